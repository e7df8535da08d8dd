"""The sandbox contract: where agent tools run untrusted code.

A `SandboxProvider` is what a plugin registers (`register_sandboxes`, a class with `name`). The runner
builds one per run from the `[sandbox]` config section, starts it before the first step and closes it
after the last; it owns whatever is pooled (a warm worker, a Docker client, a Modal app). Each agent
loop opens its own `Sandbox` from it:

    async with provider.sandbox() as box:
        await box.write_file("data.txt", "1 2 3")
        result = await box.exec(["python3", "-c", "print(sum(map(int, open('data.txt').read().split())))"])
        result.status, result.stdout        # "ok", "6\\n"

A sandbox keeps its files between `exec` calls and loses them on close. Limits apply to every `exec`.
An `exec` never raises for what the code did (crash, timeout, memory, flood of output): that is its
`ExecResult.status`. `SandboxError` means the sandbox itself could not do what was asked.
"""

from __future__ import annotations

import codecs
import hashlib
import posixpath
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal, Mapping, Sequence

ExecStatus = Literal["ok", "error", "timeout", "memory", "killed", "output_truncated"]
STATUSES: tuple[str, ...] = ("ok", "error", "timeout", "memory", "killed", "output_truncated")
LARGE_CODE_BYTES = 64 * 1024


class SandboxError(RuntimeError):
    """The sandbox could not run the request (it is broken, closed, or the request is malformed)."""


@dataclass(frozen=True)
class SandboxLimits:
    """What one `exec` may use. Backends enforce what their isolation allows and say what in `describe()`:
    the local backend without root has no per-uid process limit and no network namespace, for one."""

    wall_seconds: float = 10.0  # from start to finish, sleeping included
    cpu_seconds: float = 10.0  # CPU time of the process
    memory_mb: int = 512  # address space (local) or container memory (docker, modal)
    processes: int = 32  # processes and threads at once
    output_bytes: int = 65536  # stdout + stderr kept; more stops the process (status output_truncated)
    file_mb: int = 64  # largest file the code may write
    network: bool = False  # False: no network at all, loopback included

    def replace(self, **changes: Any) -> SandboxLimits:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one `exec`. `exit_code` is None when the process was killed by a signal."""

    status: ExecStatus
    exit_code: int | None
    stdout: str
    stderr: str
    duration: float
    detail: str = ""  # why, in words, when status is not ok
    signal: int | None = None  # the signal that ended the process, if one did

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Sandbox(ABC):
    """One isolated place to run commands, used as an async context manager."""

    limits: SandboxLimits

    async def __aenter__(self) -> Sandbox:
        try:
            await self.start()
        except BaseException:
            await self.close()  # a half-made sandbox (a container, a work dir) must not outlive the error
            raise
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    @abstractmethod
    async def start(self) -> None:
        """Make the sandbox ready (its work dir, container, ...)."""

    @abstractmethod
    async def close(self) -> None:
        """Stop every process it started and delete its files. Safe to call twice."""

    @abstractmethod
    async def exec(self, cmd: Sequence[str] | str, *, timeout: float | None = None, stdin: str | bytes | None = None,
                   env: Mapping[str, str] | None = None, cwd: str | None = None) -> ExecResult:
        """Run `cmd` (argv list; a string runs through `sh -c`) in the work dir, or `cwd` relative to it.

        `timeout` lowers the wall-time limit for this call. `env` is added to a minimal environment (PATH,
        HOME, TMPDIR, LANG); the runner's own environment never leaks in."""

    @abstractmethod
    async def write_file(self, path: str, data: str | bytes) -> None:
        """Write a file relative to the work dir (parents created)."""

    @abstractmethod
    async def read_file(self, path: str) -> bytes:
        """Read a file relative to the work dir."""

    async def run_python(self, code: str, *, timeout: float | None = None, stdin: str | bytes | None = None) -> ExecResult:
        """Run a Python snippet, the common case of agent tools. Backends may make this faster."""
        if len(code.encode()) > LARGE_CODE_BYTES:  # one argv string may not pass 128 KiB on Linux
            name = f".snippet-{hashlib.sha256(code.encode()).hexdigest()[:12]}.py"
            await self.write_file(name, code)
            return await self.exec(["python3", name], timeout=timeout, stdin=stdin)
        return await self.exec(["python3", "-c", code], timeout=timeout, stdin=stdin)


