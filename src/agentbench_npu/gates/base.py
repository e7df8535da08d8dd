"""What a gate is, what it sees, and how the runner evaluates the selected gates after a run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

from ..config import RunConfig
from ..errors import UserError, close_names
from ..types import GateResult

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SECOND_RUN_ENV = "AGENTBENCH_NPU_SECOND_RUN"  # set in a gate's second run (no report.md / report.html there)
THRESHOLD_KEYS = ("logprob_mean", "logprob_max", "logprob_kl", "spike_factor", "spike_floor", "sync_probe_max",
                  "repro_tolerance", "continuity_tolerance")
_PRECISION = {"float32": 32, "bfloat16": 16, "float16": 16}


class Gate(Protocol):
    """An acceptance gate (register it with `register_gates`).

    name                 unique name, used by `run --gates NAME,...`
    description          one line: what it measures
    applies(config)      False when the run cannot be judged by this gate (e.g. one step only)
    evaluate(ctx)        a GateResult: name, passed, value, threshold, detail (where it broke)
    Optional: `split_step(config)` — a step after which the runner saves a checkpoint for the gate;
              `check(config)` — raise UserError on bad input the gate can see before the run starts.
    """

    name: str
    description: str

    def applies(self, config: RunConfig) -> bool: ...

    def evaluate(self, ctx: GateContext) -> GateResult: ...


@dataclass
class GateContext:
    """A gate's view of a finished run, and a way to ask for another run of the same config."""

    config: RunConfig
    report: Mapping[str, Any]
    thresholds: Mapping[str, float]
    run_dir: Path
    rerun: Callable[[list[str], Path], dict[str, Any]]

    @property
    def steps(self) -> list[dict[str, Any]]:
        return list(self.report["steps"])


def threshold_key(device: str, config: RunConfig) -> list[str]:
    dtypes = [config.model.dtype, config.model.engine_dtype or config.model.dtype]
    dtype = min(dtypes, key=lambda d: _PRECISION.get(d, 32))
    return [f"{device}-{dtype}", dtype, "default"]


def thresholds_for(device: str, config: RunConfig) -> dict[str, float]:
    """Defaults from scenarios/gates.toml for (device, dtype), then the run's `gates.*` overrides."""
    table = tomllib.loads(resources.files("agentbench_npu.scenarios").joinpath("gates.toml").read_text())
    chosen = next(table[k] for k in threshold_key(device, config) if k in table)
    values = {k: float(chosen[k]) for k in THRESHOLD_KEYS}
    for key in THRESHOLD_KEYS:
        override = getattr(config.gates, key)
        if override is not None:
            values[key] = float(override)
    return values


def select_gates(available: Mapping[str, Any], config: RunConfig) -> list[Any]:
    """The gates named by `gates.enabled` (all | none | a,b) that apply to this run, in a fixed order."""
    spec = config.gates.enabled.strip()
    if spec in ("", "none"):
        return []
    if spec == "all":
        return [gate for gate in available.values() if gate.applies(config)]
    chosen = []
    for name in dict.fromkeys(part.strip() for part in spec.split(",") if part.strip()):
        if name not in available:
            raise UserError(f"unknown gate '{name}'{close_names(name, sorted(available))}; "
                            f"available: {', '.join(sorted(available))}, or all / none")
        if not available[name].applies(config):
            raise UserError(f"gate '{name}' does not apply to this run: {available[name].requirement}")
        chosen.append(available[name])
    return chosen


def subprocess_rerun(scenario: str, recipe: Path) -> Callable[[list[str], Path], dict[str, Any]]:
    """Run the same recipe again in a fresh process (gates off there), returning its report."""

    def rerun(extra: list[str], out: Path) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "agentbench_npu", "run", scenario, "--recipe", str(recipe), "--gates", "none",
               "--out", str(out), "-q", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, SECOND_RUN_ENV: "1"})
        report_path = out / "report.json"
        if proc.returncode != 0 or not report_path.is_file():
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise GateRunError(f"the second run ({' '.join(extra)}) exited {proc.returncode}: {last}")
        return json.loads(report_path.read_text())

    return rerun


class GateRunError(RuntimeError):
    """A run a gate asked for did not complete."""


def evaluate_gates(gates: Sequence[Any], ctx_for: Callable[[Any], GateContext],
                   on_gate: Callable[[str], None] | None = None, parallel: bool = False) -> list[GateResult]:
    """Every gate's verdict, in the gates' order.

    With `parallel`, gates are evaluated at once on threads: the ones that start a second run
    (reproducibility, continuity) spend their time waiting on that process, so their start-ups overlap.
    Each second run is deterministic on its own (pinned threads, lockstep batching), so running two side
    by side changes their speed, never their results.
    """
    def one(gate: Any, ctx: GateContext) -> GateResult:
        try:
            return gate.evaluate(ctx)
        except GateRunError as exc:
            return GateResult(gate.name, False, None, None, f"could not evaluate: {exc}")

    if parallel and len(gates) > 1:
        if on_gate is not None:
            on_gate(", ".join(gate.name for gate in gates))
        contexts = [ctx_for(gate) for gate in gates]
        with ThreadPoolExecutor(max_workers=len(gates), thread_name_prefix="gate") as pool:
            return list(pool.map(one, gates, contexts))
    results = []
    for gate in gates:
        if on_gate is not None:
            on_gate(gate.name)
        results.append(one(gate, ctx_for(gate)))
    return results


def first_problem(problems: list[str]) -> str:
    """The detail of a failed gate: where it first broke, and how many other places broke too."""
    return problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")


def exceeds(value: float, limit: float) -> bool:
    """True when `value` is above `limit` or is NaN (NaN compares false with everything)."""
    return not value <= limit


def relative_gap(a: float, b: float) -> float:
    if a == b:
        return 0.0
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    return abs(a - b) / max(abs(a), abs(b), 1e-12)
