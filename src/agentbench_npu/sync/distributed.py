"""Distributed weight sync: trainer rank 0 broadcasts bucketed tensors to every engine worker.

The shape of SGLang's `init_weights_update_group` + `update_weights_from_distributed`: a process group of
its own (not the trainers' data-parallel group) with the sender at rank 0 and the engines after it. Both
sides know the list of (name, shape, dtype) before the first sync, so each bucket is a flat buffer of
consecutive tensors of one dtype, packed and unpacked in the same order on both ends.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

Spec = tuple[str, tuple, str]  # name, shape, dtype name

_DTYPES = {str(t).replace("torch.", ""): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def _root(rank: int) -> Any:
    opts = dist.BroadcastOptions()
    opts.rootRank = rank
    return opts


_FROM_RANK_0 = _root(0)


def open_group(host: str, port: int, *, rank: int, world_size: int, timeout_s: float = 120.0) -> Any:
    """A gloo process group of its own (rank 0 hosts the store); usable beside a default group."""
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timedelta(seconds=timeout_s))
    return dist.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=timeout_s))


def weight_specs(named: Sequence[tuple[str, torch.Tensor]]) -> list[Spec]:
    return [(name, tuple(t.shape), str(t.dtype).replace("torch.", "")) for name, t in named]


def buckets(specs: Sequence[Spec], bucket_bytes: int) -> Iterator[list[int]]:
    """Indices of consecutive same-dtype tensors whose bytes stay within `bucket_bytes` (one at least)."""
    current: list[int] = []
    size, dtype = 0, None
    for i, (_, shape, dt) in enumerate(specs):
        nbytes = _numel(shape) * torch.empty((), dtype=_DTYPES[dt]).element_size()
        if current and (dt != dtype or size + nbytes > bucket_bytes):
            yield current
            current, size = [], 0
        current.append(i)
        size += nbytes
        dtype = dt
    if current:
        yield current


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class BucketBuffers:
    """One flat buffer per bucket, allocated on first use and reused by every later sync.

    Fresh buffers would cost a page fault per 4 KiB on every sync; reused ones are already mapped.
    """

    def __init__(self, specs: Sequence[Spec], bucket_bytes: int):
        self.specs = list(specs)
        self.plan = list(buckets(self.specs, bucket_bytes))
        self._buffers: dict[int, torch.Tensor] = {}

    def buffer(self, index: int) -> torch.Tensor:
        if index not in self._buffers:
            members = self.plan[index]
            dtype = _DTYPES[self.specs[members[0]][2]]
            self._buffers[index] = torch.empty(sum(_numel(self.specs[i][1]) for i in members), dtype=dtype)
        return self._buffers[index]


def send_weights(group: Any, named: Sequence[tuple[str, torch.Tensor]], buffers: BucketBuffers) -> int:
    """Broadcast every tensor from rank 0, bucket by bucket; returns the bytes sent."""
    sent = 0
    for index, members in enumerate(buffers.plan):
        flat = buffers.buffer(index)
        torch.cat([named[i][1].detach().reshape(-1).cpu() for i in members], out=flat)
        group.broadcast([flat], _FROM_RANK_0).wait()
        sent += flat.numel() * flat.element_size()
    return sent


def receive_weights(group: Any, buffers: BucketBuffers) -> list[tuple[str, torch.Tensor]]:
    """Receive what `send_weights` broadcasts, as named views into the buckets (valid until the next sync)."""
    out: list[tuple[str, torch.Tensor]] = []
    for index, members in enumerate(buffers.plan):
        flat = buffers.buffer(index)
        group.broadcast([flat], _FROM_RANK_0).wait()
        offset = 0
        for i in members:
            name, shape, _ = buffers.specs[i]
            n = _numel(shape)
            out.append((name, flat[offset:offset + n].view(shape)))
            offset += n
    return out
