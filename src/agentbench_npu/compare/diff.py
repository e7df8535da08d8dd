"""`agentbench-npu diff BASELINE CANDIDATE`: two runs of the same scenarios, compared metric by metric.

A typical use is a GPU baseline against an NPU candidate. For each scenario in both, each metric that has a
tolerance is compared over the steps both runs recorded:

- the mean of the last K steps, within abs + rel × |baseline|;
- the largest gap at any single step, and where it was; it counts against the metric only when the metric has a
  `max_gap` (alignment metrics do, learning curves are too noisy step to step);
- gates that passed in the baseline and fail in the candidate.

Tolerances come from scenarios/diff.toml, then the scenario recipe's `[diff]` table, then `--tolerances FILE`
(whose `[scenarios.NAME]` tables apply to one scenario). Reports whose schema this version cannot read are
refused. A different number of steps, a metric one side lacks, or a scenario only one side ran is said, never
silently skipped. A scenario the candidate lacks makes the diff fail; one only the candidate has does not.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from ..errors import UserError
from ..report.schema import SCHEMA_VERSION

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TOLERANCE_KEYS = ("abs", "rel", "max_gap")


@dataclass(frozen=True)
class Tolerance:
    abs: float = 0.0
    rel: float = 0.0
    max_gap: float | None = None

    def allowed(self, baseline: float) -> float:
        return self.abs + self.rel * abs(baseline)


@dataclass
class MetricDiff:
    metric: str
    status: str  # ok | out | missing
    baseline: float | None = None  # mean of the last K compared steps
    candidate: float | None = None
    delta: float | None = None
    allowed: float | None = None
    max_gap: float | None = None  # the largest |candidate - baseline| at one step ...
    max_gap_step: int | None = None  # ... and its step
    first_out_step: int | None = None  # the first step whose gap exceeds the tolerance's max_gap
    detail: str = ""


@dataclass
class ScenarioDiff:
    scenario: str
    baseline: str
    candidate: str
    steps_compared: list[int] = field(default_factory=list)
    last_k: int = 0
    notes: list[str] = field(default_factory=list)
    metrics: list[MetricDiff] = field(default_factory=list)
    gates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def within(self) -> bool:
        """Nothing out of tolerance, no gate regressed, and something was compared at all."""
        return (bool(self.steps_compared) and any(m.status == "ok" for m in self.metrics)
                and all(m.status != "out" for m in self.metrics)
                and not any(g["change"] == "regressed" for g in self.gates))


@dataclass
class DiffResult:
    scenarios: list[ScenarioDiff]
    only_in_baseline: list[str]
    only_in_candidate: list[str]

    @property
    def within(self) -> bool:
        return not self.only_in_baseline and all(s.within for s in self.scenarios)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": 1, "within_tolerance": self.within,
                "scenarios": [{**asdict(s), "within_tolerance": s.within} for s in self.scenarios],
                "only_in_baseline": self.only_in_baseline, "only_in_candidate": self.only_in_candidate}


# -- reading reports ------------------------------------------------------------------------------
def load_reports(path: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """scenario -> (where, report) for a report.json, a run dir, or a directory of run dirs."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif (path / "report.json").is_file():
        files = [path / "report.json"]
    elif path.is_dir():
        files = sorted(path.glob("*/report.json"))
        if not files:
            raise UserError(f"'{path}' holds no report.json, nor run dirs with one; give a report, a run dir or a "
                            "directory of run dirs")
    else:
        raise UserError(f"'{path}' does not exist; give a report.json, a run dir or a directory of run dirs")
    reports: dict[str, tuple[str, dict[str, Any]]] = {}
    for file in files:
        report = _read_report(file)
        scenario = report["scenario"]
        if scenario in reports:
            raise UserError(f"'{path}' holds two runs of scenario '{scenario}' ({reports[scenario][0]} and {file}); "
                            "compare them one at a time")
        reports[scenario] = (str(file), report)
    return reports


def _read_report(file: Path) -> dict[str, Any]:
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: not a report.json ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("scenario"), str) or not isinstance(
            report.get("steps"), list):
        raise UserError(f"{file}: not an agentbench-npu report (no 'scenario' and 'steps')")
    if not all(isinstance(r, dict) and isinstance(r.get("step"), int) and not isinstance(r["step"], bool)
               for r in report["steps"]):
        raise UserError(f"{file}: not an agentbench-npu report (a step row without an integer 'step')")
    version = report.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"{file}: report schema_version {version!r}; this agentbench-npu reads {SCHEMA_VERSION}. "
                        "Compare it with the version that wrote it")
    return report


# -- tolerances ------------------------------------------------------------------------------------
def _defaults() -> dict[str, Any]:
    return tomllib.loads(resources.files("agentbench_npu.scenarios").joinpath("diff.toml").read_text())


