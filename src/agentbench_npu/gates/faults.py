"""Faults that break a run the way real bugs do, so that each gate is shown to catch its kind of bug.

`run --inject-fault NAME` applies a fault to the live components once they are set up; reruns a gate
asks for inherit it (it is part of the recipe). Each fault names the gate meant to catch it and the
gates that may honestly fail with it; every other gate must still pass (tests/e2e/test_fault_matrix.py).
"""

from __future__ import annotations

import json
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
    role: str  # what inject() receives: "engine" (EngineWorker), "trainer" (TrainWorker) or "driver" (Runner)
    inject: Callable[[Any], None]
    also_affects: tuple[str, ...] = ()
    # returns why the fault could not change this run (then injecting it is refused), or None
    cannot_bite: Callable[[RunConfig], str | None] = lambda config: None


def _logprob_temperature(worker: Any) -> None:
    """The engine samples at temperature T but reports log-probs of the untempered distribution."""

    def reported(logits: torch.Tensor, logprobs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, chosen[:, None])[:, 0]

    worker.engine._reported_logprobs = reported


def _needs_temperature(config: RunConfig) -> str | None:
    t = config.rollout.temperature
    return None if t not in (0.0, 1.0) else f"rollout.temperature is {t}; set it to another value, e.g. 0.8"


def _stale_weights(worker: Any) -> None:
    """The engine acknowledges one weight update (the first after training starts) without applying it."""
    engine = worker.engine
    original = engine.update_weights_from_tensors
    calls = []

    def update(named: Any, version: int | None = None) -> int:
        calls.append(True)
        if len(calls) == 2:  # call 1 is the initial sync before any training
            engine.weight_version += 1
            return engine.weight_version
        return original(named, version)

    engine.update_weights_from_tensors = update


def _partial_sync(worker: Any) -> None:
    """Every weight update loses its last tensor on the way (a dropped bucket)."""
    engine = worker.engine
    original = engine.update_weights_from_tensors

    def update(named: Any, version: int | None = None) -> int:
        return original(list(named)[:-1], version)

    engine.update_weights_from_tensors = update


def _unseeded_sampling(worker: Any) -> None:
    """The engine ignores per-request seeds and samples from OS entropy."""
    engine = worker.engine

    def generator(params: Any) -> torch.Generator:
        return torch.Generator(device=engine.device).manual_seed(int.from_bytes(os.urandom(7), "big"))

    engine._generator = generator


def _drop_optimizer_state(worker: Any) -> None:
    """Checkpoints are written without the optimizer's moments (state), only its hyper-parameters."""
    trainer = worker.trainer
    original = trainer.state_dict

    def state_dict() -> dict[str, Any]:
        state = original()
        optimizer = dict(state["optimizer"])
        optimizer["state"] = {}
        return {**state, "optimizer": optimizer}

    trainer.state_dict = state_dict


def _skip_rng_restore(worker: Any) -> None:
    """A resumed run does not restore the RNG states it saved: its streams restart from the seed."""
    if worker.resumed:
        worker.device.seed(worker.config.run.seed)


def _needs_global_rng(config: RunConfig) -> str | None:
    if config.train.get("num_minibatches", 1) > 1 and config.train.get("shuffle_minibatches", True):
        return None
    return "nothing in this run draws from the global RNG after a resume; set train.num_minibatches=2"


def _rank_divergence(worker: Any) -> None:
    """Trainer rank 1 joins the gradient all-reduce but then steps with its own local gradients."""
    if worker.rank != 1:
        return
    trainer = worker.trainer
    original = trainer._reduce_gradients

    def reduce_but_keep_local() -> None:
        local = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
        original()
        for grad, mine in zip((p.grad for p in trainer.model.parameters() if p.grad is not None), local):
            grad.copy_(mine)

    trainer._reduce_gradients = reduce_but_keep_local


