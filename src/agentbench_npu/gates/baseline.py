"""baseline: the run, diffed against an archived baseline (`run --compare-to baseline|PATH`), within tolerance.

With `baseline` the newest archived run of the scenario with the same comparable digest is used (see
compare/baselines.py): a GPU baseline for an NPU run of the same recipe and seed, say. No such baseline means
nothing was verified, and the gate fails saying how to save one. The whole diff is written to
`comparison.json` in the run dir; the gate's value names what moved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import UserError
from ..paths import atomic_write_json
from ..types import GateResult
from .base import GateContext


class BaselineGate:
    name = "baseline"
    description = "with --compare-to: every compared metric within tolerance of the baseline run"
    requirement = "run.compare_to set (--compare-to baseline or a run dir)"

    def applies(self, config: RunConfig) -> bool:
        return bool(config.run.compare_to)

    def check(self, config: RunConfig) -> None:
        """Bad input this gate can see before the run starts."""
        from ..compare.diff import load_reports, read_tolerance_file

        target = config.run.compare_to
        if target != "baseline":
            if not Path(target).exists():
                raise UserError(f"run.compare_to '{target}' does not exist; give `baseline` (the matching run in the "
                                "archive), a run dir or a report.json")
            reports = load_reports(Path(target))  # no report, a bad one, another schema: now, not after the run
            if config.scenario not in reports:
                raise UserError(f"run.compare_to '{target}' holds no run of scenario '{config.scenario}' "
                                f"(it holds: {', '.join(sorted(reports))})")
        read_tolerance_file(Path(config.run.compare_tolerances) if config.run.compare_tolerances else None)

    def evaluate(self, ctx: GateContext) -> GateResult:
        from ..compare.baselines import archive_dir, comparable_digest, matching
        from ..compare.diff import DiffResult, compare_reports, load_reports, read_tolerance_file, tolerances_for

        run = ctx.config.run
        report = {**ctx.report, "gates": []}  # the other gates are being judged now; compare metrics
        scenario = report["scenario"]
        if run.compare_to == "baseline":
            entry = matching(report, run.baselines or None)
            if entry is None:
                return GateResult(self.name, False, None, None,
                                  f"no baseline of '{scenario}' with comparable digest "
                                  f"{comparable_digest(report['config'])} in {archive_dir(run.baselines or None)}; "
                                  "save a reference run with `agentbench-npu baseline save RUN_DIR`")
            source = entry["path"]
        else:
            source = run.compare_to
        baselines = load_reports(Path(source))
        if scenario not in baselines:
            return GateResult(self.name, False, None, None, f"'{source}' holds no run of scenario '{scenario}'")
        file = read_tolerance_file(Path(run.compare_tolerances) if run.compare_tolerances else None)
        last_k, tolerances = tolerances_for(scenario, _recipe_diff(scenario), file,
                                            run.compare_tolerances or "--tolerances")
        where, baseline = baselines[scenario]
        result = compare_reports(scenario, (where, {**baseline, "gates": []}), ("this run", report), last_k, tolerances)
        # this run is still being judged: its status is not final yet, and says nothing here
        result.notes = [n for n in result.notes if not n.startswith("the candidate run's status")]
        atomic_write_json(ctx.run_dir / "comparison.json", DiffResult([result], [], []).to_dict())
        out = [m for m in result.metrics if m.status == "out"]
        ok = [m for m in result.metrics if m.status == "ok"]
        missing = [m.metric for m in result.metrics if m.status == "missing"]
        value = {"baseline": baselines[scenario][0], "metrics_out": [m.metric for m in out],
                 "metrics_compared": len(ok) + len(out)}
        threshold = {"last_k": last_k, "metrics": len(tolerances)}  # each metric's tolerance: comparison.json
        if out:
            problems = [f"{m.metric}: {m.detail}" for m in out]
            detail = problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
            return GateResult(self.name, False, value, threshold, detail + "; comparison.json has the whole diff")
        if not result.steps_compared or not ok:
            why = ("no step to compare" if not result.steps_compared else
                   f"no metric recorded by both ({', '.join(missing) or 'none configured'})")
            return GateResult(self.name, False, value, threshold, f"nothing compared with {baselines[scenario][0]}: {why}")
        return GateResult(self.name, True, value, threshold,
                          f"{len(ok)} metrics within tolerance of {baselines[scenario][0]}"
                          + (f"; not recorded by both: {', '.join(missing)}" if missing else ""))


def _recipe_diff(scenario: str) -> Any:
    from ..plugins import load_plugins

    try:
        return dict(load_plugins().get("scenario", scenario).obj.recipe().values.get("diff") or {})
    except Exception:  # the scenario's plugin is not installed here: the defaults alone
        return None
