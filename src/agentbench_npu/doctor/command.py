"""`agentbench-npu doctor [--smoke]`: is this machine (or container) ready to run scenarios, and on what?"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from .. import __version__
from ..devices.base import best_available
from ..errors import UserError, one_line
from .checks import (ABSENT, FAIL, OK, WARN, Check, cache_check, cann_check, device_checks, distributed_checks,
                     docker_check, environment_checks, local_sandbox_check, modal_check, stack_checks, summarise)

# What `--require` accepts, and what each makes required besides itself.
REQUIRABLE = {
    "npu": {"npu"}, "cuda": {"cuda"}, "sglang": {"sglang"}, "vllm": {"vllm"}, "megatron": {"megatron"},
    "megatron-npu": {"megatron", "megatron-npu"}, "ray": {"ray"}, "docker": {"docker"}, "modal": {"modal"},
}
SMOKE_GATES = "logprob_alignment,weight_sync"
MARKS = {OK: "[green]✓[/]", ABSENT: "[dim]–[/]", WARN: "[yellow]![/]", FAIL: "[red]✗[/]"}


def detect_device(devices: dict[str, Any], wanted: str) -> str:
    if wanted != "auto":
        if wanted not in devices:
            raise UserError(f"doctor --device {wanted}: unknown device; available: {', '.join(sorted(devices))}")
        return wanted
    best = best_available(devices)
    return best.name if best is not None else "cpu"


def gather(devices: dict[str, Any], sandbox_factories: dict[str, Any], device: str,
           required: set[str]) -> list[Check]:
    """Every check but the smoke run, in the order they print."""
    checks = stack_checks(required)
    checks.append(cann_check("npu" in required))
    checks += device_checks(devices, required)
    checks += distributed_checks(devices, required)
    if "local" in sandbox_factories:
        checks.append(local_sandbox_check(sandbox_factories["local"]))
    checks.append(docker_check("docker" in required))
    checks.append(modal_check("modal" in required))
    checks.append(cache_check())
    checks += environment_checks(npu=device == "npu" or "npu" in required)
    return checks


# -- the smoke run --------------------------------------------------------------------------------
def smoke_command(device: str, model: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "agentbench_npu", "run", "base", "--device", device, "--model", model,
            "--steps", "1", "--gates", SMOKE_GATES, "--out", str(out), "-q"]


def smoke_verdict(report: dict[str, Any] | None, returncode: int, stderr: str, out: Path, seconds: float) -> Check:
    """One line from a smoke run's report.json (or from how it died)."""
    if report is None:
        last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {returncode}"
        return Check("smoke", "run base (1 step)", FAIL, f"no report ({last}); run dir {out}")
    gates = {g["name"]: g["passed"] for g in report.get("gates", [])}
    said = ", ".join(f"{name} {'pass' if ok else 'FAIL'}" for name, ok in gates.items()) or "no gate ran"
    step = (report.get("steps") or [{}])[0]
    measured = ""
    if step:
        delta, sync = step.get("logprob_abs_diff_mean"), step.get("weight_sync_seconds")
        measured = (f"; Δlogp mean {delta:.1e}" if isinstance(delta, (int, float)) else "") + \
                   (f", sync {sync * 1000:.0f} ms" if isinstance(sync, (int, float)) else "")
    env = report.get("environment", {})
    where = f"{env.get('device', '?')} ({env.get('device_name', '?')})"
    passed = report.get("status") == "passed" and returncode == 0 and all(gates.values()) and bool(gates)
    detail = f"{report.get('status')} on {where} in {seconds:.0f} s: {said}{measured}"
    if report.get("error"):
        detail += f"; error: {report['error']}"
    return Check("smoke", "run base (1 step)", OK if passed else FAIL, detail if passed else f"{detail}; run dir {out}")


