"""TrainWorker and EngineWorker: plain classes that both executors use (Ray wraps them as actors).

A TrainWorker is one data-parallel trainer rank: its model copy, optimizer and GRPO step; rank 0 also
saves checkpoints and sends weights. An EngineWorker holds one inference engine. Neither knows whether it
lives in the driver process or in a Ray actor on another node.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import RunConfig
from ..devices import Device
from ..errors import UserError
from ..models.loading import load_causal_lm, load_tokenizer
from ..models.moe import model_dir_is_moe
from ..sync.base import named_weights
from ..sync.checksum import weights_checksum
from ..sync.distributed import BucketBuffers, receive_weights, send_weights, weight_specs
from ..training.checkpoint import (load_checkpoint, load_trainer_shard, optimizer_checksum, save_checkpoint,
                                   save_trainer_shard, shard_path)
from ..training.trainer import Trainer
from ..types import GenerateRequest, GenerateResult, Trajectory


@dataclass
class WorkerSpec:
    """Everything a worker needs to build itself, picklable so that Ray can ship it."""

    config: RunConfig
    model_dir: str
    device: Device
    device_index: int = 0
    rank: int = 0
    world_size: int = 1
    resume_from: str = ""  # a checkpoint dir to load
    faults: list = field(default_factory=list)  # Fault objects; each applies itself to its role


def _prepare_process(spec: WorkerSpec) -> torch.device:
    c = spec.config
    if c.run.threads:
        torch.set_num_threads(c.run.threads)
    spec.device.prepare()
    spec.device.set_deterministic(c.run.deterministic)
    spec.device.seed(c.run.seed)
    return spec.device.torch_device(spec.device_index)


class TrainWorker:
    role = "trainer"

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.config = spec.config
        self.device = spec.device
        self.rank = spec.rank
        self.data_rank = spec.rank  # which data shard it trains on (Megatron: TP ranks of a replica share one)
        self.shard_rank = 0  # its part of a model split by tensor and expert parallelism (tp + TP x ep)
        self.resumed = bool(spec.resume_from)
        self._update_group: Any = None
        self._buffers: BucketBuffers | None = None

    def setup(self, dist_address: str = "") -> dict[str, Any]:
        """Load the model (or the checkpoint) and join the data-parallel group; returns the checkpoint state."""
        c = self.config
        torch_device = _prepare_process(self.spec)
        group = None
        if self.spec.world_size > 1:
            import torch.distributed as dist

            dist.init_process_group(self.device.dist_backend, init_method=dist_address,
                                    rank=self.rank, world_size=self.spec.world_size,
                                    timeout=timedelta(seconds=120))
            group = dist.group.WORLD
        model_dir = Path(self.spec.resume_from) / "model" if self.resumed else Path(self.spec.model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        reference = None
        if c.run.trainer == "megatron":
            from ..training.megatron import backend as megatron

            self.model, group, parallel = megatron.start(c, self.device.name, self.device.dist_backend, torch_device,
                                                         model_dir, self.spec.world_size)
            self.data_rank, self.shard_rank = megatron.data_rank(parallel), megatron.shard_rank(parallel)
            if c.train.get("kl_coef", 0.0) > 0:
                reference = megatron.load_megatron_lm(Path(self.spec.model_dir), parallel, c.model.dtype, torch_device)
        else:
            self.model = load_causal_lm(model_dir, c.model.dtype, torch_device, c.model.attn_implementation)
            if c.train.get("kl_coef", 0.0) > 0:  # the KL anchor is the run's initial policy, also after a resume
                reference = load_causal_lm(Path(self.spec.model_dir), c.model.dtype, torch_device,
                                           c.model.attn_implementation)
        self.trainer = Trainer(self.model, c.train_config(), torch_device, self.tokenizer.pad_token_id,
                               process_group=group, reference=reference)
        state: dict[str, Any] = {}
        if self.resumed:
            checkpoint = load_checkpoint(Path(self.spec.resume_from))
            self.trainer.load_state_dict(load_trainer_shard(checkpoint, self.shard_rank))
            rng = checkpoint.rng.get("ranks", {}).get(str(self.rank), checkpoint.rng)
            self.device.set_rng_state(rng)
            state = checkpoint.state
        for fault in self.spec.faults:
            if fault.role == self.role:
                fault.inject(self)
        return state

    # -- training ----------------------------------------------------------------------------
    def train_step(self, trajs: Sequence[Trajectory]) -> dict[str, Any]:
        metrics = self.trainer.train_step(trajs)
        metrics["weights_checksum"] = self.checksum()
        return metrics

    def logprobs_for(self, trajs: Sequence[Trajectory]) -> list[list[float]]:
        return self.trainer.logprobs_for(trajs)

    def checksum(self) -> str:
        """This rank's weights digest, for the ranks gate; a model split over ranks digests its shards where they
        are (every rank of it calls this together) instead of gathering the whole model on every rank."""
        shards = getattr(self.model, "shard_checksum", None)
        return shards() if shards is not None else weights_checksum(self.named_weights())

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        return named_weights(self.model)

    def rng_state(self) -> dict[str, Any]:
        return self.device.rng_state()

    def describe(self) -> dict[str, Any]:
        """Which trainer holds the model, and how it is split (for the report)."""
        parallel = getattr(self.model, "parallel", None)
        return {"trainer": self.config.run.trainer, "trainer_model": type(getattr(self.model, "gpt", self.model)).__name__,
                **({"trainer_parallel": dataclasses.asdict(parallel)} if parallel is not None else {})}

    def close(self) -> None:
        """Leave the process groups the Megatron backend joined (the torch trainer's go with the process)."""
        if self.config.run.trainer == "megatron" and "model" in self.__dict__:
            from ..training.megatron import backend as megatron

            megatron.stop()

    def save_checkpoint(self, path: str, state: dict[str, Any], rng: dict[str, Any]) -> None:
        named = self.named_weights()  # (gathered once: a split model's other ranks call gather_weights meanwhile)
        for rank in range(1, self.config.model_parallel):
            if not shard_path(Path(path), rank).is_file():
                raise UserError(f"model-parallel rank {rank} left no optimizer state at "
                                f"{shard_path(Path(path), rank)}: the run dir must be on a filesystem every "
                                "trainer node shares")
        save_checkpoint(Path(path), model=self.model, tokenizer=self.tokenizer,
                        trainer_state=self.trainer.state_dict(), rng_state=rng,
                        state={**state, "weights_checksum": weights_checksum(named),
                               "optimizer_checksum": optimizer_checksum(self.trainer.optimizer)},
                        weights=dict(named) if hasattr(self.model, "named_hf_weights") else None)

    def save_trainer_shard(self, path: str) -> None:
        """A model-parallel rank's optimizer state, left beside the checkpoint rank 0 is about to write."""
        save_trainer_shard(Path(path), self.shard_rank, self.trainer.state_dict())

    def gather_weights(self) -> None:
        """Take part in gathering a split model's weights (rank 0 syncs or saves them)."""
        self.named_weights()

    def data_shard(self) -> int:
        return self.data_rank

    # -- distributed weight sync (rank 0 sends) -------------------------------------------------
    def weight_specs(self) -> list[tuple[str, tuple, str]]:
        dtype = self.config.model.engine_dtype or self.config.model.dtype
        return [(n, shape, dtype) for n, shape, _ in weight_specs(self.named_weights())]

    def join_update_group(self, host: str, port: int, world_size: int) -> None:
        from ..sync.distributed import open_group

        self._update_group = open_group(host, port, rank=0, world_size=world_size)

    def node_address(self) -> tuple[str, int]:
        return node_address()

    def node_id(self) -> str:
        return current_node_id()

    def send_weights(self, bucket_bytes: int, dtype: str) -> dict[str, Any]:
        start = time.perf_counter()
        named = [(n, t.to(_dtype(dtype)) if dtype else t) for n, t in self.named_weights()]
        if self._buffers is None:
            self._buffers = BucketBuffers(weight_specs(named), bucket_bytes)
        sent = send_weights(self._update_group, named, self._buffers)
        return {"seconds": time.perf_counter() - start, "bytes": sent, "tensors": len(named),
                "checksum": weights_checksum(named)}


class EngineWorker:
    role = "engine"

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.config = spec.config
        self.device = spec.device
        self._update_group: Any = None
        self._buffers: BucketBuffers | None = None

    def setup(self, engine_factory: Any) -> str:
        c = self.config
        torch_device = _prepare_process(self.spec)
        model_dir = Path(self.spec.resume_from) / "model" if self.spec.resume_from else Path(self.spec.model_dir)
        tokenizer = load_tokenizer(model_dir)
        # MoE models: the trainer replays or compares the engine's routes (dense engines ignore the flag)
        routes = bool(c.train.get("routing_replay") or c.train.get("routing_compare", True))
        options = {**dataclasses.asdict(c.engine), "routed_experts": routes and model_dir_is_moe(model_dir)}
        kwargs = {"options": options} if _accepts(engine_factory.create, "options") else {}  # older plugins
        self.engine = engine_factory.create(
            model_dir, tokenizer=tokenizer, dtype=c.model.engine_dtype or c.model.dtype, device=torch_device,
            seed=c.run.seed, attn_implementation=c.model.attn_implementation, **kwargs,
        )
        self.engine.return_routed_experts = routes
        for fault in self.spec.faults:
            if fault.role == self.role:
                fault.inject(self)
        return self.engine.checksum()

    def model_info(self) -> dict[str, Any]:
        import asyncio

        return asyncio.run(self.engine.model_info())

    def node_id(self) -> str:
        return current_node_id()

    def generate_batch(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        return self.engine.generate_batch(requests)

    def update_weights_from_disk(self, path: str) -> int:
        import asyncio

        return asyncio.run(self.engine.update_weights_from_disk(path))

    def checksum(self) -> str:
        return self.engine.checksum()

    def set_weight_version(self, version: int) -> None:
        self.engine.weight_version = version

    def join_update_group(self, host: str, port: int, rank: int, world_size: int,
                          specs: list[tuple[str, tuple, str]], bucket_bytes: int) -> None:
        from ..sync.distributed import open_group

        if hasattr(self.engine, "init_weights_update_group"):  # a server engine joins the group itself
            self.engine.init_weights_update_group(host, port, rank, world_size, backend="gloo")
            self._specs = specs
            return
        self._update_group = open_group(host, port, rank=rank, world_size=world_size)
        self._buffers = BucketBuffers(specs, bucket_bytes)

    def receive_weights(self) -> dict[str, Any]:
        start = time.perf_counter()
        if hasattr(self.engine, "update_weights_from_distributed"):
            version = self.engine.update_weights_from_distributed(self._specs)
        else:
            named = receive_weights(self._update_group, self._buffers)
            version = self.engine.update_weights_from_tensors(named)
        return {"seconds": time.perf_counter() - start, "checksum": self.engine.checksum(), "version": version}

    def release_memory(self) -> bool:
        """Colocated: give the device memory to the trainer; True once the engine said it did."""
        self.engine.release_memory_occupation()
        return bool(getattr(self.engine, "memory_released", True))

    def resume_memory(self) -> None:
        self.engine.resume_memory_occupation()

    def close(self) -> None:
        """Stop what the engine started (a server process); in-process engines hold nothing to stop."""
        close = getattr(getattr(self, "engine", None), "close", None)
        if close is not None:
            close()


def _accepts(fn: Any, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def current_node_id() -> str:
    """The Ray node this worker runs on ('local' outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except ImportError:
        return "local"


def node_address() -> tuple[str, int]:
    """This node's address as Ray knows it (loopback outside Ray) and a free port on it."""
    import socket

    try:
        import ray

        host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    except ImportError:
        host = "127.0.0.1"
    with socket.socket() as s:
        s.bind((host, 0))
        return host, s.getsockname()[1]


def _dtype(name: str) -> torch.dtype | None:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name)
