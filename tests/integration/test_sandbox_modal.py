"""The modal sandbox backend: its real code path against FakeModal, plus a live run when credentials exist.

FakeModal is a stand-in for the `modal` SDK at its boundary (App.lookup, Image, Sandbox.create/exec/
filesystem/terminate, ContainerProcess streams). It records every call and runs each exec as a local
subprocess inside a temp dir that plays the container's file system, with Modal's quirks: `wait()` returns
-1 when the exec's own timeout passes, a signal death reads 128 + signal, and each call exists as `.aio`.
Calling a FakeModal function without `.aio` fails the test: the backend must never block its event loop.
Where the real SDK is installed, the recorded calls are also bound against its real signatures.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import pytest

from agentbench_npu.errors import MissingExtraError, UserError
from agentbench_npu.sandbox.base import SandboxError, SandboxLimits
from agentbench_npu.sandbox.modal import ModalCredentialsError, ModalSandboxProvider

LIMITS = SandboxLimits(wall_seconds=3, cpu_seconds=3, memory_mb=256, output_bytes=4096, file_mb=4)


# --------------------------------------------------------------------------------------------------
# FakeModal: the SDK's surface, local subprocesses underneath
# --------------------------------------------------------------------------------------------------
class _Dual:
    """One fake SDK call: `.aio(...)` is the asynchronous variant; the plain call would block the loop."""

    def __init__(self, name: str, fn: Any):
        self.name, self.aio = name, fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"blocking SDK call {self.name}() from async code; use {self.name}.aio()")


class _FakeExceptions:
    class Error(Exception):
        pass

    class AuthError(Error):
        pass

    class SandboxFilesystemError(Error):
        pass

    class SandboxFilesystemNotFoundError(SandboxFilesystemError):
        pass

    class SandboxFilesystemIsADirectoryError(SandboxFilesystemError):
        pass


class FakeImage:
    def __init__(self, kind: str, **spec: Any):
        self.kind, self.spec = kind, spec


class FakeStream:
    """ContainerProcess.stdout/stderr: an async iterable of chunks (bytes when text=False)."""

    def __init__(self, reader: asyncio.StreamReader, text: bool):
        self.reader, self.text = reader, text

    async def __aiter__(self):
        while chunk := await self.reader.read(4096):
            yield chunk.decode() if self.text else chunk


class FakeStdin:
    def __init__(self, writer: asyncio.StreamWriter):
        self._writer, self._buffer, self._eof = writer, bytearray(), False
        self.drain = _Dual("stdin.drain", self._drain)

    def write(self, data: bytes | str) -> None:
        if self._eof:
            raise ValueError("Stdin is closed. Cannot write to it.")
        self._buffer.extend(data.encode() if isinstance(data, str) else data)

    def write_eof(self) -> None:
        self._eof = True

    async def _drain(self) -> None:
        data, self._buffer = bytes(self._buffer), bytearray()
        if data:
            self._writer.write(data)
            await self._writer.drain()
        if self._eof and not self._writer.is_closing():
            self._writer.close()


class FakeProcess:
    def __init__(self, proc: asyncio.subprocess.Process, text: bool, deadline: float | None):
        self._proc = proc
        self.stdout = FakeStream(proc.stdout, text)
        self.stderr = FakeStream(proc.stderr, text)
        self.stdin = FakeStdin(proc.stdin)
        self.timed_out = False
        self.wait = _Dual("wait", self._wait)
        self._watch = asyncio.ensure_future(self._deadline(deadline)) if deadline else None

    async def _deadline(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if self._proc.returncode is None:
            self.timed_out = True
            self._proc.kill()

    async def _wait(self) -> int:
        code = await self._proc.wait()
        if self._watch is not None:
            self._watch.cancel()
        if self.timed_out:
            return -1  # what modal 1.6's ContainerProcess.wait returns when the exec's timeout passed
        return 128 - code if code < 0 else code  # a signal death reads 128 + signal


class FakeFilesystem:
    def __init__(self, box: FakeSandbox):
        self.box = box
        self.write_bytes = _Dual("filesystem.write_bytes", self._write_bytes)
        self.read_bytes = _Dual("filesystem.read_bytes", self._read_bytes)
        self.make_directory = _Dual("filesystem.make_directory", self._make_directory)

    async def _write_bytes(self, data: bytes, remote_path: str) -> None:
        self.box.fake.record("filesystem.write_bytes", (data, remote_path), {})
        target = self.box.host(remote_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(bytes(data))

    async def _read_bytes(self, remote_path: str) -> bytes:
        self.box.fake.record("filesystem.read_bytes", (remote_path,), {})
        target = self.box.host(remote_path)
        if target.is_dir():
            raise _FakeExceptions.SandboxFilesystemIsADirectoryError(remote_path)
        if not target.exists():
            raise _FakeExceptions.SandboxFilesystemNotFoundError(remote_path)
        return target.read_bytes()

    async def _make_directory(self, remote_path: str, *, create_parents: bool = True) -> None:
        self.box.fake.record("filesystem.make_directory", (remote_path,), {"create_parents": create_parents})
        self.box.host(remote_path).mkdir(parents=create_parents, exist_ok=create_parents)


class FakeSandbox:
    """A Modal Sandbox whose container file system is a temp dir; execs are local subprocesses."""

    def __init__(self, fake: FakeModal, kwargs: dict[str, Any]):
        self.fake, self.kwargs = fake, kwargs
        self.root = Path(tempfile.mkdtemp(prefix="fake-modal-"))
        self.terminated = False
        self.processes: list[FakeProcess] = []
        self.exec = _Dual("Sandbox.exec", self._exec)
        self.terminate = _Dual("Sandbox.terminate", self._terminate)
        if fake.legacy:  # an older SDK: sb.open / sb.mkdir, no sb.filesystem
            self.open = _Dual("Sandbox.open", self._open)
            self.mkdir = _Dual("Sandbox.mkdir", self._mkdir)
        else:
            self.filesystem = FakeFilesystem(self)

    def host(self, remote: str) -> Path:
        assert remote.startswith("/"), f"the SDK wants absolute paths, got {remote!r}"
        return self.root / remote.lstrip("/")

    async def _exec(self, *args: str, timeout: int | None = None, workdir: str | None = None,
                    env: dict[str, str | None] | None = None, text: bool = True, **rest: Any) -> FakeProcess:
        self.fake.record("Sandbox.exec", args, {"timeout": timeout, "workdir": workdir, "env": env, "text": text,
                                                **rest})
        if self.terminated:
            raise _FakeExceptions.Error("Sandbox has been terminated")
        cwd = self.host(workdir or self.kwargs.get("workdir") or "/")
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                    **{k: v for k, v in (env or {}).items() if v is not None}}
        proc = await asyncio.create_subprocess_exec(
            *args, cwd=cwd, env=full_env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        deadline = self.fake.exec_deadline if self.fake.exec_deadline is not None else timeout
        process = FakeProcess(proc, text, deadline)
        self.processes.append(process)
        return process

    async def _terminate(self, *, wait: bool = False) -> None:
        self.fake.record("Sandbox.terminate", (), {"wait": wait})
        self.terminated = True
        for p in self.processes:
            if p._proc.returncode is None:
                p._proc.kill()
        shutil.rmtree(self.root, ignore_errors=True)

    async def _mkdir(self, path: str, parents: bool = False) -> None:
        self.fake.record("Sandbox.mkdir", (path,), {"parents": parents})
        self.host(path).mkdir(parents=parents, exist_ok=parents)

    async def _open(self, path: str, mode: str = "r") -> Any:
        self.fake.record("Sandbox.open", (path, mode), {})
        target = self.host(path)
        if "r" in mode and not target.exists():
            raise FileNotFoundError(path)
        handle = open(target, mode)

        async def write(data: bytes) -> None:
            handle.write(data)

        async def read() -> bytes:
            return handle.read()

        async def close() -> None:
            handle.close()

        return types.SimpleNamespace(write=_Dual("FileIO.write", write), read=_Dual("FileIO.read", read),
                                     close=_Dual("FileIO.close", close))


class FakeModal(types.ModuleType):
    """A fake `modal` module: what the backend touches, recorded; `token=None` behaves as no credentials."""

    def __init__(self, *, token: str | None = "fake-token", legacy: bool = False,
                 exec_deadline: float | None = None):
        super().__init__("modal")
        self.__version__ = "fake"
        self.token, self.legacy, self.exec_deadline = token, legacy, exec_deadline
        self.calls: list[tuple[str, tuple, dict]] = []
        self.sandboxes: list[FakeSandbox] = []
        self.exception = _FakeExceptions
        self.apps: dict[str, Any] = {}
        fake = self

        async def lookup(name: str, *, client: Any = None, environment_name: str | None = None,
                         create_if_missing: bool = False) -> Any:
            fake.record("App.lookup", (name,), {"create_if_missing": create_if_missing})
            if fake.token is None:
                raise _FakeExceptions.AuthError("Token missing. Could not authenticate client.")
            if name not in fake.apps and not create_if_missing:
                raise _FakeExceptions.Error(f"App '{name}' not found")
            return fake.apps.setdefault(name, types.SimpleNamespace(name=name))

        async def create(*args: str, **kwargs: Any) -> FakeSandbox:
            fake.record("Sandbox.create", args, kwargs)
            if kwargs.get("app") is None:
                raise _FakeExceptions.Error("Sandbox.create needs an app")
            box = FakeSandbox(fake, kwargs)
            fake.sandboxes.append(box)
            return box

        def debian_slim(python_version: str | None = None, force_build: bool = False) -> FakeImage:
            fake.record("Image.debian_slim", (), {"python_version": python_version})
            return FakeImage("debian_slim", python_version=python_version)

        def from_registry(tag: str, **kwargs: Any) -> FakeImage:
            fake.record("Image.from_registry", (tag,), kwargs)
            return FakeImage("registry", tag=tag, **kwargs)

        self.App = types.SimpleNamespace(lookup=_Dual("App.lookup", lookup))
        self.Sandbox = types.SimpleNamespace(create=_Dual("Sandbox.create", create))
        self.Image = types.SimpleNamespace(debian_slim=debian_slim, from_registry=from_registry)

    def record(self, name: str, args: tuple, kwargs: dict) -> None:
        self.calls.append((name, args, kwargs))

    def called(self, name: str) -> list[tuple[tuple, dict]]:
        return [(a, k) for n, a, k in self.calls if n == name]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def provider(fake: FakeModal | None = None, limits: SandboxLimits = LIMITS, **options: Any) -> ModalSandboxProvider:
    return ModalSandboxProvider(limits, {"image": "", **options}, sdk=fake if fake is not None else FakeModal())


# --------------------------------------------------------------------------------------------------
# the real code path against FakeModal
# --------------------------------------------------------------------------------------------------
def test_start_maps_app_image_and_limits_onto_the_sdk():
    fake = FakeModal()

    async def go():
        async with provider(fake) as p, p.sandbox() as box:
            assert (await box.exec(["true"])).ok
        return p

    p = run(go())
    assert fake.called("App.lookup") == [(("agentbench-npu",), {"create_if_missing": True})]
    assert fake.called("Image.debian_slim") == [((), {"python_version": "3.11"})]
    [(args, kw)] = fake.called("Sandbox.create")
    assert args == ()
    assert kw["app"] is fake.apps["agentbench-npu"]
    assert kw["image"].kind == "debian_slim"
    assert kw["memory"] == (256, 256)  # (request, hard limit): an int would only be a request
    assert kw["block_network"] is True
    assert kw["cpu"] == 1.0 and kw["timeout"] == 600 and kw["workdir"] == "/work"
    assert fake.called("filesystem.make_directory") == [(("/work",), {"create_parents": True})]
    assert len(fake.called("Sandbox.terminate")) == 1 and fake.sandboxes[0].terminated
    desc = p.describe()
    assert desc["backend"] == "modal" and desc["network_blocked"] and desc["per_exec_rlimits"]


def test_options_registry_image_network_app_name_and_cpu():
    fake = FakeModal()
    limits = LIMITS.replace(network=True, memory_mb=1024)

    async def go():
        p = ModalSandboxProvider(limits, {"image": "python:3.12-slim", "app_name": "mine", "cpu": 2,
                                          "sandbox_timeout": 120, "add_python": "3.12"}, sdk=fake)
        async with p, p.sandbox() as box:
            assert (await box.exec("echo hi")).stdout == "hi\n"

    run(go())
    assert fake.called("App.lookup")[0][0] == ("mine",)
    assert fake.called("Image.from_registry") == [(("python:3.12-slim",), {"add_python": "3.12"})]
    kw = fake.called("Sandbox.create")[0][1]
    assert kw["block_network"] is False and kw["memory"] == (1024, 1024)
    assert kw["cpu"] == 2.0 and kw["timeout"] == 120 and kw["image"].spec["tag"] == "python:3.12-slim"


def test_exec_output_exit_codes_env_cwd_and_stdin():
    fake = FakeModal()

    async def go():
        async with provider(fake) as p, p.sandbox() as box:
            ok = await box.exec(["python3", "-c", "import sys; print('out'); print('err', file=sys.stderr)"])
            bad = await box.exec("echo nope >&2; exit 3")
            env = await box.exec(["sh", "-c", 'echo "$GREETING $HOME"'], env={"GREETING": "hello"})
            await box.write_file("sub/dir/x.txt", "in sub")
            where = await box.exec(["cat", "x.txt"], cwd="sub/dir")
            echo = await box.exec(["python3", "-c", "import sys; print(sys.stdin.read().upper())"],
                                  stdin="piped in")
            nostdin = await box.exec(["cat"])  # stdin is closed, so cat ends
            py = await box.run_python("print(6 * 7)")
            return ok, bad, env, where, echo, nostdin, py

    ok, bad, env, where, echo, nostdin, py = run(go())
    assert (ok.status, ok.exit_code, ok.stdout, ok.stderr) == ("ok", 0, "out\n", "err\n")
    assert (bad.status, bad.exit_code, bad.stderr, bad.detail) == ("error", 3, "nope\n", "exit code 3")
    assert env.stdout == "hello /work\n"
    assert where.stdout == "in sub"
    assert echo.stdout == "PIPED IN\n"
    assert nostdin.ok and nostdin.stdout == ""
    assert py.stdout == "42\n"
    execs = fake.called("Sandbox.exec")
    args, kw = execs[0]
    # the wrapper applies the per-exec rlimits; the command follows its five arguments
    assert args[:2] == ("sh", "-c") and args[-3:] == ("python3", "-c", args[-1])
    assert args[4:9] == (args[4], "3", str(4 * 2048), "32", str(256 * 1024))
    assert kw["timeout"] == 4 and kw["workdir"] == "/work" and kw["text"] is False
    assert kw["env"]["HOME"] == "/work" and "GREETING" not in kw["env"]
    assert execs[2][1]["env"]["GREETING"] == "hello"
    assert execs[3][1]["workdir"] == "/work/sub/dir"


def test_wall_timeout_kills_the_process_group():
    fake = FakeModal()

    async def go():
        async with provider(fake) as p, p.sandbox() as box:
            started = time.monotonic()
            res = await box.exec("(sleep 2; echo late > bg.txt) & echo started; sleep 30", timeout=1)
            took = time.monotonic() - started
            await asyncio.sleep(2.5)
            leftover = await box.exec(["ls"])
            return res, took, leftover

    res, took, leftover = run(go())
    assert res.status == "timeout" and "wall-time" in res.detail
    assert res.stdout == "started\n"  # what was written before the kill is kept
    assert took < 2.5
    assert "bg.txt" not in leftover.stdout  # the background child died with the group
    assert any(a[3] == "agentbench-kill" for a, _ in fake.called("Sandbox.exec"))


def test_modal_exec_deadline_reads_as_timeout():
    """Without the wrapper, Modal's own exec timeout ends the process and wait() returns -1."""
    fake = FakeModal(exec_deadline=0.5)

    async def go():
        async with provider(fake, wrap=False) as p, p.sandbox() as box:
            return await box.exec(["sleep", "10"])

    res = run(go())
    assert res.status == "timeout" and res.exit_code is None
    [(args, kw)] = fake.called("Sandbox.exec")
    assert args == ("sleep", "10") and kw["timeout"] == 4