def run_smoke(device: str, model: str, out: Path | None, timeout: float) -> Check:
    keep = out is not None
    run_dir = out or Path(tempfile.mkdtemp(prefix="agentbench-npu-smoke-")) / "run"
    click.echo(f"smoke: `agentbench-npu run base --steps 1` on {device} (the first run on a machine also builds "
               "and warms up the tiny model: minutes on a CPU) ...", err=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(smoke_command(device, model, run_dir), capture_output=True, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Check("smoke", "run base (1 step)", FAIL, f"still running after {timeout:g} s (--smoke-timeout): a "
                     f"hung collective or device? run dir {run_dir}")
    report_path = run_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    check = smoke_verdict(report, proc.returncode, proc.stderr, run_dir, time.perf_counter() - start)
    if check.status == OK and not keep:
        shutil.rmtree(run_dir.parent, ignore_errors=True)
    return check


# -- the command ----------------------------------------------------------------------------------
def _print(checks: list[Check], header: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(header, highlight=False)
    group = None
    for c in checks:
        if c.group != group:
            group = c.group
            console.print(f"[bold]{group}[/]")
        console.print(f"  {MARKS[c.status]} {c.name:<22} {escape(c.detail)}", highlight=False, soft_wrap=True)
    counts = summarise(checks)
    verdict = "[red]FAILED[/]" if counts[FAIL] else "[green]ready[/]"
    console.print(f"{verdict}: {counts[OK]} ok, {counts[ABSENT]} absent, {counts[WARN]} warnings, "
                  f"{counts[FAIL]} failed", highlight=False)


@click.command()
@click.option("--device", default="auto", show_default=True,
              help="the device to check for (its stack becomes required) and to run --smoke on; auto = the best here")
@click.option("--require", "requires", multiple=True, type=click.Choice(sorted(REQUIRABLE)),
              help="make an optional part required (a failure when absent), e.g. in an image's entry point")
@click.option("--smoke", is_flag=True, help="also run `base` for 1 colocated step on the device, with the "
              f"{SMOKE_GATES.replace(',', ' and ')} gates")
@click.option("--model", default="tiny", show_default=True, help="the model --smoke runs: tiny or a local checkpoint")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="keep the smoke run here (default: a temporary dir, kept only if the smoke run fails)")
@click.option("--smoke-timeout", default=1800.0, show_default=True, type=float,
              help="seconds the smoke run may take (the first one also builds the tiny model)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.pass_context
def doctor(ctx: click.Context, device: str, requires: tuple[str, ...], smoke: bool, model: str, out: Path | None,
           smoke_timeout: float, as_json: bool) -> None:
    """Import the whole stack and say what is here: versions, devices and their memory, process-group backends,
    sandboxes, the cache. Absent optional parts are said, not failures. Exit 0 ready, 1 something required failed.
    """
    plugins = ctx.find_root().obj
    devices = {name: r.obj for name, r in plugins.items("device").items()}
    sandboxes = {name: r.obj for name, r in plugins.items("sandbox").items()}
    if out is not None and out.exists() and any(out.iterdir()):
        raise UserError(f"doctor --out {out}: the dir exists and is not empty; pass another")
    chosen = detect_device(devices, device)
    required = {chosen} | {need for name in requires for need in REQUIRABLE[name]}
    checks = gather(devices, sandboxes, chosen, required)
    if smoke:
        if any(c.status == FAIL for c in checks):
            checks.append(Check("smoke", "run base (1 step)", FAIL, "not run: fix the failures above first"))
        else:
            try:
                checks.append(run_smoke(chosen, model, out, smoke_timeout))
            except OSError as exc:
                checks.append(Check("smoke", "run base (1 step)", FAIL, f"could not start: {one_line(exc)}"))
    failed = any(c.status == FAIL for c in checks)
    if as_json:
        click.echo(json.dumps({"version": __version__, "device": chosen, "required": sorted(required),
                               "ready": not failed, "counts": summarise(checks),
                               "checks": [c.to_json() for c in checks]}, indent=2))
    else:
        _print(checks, f"agentbench-npu {__version__} · python {platform.python_version()} · "
                       f"{platform.system()} {platform.machine()} · checking for device {chosen}")
    ctx.exit(1 if failed else 0)
