"""The `modal` sandbox: one Modal Sandbox (a gVisor container in Modal's cloud) per agent sandbox.

Written against modal 1.6.4 (checked with `inspect` on the installed SDK); the calls used are
`App.lookup(name, create_if_missing=True)`, `Image.debian_slim(python_version=)` / `Image.from_registry(tag)`,
`Sandbox.create(app=, image=, timeout=, cpu=, memory=, block_network=, workdir=)`,
`Sandbox.exec(*argv, timeout=, workdir=, env=, text=False)` → `ContainerProcess` (`stdout`/`stderr` async
iterables, `stdin.write`/`write_eof`/`drain`, `wait`), `Sandbox.filesystem.write_bytes(data, path)` /
`read_bytes(path)` / `make_directory(path)` and `Sandbox.terminate()`. Every call goes through the SDK's
`.aio` variant, so the event loop never blocks (calls without one run in a thread).

What differs from the SDK one might expect (modal 1.x):
- `memory=int` is only a *request*; the hard limit needs `memory=(request, limit)`, which is what we pass.
- `Sandbox.open` (the old file API) is gone in 1.6; files go through `sb.filesystem` (note the argument
  order of `write_bytes(data, remote_path)`). Older SDKs without `filesystem` fall back to `sb.open`.
- A `ContainerProcess` cannot be killed, and `wait()` returns -1 (no exception) when the exec's `timeout`
  passes; a process killed by a signal reports `128 + signal`.
- `exec(timeout=)` takes whole seconds.

So each exec runs through a small `sh` wrapper (`wrap=True`, the default): it applies the per-exec limits
as rlimits (CPU time, file size, address space = `memory_mb`, processes), starts the command in its own
session (`setsid`, when the image has it), records its pid, and kills the whole group when the command
ends, so nothing it started outlives the exec. When our wall clock runs out or output passes the cap, a
second exec kills that group. Modal's own exec timeout (whole seconds, a bit above ours) is the backstop.
Images without `sh` need `wrap=False`: then only Modal's timeout and the container limits apply.

Options (`[sandbox]` section or the constructor's `options`): `image` ("" → debian_slim with
`python_version`, default "3.11"; otherwise a registry reference for `Image.from_registry`), `app_name`
(default "agentbench-npu"), `sandbox_timeout` (lifetime of one sandbox in seconds, default 600), `cpu`
(cores, default 1.0), `workdir` (default "/work"), `wrap` (default true), `python_version`, `add_python`
(for registry images without Python).

Credentials: `modal token new`, or MODAL_TOKEN_ID / MODAL_TOKEN_SECRET in the environment.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import math
import posixpath
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import MissingExtraError, UserError, one_line
from .base import (
    ExecResult,
    OutputCap,
    Sandbox,
    SandboxError,
    SandboxLimits,
    SandboxProvider,
    as_bytes,
    classify,
    inside,
)

SDK_VERSION_CHECKED = "1.6.4"
DEFAULT_APP = "agentbench-npu"
DEFAULT_WORKDIR = "/work"
STDIN_CHUNK = 1 << 20  # the SDK refuses to buffer more than 2 MiB (sandbox exec: less) before a drain

# $1 pid file, $2 CPU seconds, $3 file size in 512-byte blocks (dash/busybox units), $4 processes,
# $5 address space in KiB ("-" = unset); then the command. The wrapper's own stderr goes to /dev/null so
# that shell job messages never mix into the program's stderr.
WRAPPER = r"""pf=$1 cpu=$2 fsz=$3 nproc=$4 mem=$5; shift 5
exec 3<&0 4>&2 2>/dev/null
if [ "$cpu" != - ]; then ulimit -S -t "$cpu"; ulimit -H -t "$((cpu + 1))"; fi
[ "$fsz" = - ] || ulimit -f "$fsz"
[ "$mem" = - ] || ulimit -v "$mem"
[ "$nproc" = - ] || ulimit -p "$nproc" || ulimit -u "$nproc"
if command -v setsid >/dev/null; then setsid "$@" 0<&3 2>&4 3<&- 4>&- & else "$@" 0<&3 2>&4 3<&- 4>&- & fi
p=$!; exec 3<&- 4>&-; echo "$p" > "$pf"
wait "$p"; rc=$?
kill -KILL -"$p"
rm -f "$pf"
exit "$rc"
"""
# $1 pid file: stop the recorded process group (or the process, without setsid) and its children.
KILLER = r"""p=$(cat "$1" 2>/dev/null) || exit 0
case $p in ''|*[!0-9]*|0|1) exit 0;; esac
tree() { kill -STOP "$1" 2>/dev/null; for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do tree "$c"; done; kill -KILL "$1" 2>/dev/null; }
kill -KILL -"$p" 2>/dev/null; tree "$p"; exit 0
"""
SIGXCPU = 24


class ModalCredentialsError(SandboxError, UserError):
    """Modal has no token here: the CLI prints it as one line, sandbox callers catch it as SandboxError."""


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


async def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """`fn.aio(...)` when the SDK offers it (never blocks the loop), else the blocking call in a thread."""
    aio = getattr(fn, "aio", None)
    if aio is not None:
        return await aio(*args, **kwargs)
    result = await asyncio.to_thread(fn, *args, **kwargs)
    return await result if inspect.isawaitable(result) else result


def _accepts(fn: Any, name: str) -> bool:
    """Whether the SDK function takes keyword `name` (True when its signature cannot be read)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _is(exc: BaseException, *names: str) -> bool:
    """Match SDK exceptions by class name, so a missing or faked `modal.exception` works alike."""
    return any(cls.__name__ in names for cls in type(exc).__mro__)