def test_output_cap_truncates_and_stops_the_program():
    fake = FakeModal()

    async def go():
        async with provider(fake) as p, p.sandbox() as box:
            res = await box.run_python("import sys, time\nsys.stdout.write('x' * 100000); sys.stdout.flush()\n"
                                       "time.sleep(1.5); open('marker', 'w').write('still alive')")
            await asyncio.sleep(2)
            marker = await box.exec(["ls"])
            return res, marker

    res, marker = run(go())
    assert res.status == "output_truncated"
    assert len(res.stdout) + len(res.stderr) == 4096
    assert "marker" not in marker.stdout


def test_memory_signal_cpu_and_file_size_statuses():
    fake = FakeModal()

    async def go():
        async with provider(fake, limits=LIMITS.replace(cpu_seconds=1)) as p, p.sandbox() as box:
            memory = await box.run_python("x = bytearray(1 << 30)")
            killed = await box.exec("kill -9 $$")
            cpu = await box.run_python("while True: pass", timeout=3)
            big = await box.run_python("open('big', 'wb').write(b'x' * (5 * 2**20))")
            return memory, killed, cpu, big

    memory, killed, cpu, big = run(go())
    assert memory.status == "memory" and "MemoryError" in memory.stderr
    assert (killed.status, killed.exit_code, killed.detail) == ("killed", None, "killed by signal 9")
    assert cpu.status == "timeout" and "CPU" in cpu.detail
    assert big.status == "error" and "File too large" in big.stderr