class SandboxProvider(ABC):
    """A sandbox backend, registered by class: `name`, `description`, and a factory of sandboxes."""

    name: str = ""
    description: str = ""

    def __init__(self, limits: SandboxLimits | None = None, options: Mapping[str, Any] | None = None):
        self.limits = limits or SandboxLimits()
        self.options = dict(options or {})

    async def start(self) -> None:
        """Start what sandboxes share (a worker pool, a client). Called once before the first sandbox."""

    async def close(self) -> None:
        """Stop everything started; every sandbox is closed by then."""

    @abstractmethod
    def sandbox(self) -> Sandbox:
        """A new, not yet started sandbox with this provider's limits."""

    def describe(self) -> dict[str, Any]:
        """What isolation this provider really gives here, for reports."""
        return {"backend": self.name, "limits": self.limits.to_dict()}

    async def __aenter__(self) -> SandboxProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def inside(path: str) -> str:
    """`path` as a normalised path relative to the work dir; SandboxError if it would leave it."""
    if not path or "\x00" in path:
        raise SandboxError(f"bad sandbox path {path!r}")
    norm = posixpath.normpath(path)
    if norm.startswith("/") or norm == ".." or norm.startswith("../"):
        raise SandboxError(f"path {path!r} is outside the sandbox work dir; use a path relative to it")
    return norm


def as_bytes(data: str | bytes | None) -> bytes:
    if data is None:
        return b""
    return data.encode() if isinstance(data, str) else bytes(data)


@dataclass
class OutputCap:
    """Keeps stdout and stderr up to a shared byte budget; remembers whether anything was cut."""

    limit: int
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    truncated: bool = False

    def feed(self, stream: str, data: bytes) -> bool:
        """Add data; False once the budget is spent (the caller should stop the process)."""
        room = self.limit - len(self.stdout) - len(self.stderr)
        target = self.stdout if stream == "stdout" else self.stderr
        if len(data) > room:
            target.extend(data[:max(room, 0)])
            self.truncated = True
            return False
        target.extend(data)
        return True

    def text(self, stream: str) -> str:
        data = bytes(self.stdout if stream == "stdout" else self.stderr)
        if self.truncated:  # a cut may split a character: drop its first bytes rather than add U+FFFD
            return codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=False)
        return data.decode("utf-8", errors="replace")


def classify(exit_code: int | None, signal_number: int | None, stderr: str, *, timed_out: bool, truncated: bool,
             cpu_limited: bool = False, memory_limited: bool = False) -> tuple[ExecStatus, str]:
    """One status for an ended process, shared by every backend so that they agree.

    `memory_limited` is for backends that learn of an out-of-memory kill from outside (a container's
    OOMKilled); otherwise a failed process whose stderr ends in an allocation error is a memory failure.
    """
    if truncated:
        return "output_truncated", "output exceeded the byte limit; the process was stopped"
    if timed_out:
        return "timeout", "wall-time limit reached; the process was killed"
    if cpu_limited:
        return "timeout", "CPU-time limit reached"
    if memory_limited:
        return "memory", "memory limit reached; the process was killed"
    if not exit_code and signal_number is None:
        return "ok", ""  # a program that handled its own MemoryError and exited 0 did fine
    tail = stderr[-2000:]
    if "MemoryError" in tail or "Cannot allocate memory" in tail or "std::bad_alloc" in tail:
        return "memory", "memory limit reached"
    if signal_number is not None:
        return "killed", f"killed by signal {signal_number}"
    if exit_code:
        return "error", f"exit code {exit_code}"
    return "ok", ""
