"""The `sglang` engine backend: an SGLang server per engine worker, launched here or attached to by URL.

Every call goes over SGLang's HTTP API through the same client as our own server (engines/http.py): generation,
weight updates from disk and over a process group, memory release/resume for colocated training. The launcher
builds the server's command line — `python -m sglang.launch_server` for real, or `agentbench-npu serve` (our
engine behind the same API subset: `engine.launcher = "agentbench"`), which is how the lifecycle is tested on a
machine without an accelerator.

Weights reach the server from disk (colocated runs: the trainer's tensors are written as safetensors to a staging
dir and loaded with /update_weights_from_disk) or over a process group (/update_weights_from_distributed).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Coroutine, Iterable, Mapping, Sequence

import httpx
import torch

from ..errors import UserError, one_line
from ..models.moe import routes_shape
from ..types import GenerateRequest, GenerateResult
from .base import EngineClient
from .http import EngineRequestError, HttpEngine

__all__ = ["EngineLaunchError", "SGLangEngine", "ServerProcess", "agentbench_argv", "free_port", "routes_shape",
           "sglang_argv"]

LAUNCHERS = ("sglang", "agentbench")
# SGLang's deterministic inference works with these attention backends only ("" = its default choice) and refuses
# to start with another one named; on Ascend (backend "ascend") determinism comes from HCCL_DETERMINISTIC instead
DETERMINISTIC_BACKENDS = ("", "flashinfer", "fa3", "triton")


class EngineLaunchError(UserError):
    """The engine server did not come up: it exited, or did not answer /health in time."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def sglang_argv(model_dir: str | Path, *, host: str, port: int, dtype: str, device: str, device_index: int = 0,
                seed: int, options: Mapping[str, Any], routed_experts: bool, python: str = sys.executable) -> list[str]:
    """The command line of a real SGLang server for this run's engine worker (`device`: cpu, cuda or npu)."""
    argv = [python, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--host", host, "--port", str(port),
            "--dtype", dtype, "--tp-size", str(options.get("tp_size", 1)), "--random-seed", str(seed)]
    if int(options.get("ep_size", 1)) > 1:
        argv += ["--ep-size", str(options["ep_size"])]
    if device in ("cuda", "npu"):
        argv += ["--device", device, "--base-gpu-id", str(device_index)]
    attention = options.get("attention_backend") or ("ascend" if device == "npu" else "")
    if attention:
        argv += ["--attention-backend", attention]
    if float(options.get("mem_fraction_static", 0.0)) > 0:
        argv += ["--mem-fraction-static", f"{float(options['mem_fraction_static']):g}"]
    if options.get("release_memory", True):
        argv.append("--enable-memory-saver")  # /release_memory_occupation frees weights and KV cache
    if options.get("deterministic", True) and attention in DETERMINISTIC_BACKENDS:
        argv.append("--enable-deterministic-inference")
    if routed_experts:
        argv.append("--enable-return-routed-experts")
    return argv + [str(a) for a in options.get("extra_args", [])]


def agentbench_argv(model_dir: str | Path, *, host: str, port: int, dtype: str, device: str, seed: int,
                    python: str = sys.executable) -> list[str]:
    """Our own engine server behind the same API subset (no accelerator needed)."""
    return [python, "-m", "agentbench_npu", "serve", "--model", str(model_dir), "--host", host, "--port", str(port),
            "--dtype", dtype, "--device", device, "--seed", str(seed)]


