"""logprob_alignment: the engine's rollout log-probs against the trainer's recompute, every step."""

from __future__ import annotations

import math
import statistics
from typing import Any

from ..config import RunConfig
from ..types import GateResult
from .base import GateContext, exceeds, first_problem


def _where(row: dict[str, Any]) -> str:
    worst = row.get("logprob_worst_token")
    if not worst:
        return ""
    return (f"; worst token: task {worst['task_id']} sample {worst['sample']} response position "
            f"{worst['response_position']} (train {worst['train_logprob']:.6g}, rollout {worst['rollout_logprob']:.6g})")


def _worst(values: Any) -> float:
    """The largest value, NaN if any is NaN (max() would keep whichever came first)."""
    values = list(values)
    return math.nan if any(math.isnan(v) for v in values) else max(values)


class LogprobAlignmentGate:
    name = "logprob_alignment"
    description = "per step mean/max |train - rollout| log-prob over trainable tokens, k3 KL, spikes"
    requirement = "at least one step of a sampling policy (--policy gold samples nothing)"

    def applies(self, config: RunConfig) -> bool:
        return config.run.steps >= 1 and config.run.policy == "model"

    def evaluate(self, ctx: GateContext) -> GateResult:
        t = ctx.thresholds
        threshold = {"mean": t["logprob_mean"], "max": t["logprob_max"], "kl": t["logprob_kl"],
                     "spike_factor": t["spike_factor"]}
        # null in a report read back (a resumed run's history) was a NaN: it stays one here
        steps = [{**s, **{k: math.nan for k in ("logprob_abs_diff_mean", "logprob_abs_diff_max", "kl") if s.get(k) is None}}
                 for s in ctx.steps]
        value = {
            "mean": _worst(s["logprob_abs_diff_mean"] for s in steps),
            "max": _worst(s["logprob_abs_diff_max"] for s in steps),
            "kl": _worst(s["kl"] for s in steps),
        }
        problems = []
        history: list[float] = []
        for s in steps:
            step, mean = s["step"], s["logprob_abs_diff_mean"]
            if exceeds(mean, t["logprob_mean"]):
                problems.append(f"step {step}: mean |Δlogp| {mean:.3g} > {t['logprob_mean']:g}{_where(s)}")
            if exceeds(s["logprob_abs_diff_max"], t["logprob_max"]):
                problems.append(f"step {step}: a token's |Δlogp| {s['logprob_abs_diff_max']:.3g} > "
                                f"{t['logprob_max']:g}{_where(s)}")
            if exceeds(s["kl"], t["logprob_kl"]):
                problems.append(f"step {step}: k3 KL {s['kl']:.3g} > {t['logprob_kl']:g}")
            if len(history) >= 3:
                median = statistics.median(history)
                if mean > t["spike_factor"] * median and mean > t["spike_floor"]:
                    problems.append(f"step {step}: spike, mean |Δlogp| {mean:.3g} is "
                                    f"{mean / max(median, 1e-30):.1f}x the running median {median:.3g}")
            history.append(mean)
        if steps and all(s.get("trainable_tokens") == 0 for s in steps):
            problems.append("no step had a sampled token to compare: every trajectory was excluded from training "
                            "(see the scenario's prefix_break_rate) or sampled nothing")
        if problems:
            return GateResult(self.name, False, value, threshold, first_problem(problems))
        worst = max(steps, key=lambda s: s["logprob_abs_diff_mean"])
        return GateResult(self.name, True, value, threshold,
                          f"{len(steps)} steps within bounds; largest step mean {worst['logprob_abs_diff_mean']:.3g} "
                          f"at step {worst['step']}")