def _needs_ranks(config: RunConfig) -> str | None:
    n = config.data_parallel
    if n >= 2:
        return None
    if config.run.trainer == "megatron":
        return (f"the Megatron trainer has {n} data-parallel rank(s) (cluster.train_devices / "
                "megatron.tensor_parallel); it needs at least 2")
    return f"cluster.train_devices is {n}; it needs at least 2 data-parallel ranks"


def _unsummed_tp_norm_grads(worker: Any) -> None:
    """Tensor-parallel ranks step their q/k-norm weights with the gradient of their own heads only (the sum over
    ranks that Megatron's loop does is skipped): the ranks' copies of those weights drift apart."""
    worker.model.finish_gradients = lambda: None


def _needs_tensor_parallel(config: RunConfig) -> str | None:
    if config.run.trainer != "megatron" or config.megatron.tensor_parallel == 1:
        return "it breaks the Megatron trainer's tensor parallelism; use --trainer megatron with megatron.tensor_parallel=2"
    from ..training.megatron.model import has_transformer_engine

    if has_transformer_engine():  # sequence parallelism: every replicated tensor's gradient is partial
        return None
    from ..models.loading import resolve_model_dir

    try:
        model_type = json.loads((resolve_model_dir(config.model.name, config.model.seed) / "config.json").read_text())
    except Exception:  # an unusable model is reported where it is loaded
        return None
    if str((model_type.get("text_config") or model_type).get("model_type", "")).startswith("qwen3"):
        return None
    return (f"model '{config.model.name}' has no q/k norms, the only tensors whose gradients TP ranks hold in part "
            "without Transformer Engine's sequence parallelism; use a Qwen3 model (tiny)")


def _shuffled_data_order(runner: Any) -> None:
    """Each step reads its tasks from a place in the data chosen by an unseeded RNG (a data loader that
    shuffles without the run's seed); the cursor still advances as if nothing were wrong."""
    original = runner._tasks
    rng = random.Random(os.urandom(16))

    def tasks(count: int) -> list:
        start = runner.cursor
        runner.cursor = rng.randrange(1, 1 << 40)
        try:
            return original(count)
        finally:
            runner.cursor = start + count

    runner._tasks = tasks


def _corrupt_routing(worker: Any) -> None:
    """Routing replay uses the wrong experts: every recorded expert id is shifted by one (mod num_experts)."""
    worker.trainer.corrupt_routes = 1


def _needs_replay(config: RunConfig) -> str | None:
    from ..models.moe import model_is_moe

    if not model_is_moe(config.model.name):
        return f"model '{config.model.name}' is dense: it has no routes to replay; use an MoE model (tiny-moe)"
    if not config.train.get("routing_replay", False):
        return "train.routing_replay is off, so no recorded route is replayed; run scenario r3 or set it to true"
    return None


def _nan_expert(worker: Any) -> None:
    """One expert's weights turn NaN in the trainer just before its first training step (a corrupt shard, an
    overflowing kernel): what trains on it, and the engine it is synced to, meet NaN."""
    from ..models.moe import routers

    trainer = worker.trainer
    original = trainer.train_step

    def train_step(trajs: Any) -> dict[str, Any]:
        if not getattr(trainer, "_nan_expert_done", False):
            trainer._nan_expert_done = True
            _, router = routers(trainer.model)[0]
            layer = next(m for m in trainer.model.modules() if getattr(m, "gate", None) is router)
            with torch.no_grad():
                for param in layer.experts.parameters():  # fused [experts, ...] tensors: expert 0's slices
                    param[0].fill_(float("nan"))
        return original(trajs)

    trainer.train_step = train_step


def _needs_moe(config: RunConfig) -> str | None:
    from ..models.moe import model_is_moe

    if model_is_moe(config.model.name):
        return None
    return f"model '{config.model.name}' is dense: it has no experts; use an MoE model (tiny-moe, scenario moe)"


