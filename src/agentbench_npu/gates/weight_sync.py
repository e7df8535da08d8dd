"""weight_sync: after every sync the engine holds the trainer's weights, by checksum and by behaviour."""

from __future__ import annotations

import math

from ..config import RunConfig
from ..report.schema import nan_if_null
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
        # NaN (null when read back) is a probe the engine could not answer: every request aborted
        probes = [nan_if_null(s.get("sync_probe_abs_diff_max", 0.0)) for s in steps]
        probe_max = math.nan if any(math.isnan(p) for p in probes) else max(probes)
        seconds = [s["weight_sync_seconds"] for s in steps]
        value = {"checksum_mismatches": len(mismatched), "probe_max": probe_max,
                 "seconds_mean": sum(seconds) / len(seconds), "seconds_max": max(seconds)}
        threshold = {"checksum_mismatches": 0, "probe_max": limit}
        problems = []
        for s in steps:
            if not s["weights_checksum_match"]:
                problems.append(f"step {s['step']}: engine checksum {s.get('weights_checksum')} != trainer "
                                f"{s.get('trainer_weights_checksum')} after sync (version {s.get('weight_version')})")
            probe = nan_if_null(s.get("sync_probe_abs_diff_max", 0.0))
            if exceeds(probe, limit):
                problems.append(f"step {s['step']}: probe |engine - trainer| log-prob max {probe:.3g} > {limit:g}"
                                + (" (the engine answered no probe request: all aborted)" if math.isnan(probe) else ""))
        if problems:
            return GateResult(self.name, False, value, threshold, first_problem(problems))
        return GateResult(self.name, True, value, threshold,
                          f"{len(steps)} syncs verified; {value['seconds_mean'] * 1000:.1f} ms mean")
