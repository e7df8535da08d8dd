"""An ASGI app served by uvicorn on a background thread: for tests, benchmarks and in-process servers.

Shared by the engine server (engines/server.py) and the SandboxFusion endpoint (sandbox/fusion.py); it
imports neither torch nor any server of ours, so a sandbox server starts in a blink.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable

import httpx
import uvicorn


class AppThread:
    """`app_factory()` served on `host:port`; `port=0` picks a free port. Entering returns once GET `health`
    answers 200 (`.url` is then the base URL); leaving stops the server and joins its thread."""

    def __init__(self, app_factory: Callable[[], Any], what: str, host: str = "127.0.0.1", port: int = 0, *,
                 log_level: str = "warning", startup_timeout: float = 60.0, stop_timeout: float = 30.0,
                 health: str = "/health"):
        self.app_factory, self.what, self.health = app_factory, what, health
        self.host, self.port, self.log_level = host, port, log_level
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __enter__(self) -> AppThread:
        # Bind before starting so the port is known (and ours) even when port=0.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((self.host, self.port))
        self.port = self._socket.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(self.app_factory(), log_level=self.log_level))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name=f"{self.what}:{self.port}", daemon=True)
        self._thread.start()
        try:
            self._wait_until_healthy()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        assert self._thread is not None
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise RuntimeError(f"{self.what} on {self.url} exited during startup; see its log above")
            try:
                if httpx.get(f"{self.url}{self.health}", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            self._thread.join(timeout=0.02)  # the wait between polls; returns early if the server died
        raise TimeoutError(f"{self.what} on {self.url} did not answer {self.health} within {self.startup_timeout} s")

    def __exit__(self, *exc_info: Any) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=self.stop_timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout=self.stop_timeout)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None
