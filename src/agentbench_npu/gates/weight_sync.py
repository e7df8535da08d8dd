"""weight_sync: after every sync the engine holds the trainer's weights, by checksum and by behaviour."""

from __future__ import annotations

from ..config import RunConfig
from ..types import GateResult
from .base import GateContext, exceeds, first_problem


class WeightSyncGate:
    name = "weight_sync"
    description = "after each sync: checksums equal and engine log-probs on a probe batch equal the trainer's"
    requirement = "at least one step"

    def applies(self, config: RunConfig) -> bool:
        return config.run.steps >= 1

    def evaluate(self, ctx: GateContext) -> GateResult:
        limit = ctx.thresholds["sync_probe_max"]
        steps = ctx.steps
        mismatched = [s["step"] for s in steps if not s["weights_checksum_match"]]
        probe_max = max(s.get("sync_probe_abs_diff_max", 0.0) for s in steps)
        seconds = [s["weight_sync_seconds"] for s in steps]
        value = {"checksum_mismatches": len(mismatched), "probe_max": probe_max,
                 "seconds_mean": sum(seconds) / len(seconds), "seconds_max": max(seconds)}
        threshold = {"checksum_mismatches": 0, "probe_max": limit}
        problems = []
        for s in steps:
            if not s["weights_checksum_match"]:
                problems.append(f"step {s['step']}: engine checksum {s.get('weights_checksum')} != trainer "
                                f"{s.get('trainer_weights_checksum')} after sync (version {s.get('weight_version')})")
            if exceeds(s.get("sync_probe_abs_diff_max", 0.0), limit):
                problems.append(f"step {s['step']}: probe |engine - trainer| log-prob max "
                                f"{s['sync_probe_abs_diff_max']:.3g} > {limit:g}")
        if problems:
            return GateResult(self.name, False, value, threshold, first_problem(problems))
        return GateResult(self.name, True, value, threshold,
                          f"{len(steps)} syncs verified; {value['seconds_mean'] * 1000:.1f} ms mean")