def test_files_round_trip_and_errors():
    fake = FakeModal()

    async def go():
        async with provider(fake) as p, p.sandbox() as box:
            await box.write_file("a/b/c.bin", b"\x00\x01binary")
            await box.write_file("text.txt", "h\u00e9llo")
            made = await box.run_python("open('made.txt', 'w').write('by code')")
            out = (await box.read_file("a/b/c.bin"), await box.read_file("text.txt"),
                   await box.read_file("made.txt"), made)
            errors = []
            for bad in ("missing.txt", "a", "../escape", "/etc/passwd"):
                try:
                    await box.read_file(bad)
                except SandboxError as exc:
                    errors.append(str(exc))
            try:
                await box.write_file("huge", b"x" * (5 * 2**20))
            except SandboxError as exc:
                errors.append(str(exc))
            return out, errors

    (bin_, text, made, res), errors = run(go())
    assert bin_ == b"\x00\x01binary" and text == "h\u00e9llo".encode() and made == b"by code" and res.ok
    assert "no file 'missing.txt'" in errors[0] and "is a directory" in errors[1]
    assert "outside the sandbox" in errors[2] and "outside the sandbox" in errors[3]
    assert "file limit" in errors[4]
    assert fake.called("filesystem.write_bytes")[0][0] == (b"\x00\x01binary", "/work/a/b/c.bin")


