"""Megatron ranks on the CPU for tests: `fn` in N spawned processes joined by a gloo group.

Each process points megatron-core's CUDA-only calls at the CPU as the Megatron trainer does on the CPU
(training/megatron/backend.run_on_cpu); on cuda and npu nothing is patched.
"""

from __future__ import annotations

import io
import os
from typing import Any, Callable

import torch

from agentbench_npu.training.megatron.backend import run_on_cpu
from tests.support.servers import free_port


def _rank_main(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        run_on_cpu()
        result: Any = fn(rank, *args)
    except BaseException as exc:  # the parent re-raises it with the rank named
        result = exc
    buffer = io.BytesIO()  # as bytes: tensors sent as shared memory would vanish with this process
    torch.save(result, buffer)
    queue.put((rank, buffer.getvalue()))
    dist.destroy_process_group()


def spawn_ranks(world: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """Run `fn(rank, *args)` in `world` processes joined by a gloo group; their results by rank."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    for _ in procs:
        rank, value = queue.get(timeout=600)
        results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    for p in procs:
        p.join(timeout=60)
    for rank, value in sorted(results.items()):
        if isinstance(value, BaseException):
            raise AssertionError(f"rank {rank} failed: {value!r}") from value
    return [results[r] for r in range(world)]
