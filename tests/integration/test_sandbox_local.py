"""The sandbox conformance suite applied to the `local` backend, and the suite's own ability to fail.

One module-scoped provider serves every check (the local provider is thread-based and does not belong to
an event loop, so each test drives it with its own `asyncio.run`). Limits are small so that hostile checks,
which run into them on purpose, take a few seconds at most. Run as root, every check applies; without
root the provider falls back to rlimits and the hostile checks that need root report themselves skipped.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest

from agentbench_npu.sandbox.base import ExecResult, SandboxError, SandboxLimits, SandboxProvider
from agentbench_npu.sandbox.conformance import CHECKS, CONTRACT_CHECKS, CheckResult, run_checks
from agentbench_npu.sandbox.local import LocalSandbox, LocalSandboxProvider, live_processes

LIMITS = SandboxLimits(wall_seconds=3, cpu_seconds=2, memory_mb=256, output_bytes=65536, processes=32)
# uid ranges away from the default (3,000,000), so that a run of the real runner on this machine and these
# tests never share uids, and "no process of our uids is left" means ours
MODULE_UID_BASE, CLOSE_UID_BASE = 3_100_000, 3_200_000




def sandbox_roots() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("agentbench-sandboxes-*")}


async def started_and_checked(provider: SandboxProvider, **kwargs: Any) -> list[CheckResult]:
    async with provider:
        return await run_checks(provider, **kwargs)


@pytest.fixture(scope="module")
def provider():
    """One provider for the module; closing it must leave no process of its uids and no directory."""
    provider = LocalSandboxProvider(LIMITS, {"uid_base": MODULE_UID_BASE, "slots": 16})
    asyncio.run(provider.start())
    root, uids = provider.root, provider.describe()["uid_range"]
    yield provider
    asyncio.run(provider.close())
    # checked after the close, not between checks: closing a sandbox reaps its uid asynchronously, so a
    # short-lived reaper of that uid may still be running right after a check (see the report on local.py)
    assert root is not None and not root.exists()
    if uids is not None:
        assert live_processes(set(range(uids[0], uids[1] + 1))) == 0


# -- the suite against the local backend ----------------------------------------------------------
@pytest.mark.parametrize("check", CHECKS, ids=[f"{c.kind}-{c.name}" for c in CHECKS])
def test_the_local_sandbox_passes_every_conformance_check(provider: LocalSandboxProvider, check):
    [result] = asyncio.run(run_checks(provider, names=[check.name]))
    if result.skipped:
        pytest.skip(f"{check.name}: {result.detail}")
    assert result.passed, f"{check.name} ({check.description}): {result.detail}"


def test_after_every_check_no_work_dir_of_the_provider_is_left(provider: LocalSandboxProvider):
    assert provider.leftover_dirs() == 0


def _own_uid(provider: LocalSandboxProvider, box: LocalSandbox) -> int:
    """The sandbox's own uid, which a reap clears; skips where sandboxes share the runner's (not root)."""
    if box.uid is None:
        pytest.skip("sandboxes share the runner's uid (not root): no per-uid reaper")
    assert provider.link is not None
    return box.uid


def test_an_exec_sent_while_its_uid_is_being_reaped_waits_for_the_reaper_instead_of_being_killed_by_it(
        provider: LocalSandboxProvider):
    # what an output flood leaves behind: the runner asks for the uid to be cleared, the flood dies of its own
    # SIGPIPE, and the agent's next command arrives while the reaper's kill(-1) may still be running
    async def scenario() -> list[tuple[str, str]]:
        async with provider.sandbox() as box:
            uid = _own_uid(provider, box)
            results = []
            for _ in range(40):
                provider.link.reap(uid)  # not awaited, as the link does it
                result = await box.exec(["python3", "-c", "print(1)"])
                results.append((result.status, result.stdout.strip()))
            return results

    assert asyncio.run(scenario()) == [("ok", "1")] * 40


def test_a_reap_asked_for_after_an_exec_was_sent_stops_it_even_while_it_waits_for_an_earlier_reaper(
        provider: LocalSandboxProvider):
    # the exec may wait for the first reaper (its uid is being cleared); the second reap must still stop it,
    # or an exec whose deadline passed while it waited would start afterwards and never be stopped
    async def scenario() -> list[str]:
        async with provider.sandbox() as box:
            uid = _own_uid(provider, box)
            statuses = []
            for _ in range(20):
                provider.link.reap(uid)
                running = asyncio.ensure_future(box.exec(["sleep", "30"]))
                await asyncio.sleep(0)  # the exec's request is queued before the second reap's
                await asyncio.wrap_future(provider.link.reap(uid))
                statuses.append((await running).status)
            return statuses

    assert asyncio.run(scenario()) == ["killed"] * 20


def test_closing_the_provider_mid_exec_fails_the_exec_and_leaves_no_process_and_no_directory():
    provider = LocalSandboxProvider(LIMITS.replace(wall_seconds=30), {"uid_base": CLOSE_UID_BASE, "slots": 8})

    async def scenario() -> tuple[Path, list[int] | None]:
        await provider.start()
        assert provider.root is not None
        root, uids = provider.root, provider.describe()["uid_range"]
        box = provider.sandbox()
        await box.start()
        code = "import subprocess, time; subprocess.Popen(['sleep', '100']); open('ready', 'w'); time.sleep(100)"
        running = asyncio.ensure_future(box.exec(["python3", "-c", code]))
        for _ in range(1000):  # wait until the exec is surely running (the file is its signal)
            try:
                await box.read_file("ready")
                break
            except SandboxError:
                await asyncio.sleep(0.01)
        await provider.close()
        with pytest.raises(SandboxError):
            await running
        await box.close()  # a sandbox closed after its provider: nothing left to do, and no error
        return root, uids

    root, uids = asyncio.run(scenario())
    assert not root.exists()
    assert root.name not in sandbox_roots()
    if uids is not None:
        assert live_processes(set(range(uids[0], uids[1] + 1))) == 0


# -- without root's isolation -----------------------------------------------------------------------
def test_rlimits_mode_still_passes_every_contract_check():
    provider = LocalSandboxProvider(LIMITS, {"isolation": "rlimits"})
    results = asyncio.run(started_and_checked(provider, kinds=("contract",)))
    assert [r.name for r in results] == [c.name for c in CONTRACT_CHECKS]
    assert [(r.name, r.detail) for r in results if not r.passed] == []


def test_rlimits_mode_skips_the_hostile_checks_that_need_root_with_a_reason_and_passes_the_rest():
    provider = LocalSandboxProvider(LIMITS.replace(wall_seconds=1.5, cpu_seconds=1), {"isolation": "rlimits"})
    results = asyncio.run(started_and_checked(provider, kinds=("hostile",)))
    skipped = {r.name for r in results if r.skipped}
    assert {"fork_bomb", "network_blocked", "write_outside", "kill_parent", "runner_secrets"} <= skipped
    assert all("rlimits" in r.detail for r in results if r.skipped)
    assert [(r.name, r.detail) for r in results if r.passed is False] == []
    assert {"memory_bomb", "output_flood", "sleep_forever", "busy_loop", "symlink_escape"} <= \
        {r.name for r in results if r.passed}


# -- the suite can fail ---------------------------------------------------------------------------------
class StdinDroppingSandbox(LocalSandbox):
    async def exec(self, cmd: Sequence[str] | str, *, timeout: float | None = None, stdin: str | bytes | None = None,
                   env: Mapping[str, str] | None = None, cwd: str | None = None) -> ExecResult:
        return await super().exec(cmd, timeout=timeout, env=env, cwd=cwd)


class EnvLeakingSandbox(LocalSandbox):
    async def exec(self, cmd: Sequence[str] | str, *, timeout: float | None = None, stdin: str | bytes | None = None,
                   env: Mapping[str, str] | None = None, cwd: str | None = None) -> ExecResult:
        return await super().exec(cmd, timeout=timeout, stdin=stdin, env={**os.environ, **(env or {})}, cwd=cwd)


class TimeoutIgnoringSandbox(LocalSandbox):
    async def exec(self, cmd: Sequence[str] | str, *, timeout: float | None = None, stdin: str | bytes | None = None,
                   env: Mapping[str, str] | None = None, cwd: str | None = None) -> ExecResult:
        return await super().exec(cmd, stdin=stdin, env=env, cwd=cwd)


class ExplodingSandbox(LocalSandbox):
    async def exec(self, cmd: Sequence[str] | str, **kwargs: Any) -> ExecResult:
        raise RuntimeError("worker gone")


class BrokenProvider(SandboxProvider):
    """Hands out a misbehaving sandbox class on top of a working local provider."""

    name = "broken"

    def __init__(self, inner: LocalSandboxProvider, box_class: type[LocalSandbox]):
        super().__init__(inner.limits)
        self.inner, self.box_class = inner, box_class

    def sandbox(self) -> LocalSandbox:
        return self.box_class(self.inner)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()


@pytest.mark.parametrize("box_class, check, words", [
    (StdinDroppingSandbox, "stdin_delivered", "stdin"),
    (EnvLeakingSandbox, "env_isolated", "leaked"),
    (TimeoutIgnoringSandbox, "per_call_timeout", "was ignored"),
    (ExplodingSandbox, "python_exec", "RuntimeError: worker gone"),
], ids=["stdin-dropped", "env-leaked", "timeout-ignored", "exec-raises"])
def test_a_misbehaving_backend_fails_the_check_that_covers_it(provider: LocalSandboxProvider, box_class, check, words):
    [result] = asyncio.run(run_checks(BrokenProvider(provider, box_class), names=[check]))
    assert result.passed is False
    assert words in result.detail


def test_asking_for_an_unknown_check_is_an_error_naming_it(provider: LocalSandboxProvider):
    with pytest.raises(ValueError, match="no_such_check"):
        asyncio.run(run_checks(provider, names=["no_such_check"]))


def test_every_check_has_a_unique_name_a_kind_and_a_description():
    assert len({c.name for c in CHECKS}) == len(CHECKS)
    assert {c.kind for c in CHECKS} == {"contract", "hostile"}
    assert all(c.description for c in CHECKS)