def _die_with_parent() -> None:
    """In the server's process, before exec: SIGTERM when the process that launched it dies (Linux), so a killed
    run does not leave a server holding its devices."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerProcess:
    """A server subprocess in its own process group: started, waited for until /health answers, stopped."""

    def __init__(self, argv: Sequence[str], url: str, log_path: Path, env: Mapping[str, str] | None = None):
        self.argv = list(argv)
        self.url = url
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pause = threading.Event()  # a wait between polls that nothing needs to interrupt
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while True:
                code = self.proc.poll() if self.proc else None
                if code is not None:
                    raise EngineLaunchError(f"the engine server ({self.argv[2]}) exited with status {code} before "
                                            f"answering {self.url}/health; its log ({self.log_path}) ends: "
                                            f"{self.log_tail()}")
                try:
                    if client.get("/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise EngineLaunchError(f"the engine server did not answer {self.url}/health within {timeout:g} s "
                                            f"(engine.launch_timeout); its log ({self.log_path}) ends: {self.log_tail()}")
                pause.wait(0.2)

    def log_tail(self, lines: int = 3) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                tail = [line.strip() for line in deque(f, maxlen=lines) if line.strip()]
        except OSError:
            return "(no log)"
        return " | ".join(tail) or "(empty)"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the server's whole process group (SGLang runs a scheduler and workers), SIGKILL to what is
        left after `grace` seconds — also when the server's main process is gone and its workers are not."""
        if self.proc is None:
            return
        group, pause = self.proc.pid, threading.Event()
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break  # nobody left in the group
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.proc.poll()  # reap the main process, or it stays in the group as a zombie
                try:
                    os.killpg(group, 0)
                except ProcessLookupError:
                    return
                pause.wait(0.1)
        self.proc.poll()


def _staging_dir(options: Mapping[str, Any]) -> Path:
    """Where colocated syncs write weights for the server to load: under engine.staging_dir when set (a dir the
    server's host sees too, for a server attached by URL on another machine), else the local temp dir."""
    root = options.get("staging_dir") or None
    if root:
        Path(root).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="agentbench-npu-sglang-", dir=root))


