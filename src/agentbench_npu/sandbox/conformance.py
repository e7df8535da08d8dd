"""The sandbox conformance suite: what every backend must do, checked against the backend itself.

A plugin that registers a `SandboxProvider` runs the suite against its own provider, the way inspect_ai
sandboxes run their self-check, so "conforms to the contract in base.py" is something shown, not claimed:

    async with MyProvider(SandboxLimits(wall_seconds=3, cpu_seconds=2, memory_mb=256)) as provider:
        for result in await run_checks(provider):
            print(result.name, result.passed, result.detail)

Two kinds of check. `contract` checks are the API every caller relies on (output, exit codes, stdin, env,
files, paths, timeouts, lifecycle). `hostile` checks (hostile.py) run code that attacks the sandbox and
require it to be contained with the right status, and the sandbox to work afterwards. A check that cannot
hold for how the provider is set up here (no root, network allowed) raises `CheckSkipped` with the reason.

Each check opens its own sandboxes, so checks are independent and can be run one by one (one pytest
test each). Small limits keep the suite fast: hostile checks run into the wall and CPU limits on purpose.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Sequence

from .base import STATUSES, ExecResult, Sandbox, SandboxError, SandboxProvider

SECRET_VAR = "AGENTBENCH_TEST_SECRET"
# `describe()["isolation"]` values under which sandboxed code runs as the runner's own user: hostile code
# there can read, write and kill whatever the runner can, so hostile checks of that are skipped, not failed.
WEAK_ISOLATION = frozenset({"rlimits", "none"})


class CheckSkipped(Exception):
    """A check that does not apply to this provider as configured; the message says why."""


@dataclass(frozen=True)
class Check:
    """One conformance check. `run(provider)` raises AssertionError saying what the backend got wrong."""

    name: str
    kind: str  # "contract" | "hostile"
    description: str
    run: Callable[[SandboxProvider], Awaitable[None]]


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check. `passed` is None when it was skipped (`detail` says why)."""

    name: str
    kind: str
    passed: bool | None
    detail: str
    seconds: float

    @property
    def skipped(self) -> bool:
        return self.passed is None


CONTRACT_CHECKS: list[Check] = []
CHECKS: list[Check]  # contract then hostile checks; built on first use (hostile.py imports this module)


def _all_checks() -> list[Check]:
    if "CHECKS" not in globals():
        from .hostile import HOSTILE_CHECKS

        globals()["CHECKS"] = [*CONTRACT_CHECKS, *HOSTILE_CHECKS]
    return globals()["CHECKS"]


def __getattr__(name: str) -> Any:
    if name == "CHECKS":
        return _all_checks()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


async def run_checks(provider: SandboxProvider, names: Iterable[str] | None = None,
                     kinds: Sequence[str] = ("contract", "hostile")) -> list[CheckResult]:
    """Run the chosen checks one after another against a started provider.

    A check that hangs fails after a budget scaled to the wall limit instead of hanging the caller; any
    exception other than AssertionError and CheckSkipped is a failure too (the backend broke)."""
    checks = _all_checks()
    if names is not None:
        wanted = list(names)
        unknown = sorted(set(wanted) - {c.name for c in checks})
        if unknown:
            raise ValueError(f"unknown conformance checks {unknown}; known: {[c.name for c in checks]}")
        checks = [c for c in checks if c.name in wanted]
    budget = 30.0 + 10.0 * float(provider.limits.wall_seconds)
    results = []
    for item in checks:
        if item.kind not in kinds:
            continue
        started = time.monotonic()
        passed: bool | None
        try:
            await asyncio.wait_for(item.run(provider), timeout=budget)
            passed, detail = True, ""
        except CheckSkipped as exc:
            passed, detail = None, str(exc)
        except AssertionError as exc:
            passed, detail = False, str(exc) or "assertion failed"
        except asyncio.TimeoutError:
            passed, detail = False, f"the check did not finish within {budget:.0f} s"
        except Exception as exc:  # the backend raised where the contract says it must not
            passed, detail = False, f"{type(exc).__name__}: {exc}"
        results.append(CheckResult(item.name, item.kind, passed, detail, time.monotonic() - started))
    return results


