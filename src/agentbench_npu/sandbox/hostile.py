"""Hostile conformance checks: code that attacks the sandbox must be contained, and the sandbox must live on.

Each check runs the attack, asserts the outcome a caller sees (the status), asserts that the attack did
not reach the host, and then runs `print(1)` in the same sandbox. The attack snippets catch only OSError
and print one verdict per attempt ("NAME: blocked ..." or an alarm word), so a snippet that crashes for an
unrelated reason fails the check instead of passing it by accident.
"""

from __future__ import annotations

import inspect
import os
import socket
import tempfile
from typing import Callable

from .base import Sandbox, SandboxProvider
from .conformance import (SECRET_VAR, Check, CheckFn, CheckSkipped, check, expect_ok, py, require_isolation, run, show,
                          still_works, token, weakly_isolated)

HOSTILE_CHECKS: list[Check] = []


def hostile(description: str) -> Callable[[CheckFn], CheckFn]:
    return check("hostile", description, HOSTILE_CHECKS)


def within_wall(provider: SandboxProvider, seconds: float) -> bool:
    """Ended near the wall limit: generous, a loaded machine is slow, but a missing limit is not."""
    wall = float(provider.limits.wall_seconds)
    return seconds <= wall + max(2.0, wall)


ATTEMPT = """
import errno, os, socket
def attempt(name, fn):
    try:
        fn()
    except OSError as exc:
        print(f"{name}: blocked {errno.errorcode.get(exc.errno, exc)}")
    else:
        print(f"{name}: ESCAPED")
"""


def escaped(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.endswith("ESCAPED")]


async def attempts(box: Sandbox, body: str, expected: int, what: str) -> str:
    """Run `body` (which calls attempt() `expected` times); every attempt must have been blocked."""
    result = await expect_ok(box, ATTEMPT + body, what)
    verdicts = [line for line in result.stdout.splitlines() if ": " in line]
    assert len(verdicts) == expected, f"{what}: expected {expected} verdicts, got {show(result)}"
    assert not escaped(result.stdout), f"{what} was not contained: {escaped(result.stdout)}"
    return result.stdout


