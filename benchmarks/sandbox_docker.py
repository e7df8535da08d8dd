"""Docker sandbox exec latency and throughput against spawning python3 on the host, side by side in one run.

latency:     p50/p99 of `print(1)` run with exec in one docker sandbox, one after another, vs
             `python3 -c 'print(1)'` spawned on the host (subprocess, the same interpreter command).
throughput:  execs per second with `concurrency` sandboxes (one exec loop each) running at once, vs the
             same number of host spawn loops at once.
open/close:  how long opening a sandbox takes from the warm pool and without one, and closing it.
No targets: this is for knowing the cost (a docker exec goes through the daemon, containerd and runc).

    python benchmarks/sandbox_docker.py [--execs 50] [--concurrency 8] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from agentbench_npu.sandbox.base import SandboxLimits
from agentbench_npu.sandbox.docker import DockerSandboxProvider

CODE = "print(1)"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def host_spawn() -> float:
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec("python3", "-c", CODE, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert out == b"1\n" and proc.returncode == 0
    return time.perf_counter() - start


async def docker_exec(box) -> float:
    start = time.perf_counter()
    result = await box.exec(["python3", "-c", CODE])
    assert result.status == "ok" and result.stdout == "1\n", result
    return time.perf_counter() - start


async def loop_for(seconds: float, once) -> int:
    done, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        await once()
        done += 1
    return done


async def main(execs: int, concurrency: int, seconds: float) -> None:
    limits = SandboxLimits(wall_seconds=30, cpu_seconds=30)
    async with DockerSandboxProvider(limits, {"warm": concurrency}) as provider:
        # -- latency, one exec at a time -------------------------------------------------------------
        async with provider.sandbox() as box:
            for _ in range(3):
                await docker_exec(box)
                await host_spawn()
            d, h = [], []
            for _ in range(execs):  # interleaved, so both see the same machine load
                d.append(await docker_exec(box))
                h.append(await host_spawn())
        d50, d99, h50, h99 = (percentile(d, 50), percentile(d, 99), percentile(h, 50), percentile(h, 99))
        print(f"latency of print(1), {execs} execs each")
        print(f"  docker exec   p50 {d50 * 1e3:7.1f} ms   p99 {d99 * 1e3:7.1f} ms")
        print(f"  host spawn    p50 {h50 * 1e3:7.1f} ms   p99 {h99 * 1e3:7.1f} ms")
        print(f"  ratio docker/host   p50 {d50 / h50:5.1f}x   p99 {d99 / h99:5.1f}x")

        # -- throughput, `concurrency` sandboxes at once ------------------------------------------------
        await asyncio.sleep(0)
        opened = time.perf_counter()
        boxes = [provider.sandbox() for _ in range(concurrency)]
        await asyncio.gather(*(b.start() for b in boxes))
        open_warm = (time.perf_counter() - opened) / concurrency
        try:
            for b in boxes:
                await docker_exec(b)
            counts = await asyncio.gather(*(loop_for(seconds, lambda b=b: docker_exec(b)) for b in boxes))
            docker_rate = sum(counts) / seconds
            counts = await asyncio.gather(*(loop_for(seconds, host_spawn) for _ in range(concurrency)))
            host_rate = sum(counts) / seconds
        finally:
            closing = time.perf_counter()
            await asyncio.gather(*(b.close() for b in boxes))
            close_each = (time.perf_counter() - closing) / concurrency
        print(f"throughput of print(1), concurrency {concurrency}, {seconds:.0f} s each")
        print(f"  docker exec   {docker_rate:7.1f} execs/s")
        print(f"  host spawn    {host_rate:7.1f} execs/s")
        print(f"  ratio docker/host   {docker_rate / host_rate:5.2f}x")

        # -- opening and closing ------------------------------------------------------------------------
        cold = []
        async with DockerSandboxProvider(limits, {"warm": 0}) as unpooled:
            for _ in range(3):
                start = time.perf_counter()
                async with unpooled.sandbox() as box:
                    cold.append(time.perf_counter() - start)
        print("opening a sandbox")
        print(f"  from the warm pool {open_warm * 1e3:7.0f} ms each ({concurrency} at once, pool of {concurrency})")
        print(f"  new container      {statistics.median(cold) * 1e3:7.0f} ms (median of 3, one at a time)")
        print(f"  close              {close_each * 1e3:7.0f} ms each (removal continues in the background)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--execs", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    asyncio.run(main(args.execs, args.concurrency, args.seconds))
