"""Eval runs (`--mode eval`): rollouts scored without training, pass^k over trials, a per-task table.

pass^k (τ-bench's): the chance that k trials of the same task all succeed, estimated per task from n trials with
c successes as C(c, k) / C(n, k), then averaged over tasks. pass^1 is the success rate; the curve's drop with k
is the policy's inconsistency, which one success rate hides. A trial succeeds when its reward is 1 (within 1e-6).

An eval step still compares the trainer's log-probs with the engine's on every sampled token (forward only, no
update), so the log-prob alignment gate judges an eval run as it judges a training run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .training.losses import k3
from .types import Trajectory

SUCCESS = 1.0 - 1e-6


def pass_hat_k(successes: int, trials: int, k: int) -> float:
    if not 1 <= k <= trials:
        raise ValueError(f"pass^k needs 1 <= k <= trials, got k={k}, trials={trials}")
    if not 0 <= successes <= trials:
        raise ValueError(f"pass^k needs 0 <= successes <= trials, got successes={successes}, trials={trials}")
    return math.comb(successes, k) / math.comb(trials, k)


@dataclass
class EvalRecord:
    """Every trial of an eval run, task by task, in the order they ran."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, step: int, trajs: Sequence[Trajectory], scenario: Any) -> None:
        columns = getattr(scenario, "task_result", None)
        for t in trajs:
            self.rows.append({"task_id": t.task_id, "step": step, "trial": t.metadata.get("sample"),
                              "seed": t.metadata.get("seed"), "reward": t.reward, "status": t.status,
                              **(columns(t) if columns else {})})

    def summary(self) -> dict[str, Any]:
        tasks: dict[str, list[dict[str, Any]]] = {}
        for row in self.rows:
            tasks.setdefault(row["task_id"], []).append(row)
        if not tasks:
            return {"tasks": [], "pass_hat_k": {}, "trials_per_task": 0}
        k_max = min(len(trials) for trials in tasks.values())
        table = []
        for task_id, trials in tasks.items():
            successes = sum(float(r["reward"]) >= SUCCESS for r in trials)
            table.append({"task_id": task_id, "trials": len(trials), "successes": successes,
                          "reward_mean": sum(float(r["reward"]) for r in trials) / len(trials),
                          "runs": [{k: v for k, v in r.items() if k != "task_id"} for r in trials]})
        curve = {str(k): sum(pass_hat_k(row["successes"], row["trials"], k) for row in table) / len(table)
                 for k in range(1, k_max + 1)}
        return {"tasks": sorted(table, key=lambda r: r["task_id"]), "pass_hat_k": curve, "trials_per_task": k_max,
                "reward_mean": sum(float(r["reward"]) for r in self.rows) / len(self.rows)}


def logprob_mismatch(trajs: Sequence[Trajectory], trainer_logprobs: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Train/rollout log-prob gap over trainable tokens, in the train step's own terms (|Δ| mean and max,
    k3 KL, the worst token). `trainer_logprobs[i]` covers every response token of `trajs[i]`."""
    train, rollout = [], []
    worst = None
    for t, lps in zip(trajs, trainer_logprobs):
        for position, (lp, rlp, keep) in enumerate(zip(lps, t.rollout_logprobs, t.loss_mask)):
            if not keep:
                continue
            train.append(lp)
            rollout.append(rlp)
            gap = abs(lp - rlp)
            if worst is None or gap > worst["abs_diff"]:
                worst = {"task_id": t.task_id, "sample": t.metadata.get("sample"), "response_position": position,
                         "abs_diff": gap, "train_logprob": lp, "rollout_logprob": rlp}
    if not train:
        return {"logprob_abs_diff_mean": 0.0, "logprob_abs_diff_max": 0.0, "kl": 0.0, "logprob_worst_token": None,
                "trainable_tokens": 0}
    a = torch.tensor(train, dtype=torch.float64)
    b = torch.tensor(rollout, dtype=torch.float64)
    diff = (a - b).abs()
    return {"logprob_abs_diff_mean": float(diff.mean()), "logprob_abs_diff_max": float(diff.max()),
            "kl": float(k3(a, b).mean()), "logprob_worst_token": worst, "trainable_tokens": len(train)}
