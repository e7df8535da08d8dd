"""Run megatron-core's GPT model on the CPU, for tests: gloo groups and two CUDA-only calls pointed elsewhere.

megatron-core targets CUDA and hard-codes it in two places a dense or MoE forward reaches (0.12):
- RotaryEmbedding.forward moves `inv_freq` to `torch.cuda.current_device()`;
- DotProductAttention forks the CUDA RNG tracker around attention dropout (dropout is 0 in our configs).
Here `torch.cuda.current_device` answers "cpu" and the tracker's fork is a no-op, for the duration of a test.
The product never does this: on cuda and npu Megatron runs unpatched (tests/device/ runs it there).
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any, Callable

import torch

from tests.support.servers import free_port


@contextlib.contextmanager
def megatron_on_cpu():
    import megatron.core.tensor_parallel as tensor_parallel

    class _NoFork:
        def fork(self, name: str = "") -> contextlib.AbstractContextManager:
            return contextlib.nullcontext()

    saved = torch.cuda.current_device, tensor_parallel.get_cuda_rng_tracker
    torch.cuda.current_device = lambda: "cpu"
    tensor_parallel.get_cuda_rng_tracker = lambda *a, **k: _NoFork()
    try:
        yield
    finally:
        torch.cuda.current_device, tensor_parallel.get_cuda_rng_tracker = saved


def _rank_main(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with megatron_on_cpu():
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