# -- helpers shared with hostile.py -------------------------------------------------------------------
def show(result: ExecResult) -> str:
    """An ExecResult in one line, enough to see why a check failed."""
    return (f"status={result.status} exit_code={result.exit_code} detail={result.detail!r} "
            f"stdout={result.stdout[:300]!r} stderr={result.stderr[-500:]!r}")


async def run(box: Sandbox, cmd: Sequence[str] | str, **kwargs: Any) -> ExecResult:
    """`box.exec`, checking the result has the contract's shape (any status outside STATUSES is a bug)."""
    result = await box.exec(cmd, **kwargs)
    assert isinstance(result, ExecResult), f"exec returned {type(result).__name__}, not ExecResult"
    assert result.status in STATUSES, f"exec returned unknown status {result.status!r}"
    return result


async def py(box: Sandbox, code: str, **kwargs: Any) -> ExecResult:
    return await run(box, ["python3", "-c", code], **kwargs)


async def expect_ok(box: Sandbox, code: str, what: str, **kwargs: Any) -> ExecResult:
    result = await py(box, code, **kwargs)
    assert result.status == "ok", f"{what}: expected status ok, got {show(result)}"
    return result


async def still_works(box: Sandbox, after: str) -> None:
    """Containment is only half the job: the same sandbox must keep serving the agent."""
    result = await py(box, "print(1)")
    assert result.status == "ok" and result.stdout.strip() == "1", \
        f"after {after} the sandbox no longer works: {show(result)}"


async def expect_raises(action: Awaitable[Any], what: str) -> None:
    try:
        await action
    except SandboxError:
        return
    except Exception as exc:
        raise AssertionError(f"{what}: raised {type(exc).__name__}: {exc}, not SandboxError") from exc
    raise AssertionError(f"{what}: did not raise SandboxError")


def weakly_isolated(provider: SandboxProvider) -> bool:
    return str(provider.describe().get("isolation", "")) in WEAK_ISOLATION


def require_isolation(provider: SandboxProvider, what: str) -> None:
    """Skip a hostile check that only isolation by uid and namespaces (or a container) can pass."""
    if weakly_isolated(provider):
        isolation = provider.describe().get("isolation")
        raise CheckSkipped(f"isolation is {isolation!r} here (code runs as the runner's own user), so {what} "
                           "cannot be contained; run as root for namespace isolation")


def token() -> str:
    return secrets.token_hex(6)


CheckFn = Callable[[SandboxProvider], Awaitable[None]]


def check(kind: str, description: str, into: list[Check]) -> Callable[[CheckFn], CheckFn]:
    """Register an `async def name(provider)` as a Check named after the function."""
    def register(fn: CheckFn) -> CheckFn:
        into.append(Check(fn.__name__, kind, description, fn))
        return fn
    return register


def contract(description: str) -> Callable[[CheckFn], CheckFn]:
    return check("contract", description, CONTRACT_CHECKS)


# -- contract checks ----------------------------------------------------------------------------------
@contract("python3 -c prints to stdout and stderr separately and exits 0; run_python does the same")
async def python_exec(provider: SandboxProvider) -> None:
    async with provider.sandbox() as box:
        result = await expect_ok(box, "import sys; print('hello', 6 * 7); print('warn', file=sys.stderr)", "print")
        assert result.exit_code == 0, f"a clean exit has exit_code 0: {show(result)}"
        assert result.stdout == "hello 42\n", f"stdout: {show(result)}"
        assert "warn" in result.stderr and "warn" not in result.stdout, f"stderr kept apart: {show(result)}"
        again = await box.run_python("print(sum(range(5)))")
        assert again.status == "ok" and again.stdout == "10\n", f"run_python: {show(again)}"


