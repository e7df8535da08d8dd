"""Local sandbox exec latency and throughput against spawning python3, side by side in one run.

latency:     p50/p99 of `print(1)` through the local sandbox (forked from the warm worker, namespaced, limited,
             its own uid) one after another, vs `python3 -c 'print(1)'` spawned on the host with no isolation
             at all (the same interpreter).
throughput:  execs per second with `concurrency` sandboxes (one exec loop each) at once, vs as many spawn loops.
Target: sandbox p50 <= 0.5x the plain spawn's.

    python benchmarks/sandbox_local.py [--execs 100] [--concurrency 8] [--seconds 5] [--isolation auto]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from agentbench_npu.sandbox.base import SandboxLimits
from agentbench_npu.sandbox.local import LocalSandboxProvider

CODE = "print(1)"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def spawn() -> float:
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CODE, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert out == b"1\n" and proc.returncode == 0
    return time.perf_counter() - start


async def sandboxed(box) -> float:
    start = time.perf_counter()
    result = await box.run_python(CODE)
    assert result.status == "ok" and result.stdout == "1\n", result
    return time.perf_counter() - start


async def loop_for(seconds: float, once) -> int:
    done, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        await once()
        done += 1
    return done


async def main(execs: int, concurrency: int, seconds: float, isolation: str) -> None:
    async with LocalSandboxProvider(SandboxLimits(), {"isolation": isolation}) as provider:
        print(f"local sandbox isolation: {provider.describe()['isolation']}")
        async with provider.sandbox() as box:
            for _ in range(5):  # warm both paths
                await sandboxed(box)
                await spawn()
            ours, theirs = [], []
            for _ in range(execs):  # interleaved, so both see the same machine
                ours.append(await sandboxed(box))
                theirs.append(await spawn())
        p50, p99 = percentile(ours, 50), percentile(ours, 99)
        s50, s99 = percentile(theirs, 50), percentile(theirs, 99)
        print(f"latency  sandbox p50 {p50 * 1e3:6.2f} ms  p99 {p99 * 1e3:6.2f} ms")
        print(f"         spawn   p50 {s50 * 1e3:6.2f} ms  p99 {s99 * 1e3:6.2f} ms")
        print(f"         ratio p50 {p50 / s50:.2f}x (target <= 0.5x)  p99 {p99 / s99:.2f}x")

        boxes = [provider.sandbox() for _ in range(concurrency)]
        for b in boxes:
            await b.start()
        try:
            counts = await asyncio.gather(*[loop_for(seconds, lambda b=b: sandboxed(b)) for b in boxes])
        finally:
            for b in boxes:
                await b.close()
        spawned = await asyncio.gather(*[loop_for(seconds, spawn) for _ in range(concurrency)])
        ours_rate, theirs_rate = sum(counts) / seconds, sum(spawned) / seconds
        print(f"throughput at concurrency {concurrency}: sandbox {ours_rate:.0f}/s  spawn {theirs_rate:.0f}/s  "
              f"ratio {ours_rate / theirs_rate:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--execs", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--isolation", default="auto", choices=["auto", "namespaces", "rlimits"])
    args = parser.parse_args()
    asyncio.run(main(args.execs, args.concurrency, args.seconds, args.isolation))
