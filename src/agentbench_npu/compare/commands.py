"""`agentbench-npu diff`: the command over compare/diff.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..paths import atomic_write_text
from .diff import DiffResult, diff, headline, metric_rows, to_markdown

_STYLE = {"ok": "green", "out": "bold red", "missing": "yellow"}


@click.command("diff")
@click.argument("baseline", type=click.Path(path_type=Path))
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--tolerances", type=click.Path(dir_okay=False, path_type=Path),
              help="a TOML file of tolerances over the defaults and the scenarios' own (see docs/diff.md)")
@click.option("--last-k", type=click.IntRange(min=1), help="compare curves by the mean of their last K steps")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "json"]), default="table", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="write the output to a file too")
@click.pass_context
def diff_command(ctx: click.Context, baseline: Path, candidate: Path, tolerances: Path | None, last_k: int | None,
                 fmt: str, out: Path | None) -> None:
    """Compare CANDIDATE runs with BASELINE runs (report.json files, run dirs, or directories of run dirs).

    Per scenario and metric: the mean of the last K steps within tolerance, the largest gap at one step, and gates
    that passed before and fail now. Exit status: 0 within tolerance, 1 out of tolerance, 2 bad input.
    """
    plugins = ctx.find_root().obj
    result = diff(baseline, candidate, tolerances, last_k, recipe_diff=lambda name: _recipe_diff(plugins, name))
    text = {"json": lambda: json.dumps(result.to_dict(), indent=2) + "\n", "markdown": lambda: to_markdown(result),
            "table": lambda: None}[fmt]()
    if text is None:
        _print_table(result)
    else:
        sys.stdout.write(text)
    if out is not None:
        atomic_write_text(out, text if text is not None else to_markdown(result))
    ctx.exit(0 if result.within else 1)


def _recipe_diff(plugins: Any, scenario: str) -> dict[str, Any] | None:
    """The scenario recipe's [diff] table, when its plugin is installed here."""
    try:
        return dict(plugins.get("scenario", scenario).obj.recipe().values.get("diff") or {})
    except Exception:  # a scenario this installation lacks compares by the defaults alone
        return None


def _print_table(result: DiffResult) -> None:
    console = Console(width=None if sys.stdout.isatty() else 160)
    for s in result.scenarios:
        table = Table(title=f"{s.scenario}: {'within tolerance' if s.within else 'OUT OF TOLERANCE'} "
                            f"({len(s.steps_compared)} steps, last {s.last_k})", title_justify="left")
        for column in ("metric", "status", "baseline", "candidate", "Δ", "allowed", "largest gap @ step", "detail"):
            table.add_column(column, overflow="fold")
        for row in metric_rows(s):
            table.add_row(*[escape(cell) for cell in row[:1]], f"[{_STYLE[row[1]]}]{row[1]}[/]",
                          *[escape(cell) for cell in row[2:]])
        console.print(table)
        for note in s.notes:
            console.print(f"  note: {escape(note)}")
        for g in s.gates:
            if g["change"] != "same":
                style = "bold red" if g["change"] == "regressed" else "yellow"
                console.print(f"  gate {g['gate']}: [{style}]{g['change']}[/]")
    for name in result.only_in_baseline:
        console.print(f"[bold red]scenario {escape(name)}: in the baseline only, the candidate did not run it[/]")
    for name in result.only_in_candidate:
        console.print(f"scenario {escape(name)}: in the candidate only, no baseline to compare with")
    console.print(("[green]" if result.within else "[bold red]") + headline(result) + "[/]")


@click.group("baseline")
def baseline_group() -> None:
    """The baseline archive: passed runs kept to compare later runs with (`run --compare-to baseline`)."""


_ARCHIVE = click.option("--archive", type=click.Path(file_okay=False, path_type=Path),
                        help="the archive dir (default $AGENTBENCH_NPU_BASELINES, else ./baselines)")


@baseline_group.command("save")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--name", help="the baseline's name (default: device-model-digest-time)")
@_ARCHIVE
def baseline_save(run_dir: Path, name: str | None, archive: Path | None) -> None:
    """Keep RUN_DIR's report (a passed run) in the archive with its fingerprint."""
    from .baselines import save

    target = save(run_dir, name, archive)
    Console().print(f"saved baseline {escape(str(target))}")


@baseline_group.command("list")
@click.option("--scenario", help="only this scenario's baselines")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@_ARCHIVE
def baseline_list(scenario: str | None, as_json: bool, archive: Path | None) -> None:
    """The archived baselines, oldest first."""
    from .baselines import archive_dir, entries

    found = entries(archive, scenario)
    if as_json:
        sys.stdout.write(json.dumps(found, indent=2) + "\n")
        return
    table = Table(title=f"baselines in {archive_dir(archive)}", title_justify="left")
    for column in ("scenario", "name", "device", "model", "comparable digest", "saved"):
        table.add_column(column, overflow="fold")
    for e in found:
        table.add_row(*(escape(str(e.get(k))) for k in ("scenario", "name", "device", "model", "comparable_digest",
                                                          "saved_at")))
    Console(width=None if sys.stdout.isatty() else 160).print(table if found else "no baselines yet")


@baseline_group.command("show")
@click.argument("name")
@_ARCHIVE
def baseline_show(name: str, archive: Path | None) -> None:
    """A baseline's fingerprint and the summary of its run (NAME or its path)."""
    from .baselines import find

    entry = find(name, archive)
    report = json.loads((Path(entry["path"]) / "report.json").read_text())
    gates = ", ".join(f"{g['name']} {'pass' if g['passed'] else 'FAIL'}" for g in report.get("gates", []))
    lines = [f"{k}: {entry.get(k)}" for k in ("name", "scenario", "device", "device_name", "model",
                                              "comparable_digest", "saved_at", "source", "path")]
    lines += [f"steps: {len(report.get('steps', []))}", f"gates: {gates or 'none'}",
              f"summary: {json.dumps(report.get('summary', {}))}"]
    sys.stdout.write("\n".join(lines) + "\n")