def test_legacy_sdk_without_filesystem_uses_sandbox_open():
    fake = FakeModal(legacy=True)

    async def go():
        async with provider(fake) as p, p.sandbox() as box:
            await box.write_file("d/e.txt", "old api")
            return await box.read_file("d/e.txt"), await box.exec(["cat", "d/e.txt"])

    data, res = run(go())
    assert data == b"old api" and res.stdout == "old api"
    assert [a for a, _ in fake.called("Sandbox.open")] == [("/work/d/e.txt", "wb"), ("/work/d/e.txt", "rb")]


def test_close_terminates_once_and_provider_close_reaps_leftovers():
    fake = FakeModal()

    async def go():
        p = provider(fake)
        await p.start()
        box = p.sandbox()
        await box.start()
        await box.close()
        await box.close()  # safe twice
        with pytest.raises(SandboxError, match="not started"):
            await box.exec(["true"])
        forgotten = p.sandbox()
        await forgotten.start()
        await p.close()
        return forgotten

    forgotten = run(go())
    assert len(fake.called("Sandbox.terminate")) == 2
    assert all(b.terminated for b in fake.sandboxes) and forgotten.sb is None


def test_missing_credentials_is_one_line_user_error():
    fake = FakeModal(token=None)
    with pytest.raises(ModalCredentialsError) as info:
        run(provider(fake).start())
    assert isinstance(info.value, SandboxError) and isinstance(info.value, UserError)
    message = str(info.value)
    assert "\n" not in message and "modal token new" in message and "MODAL_TOKEN_ID" in message


