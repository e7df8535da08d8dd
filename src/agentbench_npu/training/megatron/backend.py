"""The Megatron trainer backend (run.trainer = "megatron"): a trainer rank's model, groups and data-parallel group.

The GRPO step itself is the torch trainer's (training/trainer.py): it trains a MegatronCausalLM as it trains a
transformers model, asks it to finish its gradients (the TP reductions Megatron's own loop does) and reduces
them over the data-parallel group Megatron defines.

megatron-core targets CUDA (and Ascend through MindSpeed). On the CPU — the tiny profile on a laptop, the
tests — two of its CUDA-only calls on the forward path are pointed at the CPU (`run_on_cpu`); on cuda and npu
nothing is patched.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import socket
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from ...errors import UserError
from .config import Parallel, require_megatron, transformer_config
from .model import MegatronCausalLM, check_split, initialize, load_megatron_lm

CPU_TESTED = "0.12."  # the megatron-core line whose CUDA-only calls run_on_cpu knows


def parallel_for(config: Any, world_size: int) -> Parallel:
    m = config.megatron
    return Parallel.for_world(world_size, tp=m.tensor_parallel, pp=m.pipeline_parallel, ep=m.expert_parallel)


def preflight(config: Any, device_name: str, model_dir: Path, world_size: int) -> None:
    """What can be refused before any worker starts: the extra, the model on this device, the split of it."""
    require_megatron(device_name)
    hf = json.loads((model_dir / "config.json").read_text())
    parallel = parallel_for(config, world_size)
    transformer_config(hf, parallel)  # TP must divide the heads, EP the experts
    check_split(hf, parallel)


def start(config: Any, device_name: str, dist_backend: str, torch_device: torch.device, model_dir: Path,
          world_size: int) -> tuple[MegatronCausalLM, Any, Parallel]:
    """This rank's model and its data-parallel group (None on one rank); joins a one-rank process group first
    when the executor started none (the local executor). The driver ran `preflight` before any worker started;
    `initialize` imports Megatron here (MindSpeed's adaptor first on npu)."""
    warnings.filterwarnings("ignore", message="Apex is not installed")  # megatron-core falls back to torch norms
    if device_name == "cpu":
        run_on_cpu()
    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.distributed.init_process_group(dist_backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                             world_size=1, timeout=timedelta(seconds=120))
    parallel = parallel_for(config, world_size)
    initialize(parallel, device_name, config.run.seed)
    model = load_megatron_lm(model_dir, parallel, config.model.dtype, torch_device)
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group() if parallel.dp > 1 else None
    return model, group, parallel


def data_rank(parallel: Parallel) -> int:
    """Which data shard this rank trains on: TP ranks of one model replica share theirs."""
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank() if parallel.dp > 1 else 0


def shard_rank(parallel: Parallel) -> int:
    """This rank's part of the model (its optimizer state's file in a checkpoint): tp + TP x ep, which is its
    global rank among the first TP x EP ranks (Megatron orders ranks TP first, then EP)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_rank() if parallel.tp > 1 else 0
    ep = ps.get_expert_model_parallel_rank() if parallel.ep > 1 else 0
    return tp + parallel.tp * ep


def stop() -> None:
    """Megatron's groups and the process group this backend started, so that a later run can start afresh."""
    with contextlib.suppress(Exception):
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


_PATCHED = False


def run_on_cpu() -> None:
    """Point megatron-core's CUDA-only calls on the forward path at the CPU, once per process.

    - RotaryEmbedding.forward moves its frequencies to `torch.cuda.current_device()`: here that is "cpu";
    - DotProductAttention forks the CUDA RNG tracker around attention dropout (0 in our configs): a no-op fork.
    """
    global _PATCHED
    if _PATCHED:
        return
    version = importlib.metadata.version("megatron-core")
    if not version.startswith(CPU_TESTED):
        raise UserError(f"the Megatron trainer on the CPU knows megatron-core {CPU_TESTED}x, and {version} is "
                        f"installed: pip install 'megatron-core=={CPU_TESTED}1', or run it on cuda or npu")
    if torch.cuda.is_available():
        raise UserError("the Megatron trainer on the CPU of a machine with CUDA: run it on the GPU (--device cuda)")
    import megatron.core.tensor_parallel as tensor_parallel

    class _NoFork:
        def fork(self, name: str = "") -> contextlib.AbstractContextManager:
            return contextlib.nullcontext()

    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]  (no CUDA here: nothing else asks)
    tensor_parallel.get_cuda_rng_tracker = lambda *a, **k: _NoFork()
    _PATCHED = True
