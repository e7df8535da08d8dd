"""moe_health: a mixture-of-experts model trains without NaN/Inf and its routers stay healthy, every step.

Read from the trainer's old-log-prob pass (training/trainer.py, models/moe.py): non-finite log-probs, loss,
gradients or router logits; the share of dead experts (no token in the step), the load imbalance of the worst
layer (its coefficient of variation over that of a total collapse) and the mean router entropy over log(E).
"""

from __future__ import annotations

import math
from typing import Any

from ..config import RunConfig
from ..models.moe import model_is_moe
from ..report.schema import nan_if_null
from ..types import GateResult
from .base import GateContext, first_problem

NONFINITE = (("nonfinite_logprobs", "log-probs of trainable tokens"), ("nonfinite_loss", "micro-batch losses"),
             ("moe_nonfinite_router_logits", "(token, layer) router logits"), ("skipped_updates", "skipped updates"))


class MoeHealthGate:
    name = "moe_health"
    description = "MoE models: no NaN/Inf in logits, loss or grads; no dead experts, collapsed load or saturated routers"
    requirement = "a training run (--mode train) of a mixture-of-experts model (e.g. --model tiny-moe)"

    def applies(self, config: RunConfig) -> bool:
        return (config.run.steps >= 1 and config.run.mode == "train" and config.run.policy == "model"
                and model_is_moe(config.model.name))

    def evaluate(self, ctx: GateContext) -> GateResult:
        g = ctx.config.gates
        threshold = {"nonfinite": 0, "dead_fraction": g.moe_dead_fraction, "load_imbalance": g.moe_load_imbalance,
                     "router_entropy_min": g.moe_router_entropy_min}
        problems: list[str] = []
        worst: dict[str, Any] = {"nonfinite": 0, "dead_fraction": 0.0, "load_imbalance": 0.0,
                                 "router_entropy_min": None}
        for s in ctx.steps:
            step = s["step"]
            for key, what in NONFINITE:
                count = int(s.get(key) or 0)
                if key == "skipped_updates" and not s.get("trainable_tokens", 1):
                    continue  # a step with nothing to train skips its update for that reason (reported below)
                worst["nonfinite"] += count
                if count:
                    problems.append(f"step {step}: {count} non-finite {what}" if key != "skipped_updates" else
                                    f"step {step}: {count} optimizer step(s) skipped for non-finite gradients")
            if "moe_dead_fraction" not in s:
                aborted = s.get("aborted_fraction", 0.0)
                if s.get("trainable_tokens", 0):
                    problems.append(f"step {step}: no routing statistics although tokens were trained: the trainer "
                                    "could not hook this model's routers")
                else:
                    problems.append(f"step {step}: no routing statistics: nothing was trained"
                                    + (f" ({aborted:.0%} of requests aborted: the engine's logits were not finite)"
                                       if aborted else ""))
                continue
            dead, imbalance = nan_if_null(s["moe_dead_fraction"]), nan_if_null(s["moe_load_imbalance"])
            entropy = nan_if_null(s["moe_router_entropy"]) / s["moe_router_entropy_max"]
            worst["dead_fraction"] = max(worst["dead_fraction"], dead)
            worst["load_imbalance"] = max(worst["load_imbalance"], imbalance)
            worst["router_entropy_min"] = entropy if worst["router_entropy_min"] is None else min(
                worst["router_entropy_min"], entropy)
            if not dead <= g.moe_dead_fraction:
                problems.append(f"step {step}: {s['moe_dead_experts']} dead experts ({dead:.0%} of layer x expert "
                                f"pairs got no token) > {g.moe_dead_fraction:.0%}")
            if not imbalance <= g.moe_load_imbalance:
                problems.append(f"step {step}: expert load imbalance {imbalance:.2f} > {g.moe_load_imbalance:g} "
                                f"(load CV {s['moe_load_cv']:.2f}; 1.0 = all tokens on the same experts)")
            if not entropy >= g.moe_router_entropy_min:
                problems.append(f"step {step}: router entropy {entropy:.3f} of its maximum < "
                                f"{g.moe_router_entropy_min:g} (saturated routers)")
        if problems:
            return GateResult(self.name, False, worst, threshold, first_problem(problems))
        entropy = worst["router_entropy_min"]
        return GateResult(self.name, True, worst, threshold,
                          f"{len(ctx.steps)} steps finite; worst load imbalance {worst['load_imbalance']:.2f}, "
                          f"dead {worst['dead_fraction']:.0%}, router entropy >= "
                          f"{entropy if entropy is not None and math.isfinite(entropy) else 0:.2f} of max")
