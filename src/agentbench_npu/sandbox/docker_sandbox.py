"""A docker sandbox: one container, execs through the supervisor, files through tar archives (see docker.py)."""

from __future__ import annotations

import base64
import io
import json
import posixpath
import struct
import tarfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import one_line
from .base import ExecResult, OutputCap, Sandbox, SandboxError, as_bytes, classify, inside

if TYPE_CHECKING:
    from .docker import DockerSandboxProvider

WORKDIR = "/work"
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
SIGXCPU, SIGKILL = 24, 9
CONTROL_SECONDS = 15.0  # how long a kill-everything or count request may take
# Runs inside the container once per exec (docker_supervisor.py, sent as text: any image with python3 works).
SUPERVISOR = (Path(__file__).with_name("docker_supervisor.py")).read_text(encoding="utf-8")


class DockerSandbox(Sandbox):
    def __init__(self, provider: DockerSandboxProvider):
        self.provider = provider
        self.limits = provider.limits
        self.container: Any = None
        self._closed = False
        self._exec_lock = threading.Lock()  # one exec at a time: each ends by killing all it left behind

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.provider._call(self._start_sync)

    def _start_sync(self) -> None:
        if self.container is not None:
            return
        if self._closed:
            raise SandboxError("this sandbox is closed; open a new one")
        container = self.provider._take_container()
        with self.provider._lock:
            self.container = container
            self.provider._boxes.add(self)

    async def close(self) -> None:
        """Stop the container and delete it with its files. The removal finishes in the background (the
        provider's close waits for it); the sandbox is unusable at once."""
        if self.container is None or self.provider._pool is None:
            self._closed = True
            return
        await self.provider._call(self._close_sync)

    def _close_sync(self, wait: bool = False) -> None:
        with self.provider._lock:
            self._closed = True
            container, self.container = self.container, None
            self.provider._boxes.discard(self)
        if container is not None:
            self.provider._discard(container, wait)

    def _require(self) -> Any:
        if self.container is None:
            raise SandboxError("the sandbox is not open (use `async with provider.sandbox() as box`); "
                               "after close it cannot be used again")
        return self.container

    # -- exec ----------------------------------------------------------------------------------------
    async def exec(self, cmd: Sequence[str] | str, *, timeout: float | None = None, stdin: str | bytes | None = None,
                   env: Mapping[str, str] | None = None, cwd: str | None = None) -> ExecResult:
        self._require()
        shell = isinstance(cmd, str)
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else [str(a) for a in cmd]
        if not argv or not argv[0]:
            raise SandboxError("exec needs a command")
        where = posixpath.join(WORKDIR, inside(cwd)) if cwd else WORKDIR
        limits = self.limits
        wall = min(limits.wall_seconds, timeout) if timeout is not None else limits.wall_seconds
        data = as_bytes(stdin)
        request = {
            "argv": argv, "shell": shell, "cwd": where, "workdir": WORKDIR, "uid": self.provider.uid,
            "wall": float(wall), "limits": limits.to_dict(), "stdin_len": len(data),
            "env": {"PATH": DEFAULT_PATH, "HOME": WORKDIR, "TMPDIR": WORKDIR, "LANG": "C.UTF-8", **dict(env or {})},
        }
        return await self.provider._call(self._exec_sync, request, data)

    def _exec_sync(self, request: dict[str, Any], data: bytes) -> ExecResult:
        started = time.monotonic()
        with self._exec_lock:
            container = self._require()
            budget = float(request["wall"]) + self.provider.exec_margin
            try:
                out, err, exit_code = self._supervise(container, request, data, budget)
            except TimeoutError:  # the socket deadline passed
                self._reap_after_hang(container)
                return ExecResult("timeout", None, "", "", time.monotonic() - started,
                                  detail=f"the sandbox did not answer within {budget:.0f} s; everything running in "
                                         "it was killed")
            duration = time.monotonic() - started
            answer = _last_json(out)
            if answer is None:
                return self._no_answer(container, out, err, exit_code, duration)
        if "setup_error" in answer:
            raise SandboxError(answer["setup_error"])
        if "start_error" in answer:
            message = answer["start_error"]
            return ExecResult("error", 127, "", message + "\n", duration, detail=message)
        cap = OutputCap(self.limits.output_bytes, bytearray(base64.b64decode(answer["stdout"])),
                        bytearray(base64.b64decode(answer["stderr"])), bool(answer["truncated"]))
        stdout, stderr = cap.text("stdout"), cap.text("stderr")  # decoded as every backend decodes
        code, sig = answer["exit_code"], answer["signal"]
        # SIGXCPU comes only from RLIMIT_CPU's soft limit (rusage may under-count CPU time by 10% on a loaded
        # machine, so it is not asked); a SIGKILL is the hard limit's only when the CPU time says so
        cpu_limited = sig == SIGXCPU or (sig == SIGKILL and answer["cpu"] >= self.limits.cpu_seconds * 0.95)
        # the cgroup's OOM killer struck during this exec (the command or one of its children) and the
        # command failed: a memory failure, as a MemoryError would be
        memory_limited = bool(answer.get("oom_killed")) and (bool(code) or sig is not None)
        status, detail = classify(code, sig, stderr, timed_out=answer["timed_out"], truncated=answer["truncated"],
                                  cpu_limited=cpu_limited, memory_limited=memory_limited)
        if code in (126, 127) and stderr.startswith("sandbox: could not start"):
            detail = stderr.strip().splitlines()[0]
        return ExecResult(status=status, exit_code=code, stdout=stdout, stderr=stderr, duration=duration,
                          detail=detail, signal=sig)

    def _supervise(self, container: Any, request: dict[str, Any], data: bytes,
                   budget: float) -> tuple[bytes, bytes, int | None]:
        """One `docker exec` of the supervisor: send the request and stdin, collect its stdout and stderr."""
        client = self.provider.client
        if client is None:
            raise SandboxError("the docker sandbox provider is closed")
        api = client.api
        try:
            exec_id = api.exec_create(container.id, ["python3", "-I", "-S", "-c", SUPERVISOR], stdin=True,
                                      stdout=True, stderr=True, tty=False, user="0", workdir="/")["Id"]
            sock = api.exec_start(exec_id, socket=True)
        except Exception as exc:
            raise self._broken(container, exc) from None
        raw = getattr(sock, "_sock", sock)
        deadline = time.monotonic() + budget
        out, err = bytearray(), bytearray()
        try:
            raw.settimeout(budget)
            raw.sendall(json.dumps(request).encode() + b"\n" + data)
            buffer = bytearray()
            while True:
                raw.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = raw.recv(1 << 16)
                if not chunk:
                    break
                buffer += chunk
                while len(buffer) >= 8:  # frames: stream (1 byte), 3 zero bytes, size (4 bytes, big-endian)
                    stream, size = buffer[0], struct.unpack(">I", buffer[4:8])[0]
                    if len(buffer) < 8 + size:
                        break
                    (out if stream == 1 else err).extend(buffer[8:8 + size])
                    del buffer[:8 + size]
                    if len(err) > 1 << 20:
                        del err[: len(err) - (1 << 16)]
        except TimeoutError:  # the deadline: the caller reaps
            raise
        except OSError as exc:  # the daemon went away, or the container with it
            raise self._broken(container, exc) from None
        finally:
            try:
                sock.close()
            except OSError:
                pass
        exit_code = None
        if _last_json(bytes(out)) is None:
            try:
                exit_code = api.exec_inspect(exec_id).get("ExitCode")
            except Exception:
                pass
        return bytes(out), bytes(err), exit_code

    def _no_answer(self, container: Any, out: bytes, err: bytes, exit_code: int | None, duration: float) -> ExecResult:
        """The supervisor ended without its JSON line: the sandbox was closed or its container died (raise),
        or something killed the supervisor (a result, after killing everything left)."""
        if self.container is None:
            raise SandboxError("the sandbox was closed while it was in use")
        try:
            container.reload()
            state = container.attrs.get("State", {})
        except Exception as exc:
            raise self._broken(container, exc) from None
        if not state.get("Running"):
            why = " (out of memory)" if state.get("OOMKilled") else ""
            raise SandboxError(f"the sandbox container {container.short_id} stopped{why}; open a new sandbox")
        tail = err.decode("utf-8", errors="replace").strip()[-500:]
        self._reap_after_hang(container)
        return ExecResult("killed", None, "", tail, duration,
                          detail=f"the sandbox supervisor ended without a result (exit code {exit_code}); "
                                 "everything running in the sandbox was killed")

    def _broken(self, container: Any, exc: BaseException) -> SandboxError:
        if self.container is None:
            return SandboxError("the sandbox was closed while it was in use")
        return SandboxError(f"docker exec in sandbox container {container.short_id} failed: {one_line(exc)}")

    def _control_sync(self, op: str) -> dict[str, Any]:
        """Run the supervisor for `op` ("reap": kill everything but PID 1; "count": count it)."""
        with self._exec_lock:
            out, err, code = self._supervise(self._require(), {"op": op}, b"", CONTROL_SECONDS)
        answer = _last_json(out)
        if answer is None:
            raise SandboxError(f"the docker sandbox supervisor failed on {op!r} (exit code {code}): "
                               f"{err.decode('utf-8', errors='replace').strip()[-500:]}")
        return answer

    def _reap_after_hang(self, container: Any) -> None:
        try:
            out, _, _ = self._supervise(container, {"op": "reap"}, b"", CONTROL_SECONDS)
        except Exception:
            out = b""
        if _last_json(out) is None:  # not even that answered: the container is beyond use
            self._close_sync()

    # -- files -----------------------------------------------------------------------------------------
    async def write_file(self, path: str, data: str | bytes) -> None:
        rel = inside(path)
        if rel == ".":
            raise SandboxError(f"write_file needs a file path, got {path!r}")
        self._require()
        await self.provider._call(self._write_sync, rel, as_bytes(data))

    def _write_sync(self, rel: str, data: bytes) -> None:
        container = self._require()
        uid = self.provider.uid
        buffer = io.BytesIO()
        now = time.time()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            parts = rel.split("/")
            for depth in range(1, len(parts)):  # the parents, owned by the command's uid so it can use them
                info = tarfile.TarInfo("/".join(parts[:depth]))
                info.type, info.mode, info.uid, info.gid, info.mtime = tarfile.DIRTYPE, 0o755, uid, uid, now
                tar.addfile(info)
            info = tarfile.TarInfo(rel)
            info.size, info.mode, info.uid, info.gid, info.mtime = len(data), 0o644, uid, uid, now
            tar.addfile(info, io.BytesIO(data))
        try:
            container.put_archive(WORKDIR, buffer.getvalue())
        except Exception as exc:
            raise SandboxError(f"could not write {rel!r} in the sandbox: {one_line(exc)}") from None

    async def read_file(self, path: str) -> bytes:
        rel = inside(path)
        self._require()
        return await self.provider._call(self._read_sync, rel)

    def _read_sync(self, rel: str) -> bytes:
        container = self._require()
        errors = self.provider.docker.errors
        limit = int(self.limits.file_mb) * 2**20
        target = rel
        for _ in range(16):  # follow symlinks ourselves, refusing any that leave the work dir
            try:
                stream, stat = container.get_archive(posixpath.join(WORKDIR, target))
            except errors.NotFound:
                raise SandboxError(f"no file {rel!r} in the sandbox") from None
            except Exception as exc:
                raise SandboxError(f"could not read {rel!r} in the sandbox: {one_line(exc)}") from None
            link = stat.get("linkTarget") or ""
            if not link:
                break
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(posixpath.join(WORKDIR, target)), link))
            if resolved != WORKDIR and not resolved.startswith(WORKDIR + "/"):
                raise SandboxError(f"{rel!r} in the sandbox is a link to {link!r}, outside the work dir")
            target = posixpath.relpath(resolved, WORKDIR)
        else:
            raise SandboxError(f"{rel!r} in the sandbox is a chain of too many links")
        if stat.get("mode", 0) & (1 << 31):  # Go's os.ModeDir
            raise SandboxError(f"{rel!r} in the sandbox is a directory")
        with tarfile.open(fileobj=_ChunkReader(stream), mode="r|") as tar:
            for member in tar:
                if member.isfile():
                    handle = tar.extractfile(member)
                    assert handle is not None
                    return handle.read(limit)
        raise SandboxError(f"{rel!r} in the sandbox is not a regular file")


class _ChunkReader(io.RawIOBase):
    """A file object over the byte chunks get_archive streams, for tarfile's streaming mode."""

    def __init__(self, chunks: Any):
        self._chunks = iter(chunks)
        self._left = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._left:
            try:
                self._left = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(target), len(self._left))
        target[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


def _last_json(out: bytes) -> dict[str, Any] | None:
    for line in reversed(out.splitlines()):
        line = line.strip()
        if line.startswith(b"{"):
            try:
                value = json.loads(line)
            except ValueError:
                return None
            return value if isinstance(value, dict) else None
    return None
