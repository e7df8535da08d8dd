"""The runner's side of the local sandbox worker (zygote.py): one thread, one socket, many execs.

All bookkeeping of running execs happens on the link's own thread: it sends requests, reads every
child's stdout and stderr, enforces wall-time deadlines and the output cap, and resolves each exec's
future when the worker reports the exit. Callers on any thread or event loop just wait on the future,
so an asyncio loop is never blocked by a pipe and per-step event loops can share one worker.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import queue
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import ExecResult, OutputCap, SandboxError, classify

TRACE = []
ZYGOTE = Path(__file__).with_name("zygote.py")


@dataclass
class _Exec:
    request: dict[str, Any]
    stdin: bytes
    future: concurrent.futures.Future
    cap: OutputCap
    wall_seconds: float
    cpu_seconds: float
    started: float = 0.0
    deadline: float = 0.0
    pid: int | None = None
    pipes: dict[int, str] = field(default_factory=dict)  # read fd -> "stdout" | "stderr"
    exit: dict[str, Any] | None = None
    timed_out: bool = False
    reaped: bool = False


class ZygoteLink:
    """Starts the worker process and runs execs through it."""

    def __init__(self, isolation: str, root: str, network: bool, env: dict[str, str] | None = None):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = json.dumps({"isolation": isolation, "root": root, "network": network})
        self.process = subprocess.Popen(
            [sys.executable, "-I", str(ZYGOTE), str(theirs.fileno()), config], pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env if env is not None else {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
        )
        theirs.close()
        self.sock = ours
        self.sock.setblocking(False)
        self._ids = itertools.count(1)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._execs: dict[int, _Exec] = {}
        self._reaps: dict[int, concurrent.futures.Future] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._closed = False
        self._broken: str | None = None
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.sock, selectors.EVENT_READ, "sock")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._loop, name="sandbox-link", daemon=True)
        self._thread.start()

    # -- any thread ------------------------------------------------------------------------------
    def run(self, request: dict[str, Any], *, stdin: bytes, wall_seconds: float, cpu_seconds: float,
            output_bytes: int) -> concurrent.futures.Future:
        """Submit one exec; the future resolves to an ExecResult (or SandboxError if the worker died)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._broken or self._closed:
            future.set_exception(SandboxError(self._broken or "the local sandbox worker is closed"))
            return future
        request = {**request, "op": "run", "id": next(self._ids)}
        self._queue.put(_Exec(request, stdin, future, OutputCap(output_bytes), wall_seconds, cpu_seconds))
        os.write(self._wake_w, b"x")
        return future

    def reap(self, uid: int) -> concurrent.futures.Future:
        """Kill whatever runs under `uid` now (a closing sandbox's leftovers); resolves when all are gone."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self._broken or self._closed:
            future.set_result(None)  # no worker, nothing of ours runs
            return future
        request_id = next(self._ids)
        self._reaps[request_id] = future
        self._queue.put({"op": "reap", "uid": uid, "id": request_id})
        os.write(self._wake_w, b"x")
        return future

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.write(self._wake_w, b"q")
        self._thread.join(timeout=10)
        self.sock.close()  # the worker sees end of file, kills and reaps everything it started, and exits
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    @property
    def pid(self) -> int:
        return self.process.pid

    # -- the link thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._closed or self._execs:
                timeout = None
                deadlines = [e.deadline for e in self._execs.values() if e.started and not e.timed_out]
                if deadlines:
                    timeout = max(0.0, min(deadlines) - time.monotonic())
                for key, _ in self._selector.select(timeout):
                    if key.data == "wake":
                        if b"q" in _drain(self._wake_r):
                            self._fail_all("the local sandbox was closed while code ran")
                            return
                        self._submit_queued()
                    elif key.data == "sock":
                        self._on_message()
                    else:
                        self._on_output(key.fd, key.data)
                self._enforce_deadlines()
        except BaseException as exc:  # anything unexpected here must not leave callers waiting forever
            self._broken = f"the local sandbox worker link failed: {exc}"
            self._fail_all(self._broken)

    def _submit_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, dict):
                self._send(item)
                continue
            made: list[int] = []
            try:
                stdin_fd = os.memfd_create("sandbox-stdin")
                made.append(stdin_fd)
                os.write(stdin_fd, item.stdin)
                os.lseek(stdin_fd, 0, os.SEEK_SET)
                out_r, out_w = os.pipe()
                made += [out_r, out_w]
                err_r, err_w = os.pipe()
                made += [err_r, err_w]
                socket.send_fds(self.sock, [json.dumps(item.request).encode()], [stdin_fd, out_w, err_w])
            except OSError as exc:  # out of fds, or the worker is gone: this exec fails, the link lives on
                for fd in made:
                    os.close(fd)
                if not item.future.done():
                    item.future.set_exception(SandboxError(f"could not start the exec: {exc}"))
                continue
            for fd in (stdin_fd, out_w, err_w):
                os.close(fd)
            item.started = time.monotonic()
            item.deadline = item.started + item.wall_seconds
            for fd, name in ((out_r, "stdout"), (err_r, "stderr")):
                os.set_blocking(fd, False)
                item.pipes[fd] = name
                self._selector.register(fd, selectors.EVENT_READ, (item.request["id"], name))
            self._execs[item.request["id"]] = item

    def _send(self, message: dict[str, Any]) -> None:
        self.sock.send(json.dumps(message).encode())

    def _on_message(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            if not data:
                stderr = self.process.stderr.read().decode(errors="replace")[-500:] if self.process.stderr else ""
                self._broken = f"the local sandbox worker exited: {stderr.strip() or 'no message'}"
                self._fail_all(self._broken)
                self._closed = True
                return
            message = json.loads(data)
            if message["op"] == "reaped":
                done = self._reaps.pop(message.get("id"), None)
                if done is not None:
                    done.set_result(None)
                continue
            item = self._execs.get(message.get("id"))
            if item is None:
                continue
            if message["op"] == "started":
                item.pid = message["pid"]
            elif message["op"] == "exited":
                if "trace" in message: TRACE.append((message["trace"], time.monotonic() - item.started))
                item.exit = message
                for fd in list(item.pipes):
                    self._read_all(item, fd)
                self._finish(item)

    def _on_output(self, fd: int, key: tuple[int, str]) -> None:
        item = self._execs.get(key[0])
        if item is not None:
            self._read_all(item, fd)

    def _read_all(self, item: _Exec, fd: int) -> None:
        """Read what the pipe holds now; close it at end of file or once the output cap is hit."""
        while fd in item.pipes:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self._close_pipe(item, fd)
                return
            if not item.cap.feed(item.pipes[fd], chunk):
                for other in list(item.pipes):
                    self._close_pipe(item, other)
                self._kill(item)
                return

    def _close_pipe(self, item: _Exec, fd: int) -> None:
        self._selector.unregister(fd)
        os.close(fd)
        del item.pipes[fd]

    def _kill(self, item: _Exec) -> None:
        if item.reaped:
            return
        item.reaped = True
        if item.request.get("uid") is not None:
            self._send({"op": "reap", "uid": item.request["uid"]})
        elif item.pid is not None:
            self._send({"op": "reap", "pgid": item.pid})
        else:
            item.reaped = False  # no pid yet: retried when the deadline check runs again

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for item in self._execs.values():
            if item.exit is None and item.deadline and now >= item.deadline and not item.reaped:
                item.timed_out = True
                self._kill(item)

    def _finish(self, item: _Exec) -> None:
        for fd in list(item.pipes):
            self._close_pipe(item, fd)
        del self._execs[item.request["id"]]
        raw = item.exit["status"]
        code = os.waitstatus_to_exitcode(raw)
        exit_code, sig = (code, None) if code >= 0 else (None, -code)
        stderr = item.cap.text("stderr")
        # only RLIMIT_CPU sends SIGXCPU; rusage may read under the limit on a loaded machine, so trust it
        # SIGXCPU comes only from the CPU rlimit; a shell reports its child's SIGXCPU as exit 128 + 24
        over_cpu = item.exit["cpu"] >= item.cpu_seconds * 0.95
        cpu_limited = sig == signal.SIGXCPU or (sig == signal.SIGKILL and over_cpu) or (
            exit_code == 128 + signal.SIGXCPU and over_cpu)
        status, detail = classify(exit_code, sig, stderr, timed_out=item.timed_out, truncated=item.cap.truncated,
                                  cpu_limited=cpu_limited)
        if exit_code in (126, 127) and stderr.startswith("sandbox: could not start"):
            detail = stderr.strip().splitlines()[0]
        result = ExecResult(status=status, exit_code=exit_code, stdout=item.cap.text("stdout"), stderr=stderr,
                            duration=time.monotonic() - item.started, detail=detail, signal=sig)
        if not item.future.done():
            item.future.set_result(result)

    def _fail_all(self, why: str) -> None:
        for done in self._reaps.values():
            done.set_result(None)  # the worker is gone, and everything it started with it
        self._reaps.clear()
        for item in list(self._execs.values()):
            for fd in list(item.pipes):
                self._close_pipe(item, fd)
            if not item.future.done():
                item.future.set_exception(SandboxError(why))
        self._execs.clear()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if not isinstance(item, dict) and not item.future.done():
                item.future.set_exception(SandboxError(why))


def _drain(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk
