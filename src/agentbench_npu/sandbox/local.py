"""The `local` sandbox: no daemon, isolation by the operating system, a warm worker for speed.

Each sandbox gets its own work dir and its own unprivileged uid (a "slot") for its lifetime. Every exec is
forked from a warm worker (zygote.py) and, run as root, isolated by namespaces, a read-only file system
except the work dir, no network, rlimits and the slot uid; everything the code leaves running is killed
when the exec ends. Without namespaces (not root, or a kernel that refuses them) the same code runs with
rlimits and, as root still, the slot uid; without root, a process group only. `describe()` says so
(`isolation: rlimits`): fine for trusted code on a laptop, not for hostile code.

Slot uids come from a range (`uid_base`, `slots`) locked for the life of the provider, so two runs on
one machine never share a uid and never kill each other's processes.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pwd
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

from .base import ExecResult, Sandbox, SandboxError, SandboxLimits, SandboxProvider, as_bytes, inside
from .link import ZygoteLink

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
# Far above login accounts, systemd's dynamic users (61184-65519) and the usual subuid ranges.
DEFAULT_UID_BASE = 3_000_000
LOCK_DIR = Path("/run/agentbench-npu/sandbox-uids")


class LocalSandboxProvider(SandboxProvider):
    name = "local"
    description = "a forked, namespaced, rlimited process per exec on this machine (no daemon)"

    def __init__(self, limits: SandboxLimits | None = None, options: Mapping[str, Any] | None = None):
        super().__init__(limits, options)
        self.isolation_wanted = str(self.options.get("isolation", "auto"))
        if self.isolation_wanted not in ("auto", "namespaces", "rlimits"):
            raise SandboxError(f"sandbox option isolation must be auto, namespaces or rlimits; "
                               f"got '{self.isolation_wanted}'")
        self.uid_base = int(self.options.get("uid_base", DEFAULT_UID_BASE))
        self.slots = int(self.options.get("slots", 128))
        if self.uid_base < 1000 or self.uid_base + 16 * self.slots >= 2**31:
            raise SandboxError(f"sandbox option uid_base must be at least 1000 and leave room for 16 x slots "
                               f"uids below 2**31 (a range no account uses); got {self.uid_base}")
        self.isolation = ""
        self.link: ZygoteLink | None = None
        self.root: Path | None = None
        self._free: list[int] = []
        self._lock = threading.Lock()
        self._lock_fds: list[int] = []
        self._start_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self._start_sync)

    def _start_sync(self) -> None:
        with self._start_lock:
            if self.link is not None:
                return
            try:
                self._start_locked()
            except BaseException:
                self._close_sync()
                raise

    def _start_locked(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="agentbench-sandboxes-"))
        os.chmod(self.root, 0o711)
        root_ok = os.geteuid() == 0
        if self.isolation_wanted == "namespaces" and not root_ok:
            raise SandboxError("sandbox isolation 'namespaces' needs root here; run as root, or set "
                               "sandbox.isolation=rlimits for trusted code")
        if root_ok:
            # as root, code never runs as root: even without namespaces each sandbox has its own uid, so a
            # stray kill(-1) or a write to a root-owned file stays harmless
            self._claim_uid_range()
        if root_ok and self.isolation_wanted != "rlimits":
            self.isolation = "namespaces"
            self.link = ZygoteLink("namespaces", str(self.root), self.limits.network)
            probe = self._probe()
            if not probe.ok:
                if self.isolation_wanted == "namespaces":
                    raise SandboxError(f"namespace isolation does not work here: {probe.detail or probe.stderr}")
                self.link.close()
                self.link = None
        if self.link is None:
            self.isolation = "rlimits"
            if not root_ok:
                self._free = [-1] * self.slots  # no uids to hand out: every slot runs as the current user
            self.link = ZygoteLink("rlimits", str(self.root), self.limits.network)

    def _claim_uid_range(self) -> None:
        """Lock `slots` uids that no account, no live process and no other provider on this machine uses.

        One lock file per uid, in a directory only root can write: providers with different slot counts
        or temp dirs still never overlap, and so never kill each other's processes."""
        for attempt in range(16):
            base = self.uid_base + attempt * self.slots
            uids = range(base, base + self.slots)
            if any(_has_account(u) for u in uids) or live_processes(set(uids)):
                continue
            held = lock_uids(uids)
            if held is not None:
                self._lock_fds = held
                self._free = list(range(base + self.slots - 1, base - 1, -1))
                return
        raise SandboxError(f"no free range of {self.slots} sandbox uids from {self.uid_base}; "
                           "close other runs or set sandbox.uid_base")

    def _probe(self) -> ExecResult:
        box = LocalSandbox(self)
        box._start_sync()
        try:
            return box._exec_sync(["python3", "-c", "pass"], None, None, None, None)
        except SandboxError as exc:
            return ExecResult("error", None, "", str(exc), 0.0, detail=str(exc))
        finally:
            box._close_sync()

    async def close(self) -> None:
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
        for fd in self._lock_fds:
            os.close(fd)
        self._lock_fds = []

    def sandbox(self) -> LocalSandbox:
        return LocalSandbox(self)

    def describe(self) -> dict[str, Any]:
        uids = [u for u in self._free if u >= 0]
        return {**super().describe(), "isolation": self.isolation or "not started",
                "worker_pid": self.link.pid if self.link else None,
                "uid_range": [min(uids), max(uids)] if uids else None}

    # -- leak checks (the conformance suite's hooks) --------------------------------------------------
    def leftover_processes(self, box: LocalSandbox) -> int:
        """Live (not zombie) processes running as the sandbox's uid: 0 once an exec has ended. In rlimits
        mode there is no uid of its own to look for, so this says 0."""
        if box.uid is None:
            return 0
        return live_processes({box.uid})

    def leftover_dirs(self) -> int:
        """Work dirs still under the provider's root: 0 once every sandbox is closed."""
        if self.root is None or not self.root.is_dir():
            return 0
        return sum(1 for p in self.root.iterdir() if p.is_dir())

    # -- slots ---------------------------------------------------------------------------------------
    def _take_slot(self) -> int:
        if self.link is None:
            self._start_sync()
        with self._lock:
            if not self._free:
                raise SandboxError(f"all {self.slots} local sandbox slots are in use; raise sandbox.slots "
                                   "or open fewer sandboxes at once")
            return self._free.pop()

    def _give_slot(self, uid: int) -> None:
        with self._lock:
            self._free.insert(0, uid)  # least recently used first