def test_sdk_comes_from_sys_modules_lazily(monkeypatch):
    fake = FakeModal()
    monkeypatch.setitem(sys.modules, "modal", fake)
    p = ModalSandboxProvider(LIMITS, {"image": ""})

    async def go():
        async with p, p.sandbox() as box:
            return await box.exec(["echo", "via sys.modules"])

    assert run(go()).stdout == "via sys.modules\n"
    assert fake.called("App.lookup")


def test_missing_sdk_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "modal", None)  # import modal -> ImportError
    with pytest.raises(MissingExtraError, match=r"agentbench-npu\[modal\]"):
        run(ModalSandboxProvider(LIMITS, {"image": ""}).start())


def test_importing_the_backend_does_not_import_the_sdk():
    code = ("import sys; import agentbench_npu.sandbox.modal, agentbench_npu.sandbox.plugin; "
            "assert 'modal' not in sys.modules, 'modal imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_plugin_registers_modal():
    from agentbench_npu.sandbox import plugin

    names = []
    plugin.register_sandboxes(lambda cls: names.append(cls.name))
    assert "modal" in names and "local" in names


def test_contract_checks_of_the_conformance_suite():
    """The shared contract checks (not the hostile ones: FakeModal's "container" is this machine)."""
    from agentbench_npu.sandbox import conformance

    limits = SandboxLimits(wall_seconds=3, cpu_seconds=2, memory_mb=256)

    async def go():
        async with ModalSandboxProvider(limits, {"image": ""}, sdk=FakeModal()) as p:
            return await conformance.run_checks(p, kinds=("contract",))

    results = run(go())
    assert results and all(r.passed is not False for r in results), [r for r in results if r.passed is False]


# --------------------------------------------------------------------------------------------------
# the real SDK, where installed: signatures, and the missing-token path offline
# --------------------------------------------------------------------------------------------------
def test_calls_bind_to_the_installed_sdk_signatures():
    import inspect

    import modal

    from modal.container_process import ContainerProcess
    from modal.sandbox.sandbox import SandboxFilesystem

    fake = FakeModal()

    async def go():
        async with provider(fake, image="python:3.11-slim", add_python="3.11") as p, p.sandbox() as box:
            await box.exec(["echo", "x"], stdin="in", env={"A": "1"}, cwd=".")
            await box.exec(["sleep", "5"], timeout=0.5)  # the kill helper too
            await box.write_file("f", "x")
            await box.read_file("f")

    run(go())
    real = {"App.lookup": (modal.App.lookup, False), "Sandbox.create": (modal.Sandbox.create, False),
            "Sandbox.exec": (modal.Sandbox.exec, True), "Sandbox.terminate": (modal.Sandbox.terminate, True),
            "Image.from_registry": (modal.Image.from_registry, False),
            "filesystem.write_bytes": (SandboxFilesystem.write_bytes, True),
            "filesystem.read_bytes": (SandboxFilesystem.read_bytes, True),
            "filesystem.make_directory": (SandboxFilesystem.make_directory, True)}
    seen = set()
    for name, args, kwargs in fake.calls:
        fn, method = real[name]
        inspect.signature(fn).bind(*((None,) if method else ()), *args, **kwargs)
        seen.add(name)
    assert seen == set(real)
    for fn in (ContainerProcess.wait, modal.Sandbox.exec, modal.Sandbox.create, modal.App.lookup,
               SandboxFilesystem.write_bytes):
        assert hasattr(fn, "aio"), fn


def _modal_credentials() -> bool:
    return bool(os.environ.get("MODAL_TOKEN_ID")) or (Path.home() / ".modal.toml").exists()


@pytest.mark.skipif(_modal_credentials(), reason="Modal credentials are present; this checks their absence")
def test_real_sdk_without_token_gives_the_credentials_hint():
    with pytest.raises(ModalCredentialsError, match="modal token new"):
        run(ModalSandboxProvider(LIMITS, {"image": ""}).start())


@pytest.mark.skipif(not _modal_credentials(),
                    reason="no Modal credentials (set MODAL_TOKEN_ID/MODAL_TOKEN_SECRET or run `modal token new`)")
def test_live_modal_sandbox():
    limits = SandboxLimits(wall_seconds=20, cpu_seconds=20, memory_mb=512, output_bytes=4096)

    async def go():
        async with ModalSandboxProvider(limits, {"image": "", "app_name": "agentbench-npu-tests",
                                                 "sandbox_timeout": 300}) as p, p.sandbox() as box:
            await box.write_file("in/data.txt", "1 2 3")
            total = await box.run_python("print(sum(map(int, open('in/data.txt').read().split())))")
            echo = await box.exec(["cat"], stdin="piped")
            await box.exec(["sh", "-c", "echo made > out.txt"])
            made = await box.read_file("out.txt")
            bad = await box.exec("exit 4")
            slow = await box.exec(["sleep", "60"], timeout=3)
            flood = await box.run_python("print('x' * 100000)")
            net = await box.run_python("import socket; socket.create_connection(('1.1.1.1', 53), timeout=3)")
            return total, echo, made, bad, slow, flood, net

    total, echo, made, bad, slow, flood, net = run(go())
    assert total.stdout == "6\n" and echo.stdout == "piped" and made == b"made\n"
    assert (bad.status, bad.exit_code) == ("error", 4)
    assert slow.status == "timeout" and slow.duration < 10
    assert flood.status == "output_truncated"
    assert net.status == "error"
