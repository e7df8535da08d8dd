"""What a run shows on the terminal: progress bars on stderr while it runs, the step table and gate lines after."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .report.schema import nan_if_null

# Not on a terminal (CI logs, pipes) rich would assume 80 columns and cut the step table.
out_console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


class RichProgress:
    """Progress bars on stderr: the warm start, then one bar over steps with the latest metrics."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=err_console,
                             transient=False)
        self._task: Any = None
        self._started = False

    def phase(self, name: str, total: int | None = None) -> None:
        if not self._started:
            self._bar.start()
            self._started = True
        if self._task is not None:
            self._bar.update(self._task, completed=self._bar.tasks[-1].total)
        self._task = self._bar.add_task(name, total=total, info="")

    def advance(self, done: int, **info: Any) -> None:
        text = " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        self._bar.update(self._task, completed=done, info=text)

    def step(self, metrics: Any, total: int) -> None:
        info = (f"reward {metrics.reward_mean:.3f}  loss {metrics.loss:+.4f}  "
                f"|Δlogp| {metrics.logprob_abs_diff_mean:.1e}  sync {metrics.weight_sync_seconds * 1000:.0f} ms")
        self._bar.update(self._task, completed=metrics.step + 1, info=info)

    def done(self) -> None:
        if self._started:
            self._bar.stop()


def print_summary(report: dict[str, Any]) -> None:
    table = Table(title=f"{report['scenario']}: {report['status']}", title_justify="left")
    for col in ("step", "reward", "loss", "Δlogp mean", "Δlogp max", "roll s", "train s", "sync ms", "weights"):
        table.add_column(col, justify="right", no_wrap=True)
    for s in report["steps"]:
        s = {k: nan_if_null(v) for k, v in s.items()}  # a resumed run's history was read back from JSON
        table.add_row(str(s["step"]), f"{s['reward_mean']:.3f}", f"{s['loss']:+.4f}",
                      f"{s['logprob_abs_diff_mean']:.1e}", f"{s['logprob_abs_diff_max']:.1e}",
                      f"{s['rollout_seconds']:.2f}", f"{s['train_seconds']:.2f}",
                      f"{s['weight_sync_seconds'] * 1000:.1f}", "synced" if s["weights_checksum_match"] else "MISMATCH")
    out_console.print(table)
    for gate in report["gates"]:
        mark = "[green]pass[/]" if gate["passed"] else "[red]FAIL[/]"
        out_console.print(f"gate {gate['name']}: {mark}  {escape(str(gate['detail']))}", soft_wrap=True)
        out_console.print(f"    measured {compact(gate['value'])}  threshold {compact(gate['threshold'])}",
                          highlight=False, soft_wrap=True)
    run_dir = Path(report["run_dir"])
    also = " (and report.md, report.html)" if (run_dir / "report.html").is_file() else ""
    out_console.print(f"report: {run_dir / 'report.json'}{also}")


def compact(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={compact(v)}" for k, v in value.items())
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# -- list ----------------------------------------------------------------------------------------
