"""The cluster interface the runner talks to, whatever executor is behind it."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Sequence

from ..config import RunConfig
from ..devices import Device
from ..engines.base import EngineClient
from ..sync import SyncResult
from ..types import Trajectory


class Cluster(ABC):
    """Trainer rank(s) and engine worker(s) of one run.

    `engine` is the EngineClient scenarios generate with. Every method is called from the driver.
    """

    engine: EngineClient

    @abstractmethod
    def start(self, model_dir: str, resume_from: str = "") -> dict[str, Any]:
        """Build the workers, load weights (or a checkpoint), sync once; returns the checkpoint state."""

    @abstractmethod
    def train_step(self, trajs: Sequence[Trajectory]) -> dict[str, Any]:
        """One GRPO step over the batch (sharded across ranks); metrics include `rank_losses` and
        `rank_checksums` (one per data-parallel rank)."""

    @abstractmethod
    def sync_weights(self) -> SyncResult:
        """Push the trainer's weights to every engine and compare checksums."""

    @abstractmethod
    def trainer_logprobs(self, trajs: Sequence[Trajectory]) -> list[list[float]]:
        """The trainer's log-probs of each trajectory's response tokens."""

    @abstractmethod
    def save_checkpoint(self, path: str, state: dict[str, Any]) -> None:
        """Model, optimizer, scheduler and RNG states (of every rank) plus `state`, atomically."""

    @property
    @abstractmethod
    def weight_version(self) -> int: ...

    def describe(self) -> dict[str, Any]:
        """What report.json records about where the run ran."""
        return {}

    def shutdown(self) -> None:
        """Stop the workers."""


def preflight(config: RunConfig, device_name: str, model_dir: Path) -> None:
    """Checks that need no workers: the run fits the profile's devices (plan.py), the trainer backend's stack
    and split, the executor's stack installed and its cluster reachable."""
    if config.hardware.memory_gib:
        from ..plan import check

        check(config, json.loads((model_dir / "config.json").read_text()), config.profile)
    if config.run.trainer == "megatron":
        from ..training.megatron.backend import preflight as megatron_preflight

        megatron_preflight(config, device_name, model_dir, config.cluster.train_devices)
    if config.cluster.executor == "ray":
        from .ray import _ray, check_reachable

        _ray()
        check_reachable(config.cluster.ray_address)


def make_cluster(config: RunConfig, device: Device, engine_factory: Any, faults: list) -> Cluster:
    if config.cluster.executor == "ray":
        from .ray import RayCluster

        return RayCluster(config, device, engine_factory, faults)
    from .local import LocalCluster

    return LocalCluster(config, device, engine_factory, faults)