FAULTS = (
    Fault("logprob-temperature", "engine reports log-probs without the sampling temperature applied",
          "logprob_alignment", "engine", _logprob_temperature, also_affects=("weight_sync",), cannot_bite=_needs_temperature),
    # an engine that lost weights cannot be resumed into: the resumed run's engine starts from the
    # checkpoint, so continuity honestly differs too
    Fault("stale-weights", "one weight sync is acknowledged but not applied", "weight_sync", "engine",
          _stale_weights, also_affects=("logprob_alignment", "checkpoint_continuity"),
          cannot_bite=lambda c: "an eval run (--mode eval) syncs weights once, before any update" if c.run.mode == "eval" else None),
    Fault("partial-sync", "one tensor is missing from every weight sync", "weight_sync", "engine",
          _partial_sync, also_affects=("logprob_alignment", "checkpoint_continuity")),
    Fault("unseeded-sampling", "the engine ignores per-request sampling seeds", "reproducibility", "engine",
          _unseeded_sampling, also_affects=("checkpoint_continuity",)),
    Fault("drop-optimizer-state", "checkpoints are saved without the optimizer moments", "checkpoint_continuity", "trainer",
          _drop_optimizer_state),
    Fault("skip-rng-restore", "resume does not restore the saved RNG states", "checkpoint_continuity", "trainer",
          _skip_rng_restore, cannot_bite=_needs_global_rng),
    Fault("shuffled-data-order", "tasks are drawn in an order shuffled by an unseeded RNG", "reproducibility", "driver",
          _shuffled_data_order, also_affects=("checkpoint_continuity",)),
    Fault("rank-divergence", "one trainer rank steps with its local gradients instead of the all-reduced ones",
          "ranks", "trainer", _rank_divergence, also_affects=("logprob_alignment", "weight_sync"),
          cannot_bite=_needs_ranks),
    # the engine gets rank 0's q/k norms, the trainer computes each rank's heads with that rank's own
    Fault("unsummed-tp-norm-grads", "tensor-parallel ranks skip summing their q/k-norm gradients", "weight_sync",
          "trainer", _unsummed_tp_norm_grads, also_affects=("logprob_alignment", "checkpoint_continuity"),
          cannot_bite=_needs_tensor_parallel),
    # the probe's trainer log-probs replay the same corrupted routes, so the sync probe disagrees too
    Fault("corrupt-routing", "routing replay shifts every recorded expert id by one", "logprob_alignment", "trainer",
          _corrupt_routing, also_affects=("weight_sync",), cannot_bite=_needs_replay),
    # NaN weights reach the engine with the next sync: it aborts what it cannot sample, nothing trains after
    Fault("nan-expert", "one expert's weights become NaN before the first training step", "moe_health", "trainer",
          _nan_expert, also_affects=("logprob_alignment", "weight_sync", "reproducibility", "checkpoint_continuity"),
          cannot_bite=_needs_moe),
)


def selected_faults(config: RunConfig, lookup: Callable[[str], Fault], gates: dict[str, Any],
                    judged: bool) -> list[Fault]:
    """The faults `run.faults` names (`lookup` finds one or says it is unknown), each refused (UserError) if it
    could not change this run. `judged`: gates judge this run (a gate's own second run carries them along)."""
    from ..errors import UserError

    chosen = []
    for name in config.run.faults:
        fault = lookup(name)
        reason = fault.cannot_bite(config)
        if reason is None and fault.role == "engine" and config.run.engine != "reference":
            reason = (f"it breaks the in-process engine, and this run's engine is '{config.run.engine}'; "
                      "inject it with --engine reference")
        catcher = gates.get(fault.caught_by)
        if reason is None and judged and catcher is not None and not catcher.applies(config):
            reason = f"the gate that catches it ({fault.caught_by}) does not apply: it needs {catcher.requirement}"
        if reason:
            raise UserError(f"fault '{name}' would not change this run: {reason}")
        chosen.append(fault)
    return chosen
