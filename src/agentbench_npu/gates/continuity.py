"""checkpoint_continuity: N steps, save, a new process loads and runs M more == N+M uninterrupted."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import RunConfig
from ..types import GateResult
from .base import GateContext, first_problem
from .reproducibility import compare_steps


class CheckpointContinuityGate:
    name = "checkpoint_continuity"
    description = "save at step N, resume in a new process: losses, rewards, weights and optimizer continue exactly"
    requirement = "a training run (--mode train) of at least two steps with checkpoint.save = true"

    def applies(self, config: RunConfig) -> bool:
        return config.run.mode == "train" and config.run.steps >= 2 and config.checkpoint.save

    def split_step(self, config: RunConfig) -> int:
        wanted = config.gates.continuity_split or config.run.steps // 2
        return min(max(1, wanted), config.run.steps - 1)

    def checkpoint_dir(self, run_dir: Path, config: RunConfig) -> Path:
        return run_dir / "gates" / self.name / f"step-{self.split_step(config):06d}"

    def evaluate(self, ctx: GateContext) -> GateResult:
        tolerance = ctx.thresholds["continuity_tolerance"]
        split, total = self.split_step(ctx.config), ctx.config.run.steps
        resumed = ctx.rerun(["--resume", str(self.checkpoint_dir(ctx.run_dir, ctx.config)), "--steps", str(total)],
                            ctx.run_dir / "gates" / self.name / "resumed")
        tail = [s for s in ctx.steps if s["step"] >= split]
        problems = compare_steps(tail, [s for s in resumed["steps"] if s["step"] >= split], tolerance)
        final = f"step-{total:06d}"
        mine = _state(ctx.run_dir / "checkpoints" / final)
        theirs = _state(Path(resumed["run_dir"]) / "checkpoints" / final)
        for side, state in (("uninterrupted", mine), ("resumed", theirs)):
            if not state:
                problems.append(f"final checkpoint: no {final}/state.json from the {side} run")
        for key in ("weights_checksum", "optimizer_checksum") if tolerance == 0 else ():
            if mine.get(key) != theirs.get(key):
                problems.append(f"final checkpoint: {key} {mine.get(key)} (uninterrupted) vs {theirs.get(key)} (resumed)")
        threshold = {"relative_tolerance": tolerance, "split_step": split}
        if problems:
            return GateResult(self.name, False, {"mismatches": len(problems)}, threshold,
                              first_problem(problems))
        return GateResult(self.name, True, {"mismatches": 0}, threshold,
                          f"saved at step {split}, resumed in a new process: steps {split}-{total - 1}, weights "
                          "and optimizer state identical to the uninterrupted run")


def _state(checkpoint: Path) -> dict:
    path = checkpoint / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {}