@hostile("a fork bomb ends (not ok) within the wall limit, leaves nothing running, and the sandbox works")
async def fork_bomb(provider: SandboxProvider) -> None:
    require_isolation(provider, "a fork bomb (no per-user process limit)")
    async with provider.sandbox() as box:
        result = await py(box, "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
        assert result.status != "ok", f"a fork bomb cannot end ok: {show(result)}"
        assert within_wall(provider, result.duration), f"the fork bomb ran {result.duration:.1f} s: {show(result)}"
        await assert_no_leftovers(provider, box, "a fork bomb")
        await still_works(box, "a fork bomb")


@hostile("allocating far past the memory limit (one block, a growing list) is status memory")
async def memory_bomb(provider: SandboxProvider) -> None:
    async with provider.sandbox() as box:
        for code in ("bytearray(10**10)", "x = []\nwhile True:\n    x.append(bytearray(10**6))"):
            result = await py(box, code)
            assert result.status == "memory", f"{code!r} must be status memory: {show(result)}"
        await still_works(box, "a memory bomb")


@hostile("an endless sleeping loop is stopped by the wall limit: status timeout")
async def sleep_forever(provider: SandboxProvider) -> None:
    async with provider.sandbox() as box:
        result = await py(box, "import time\nwhile True:\n    time.sleep(0.05)")
        assert result.status == "timeout", f"a sleeping loop must time out: {show(result)}"
        assert within_wall(provider, result.duration), f"it ran {result.duration:.1f} s: {show(result)}"
        await still_works(box, "a sleeping loop")


@hostile("a busy CPU loop is stopped by the CPU or wall limit: status timeout")
async def busy_loop(provider: SandboxProvider) -> None:
    async with provider.sandbox() as box:
        result = await py(box, "while True:\n    pass")
        assert result.status == "timeout", f"a busy loop must time out: {show(result)}"
        assert within_wall(provider, result.duration), f"it ran {result.duration:.1f} s: {show(result)}"
        await still_works(box, "a busy loop")


@hostile("100 MB of stdout is cut at output_bytes: status output_truncated")
async def output_flood(provider: SandboxProvider) -> None:
    async with provider.sandbox() as box:
        result = await py(box, "import sys\nchunk = 'x' * 2**20\nfor _ in range(100):\n    sys.stdout.write(chunk)")
        assert result.status == "output_truncated", f"100 MB of output must be truncated: {show(result)}"
        kept = len(result.stdout.encode()) + len(result.stderr.encode())
        assert 0 < kept <= box.limits.output_bytes, f"kept {kept} bytes of output, limit {box.limits.output_bytes}"
        await still_works(box, "an output flood")


@hostile("no network: connecting to the runner's loopback port, a loopback server inside, or 1.1.1.1:53 fails")
async def network_blocked(provider: SandboxProvider) -> None:
    if provider.limits.network:
        raise CheckSkipped("limits.network is True: the sandbox is meant to reach the network")
    require_isolation(provider, "network access (no network namespace)")
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        port = listener.getsockname()[1]
        body = f"""
def connect(addr):
    s = socket.socket(); s.settimeout(2); s.connect(addr); s.close()
def loopback_inside():
    server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen()
    connect(server.getsockname())
attempt("runner loopback port", lambda: connect(("127.0.0.1", {port})))
attempt("loopback inside", loopback_inside)
attempt("outside 1.1.1.1:53", lambda: connect(("1.1.1.1", 53)))
"""
        async with provider.sandbox() as box:
            await attempts(box, body, 3, "network access")
            await still_works(box, "network attempts")
    finally:
        listener.close()


@hostile("writing outside the work dir (/tmp, /etc, the runner's cwd, the parent dir) fails on the host too")
async def write_outside(provider: SandboxProvider) -> None:
    require_isolation(provider, "writes outside the work dir (same user, writable file system)")
    mark = token()
    targets = [f"/tmp/agentbench-escape-{mark}", f"/etc/agentbench-escape-{mark}",
               os.path.join(os.getcwd(), f"agentbench-escape-{mark}")]
    body = "".join(f"attempt({t!r}, lambda: open({t!r}, 'w').write('x'))\n" for t in targets)
    body += f"attempt('../', lambda: open('../agentbench-escape-{mark}', 'w').write('x'))\n"
    try:
        async with provider.sandbox() as box:
            await attempts(box, body, len(targets) + 1, "writing outside the work dir")
            await still_works(box, "writes outside the work dir")
        appeared = [t for t in targets if os.path.exists(t)]
        assert not appeared, f"files written by the sandbox appeared on the host: {appeared}"
    finally:
        for target in targets:
            if os.path.exists(target):
                os.remove(target)


@hostile("reading /etc/shadow fails")
async def read_shadow(provider: SandboxProvider) -> None:
    require_isolation(provider, "reading root-only files")
    async with provider.sandbox() as box:
        await attempts(box, "attempt('/etc/shadow', lambda: open('/etc/shadow').read())\n", 1,
                       "reading /etc/shadow")


@hostile("the runner's environment cannot be read: not via /proc/<runner pid>/environ, not in os.environ")
async def runner_secrets(provider: SandboxProvider) -> None:
    require_isolation(provider, "reading the runner's /proc entries (same user)")
    secret = token()
    before = os.environ.get(SECRET_VAR)
    os.environ[SECRET_VAR] = secret
    body = f"""
attempt("runner environ", lambda: open("/proc/{os.getpid()}/environ", "rb").read())
attempt("runner mem", lambda: open("/proc/{os.getpid()}/mem", "rb").read(1))
print("in os.environ:", {secret!r} in repr(dict(os.environ)))
"""
    try:
        async with provider.sandbox() as box:
            stdout = await attempts(box, body, 3, "reading the runner's environment")
            assert "in os.environ: False" in stdout, f"the runner's secret is in os.environ: {stdout!r}"
    finally:
        if before is None:
            os.environ.pop(SECRET_VAR, None)
        else:
            os.environ[SECRET_VAR] = before


@hostile("killing the sandbox's parent or the runner fails; the runner and the sandbox live on")
async def kill_parent(provider: SandboxProvider) -> None:
    require_isolation(provider, "signals to the runner (same user)")
    body = f"""
attempt("kill parent", lambda: os.kill(os.getppid(), 9))
attempt("kill runner", lambda: os.kill({os.getpid()}, 9))
"""
    async with provider.sandbox() as box:
        await attempts(box, body, 2, "killing the parent and the runner")
        os.kill(os.getpid(), 0)  # we are still here to say so
        await still_works(box, "attempts to kill its parent")


async def assert_no_leftovers(provider: SandboxProvider, box: Sandbox, after: str) -> None:
    """Ask the provider's `leftover_processes(box)` hook, where it has one: nothing of the box may run."""
    hook = getattr(provider, "leftover_processes", None)
    if hook is None:
        return
    count = hook(box)
    if inspect.isawaitable(count):
        count = await count
    assert count == 0, f"{count} processes of the sandbox are still running after {after}"


@hostile("processes left in the background (subprocess, fork, a setsid daemon) are gone when the exec ends")
async def background_processes(provider: SandboxProvider) -> None:
    digits = f"{int(token(), 16) % 10**9:09d}"
    mark = f"99.{digits}"  # a sleep duration no other process on the host uses
    code = f"""
import os, subprocess
subprocess.Popen(["sleep", "{mark}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
if os.fork() == 0:
    os.execvp("sleep", ["sleep", "{mark}"])
"""
    if not weakly_isolated(provider):  # in its own session it would escape a process-group kill: not started
        code += f"""
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execvp("sleep", ["sleep", "{mark}"])
    os._exit(0)
"""
    count = f"""
import os
def state(pid):
    try:
        return open(f"/proc/{{pid}}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"
def cmd(pid):
    try:
        return open(f"/proc/{{pid}}/cmdline", "rb").read()
    except OSError:
        return b""
import time
needle = ("99." + "{digits}").encode()  # built here, so this snippet's own command line does not match
deadline = time.monotonic() + 2  # a SIGKILL sent as the exec ended may take a moment to land
while True:
    left = sum(1 for p in os.listdir("/proc") if p.isdigit() and needle in cmd(p) and state(p) not in "ZX")
    if not left or time.monotonic() > deadline:
        break
    time.sleep(0.02)
print(left)
"""
    async with provider.sandbox() as box:
        await expect_ok(box, code + "print('left them running')", "starting background processes")
        await assert_no_leftovers(provider, box, "an exec that left background processes")
        seen = await expect_ok(box, count, "counting leftovers")
        assert seen.stdout.strip() == "0", f"background processes outlived their exec: {show(seen)}"
        await still_works(box, "background processes")


@hostile("symlinks planted by code do not let read_file/write_file reach host files")
async def symlink_escape(provider: SandboxProvider) -> None:
    secret = token()
    fd, host_file = tempfile.mkstemp(prefix="agentbench-conformance-")
    os.write(fd, secret.encode())
    os.close(fd)
    host_dir = os.path.dirname(host_file)
    new_host_file = os.path.join(host_dir, f"agentbench-escape-{token()}")
    try:
        async with provider.sandbox() as box:
            await expect_ok(box, f"import os; os.symlink({host_file!r}, 'leak'); os.symlink({host_dir!r}, 'dir')",
                            "planting symlinks")
            for path in ("leak", f"dir/{os.path.basename(host_file)}"):
                try:
                    data = await box.read_file(path)
                except Exception:  # noqa: BLE001 - any refusal contains it; only the secret coming back fails
                    data = b""
                assert secret.encode() not in data, f"read_file({path!r}) followed a symlink to a host file"
            for path in ("leak", f"dir/{os.path.basename(new_host_file)}"):
                try:
                    await box.write_file(path, "pwned")
                except Exception:  # noqa: BLE001, S110 - any refusal contains it; the host files are checked below
                    pass
            with open(host_file) as f:
                assert f.read() == secret, "write_file through a planted symlink overwrote a host file"
            assert not os.path.exists(new_host_file), "write_file through a planted symlink created a host file"
            await still_works(box, "planting symlinks")
    finally:
        for path in (host_file, new_host_file):
            if os.path.lexists(path):
                os.remove(path)


@hostile("code in one sandbox cannot read another open sandbox's files by absolute path")
async def cross_sandbox_read(provider: SandboxProvider) -> None:
    require_isolation(provider, "reads across sandboxes (one user for all)")
    secret = token()
    async with provider.sandbox() as one, provider.sandbox() as two:
        await one.write_file("secret.txt", secret)
        where = (await expect_ok(one, "import os; print(os.getcwd())", "the first sandbox's work dir")).stdout.strip()
        result = await run(two, ["python3", "-c", f"print(open({where + '/secret.txt'!r}).read())"])
        assert secret not in result.stdout, f"the second sandbox read the first one's file: {show(result)}"
        await still_works(two, "reading across sandboxes")