@contract("a string command runs through sh -c (pipes, arithmetic, variables)")
async def shell_string(provider: SandboxProvider) -> None:
    async with provider.sandbox() as box:
        result = await run(box, "x=5; echo hello world | tr a-z A-Z; echo $((x * 2))")
        assert result.status == "ok" and result.stdout == "HELLO WORLD\n10\n", f"shell string: {show(result)}"


@contract("stdin is delivered whole, as text or bytes, to python and to other programs")
async def stdin_delivered(provider: SandboxProvider) -> None:
    async with provider.sandbox() as box:
        text = "line one\nline two ü\n" * 1000
        result = await expect_ok(box, "import sys; d = sys.stdin.read(); print(len(d), d.count('ü'))", "stdin",
                                 stdin=text)
        assert result.stdout.split() == [str(len(text)), "1000"], f"stdin as text: {show(result)}"
        raw = await run(box, ["cat"], stdin=b"bytes in\n")
        assert raw.status == "ok" and raw.stdout == "bytes in\n", f"stdin as bytes to cat: {show(raw)}"


@contract("env is added to a minimal environment; the runner's own environment never leaks in")
async def env_isolated(provider: SandboxProvider) -> None:
    secret = token()
    before = os.environ.get(SECRET_VAR)
    os.environ[SECRET_VAR] = secret
    try:
        async with provider.sandbox() as box:
            result = await expect_ok(box, "import os, json; print(json.dumps(dict(os.environ)))", "env",
                                     env={"AGENTBENCH_GIVEN": "yes"})
    finally:
        if before is None:
            os.environ.pop(SECRET_VAR, None)
        else:
            os.environ[SECRET_VAR] = before
    seen = json.loads(result.stdout)
    assert seen.get("AGENTBENCH_GIVEN") == "yes", f"env given to exec is missing: {sorted(seen)}"
    assert SECRET_VAR not in seen and secret not in result.stdout, "the runner's environment leaked into the sandbox"
    assert "PATH" in seen, f"PATH is part of the minimal environment: {sorted(seen)}"


@contract("cwd is relative to the work dir; by default commands run in the work dir")
async def cwd_relative(provider: SandboxProvider) -> None:
    async with provider.sandbox() as box:
        await box.write_file("sub/dir/in.txt", "x")
        base = (await run(box, "pwd")).stdout.strip()
        inner = await run(box, "pwd; ls", cwd="sub/dir")
        assert inner.status == "ok" and inner.stdout.split() == [f"{base}/sub/dir", "in.txt"], \
            f"cwd='sub/dir' from work dir {base!r}: {show(inner)}"


@contract("write_file/read_file round trip text (as UTF-8) and bytes, nested dirs, overwrite truncates")
async def file_round_trip(provider: SandboxProvider) -> None:
    async with provider.sandbox() as box:
        await box.write_file("note.txt", "héllo ✓\n")
        assert await box.read_file("note.txt") == "héllo ✓\n".encode(), "text round trip"
        blob = bytes(range(256)) * 64
        await box.write_file("a/b/c/blob.bin", blob)
        assert await box.read_file("a/b/c/blob.bin") == blob, "bytes round trip in nested dirs"
        await box.write_file("a/b/c/blob.bin", b"short")
        assert await box.read_file("a/b/c/blob.bin") == b"short", "overwriting must replace the whole file"


@contract("files persist across execs within one sandbox, both ways between exec and write_file")
async def files_persist(provider: SandboxProvider) -> None:
    async with provider.sandbox() as box:
        await box.write_file("count.txt", "0")
        bump = "n = int(open('count.txt').read()); open('count.txt', 'w').write(str(n + 1)); print(n + 1)"
        for expected in ("1", "2"):
            result = await expect_ok(box, bump, "bump a counter file")
            assert result.stdout.strip() == expected, f"the file did not persist between execs: {show(result)}"