class ModalSandboxProvider(SandboxProvider):
    name = "modal"
    description = "a Modal Sandbox (gVisor container in Modal's cloud) per sandbox; needs a Modal token"

    def __init__(self, limits: SandboxLimits | None = None, options: Mapping[str, Any] | None = None, *,
                 sdk: Any = None):
        super().__init__(limits, options)
        self._sdk = sdk  # the `modal` module, or a stand-in with the same surface (tests)
        self.app_name = str(self.options.get("app_name") or DEFAULT_APP)
        self.image_ref = self.options.get("image") or ""
        self.python_version = str(self.options.get("python_version") or "3.11")
        self.workdir = posixpath.normpath(str(self.options.get("workdir") or DEFAULT_WORKDIR))
        if not self.workdir.startswith("/"):
            raise SandboxError(f"sandbox option workdir must be an absolute path, got '{self.workdir}'")
        try:
            self.sandbox_timeout = int(self.options.get("sandbox_timeout", 600))
            self.cpu = float(self.options.get("cpu", 1.0))
        except (TypeError, ValueError) as exc:
            raise SandboxError(f"sandbox options sandbox_timeout and cpu must be numbers: {exc}") from None
        self.wrap = _bool(self.options.get("wrap", True))
        self.app: Any = None
        self.image: Any = None
        self._live: set[ModalSandbox] = set()

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def sdk(self) -> Any:
        if self._sdk is None:
            try:
                self._sdk = importlib.import_module("modal")
            except ImportError:
                raise MissingExtraError("the modal sandbox", "modal", "modal") from None
        return self._sdk

    async def start(self) -> None:
        if self.app is not None:
            return
        sdk = self.sdk
        try:
            app = await _call(sdk.App.lookup, self.app_name, create_if_missing=True)
        except Exception as exc:
            if _is(exc, "AuthError"):
                raise ModalCredentialsError(
                    "the modal sandbox has no Modal credentials: run `modal token new`, or set MODAL_TOKEN_ID "
                    "and MODAL_TOKEN_SECRET") from None
            raise SandboxError(f"cannot reach Modal app '{self.app_name}': {one_line(exc)}") from exc
        self.image = self._build_image(sdk)
        self.app = app

    def _build_image(self, sdk: Any) -> Any:
        ref = self.image_ref
        if not isinstance(ref, str):  # a modal.Image built by the caller
            return ref
        if not ref:
            return sdk.Image.debian_slim(python_version=self.python_version)
        kwargs = {"add_python": str(self.options["add_python"])} if self.options.get("add_python") else {}
        return sdk.Image.from_registry(ref, **kwargs)

    async def close(self) -> None:
        for box in list(self._live):  # the runner closes every sandbox first; this stops the bill otherwise
            await box.close()

    def sandbox(self) -> ModalSandbox:
        return ModalSandbox(self)

    def describe(self) -> dict[str, Any]:
        image = self.image_ref if isinstance(self.image_ref, str) and self.image_ref else \
            f"debian_slim python {self.python_version}"
        version = getattr(self._sdk, "__version__", None) if self._sdk is not None else None
        return {**super().describe(), "isolation": "modal sandbox (gVisor container)", "app": self.app_name,
                "image": image, "workdir": self.workdir, "cpu": self.cpu, "sandbox_timeout": self.sandbox_timeout,
                "per_exec_rlimits": self.wrap, "network_blocked": not self.limits.network, "modal_version": version,
                "notes": "memory is the container's hard limit plus an address-space rlimit per exec; "
                         "the process limit is an rlimit, which does not bind root inside the container"}


