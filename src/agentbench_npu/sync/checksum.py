"""Checksums of model weights that both sides of a weight sync compute the same way.

Each tensor's raw bits are multiplied by position-dependent odd weights and summed on the tensor's own
device (no copy to host), so a flipped bit, a swapped pair or a stale tensor changes the digest; the per-tensor digests, names, shapes and dtypes are then hashed with SHA-256.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 22
_WEIGHTS: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _position_weights(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Odd pseudo-random weights, one per position in a chunk; built once per device."""
    key = (str(device), dtype)
    if key not in _WEIGHTS:
        pos = torch.arange(_CHUNK, dtype=torch.int64, device=device)
        _WEIGHTS[key] = ((pos * 2654435761 + 97) % 2147483647 * 2 + 1).to(dtype)
    return _WEIGHTS[key]


def tensor_digest(tensor: torch.Tensor) -> int:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    elif flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    bits = flat.view(_INT_VIEW[flat.element_size()])
    # 8-byte values keep int64 arithmetic; narrower ones are widened to int32, where the products wrap
    work = torch.int64 if bits.dtype == torch.int64 else torch.int32
    weights = _position_weights(flat.device, work)
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for k, start in enumerate(range(0, bits.numel(), _CHUNK)):
        chunk = bits[start:start + _CHUNK]
        chunk = chunk if chunk.dtype == work else chunk.to(work)
        total += (chunk * weights[:chunk.numel()]).sum(dtype=torch.int64) * (2 * k + 1)
    return int(total.item())


def weights_checksum(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A hex digest over (name, dtype, shape, bits) of every tensor, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{tensor_digest(tensor)};".encode())
    return h.hexdigest()[:16]