@contract("a file written by exec (in a new dir) is readable with read_file")
async def exec_file_readable(provider: SandboxProvider) -> None:
    async with provider.sandbox() as box:
        code = "import os; os.makedirs('out/deep'); open('out/deep/r.bin', 'wb').write(bytes(range(256)))"
        await expect_ok(box, code, "write a file from exec")
        assert await box.read_file("out/deep/r.bin") == bytes(range(256)), "read_file of a file made by exec"


@contract("paths escaping the work dir raise SandboxError (read, write, cwd); so does a missing file")
async def escaping_paths_refused(provider: SandboxProvider) -> None:
    mark = token()
    async with provider.sandbox() as box:
        for path in ("../x", "/etc/passwd", "a/../../x", "../../../../etc/passwd"):
            await expect_raises(box.read_file(path), f"read_file({path!r})")
        outside = [f"/etc/agentbench-escape-{mark}", f"/tmp/agentbench-escape-{mark}"]
        for path in (f"../agentbench-escape-{mark}", *outside):
            await expect_raises(box.write_file(path, "x"), f"write_file({path!r})")
        assert not any(os.path.exists(p) for p in outside), "write_file wrote outside the work dir"
        await expect_raises(box.exec(["true"], cwd=".."), "exec(cwd='..')")
        await expect_raises(box.read_file("no/such/file.txt"), "read_file of a missing file")


@contract("a per-call timeout lower than the wall limit is honoured: status timeout, well before the limit")
async def per_call_timeout(provider: SandboxProvider) -> None:
    async with provider.sandbox() as box:
        timeout = min(1.0, box.limits.wall_seconds / 4)
        result = await py(box, "import time; time.sleep(600)", timeout=timeout)
        assert result.status == "timeout", f"a sleep past timeout={timeout} must time out: {show(result)}"
        wall = box.limits.wall_seconds
        assert result.duration < wall, f"timeout={timeout} was ignored: it ran {result.duration:.2f} s (wall {wall})"
        await still_works(box, "a timeout")


@contract("a non-zero exit is status error with its exit_code (sys.exit, an exception, a shell exit)")
async def nonzero_exit(provider: SandboxProvider) -> None:
    async with provider.sandbox() as box:
        for cmd, code in ((["python3", "-c", "import sys; sys.exit(3)"], 3), ("echo out; exit 7", 7),
                          (["python3", "-c", "raise ValueError('boom')"], 1)):
            result = await run(box, cmd)
            assert result.status == "error" and result.exit_code == code, \
                f"{cmd!r} must be error/{code}: {show(result)}"
        assert "ValueError: boom" in result.stderr, f"the traceback goes to stderr: {show(result)}"


@contract("two open sandboxes do not see each other's files")
async def sandboxes_separate(provider: SandboxProvider) -> None:
    async with provider.sandbox() as one, provider.sandbox() as two:
        await one.write_file("mine.txt", "one")
        await expect_ok(one, "open('made.txt', 'w').write('one')", "write in the first sandbox")
        await expect_raises(two.read_file("mine.txt"), "the second sandbox reading the first one's file")
        result = await expect_ok(two, "import os; print(sorted(os.listdir('.')))", "list the second sandbox")
        assert "mine.txt" not in result.stdout and "made.txt" not in result.stdout, f"files shared: {show(result)}"


@contract("closing a sandbox twice is safe")
async def close_twice(provider: SandboxProvider) -> None:
    box = provider.sandbox()
    async with box:
        await expect_ok(box, "print(1)", "a first exec")
    await box.close()


@contract("exec, read_file and write_file after close raise SandboxError")
async def use_after_close(provider: SandboxProvider) -> None:
    async with provider.sandbox() as box:
        await box.write_file("f.txt", "x")
    await expect_raises(box.exec(["true"]), "exec after close")
    await expect_raises(box.read_file("f.txt"), "read_file after close")
    await expect_raises(box.write_file("g.txt", "x"), "write_file after close")