class _Loop:
    """A private event loop on a thread: the engine's HTTP client lives there, for sync and async callers alike."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sglang-client", daemon=True)
        self.thread.start()
        self.closed = False

    def _submit(self, coro: Coroutine[Any, Any, Any]) -> Any:
        if self.closed:
            coro.close()
            raise EngineRequestError("the sglang engine is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self._submit(coro).result()

    async def wrap(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return await asyncio.wrap_future(self._submit(coro))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class SGLangEngine(EngineClient):
    """An engine worker's SGLang server and the client to it."""

    name = "sglang"
    description = "an SGLang server per engine worker (launched, or attached by engine.url) over SGLang's HTTP API"
    per_tensor_broadcast = True  # distributed updates: one broadcast per tensor, SGLang's protocol
    colocated_transport = "disk"  # colocated updates go through a safetensors staging dir
    colocated_release = True  # colocated steps: release the server's memory while the trainer steps

    def __init__(self, url: str, *, dtype: str, model_path: str, process: ServerProcess | None = None,
                 staging: Path | None = None):
        self.url = url
        self.dtype = dtype
        self.model_path = model_path
        self.process = process
        self._http = HttpEngine(url)  # used only on the private loop below, whoever calls
        self._loop = _Loop()
        self._staging = staging or Path(tempfile.mkdtemp(prefix="agentbench-npu-sglang-"))
        self.memory_released = False
        shape = routes_shape(Path(model_path))  # SGLang's /get_model_info does not describe the experts
        self._http.routes_shape = shape

    @classmethod
    def create(cls, model_dir: Path, *, tokenizer: Any = None, dtype: str, device: torch.device, seed: int = 0,
               attn_implementation: str = "sdpa", options: Mapping[str, Any] | None = None) -> SGLangEngine:
        """Attach to `options["url"]`, or launch a server for `model_dir` and wait until it answers."""
        options = dict(options or {})
        if options.get("url"):
            engine = cls(str(options["url"]).rstrip("/"), dtype=dtype, model_path=str(model_dir),
                         staging=_staging_dir(options))
            if not engine._sync(engine._http.health()):
                engine.close()
                raise EngineLaunchError(f"engine.url {options['url']}: no SGLang server answers /health there")
            return engine
        launcher = options.get("launcher", "sglang")
        host, port = "127.0.0.1", int(options.get("port") or 0) or free_port()
        if launcher == "sglang":
            from importlib.util import find_spec

            if find_spec("sglang") is None:
                from ..errors import MissingExtraError

                raise MissingExtraError("engine 'sglang'", extra="sglang", module="sglang")
            argv = sglang_argv(model_dir, host=host, port=port, dtype=dtype, device=device.type,
                               device_index=device.index or 0, seed=seed, options=options,
                               routed_experts=bool(options.get("routed_experts")))
        elif launcher == "agentbench":
            argv = agentbench_argv(model_dir, host=host, port=port, dtype=dtype, device=device.type, seed=seed)
        else:
            raise UserError(f"engine.launcher {launcher!r}: must be one of {', '.join(LAUNCHERS)}")
        staging = _staging_dir(options)
        url = f"http://{host}:{port}"
        process = ServerProcess(argv, url, Path(options.get("log_dir") or staging) / f"server-{port}.log")
        try:
            process.start(float(options.get("launch_timeout", 600.0)))
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls(url, dtype=dtype, model_path=str(model_dir), process=process, staging=staging)

    def _sync(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self._loop.run(coro)

    @property
    def weight_version(self) -> int:
        return self._http.weight_version

    @weight_version.setter
    def weight_version(self, value: int) -> None:
        self._http.weight_version = int(value)

    @property
    def return_routed_experts(self) -> bool:  # type: ignore[override]
        return self._http.return_routed_experts

    @return_routed_experts.setter
    def return_routed_experts(self, value: bool) -> None:
        moe = self._http.routes_shape is not None  # dense models have no routes to return
        self._http.return_routed_experts = bool(value) and moe

    # -- EngineClient (async; every call runs on the private loop: one connection pool, whichever loop asks) --
    async def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        return await self._loop.wrap(self._http.generate(requests))

    async def update_weights_from_disk(self, path: str | Path) -> int:
        return await self._loop.wrap(self._http.update_weights_from_disk(path))

    async def weights_checksum(self) -> str:
        return await self._loop.wrap(self._http.weights_checksum())

    async def model_info(self) -> dict[str, Any]:
        info = await self._loop.wrap(self._http.model_info())
        return {**info, "engine": self.name, "url": self.url}

    async def health(self) -> bool:
        return await self._loop.wrap(self._http.health())

    # -- what the executors call (synchronous) -----------------------------------------------------
    def generate_batch(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        return self._sync(self._http.generate(requests))

    def checksum(self) -> str:
        try:
            return self._sync(self._http.weights_checksum())
        except EngineRequestError as exc:
            raise EngineRequestError(f"{exc}. Checking a stock SGLang server's weights against the trainer's is not "
                                     "built yet: run with engine.launcher = \"agentbench\", or a server that offers "
                                     "GET /weights_checksum") from None

    def cast_for_update(self, named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        """The trainer's tensors as the server will hold them: on the CPU, in the engine's dtype."""
        dtype = getattr(torch, self.dtype)
        return [(n, t.detach().to(device="cpu", dtype=dtype)) for n, t in named]

    def update_weights_from_tensors(self, named: Iterable[tuple[str, torch.Tensor]], version: int | None = None) -> int:
        """Colocated sync through disk: write safetensors to the staging dir, then /update_weights_from_disk."""
        from safetensors.torch import save_file

        target = self._staging / "weights"
        partial = self._staging / "weights.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        save_file({n: t.contiguous() for n, t in named}, str(partial / "model.safetensors"))
        for extra in ("config.json", "generation_config.json"):
            if (Path(self.model_path) / extra).is_file():
                shutil.copy(Path(self.model_path) / extra, partial / extra)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        new = self._sync(self._http.update_weights_from_disk(target))
        if version is not None:
            self.weight_version = version
            return version
        return new

    def release_memory_occupation(self) -> None:
        self._sync(self._http.release_memory_occupation())  # raises unless the server said it released
        self.memory_released = True

    def resume_memory_occupation(self) -> None:
        self._sync(self._http.resume_memory_occupation())
        self.memory_released = False

    def init_weights_update_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        self._sync(self._http.init_weights_update_group(host, port, rank, world_size, backend))

    def update_weights_from_distributed(self, specs: Sequence[tuple[str, tuple, str]]) -> int:
        return self._sync(self._http.update_weights_from_distributed(specs))

    def destroy_weights_update_group(self) -> None:
        self._sync(self._http.destroy_weights_update_group())

    # -- teardown -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop a launched server (an attached one keeps running), drop the staging dir and the client loop.
        Safe to call twice."""
        if self._loop.closed:
            return
        try:
            self._sync(self._http.aclose())
        except Exception as exc:  # closing must not hide why we are closing
            print(f"sglang engine: closing the client failed: {one_line(exc)}", file=sys.stderr)
        self._loop.close()
        if self.process is not None:
            self.process.stop()
        shutil.rmtree(self._staging, ignore_errors=True)
