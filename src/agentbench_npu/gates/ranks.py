"""ranks: every data-parallel trainer rank holds the same weights after every step.

(The loss each rank reports is all-reduced, so equal by construction; the parameter checksum is what can
disagree, when a rank's update differs.)"""

from __future__ import annotations

from ..config import RunConfig
from ..types import GateResult
from .base import GateContext, first_problem


class RanksGate:
    name = "ranks"
    description = "with data-parallel trainers: parameter checksum identical across ranks every step"
    requirement = "a training run (--mode train) with >= 2 data-parallel trainer ranks"

    def applies(self, config: RunConfig) -> bool:
        return config.data_parallel >= 2 and config.run.mode == "train"

    def evaluate(self, ctx: GateContext) -> GateResult:
        problems = []
        ranks = 0
        for s in ctx.steps:
            sums = s.get("rank_checksums") or []
            ranks = max(ranks, len(sums))
            if len(sums) < 2:
                problems.append(f"step {s['step']}: {len(sums)} rank(s) reported; expected "
                                f"{ctx.config.cluster.train_devices}")
                continue
            if len(set(sums)) > 1:
                odd = [r for r, c in enumerate(sums) if c != sums[0]]
                problems.append(f"step {s['step']}: parameter checksums differ across ranks (rank 0 {sums[0]}, "
                                f"rank {odd[0]} {sums[odd[0]]})")
        value = {"ranks": ranks, "divergent_steps": len({p.split(':')[0] for p in problems})}
        threshold = {"divergent_steps": 0}
        if problems:
            return GateResult(self.name, False, value, threshold,
                              first_problem(problems))
        return GateResult(self.name, True, value, threshold,
                          f"{ranks} ranks hold identical weights at all {len(ctx.steps)} steps")
