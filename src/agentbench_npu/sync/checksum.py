"""Checksums of model weights that both sides of a weight sync compute the same way.

Each tensor's raw bits are combined with position-dependent odd weights in int64 arithmetic on the
tensor's own device (no copy to host), so a flipped bit, a swapped pair or a stale tensor changes the
digest; the per-tensor digests, names, shapes and dtypes are then hashed with SHA-256.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import torch

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 22


def tensor_digest(tensor: torch.Tensor) -> int:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    elif flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    bits = flat.view(_INT_VIEW[flat.element_size()])
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, bits.numel(), _CHUNK):
        chunk = bits[start:start + _CHUNK].to(torch.int64)
        pos = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=flat.device)
        weights = (pos * 2654435761 + 97) % 2147483647 * 2 + 1
        total += (chunk * weights).sum()
    return int(total.item())


def weights_checksum(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A hex digest over (name, dtype, shape, bits) of every tensor, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|{tensor_digest(tensor)};".encode())
    return h.hexdigest()[:16]