class LocalSandbox(Sandbox):
    def __init__(self, provider: LocalSandboxProvider):
        self.provider = provider
        self.limits = provider.limits
        self.uid: int | None = None
        self.workdir: Path | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self._start_sync)

    def _start_sync(self) -> None:
        if self.workdir is not None:
            return
        slot = self.provider._take_slot()
        self.uid = None if slot < 0 else slot
        assert self.provider.root is not None
        self.workdir = Path(tempfile.mkdtemp(prefix="box-", dir=self.provider.root))
        if self.uid is not None:
            os.chown(self.workdir, self.uid, self.uid)
        os.chmod(self.workdir, 0o700)

    async def close(self) -> None:
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        if self.workdir is None:
            return
        if self.uid is not None and self.provider.link is not None:
            # wait: the uid goes back to the pool, and a reaper still running would hit its next owner
            self.provider.link.reap(self.uid).result(timeout=30)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir = None
        self.provider._give_slot(-1 if self.uid is None else self.uid)

    # -- exec ----------------------------------------------------------------------------------------
    async def exec(self, cmd: Sequence[str] | str, *, timeout: float | None = None, stdin: str | bytes | None = None,
                   env: Mapping[str, str] | None = None, cwd: str | None = None) -> ExecResult:
        future = self._submit(cmd, timeout, stdin, env, cwd)
        return await asyncio.wrap_future(future)

    def _exec_sync(self, cmd: Sequence[str] | str, timeout: float | None, stdin: str | bytes | None,
                   env: Mapping[str, str] | None, cwd: str | None) -> ExecResult:
        return self._submit(cmd, timeout, stdin, env, cwd).result()

    def _submit(self, cmd: Sequence[str] | str, timeout: float | None, stdin: str | bytes | None,
                env: Mapping[str, str] | None, cwd: str | None) -> Any:
        if self.workdir is None:
            raise SandboxError("sandbox is not started (use `async with provider.sandbox() as box`)")
        link = self.provider.link
        if link is None:
            raise SandboxError("the local sandbox provider is closed")
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
        if not argv:
            raise SandboxError("exec needs a command")
        where = self.workdir / inside(cwd) if cwd else self.workdir
        limits = self.limits
        if timeout is not None and not timeout > 0:
            raise SandboxError(f"exec timeout must be > 0 seconds, got {timeout}")
        wall = min(limits.wall_seconds, timeout) if timeout is not None else limits.wall_seconds
        request = {
            "argv": argv, "workdir": str(self.workdir), "cwd": str(where),
            "uid": self.uid, "gid": self.uid, "limits": limits.to_dict(),
            "env": {"PATH": DEFAULT_PATH, "HOME": str(self.workdir), "TMPDIR": str(self.workdir),
                    "LANG": "C.UTF-8", **dict(env or {})},
        }
        return link.run(request, stdin=as_bytes(stdin), wall_seconds=wall, cpu_seconds=limits.cpu_seconds,
                        output_bytes=limits.output_bytes)

    # -- files -----------------------------------------------------------------------------------------
    def _host_path(self, path: str) -> Path:
        if self.workdir is None:
            raise SandboxError("sandbox is not started")
        full = self.workdir / inside(path)
        # code may have planted symlinks: resolve, and refuse anything that lands outside the work dir
        real = Path(os.path.realpath(full))
        if real != self.workdir and self.workdir not in real.parents:
            raise SandboxError(f"path {path!r} resolves outside the sandbox work dir")
        return real

    async def write_file(self, path: str, data: str | bytes) -> None:
        await asyncio.to_thread(self._write_sync, path, as_bytes(data))

    def _write_sync(self, path: str, data: bytes) -> None:
        try:
            self._write_checked(path, data)
        except OSError as exc:
            raise SandboxError(f"cannot write {path!r} in the sandbox: {exc.strerror or exc}") from None

    def _write_checked(self, path: str, data: bytes) -> None:
        target = self._host_path(path)
        assert self.workdir is not None
        made = []
        parent = target.parent
        while not parent.exists():
            made.append(parent)
            parent = parent.parent
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if self.uid is not None:
            for p in [target, *made]:
                os.chown(p, self.uid, self.uid, follow_symlinks=False)

    async def read_file(self, path: str) -> bytes:
        return await asyncio.to_thread(self._read_sync, path)

    def _read_sync(self, path: str) -> bytes:
        target = self._host_path(path)
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise SandboxError(f"no file {path!r} in the sandbox") from None
        except IsADirectoryError:
            raise SandboxError(f"{path!r} in the sandbox is a directory") from None
        with os.fdopen(fd, "rb") as f:
            return f.read(self.limits.file_mb * 2**20 + 1)[: self.limits.file_mb * 2**20]


def lock_uids(uids: range) -> list[int] | None:
    """Lock every uid of `uids` for this process (one lock file each, in a directory only root can write),
    or none of them if another holder has any; the fds are the locks: close them to release."""
    LOCK_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    held: list[int] = []
    for uid in uids:
        fd = os.open(LOCK_DIR / f"{uid}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            for other in held:
                os.close(other)
            return None
        held.append(fd)
    return held


def _has_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def live_processes(uids: set[int]) -> int:
    """How many live (not zombie, not dead) processes in /proc have a real uid in `uids`."""
    count = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        state = fields.get("State", "X").split()[0]
        if int(fields.get("Uid", "-1").split()[0]) in uids and state not in ("Z", "X"):
            count += 1
    return count
