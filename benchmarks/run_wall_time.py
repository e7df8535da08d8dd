"""Cold and warm wall time of `agentbench-npu run SCENARIO` (retool is the README's main job), in fresh processes.

cold: an empty model cache, so the tiny model is built and warm-started first.
warm: the same cache again, as a user's second run.
Each with the four gates (the default; reproducibility and continuity each start a second process) and
without them (`--gates none`: the loop alone). Prints all four, and each against its target on 2 cores
(base: cold <= 60 s, warm <= 20 s; retool: cold <= 60 s, warm <= 40 s).

    python benchmarks/run_wall_time.py [--scenario retool] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

TARGETS = {"base": {"cold": 60.0, "warm": 20.0}, "retool": {"cold": 60.0, "warm": 40.0}}


def timed_run(scenario: str, steps: int, cache: str, out: str, gates: str) -> float:
    env = {**os.environ, "AGENTBENCH_NPU_CACHE": cache}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "agentbench_npu", "run", scenario, "--steps", str(steps),
                           "--out", out, "--gates", gates, "-q"], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"run failed ({proc.returncode}): {proc.stderr.strip()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="retool")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    results = {}
    for gates in ("none", "all"):
        with tempfile.TemporaryDirectory() as tmp:
            cache = os.path.join(tmp, "cache")
            for name in ("cold", "warm"):
                results[(name, gates)] = timed_run(args.scenario, args.steps, cache, os.path.join(tmp, name), gates)
    targets = TARGETS.get(args.scenario, TARGETS["base"])
    print(f"run {args.scenario}, {args.steps} steps, {os.cpu_count()} cores")
    for (name, gates), seconds in results.items():
        label = f"{name}, gates {gates}"
        print(f"{label:18s} {seconds:6.1f} s   {seconds / targets[name]:.2f} of the {targets[name]:.0f} s target")
    for gates in ("none", "all"):
        print(f"cold / warm (gates {gates}): {results[('cold', gates)] / results[('warm', gates)]:.2f}x")


if __name__ == "__main__":
    main()
