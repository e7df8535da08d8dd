"""`agentbench-npu checklist`: every item of the Ascend bring-up checklist with what covers it and its status.

The items and their scenarios live in scenarios/checklist.toml. An item's status comes from the newest run of
each of its scenarios in the runs directory (by start time):

- passed: every scenario's newest run passed, and evaluated (and passed) each of the RFC's global acceptance
  gates that applies to it (log-prob alignment, weight sync, reproducibility, checkpoint continuity) and the
  item's own required gates: a run with `--gates none` proves nothing and does not count;
- failed / error / running: the newest run of some scenario says so;
- unverified: the newest run passed but skipped a gate it should have been judged by;
- not run: its scenarios are installed, but no run of one of them is in the runs directory;
- not installed: a scenario the item needs is not registered here (its plugin is missing);
- not available: nothing covers the item yet. It says what the item waits for, and is never shown as passed.

`--run` runs the items' scenarios first (the tiny profile unless `--profile` says otherwise) and exits 1 when
any of them failed; `--junit FILE` writes a JUnit XML testcase per item for CI systems.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Callable
from xml.etree import ElementTree

from .errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NOT_AVAILABLE, NOT_INSTALLED, NOT_RUN, PASSED = "not available", "not installed", "not run", "passed"
UNVERIFIED = "unverified"
GLOBAL_GATES = ("logprob_alignment", "weight_sync", "reproducibility", "checkpoint_continuity")


@dataclass(frozen=True)
class Item:
    id: str
    section: str
    item: str
    criteria: str
    scenarios: tuple[str, ...] = ()
    gates: tuple[str, ...] = ()
    needs: str = ""
    min_steps: int = 1


@dataclass
class ItemStatus:
    item: Item
    status: str
    detail: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        i = self.item
        return {"id": i.id, "section": i.section, "item": i.item, "criteria": i.criteria,
                "scenarios": list(i.scenarios), "required_gates": list(i.gates), "status": self.status,
                "detail": self.detail, "runs": self.runs}


def load_items() -> list[Item]:
    table = tomllib.loads(resources.files("agentbench_npu.scenarios").joinpath("checklist.toml").read_text())
    return [Item(id=row["id"], section=row["section"], item=row["item"], criteria=row["criteria"],
                 scenarios=tuple(row.get("scenarios", ())), gates=tuple(row.get("gates", ())),
                 needs=row.get("needs", ""), min_steps=int(row.get("min_steps", 1))) for row in table["items"]]


def select(items: list[Item], only: str | None) -> list[Item]:
    if not only:
        return items
    wanted = [part.strip() for part in only.split(",") if part.strip()]
    known = {i.id for i in items}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise UserError(f"--only: unknown checklist item '{unknown[0]}'; items: {', '.join(i.id for i in items)}")
    return [i for i in items if i.id in wanted]


def latest_runs(runs_dir: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """scenario -> (run dir, report) of its newest run under `runs_dir`; unreadable reports are skipped."""
    newest: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in sorted(Path(runs_dir).glob("*/report.json")):
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
            scenario, started = report["scenario"], str(report.get("started_at") or "")
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if scenario not in newest or started >= str(newest[scenario][1].get("started_at") or ""):
            newest[scenario] = (path.parent, report)
    return newest


def acceptance_gates(report: dict[str, Any], gates: dict[str, Any]) -> list[str]:
    """The global acceptance gates that apply to the run a report records (its config, re-resolved)."""
    from .config import resolve
    from .recipes import Layer

    config = dict(report.get("config") or {})
    # unset thresholds are recorded as null: leave them unset again
    sections = {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in config.items() if isinstance(v, dict)}
    try:
        resolved = resolve(report["scenario"], [Layer(sections, "report")], sections.get("task") or {})
    except UserError:
        return list(GLOBAL_GATES)  # a config this version cannot read: every global gate is asked for
    return [name for name in GLOBAL_GATES if name in gates and gates[name].applies(resolved)]


def status_of(item: Item, installed: set[str], latest: dict[str, tuple[Path, dict[str, Any]]],
              gate_plugins: dict[str, Any] | None = None) -> ItemStatus:
    if not item.scenarios:
        return ItemStatus(item, NOT_AVAILABLE, f"waits for {item.needs}" if item.needs else "nothing covers it yet")
    missing = [s for s in item.scenarios if s not in installed]
    if missing:
        return ItemStatus(item, NOT_INSTALLED, f"scenario '{missing[0]}' is not installed (its plugin is missing)")
    runs, problems, not_run = [], [], []
    for scenario in item.scenarios:
        if scenario not in latest:
            not_run.append(scenario)
            continue
        run_dir, report = latest[scenario]
        gates = {g["name"]: bool(g["passed"]) for g in report.get("gates", [])}
        runs.append({"scenario": scenario, "run": str(run_dir), "status": report.get("status"),
                     "started_at": report.get("started_at"), "gates": gates})
        if report.get("status") != PASSED:
            failed = [g for g, ok in gates.items() if not ok]
            why = report.get("error") or (f"gates failed: {', '.join(failed)}" if failed else "")
            problems.append((report.get("status") or "error", f"{scenario}: newest run {run_dir} is "
                             f"{report.get('status')}" + (f" ({why})" if why else "")))
        if report.get("status") == PASSED and len(report.get("steps", [])) < item.min_steps:
            problems.append((UNVERIFIED, f"{scenario}: newest run {run_dir} ran {len(report.get('steps', []))} "
                             f"step(s); the item asks for at least {item.min_steps}"))
            continue
        required = list(dict.fromkeys(acceptance_gates(report, gate_plugins or {}) + list(item.gates)))
        unevaluated = [g for g in required if g not in gates]
        if report.get("status") == PASSED and unevaluated:
            problems.append((UNVERIFIED, f"{scenario}: newest run {run_dir} did not evaluate "
                             f"{', '.join(unevaluated)}; run it with every gate"))
            continue
        for gate in required:
            if gates.get(gate) is not True:
                problems.append(("failed", f"{scenario}: gate {gate} " + ("failed" if gate in gates else
                                                                         "was not evaluated") + f" in {run_dir}"))
    if problems:
        return ItemStatus(item, problems[0][0], problems[0][1], runs)
    if not_run:
        return ItemStatus(item, NOT_RUN, f"no run of {', '.join(not_run)} yet", runs)
    return ItemStatus(item, PASSED, "; ".join(f"{r['scenario']}: {', '.join(g for g, ok in r['gates'].items() if ok)}"
                                              for r in runs), runs)


def run_scenarios(items: list[Item], installed: set[str], runs_dir: Path, profile: str | None,
                  on_start: Callable[[str], None] = lambda name: None) -> dict[str, str]:
    """Run every installed scenario the items name, once each, into `runs_dir`; returns scenario -> why, for
    the runs that stopped before writing a report (an older run must not speak for them)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    broken = {}
    for scenario in dict.fromkeys(s for i in items for s in i.scenarios if s in installed):
        on_start(scenario)
        out = Path(runs_dir) / f"{scenario}-checklist-{stamp}"
        cmd = [sys.executable, "-m", "agentbench_npu", "run", scenario, "--out", str(out), "-q"] + (
            ["--profile", profile] if profile else [])
        proc = subprocess.run(cmd, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if not (out / "report.json").is_file():
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            broken[scenario] = f"{scenario}: agentbench-npu run exited {proc.returncode} before writing a report: {last}"
    return broken


def junit_xml(statuses: list[ItemStatus]) -> str:
    """A JUnit testsuite: passed items pass, failed ones fail, the rest are skipped with the reason."""
    failures = sum(s.status not in (PASSED, NOT_AVAILABLE, NOT_INSTALLED, NOT_RUN, UNVERIFIED) for s in statuses)
    skipped = sum(s.status in (NOT_AVAILABLE, NOT_INSTALLED, NOT_RUN, UNVERIFIED) for s in statuses)
    suite = ElementTree.Element("testsuite", name="agentbench-npu checklist", tests=str(len(statuses)),
                                failures=str(failures), skipped=str(skipped))
    for s in statuses:
        case = ElementTree.SubElement(suite, "testcase", classname=s.item.section, name=f"{s.item.id}: {s.item.item}")
        if s.status in (NOT_AVAILABLE, NOT_INSTALLED, NOT_RUN, UNVERIFIED):
            ElementTree.SubElement(case, "skipped", message=f"{s.status}: {s.detail}")
        elif s.status != PASSED:
            ElementTree.SubElement(case, "failure", message=f"{s.status}: {s.detail}")
    return ElementTree.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


# -- the command -----------------------------------------------------------------------------------
import click  # noqa: E402  (the command over the functions above)

_STYLE = {PASSED: "green", NOT_AVAILABLE: "dim", NOT_INSTALLED: "yellow", NOT_RUN: "yellow", UNVERIFIED: "yellow"}


@click.command("checklist")
@click.option("--runs", "runs_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"),
              show_default=True, help="where runs are (their newest run per scenario decides an item)")
