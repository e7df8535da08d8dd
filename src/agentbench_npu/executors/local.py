"""The local executor: one trainer and one engine in this process, weights synced in memory."""

from __future__ import annotations

from typing import Any, Sequence

from ..config import RunConfig
from ..devices import Device
from ..sync import ColocateSync, SyncResult
from ..types import Trajectory
from .base import Cluster
from .workers import EngineWorker, TrainWorker, WorkerSpec


class LocalCluster(Cluster):
    def __init__(self, config: RunConfig, device: Device, engine_factory: Any, faults: list):
        self.config = config
        self.device = device
        self.engine_factory = engine_factory
        self.faults = faults
        self.transport = ColocateSync()

    def start(self, model_dir: str, resume_from: str = "") -> dict[str, Any]:
        spec = WorkerSpec(config=self.config, model_dir=model_dir, device=self.device, resume_from=resume_from,
                          faults=self.faults)
        self.trainer = TrainWorker(spec)
        self.engine_worker = EngineWorker(spec)
        # engine first: the trainer's set-up restores the checkpoint's RNG state last
        self.engine_worker.setup(self.engine_factory)
        state = self.trainer.setup()
        self.engine = self.engine_worker.engine
        self.engine.weight_version = int(state.get("weight_version", 0))
        return state

    def train_step(self, trajs: Sequence[Trajectory]) -> dict[str, Any]:
        # a server engine (SGLang) gives its device memory to the trainer for the step; the weights are re-sent
        # after. The in-process engine shares this process's memory with the trainer: nothing to hand over.
        released = False
        if self.config.engine.release_memory and getattr(self.engine, "colocated_release", False):
            released = self.engine_worker.release_memory()
        try:
            metrics = self.trainer.train_step(trajs)
        finally:
            if released:
                self.engine_worker.resume_memory()
        return {**metrics, "rank_losses": [metrics["loss"]], "rank_checksums": [metrics["weights_checksum"]],
                "engine_memory_released": released}

    def sync_weights(self) -> SyncResult:
        return self.transport.push(self.trainer.model, self.engine)

    def trainer_logprobs(self, trajs: Sequence[Trajectory]) -> list[list[float]]:
        return self.trainer.logprobs_for(trajs)

    def save_checkpoint(self, path: str, state: dict[str, Any]) -> None:
        self.trainer.save_checkpoint(path, state, self.trainer.rng_state())

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    def shutdown(self) -> None:
        """Drop the models and optimizer so that the gates' own runs get the device memory back."""
        import gc

        for role in ("engine_worker", "trainer"):
            worker = self.__dict__.get(role)
            if worker is not None:
                worker.close()
        for name in ("trainer", "engine_worker", "engine"):
            self.__dict__.pop(name, None)
        gc.collect()
        module = self.device.module()
        if module is not None and hasattr(module, "empty_cache"):
            module.empty_cache()

    def describe(self) -> dict[str, Any]:
        engine = self.engine_factory.name
        return {"executor": "local", "mode": "colocate", "train_ranks": 1, "engines": 1, "engine": engine,
                "sync": getattr(self.engine_factory, "colocated_transport", "colocate"), **self.trainer.describe()}
