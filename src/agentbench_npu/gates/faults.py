"""Faults that break a run the way real bugs do, so that each gate is shown to catch its kind of bug.

`run --inject-fault NAME` applies a fault to the live components once they are set up; reruns a gate
asks for inherit it (it is part of the recipe). Each fault names the gate meant to catch it and the
gates that may honestly fail with it; every other gate must still pass (tests/e2e/test_fault_matrix.py).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import RunConfig


@dataclass(frozen=True)
class Fault:
    name: str
    description: str
    caught_by: str
    inject: Callable[[Any], None]
    also_affects: tuple[str, ...] = ()
    # returns why the fault could not change this run (then injecting it is refused), or None
    cannot_bite: Callable[[RunConfig], str | None] = lambda config: None


def _logprob_temperature(runner: Any) -> None:
    """The engine samples at temperature T but reports log-probs of the untempered distribution."""

    def reported(logits: torch.Tensor, logprobs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, chosen[:, None])[:, 0]

    runner.engine._reported_logprobs = reported


def _needs_temperature(config: RunConfig) -> str | None:
    t = config.rollout.temperature
    return None if t not in (0.0, 1.0) else f"rollout.temperature is {t}; set it to another value, e.g. 0.8"


def _stale_weights(runner: Any) -> None:
    """The engine acknowledges the first weight update after training started without applying it."""
    engine = runner.engine
    original = engine.update_weights_from_tensors
    skipped = []

    def update(named: Any, version: int | None = None) -> int:
        if not skipped:
            skipped.append(True)
            engine.weight_version += 1
            return engine.weight_version
        return original(named, version)

    engine.update_weights_from_tensors = update


def _partial_sync(runner: Any) -> None:
    """Every weight update loses its last tensor on the way (a dropped bucket)."""
    engine = runner.engine
    original = engine.update_weights_from_tensors

    def update(named: Any, version: int | None = None) -> int:
        return original(list(named)[:-1], version)

    engine.update_weights_from_tensors = update


def _unseeded_sampling(runner: Any) -> None:
    """The engine ignores per-request seeds and samples from OS entropy."""
    engine = runner.engine

    def generator(params: Any) -> torch.Generator:
        return torch.Generator(device=engine.device).manual_seed(int.from_bytes(os.urandom(7), "big"))

    engine._generator = generator


def _drop_optimizer_state(runner: Any) -> None:
    """Checkpoints are written without the optimizer's moments (state), only its hyper-parameters."""
    trainer = runner.trainer
    original = trainer.state_dict

    def state_dict() -> dict[str, Any]:
        state = original()
        optimizer = dict(state["optimizer"])
        optimizer["state"] = {}
        return {**state, "optimizer": optimizer}

    trainer.state_dict = state_dict


def _skip_rng_restore(runner: Any) -> None:
    """A resumed run does not restore the RNG states it saved: its streams restart from the seed."""
    if runner.checkpoint is not None:
        runner.device.seed(runner.config.run.seed)


def _needs_global_rng(config: RunConfig) -> str | None:
    if config.train.get("num_minibatches", 1) > 1 and config.train.get("shuffle_minibatches", True):
        return None
    return "nothing in this run draws from the global RNG after a resume; set train.num_minibatches=2"


def _shuffled_data_order(runner: Any) -> None:
    """Each step's tasks come in an order shuffled by an unseeded RNG (a data loader without a seed)."""
    original = runner._tasks
    rng = random.Random(os.urandom(16))

    def tasks(count: int) -> list:
        drawn = original(count)
        rng.shuffle(drawn)
        return drawn

    runner._tasks = tasks


FAULTS = (
    Fault("logprob-temperature", "engine reports log-probs without the sampling temperature applied",
          "logprob_alignment", _logprob_temperature, also_affects=("weight_sync",), cannot_bite=_needs_temperature),
    # an engine that lost weights cannot be resumed into: the resumed run's engine starts from the
    # checkpoint, so continuity honestly differs too
    Fault("stale-weights", "one weight sync is acknowledged but not applied", "weight_sync",
          _stale_weights, also_affects=("logprob_alignment", "checkpoint_continuity")),
    Fault("partial-sync", "one tensor is missing from every weight sync", "weight_sync",
          _partial_sync, also_affects=("logprob_alignment", "checkpoint_continuity")),
    Fault("unseeded-sampling", "the engine ignores per-request sampling seeds", "reproducibility",
          _unseeded_sampling, also_affects=("checkpoint_continuity",)),
    Fault("drop-optimizer-state", "checkpoints are saved without the optimizer moments", "checkpoint_continuity",
          _drop_optimizer_state),
    Fault("skip-rng-restore", "resume does not restore the saved RNG states", "checkpoint_continuity",
          _skip_rng_restore, cannot_bite=_needs_global_rng),
    Fault("shuffled-data-order", "tasks are shuffled by an unseeded RNG", "reproducibility",
          _shuffled_data_order, also_affects=("checkpoint_continuity",)),
)