class ModalSandbox(Sandbox):
    def __init__(self, provider: ModalSandboxProvider):
        self.provider = provider
        self.limits = provider.limits
        self.sb: Any = None

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.sb is not None:
            return
        provider = self.provider
        await provider.start()
        sdk = provider.sdk
        create = sdk.Sandbox.create
        kwargs: dict[str, Any] = {
            "app": provider.app, "image": provider.image, "timeout": provider.sandbox_timeout,
            "cpu": provider.cpu, "memory": (self.limits.memory_mb, self.limits.memory_mb),
            "block_network": not self.limits.network,
        }
        if _accepts(create, "workdir"):
            kwargs["workdir"] = provider.workdir
        try:
            self.sb = await _call(create, **kwargs)
        except Exception as exc:
            raise SandboxError(f"cannot create a Modal sandbox: {one_line(exc)}") from exc
        provider._live.add(self)
        try:
            await self._mkdir(provider.workdir)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        sb, self.sb = self.sb, None
        self.provider._live.discard(self)
        if sb is not None:
            try:
                await _call(sb.terminate)
            except Exception:  # already gone (lifetime over, or terminated on Modal's side)
                pass

    def _need(self) -> Any:
        if self.sb is None:
            raise SandboxError("sandbox is not started (use `async with provider.sandbox() as box`)")
        return self.sb

    # -- exec ----------------------------------------------------------------------------------------
    async def exec(self, cmd: Sequence[str] | str, *, timeout: float | None = None, stdin: str | bytes | None = None,
                   env: Mapping[str, str] | None = None, cwd: str | None = None) -> ExecResult:
        sb = self._need()
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
        if not argv:
            raise SandboxError("exec needs a command")
        limits = self.limits
        wall = min(limits.wall_seconds, timeout) if timeout is not None else limits.wall_seconds
        where = posixpath.join(self.provider.workdir, inside(cwd)) if cwd else self.provider.workdir
        pidfile = f"/tmp/.agentbench-exec-{uuid.uuid4().hex}.pid"
        if self.provider.wrap:
            argv = ["sh", "-c", WRAPPER, "agentbench-exec", pidfile, str(max(1, math.ceil(limits.cpu_seconds))),
                    str(limits.file_mb * 2048), str(limits.processes), str(limits.memory_mb * 1024), *argv]
        full_env = {"HOME": self.provider.workdir, "TMPDIR": "/tmp", "LANG": "C.UTF-8", **dict(env or {})}
        try:
            proc = await _call(sb.exec, *argv, timeout=max(1, math.ceil(wall)) + 1, workdir=where, env=full_env,
                               text=False)
        except Exception as exc:
            raise SandboxError(f"Modal could not start the command: {one_line(exc)}") from exc
        started = time.monotonic()
        cap = OutputCap(limits.output_bytes)
        stop = asyncio.Event()

        async def pump(name: str, stream: Any) -> None:
            async for chunk in stream:
                if chunk is None:
                    break
                if not cap.feed(name, chunk.encode() if isinstance(chunk, str) else bytes(chunk)):
                    stop.set()
                    return

        async def feed() -> None:
            data = as_bytes(stdin)
            try:
                for i in range(0, len(data), STDIN_CHUNK):
                    proc.stdin.write(data[i:i + STDIN_CHUNK])
                    await _call(proc.stdin.drain)
                proc.stdin.write_eof()
                await _call(proc.stdin.drain)
            except Exception:  # the program exited without reading all of it, as with a pipe
                pass

        async def finish() -> int:
            await asyncio.gather(pump("stdout", proc.stdout), pump("stderr", proc.stderr))
            return int(await _call(proc.wait))

        feeder = asyncio.ensure_future(feed())
        main = asyncio.ensure_future(finish())
        stopper = asyncio.ensure_future(stop.wait())
        timed_out = False
        returncode: int | None = None
        try:
            done, _ = await asyncio.wait({main, stopper}, timeout=wall, return_when=asyncio.FIRST_COMPLETED)
            if main not in done:
                timed_out = stopper not in done
                await self._kill(pidfile)
                # the group is dead: let the readers take what was already written, then collect the code
                done, _ = await asyncio.wait({main}, timeout=2.0)
            if main in done:
                returncode = main.result()
            else:
                main.cancel()
                returncode = await self._settle(proc)
        except BaseException as exc:
            main.cancel()
            await asyncio.shield(self._kill(pidfile))
            if isinstance(exc, Exception):
                raise SandboxError(f"the Modal exec failed: {one_line(exc)}") from exc
            raise
        finally:
            stopper.cancel()
            feeder.cancel()
        duration = time.monotonic() - started
        if returncode == -1:  # Modal's own exec deadline passed
            timed_out, returncode = True, None
        signal_number = returncode - 128 if returncode is not None and 128 < returncode <= 128 + 64 else None
        exit_code = None if signal_number is not None else returncode
        stderr = cap.text("stderr")
        status, detail = classify(exit_code, signal_number, stderr, timed_out=timed_out, truncated=cap.truncated,
                                  cpu_limited=signal_number == SIGXCPU)
        return ExecResult(status, exit_code, cap.text("stdout"), stderr, duration, detail)

    async def _kill(self, pidfile: str) -> None:
        """Stop what an exec started (wrapper only; without it Modal's exec timeout ends the process)."""
        if not self.provider.wrap or self.sb is None:
            return
        try:
            killer = await _call(self.sb.exec, "sh", "-c", KILLER, "agentbench-kill", pidfile, timeout=10, text=False)
            await asyncio.wait_for(_call(killer.wait), 15)
        except Exception:
            pass

    async def _settle(self, proc: Any) -> int | None:
        try:
            return int(await asyncio.wait_for(_call(proc.wait), 10))
        except Exception:
            return None

    # -- files -----------------------------------------------------------------------------------------
    def _remote(self, path: str) -> str:
        return posixpath.join(self.provider.workdir, inside(path))

    async def _mkdir(self, remote: str) -> None:
        sb = self._need()
        fs = getattr(sb, "filesystem", None)
        try:
            if fs is not None:
                await _call(fs.make_directory, remote, create_parents=True)
            else:
                await _call(sb.mkdir, remote, parents=True)
        except Exception as exc:
            if not _is(exc, "SandboxFilesystemPathAlreadyExistsError", "FileExistsError"):
                raise SandboxError(f"cannot create {remote} in the Modal sandbox: {one_line(exc)}") from exc

    async def write_file(self, path: str, data: str | bytes) -> None:
        sb = self._need()
        remote, payload = self._remote(path), as_bytes(data)
        if len(payload) > self.limits.file_mb * 2**20:
            raise SandboxError(f"{path!r} is {len(payload)} bytes, over the sandbox file limit of "
                               f"{self.limits.file_mb} MB")
        try:
            fs = getattr(sb, "filesystem", None)
            if fs is not None:
                await _call(fs.write_bytes, payload, remote)  # creates parent directories
            else:
                await self._mkdir(posixpath.dirname(remote))
                handle = await _call(sb.open, remote, "wb")
                try:
                    await _call(handle.write, payload)
                finally:
                    await _call(handle.close)
        except SandboxError:
            raise
        except Exception as exc:
            raise SandboxError(f"cannot write {path!r} in the Modal sandbox: {one_line(exc)}") from exc

    async def read_file(self, path: str) -> bytes:
        sb = self._need()
        remote = self._remote(path)
        try:
            fs = getattr(sb, "filesystem", None)
            if fs is not None:
                data = await _call(fs.read_bytes, remote)
            else:
                handle = await _call(sb.open, remote, "rb")
                try:
                    data = await _call(handle.read)
                finally:
                    await _call(handle.close)
        except Exception as exc:
            if _is(exc, "SandboxFilesystemNotFoundError", "FileNotFoundError"):
                raise SandboxError(f"no file {path!r} in the sandbox") from None
            if _is(exc, "SandboxFilesystemIsADirectoryError", "IsADirectoryError"):
                raise SandboxError(f"{path!r} in the sandbox is a directory") from None
            raise SandboxError(f"cannot read {path!r} in the Modal sandbox: {one_line(exc)}") from exc
        return bytes(data)[: self.limits.file_mb * 2**20]
