"""reproducibility: the same scenario, seed and data run again in a fresh process gives the same run."""

from __future__ import annotations

import math

from ..config import RunConfig
from ..types import GateResult
from .base import GateContext, first_problem, relative_gap

COMPARED = ("tokens_digest", "reward_mean", "loss", "weights_checksum")


class ReproducibilityGate:
    name = "reproducibility"
    description = "a second fresh process with the same seed and data: same tokens, rewards and losses"
    requirement = "at least one step"

    def applies(self, config: RunConfig) -> bool:
        return config.run.steps >= 1

    def evaluate(self, ctx: GateContext) -> GateResult:
        tolerance = ctx.thresholds["repro_tolerance"]
        count = max(1, min(ctx.config.gates.repro_steps, ctx.config.run.steps))
        second = ctx.rerun(["--steps", str(count), "--set", "checkpoint.save=false"], ctx.run_dir / "gates" / self.name)
        first_steps = ctx.steps[:count]
        problems = compare_steps(first_steps, second["steps"], tolerance)
        threshold = {"relative_tolerance": tolerance, "steps": count}
        if problems:
            return GateResult(self.name, False, {"mismatches": len(problems)}, threshold,
                              first_problem(problems))
        how = "bitwise" if tolerance == 0 else f"within {tolerance:g}"
        return GateResult(self.name, True, {"mismatches": 0}, threshold,
                          f"{count} steps identical ({how}) in a second process")


# bit-level digests: compared only when the tolerance is 0 (bitwise); otherwise the numbers decide
HASHES = ("tokens_digest", "weights_checksum")


def compare_steps(a: list[dict], b: list[dict], tolerance: float, keys: tuple[str, ...] = COMPARED) -> list[str]:
    """Differences between two runs' step rows, matched by step number."""
    problems = []
    theirs = {row["step"]: row for row in b}
    missing = [row["step"] for row in a if row["step"] not in theirs]
    if missing or len(a) != len(b):
        problems.append(f"{len(a)} steps vs {len(b)} in the second run (missing there: {missing or 'none'})")
    for x in a:
        y = theirs.get(x["step"])
        if y is None:
            continue
        for key in keys:
            # a run's own report holds NaN where the JSON written for a second run holds null (paths.py)
            u, v = _finite(x.get(key)), _finite(y.get(key))
            if key in HASHES and tolerance > 0:
                continue
            if isinstance(u, float) and isinstance(v, float):
                gap = relative_gap(u, v)
                if gap > tolerance:
                    problems.append(f"step {x['step']}: {key} {u!r} vs {v!r} (relative gap {gap:.3g})")
            elif u != v:
                problems.append(f"step {x['step']}: {key} {u!r} vs {v!r}")
    return problems


def _finite(value: object) -> object:
    return None if isinstance(value, float) and not math.isfinite(value) else value