@click.option("--run", "run_first", is_flag=True, help="run the items' scenarios first; exit 1 if any fails")
@click.option("--only", metavar="ID,...", help="only these items (ids as `--json` lists them)")
@click.option("--profile", help="the profile --run uses (default: tiny for the tiny model)")
@click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), help="also write JUnit XML here")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def checklist_command(ctx: click.Context, runs_dir: Path, run_first: bool, only: str | None, profile: str | None,
                      junit: Path | None, as_json: bool) -> None:
    """Every item of the Ascend RL bring-up checklist, the scenarios that cover it, and their newest runs."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .paths import atomic_write_text

    items = select(load_items(), only)
    installed = set(ctx.find_root().obj.items("scenario"))
    console = Console(width=None if sys.stdout.isatty() else 160)
    broken: dict[str, str] = {}
    if run_first:
        broken = run_scenarios(items, installed, runs_dir, profile,
                               on_start=lambda name: None if as_json else console.print(f"running {escape(name)} …"))
    latest = latest_runs(runs_dir)
    gate_plugins = {name: r.obj for name, r in ctx.find_root().obj.items("gate").items()}
    statuses = [status_of(item, installed, latest, gate_plugins) for item in items]
    for s in statuses:
        why = [broken[name] for name in s.item.scenarios if name in broken]
        if why:
            s.status, s.detail = "error", why[0]
    if junit is not None:
        atomic_write_text(junit, junit_xml(statuses))
    if as_json:
        sys.stdout.write(json.dumps([s.to_dict() for s in statuses], indent=2) + "\n")
    else:
        table = Table(title=f"Ascend RL bring-up checklist (runs in {runs_dir})", title_justify="left")
        for column in ("item", "scenarios", "status", "detail"):
            table.add_column(column, overflow="fold")
        for s in statuses:
            style = _STYLE.get(s.status, "bold red")
            table.add_row(escape(s.item.item), escape(", ".join(s.item.scenarios) or "—"),
                          f"[{style}]{s.status}[/]", escape(s.detail))
        console.print(table)
        counts = {k: sum(s.status == k for s in statuses) for k in dict.fromkeys(s.status for s in statuses)}
        console.print(", ".join(f"{n} {k}" for k, n in counts.items()))
    failed = [s for s in statuses if s.status not in (PASSED, NOT_AVAILABLE, NOT_INSTALLED, NOT_RUN, UNVERIFIED)]
    ctx.exit(1 if run_first and failed else 0)
