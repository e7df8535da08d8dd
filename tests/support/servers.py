"""Our CLI's servers (`serve`, `search-server`) started as a user starts them: a fresh process on a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def cli_server(*args: str, timeout: float = 120) -> Iterator[tuple[str, subprocess.Popen]]:
    """`agentbench-npu ARGS --port P` until /health answers; yields (base URL, process), terminates it at exit.

    The process's combined output is left readable on `proc.stdout` after exit (`proc.communicate()`)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "agentbench_npu", *args, "--port", str(port)],
                            env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    try:
        while True:  # poll until healthy, bounded by the deadline and by the process staying alive
            if proc.poll() is not None:
                pytest.fail(f"`{args[0]}` exited early: {proc.stdout.read() if proc.stdout else ''}")
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"`{args[0]}` did not become healthy within {timeout} s")
            time.sleep(0.1)  # polling interval, not a timing assumption
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=30)