def _layer(table: Mapping[str, Any], where: str) -> tuple[int | None, dict[str, Tolerance]]:
    """(last_k, {metric: Tolerance}) from a table with `last_k` and `[metrics.NAME]`, every value checked."""
    if not isinstance(table, Mapping):
        raise UserError(f"{where}: must be a table of last_k and [metrics.NAME], got {table!r}")
    unknown = [k for k in table if k not in ("last_k", "metrics")]
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}'; a tolerance table holds last_k and [metrics.NAME]")
    last_k = table.get("last_k")
    if last_k is not None and (not isinstance(last_k, int) or isinstance(last_k, bool) or last_k < 1):
        raise UserError(f"{where}: last_k must be an integer >= 1, got {last_k!r}")
    metrics: dict[str, Tolerance] = {}
    if not isinstance(table.get("metrics") or {}, Mapping):
        raise UserError(f"{where}: metrics must be a table of [metrics.NAME], got {table['metrics']!r}")
    for name, entry in (table.get("metrics") or {}).items():
        if not isinstance(entry, dict):
            raise UserError(f"{where}: metrics.{name} must be a table of {', '.join(TOLERANCE_KEYS)}")
        for key, value in entry.items():
            if key not in TOLERANCE_KEYS:
                raise UserError(f"{where}: metrics.{name}.{key} is not a tolerance; use {', '.join(TOLERANCE_KEYS)}")
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise UserError(f"{where}: metrics.{name}.{key} must be a number >= 0, got {value!r}")
        metrics[name] = Tolerance(**{k: float(v) for k, v in entry.items()})
    return last_k, metrics


def read_tolerance_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"--tolerances {path}: {exc}") from None
    if not isinstance(table.get("scenarios") or {}, dict):
        raise UserError(f"{path}: scenarios must be a table of [scenarios.NAME], got {table['scenarios']!r}")
    for name, body in (table.get("scenarios") or {}).items():
        _layer(body, f"{path} [scenarios.{name}]")
    _layer({k: v for k, v in table.items() if k != "scenarios"}, str(path))
    return table


def tolerances_for(scenario: str, recipe_diff: Mapping[str, Any] | None, file: Mapping[str, Any],
                   file_name: str = "--tolerances") -> tuple[int, dict[str, Tolerance]]:
    """Defaults ← the scenario recipe's [diff] ← the file's top level ← the file's [scenarios.NAME]."""
    layers = [(_defaults(), "scenarios/diff.toml"), (recipe_diff or {}, f"scenario '{scenario}' recipe [diff]"),
              ({k: v for k, v in file.items() if k != "scenarios"}, file_name),
              ((file.get("scenarios") or {}).get(scenario, {}), f"{file_name} [scenarios.{scenario}]")]
    last_k, metrics = 3, {}
    for table, where in layers:
        k, _ = _layer(table, where)  # checks every value
        last_k = k or last_k
        for name, entry in (table.get("metrics") or {}).items():  # key by key: setting abs keeps max_gap
            metrics[name] = Tolerance(**{**(asdict(metrics[name]) if name in metrics else {}),
                                         **{key: float(v) for key, v in entry.items()}})
    return last_k, metrics


# -- comparing -------------------------------------------------------------------------------------
def _number(row: Mapping[str, Any], name: str) -> float | None:
    """A step's value of `name`: None when the step did not record it; NaN when it recorded null (report.json's
    word for a non-finite number), which is out of any tolerance."""
    value = row.get(name)
    if value is None:
        return math.nan if name in row else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def compare_metric(name: str, tol: Tolerance, steps: list[int], base: Mapping[int, Mapping[str, Any]],
                   cand: Mapping[int, Mapping[str, Any]], last_k: int) -> MetricDiff:
    b = {s: _number(base[s], name) for s in steps}
    c = {s: _number(cand[s], name) for s in steps}
    if all(v is None for v in b.values()) or all(v is None for v in c.values()):
        side = "baseline" if all(v is None for v in b.values()) else "candidate"
        return MetricDiff(name, "missing", detail=f"not recorded by the {side}")
    both = [s for s in steps if b[s] is not None and c[s] is not None]
    if not both:
        return MetricDiff(name, "missing", detail="no step has it on both sides")
    tail = both[-last_k:]
    mb = sum(b[s] for s in tail) / len(tail)
    mc = sum(c[s] for s in tail) / len(tail)
    delta = mc - mb
    allowed = tol.allowed(mb)
    gaps = {s: abs(c[s] - b[s]) for s in both}
    worst = max(both, key=lambda s: (gaps[s] if not math.isnan(gaps[s]) else math.inf))
    first_out = next((s for s in both if tol.max_gap is not None and not gaps[s] <= tol.max_gap), None)
    problems = []
    if not abs(delta) <= allowed:
        problems.append(f"last-{len(tail)} mean {mb:.4g} → {mc:.4g} (Δ {delta:+.3g}, allowed ±{allowed:.3g})")
    if first_out is not None:
        problems.append(f"step {first_out}: {b[first_out]:.4g} → {c[first_out]:.4g} (gap {gaps[first_out]:.3g} > "
                        f"max_gap {tol.max_gap:g})")
    return MetricDiff(name, "out" if problems else "ok", mb, mc, delta, allowed, gaps[worst], worst, first_out,
                      "; ".join(problems) or f"largest gap {gaps[worst]:.3g} at step {worst}")


def compare_reports(scenario: str, base: tuple[str, dict], cand: tuple[str, dict], last_k: int,
                    tolerances: Mapping[str, Tolerance]) -> ScenarioDiff:
    (bwhere, b), (cwhere, c) = base, cand
    out = ScenarioDiff(scenario, bwhere, cwhere, last_k=last_k)
    brows = {int(r["step"]): r for r in b["steps"]}
    crows = {int(r["step"]): r for r in c["steps"]}
    out.steps_compared = sorted(set(brows) & set(crows))
    if len(brows) != len(crows) or set(brows) != set(crows):
        out.notes.append(f"baseline has {len(brows)} steps, candidate {len(crows)}: compared the "
                         f"{len(out.steps_compared)} both have")
    for side, report in (("baseline", b), ("candidate", c)):
        if report.get("status") != "passed":
            out.notes.append(f"the {side} run's status is {report.get('status')}")
    if not out.steps_compared:
        out.notes.append("no step to compare: nothing was verified")
    else:
        for name, tol in tolerances.items():
            out.metrics.append(compare_metric(name, tol, out.steps_compared, brows, crows, last_k))
    bgates = {g["name"]: bool(g["passed"]) for g in b.get("gates", [])}
    cgates = {g["name"]: bool(g["passed"]) for g in c.get("gates", [])}
    for name in sorted(set(bgates) | set(cgates)):
        was, now = bgates.get(name), cgates.get(name)
        change = ("regressed" if was and now is False else "fixed" if was is False and now else
                  "only in baseline" if now is None else "only in candidate" if was is None else "same")
        out.gates.append({"gate": name, "baseline": was, "candidate": now, "change": change})
    return out


def diff(baseline: Path, candidate: Path, tolerance_file: Path | None = None, last_k: int | None = None,
         recipe_diff: Any = None) -> DiffResult:
    """Compare every scenario the two sides share. `recipe_diff(scenario)` gives a scenario recipe's [diff]."""
    base, cand = load_reports(baseline), load_reports(candidate)
    file = read_tolerance_file(tolerance_file)
    scenarios = []
    for scenario in sorted(set(base) & set(cand)):
        k, tolerances = tolerances_for(scenario, recipe_diff(scenario) if recipe_diff else None, file,
                                       str(tolerance_file or "--tolerances"))
        scenarios.append(compare_reports(scenario, base[scenario], cand[scenario], last_k or k, tolerances))
    return DiffResult(scenarios, sorted(set(base) - set(cand)), sorted(set(cand) - set(base)))


# -- rendering -------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def metric_rows(s: ScenarioDiff) -> list[tuple[str, ...]]:
    """(metric, status, baseline, candidate, Δ, allowed, largest gap @ step, detail) per metric."""
    return [(m.metric, m.status, _fmt(m.baseline), _fmt(m.candidate),
             "—" if m.delta is None else f"{m.delta:+.3g}", "—" if m.allowed is None else f"±{m.allowed:.3g}",
             "—" if m.max_gap is None else f"{m.max_gap:.3g} @ {m.max_gap_step}", m.detail) for m in s.metrics]


def headline(result: DiffResult) -> str:
    out = sum(not s.within for s in result.scenarios) + len(result.only_in_baseline)
    total = len(result.scenarios) + len(result.only_in_baseline)
    return ("within tolerance" if result.within else f"OUT OF TOLERANCE: {out} of {total} scenario(s)")


def to_markdown(result: DiffResult) -> str:
    lines = [f"# agentbench-npu diff: {headline(result)}", ""]
    for s in result.scenarios:
        lines += [f"## {s.scenario}: {'within tolerance' if s.within else 'OUT OF TOLERANCE'}", "",
                  f"baseline `{s.baseline}`, candidate `{s.candidate}`; steps {len(s.steps_compared)}, "
                  f"mean of the last {s.last_k}", ""]
        lines += [f"- {note}" for note in s.notes] + ([""] if s.notes else [])
        lines += ["| metric | status | baseline | candidate | Δ | allowed | largest gap @ step | detail |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += ["| " + " | ".join(row) + " |" for row in metric_rows(s)]
        changed = [g for g in s.gates if g["change"] != "same"]
        lines += [""] + [f"- gate `{g['gate']}`: {g['change']}" for g in changed] + ([""] if changed else [])
    for name in result.only_in_baseline:
        lines.append(f"- scenario `{name}`: in the baseline only, the candidate did not run it")
    for name in result.only_in_candidate:
        lines.append(f"- scenario `{name}`: in the candidate only, no baseline to compare with")
    return "\n".join(lines).rstrip() + "\n"
