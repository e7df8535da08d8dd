"""SandboxFusion's `/run_code` over any sandbox provider, so SandboxFusion clients (verl, ReTool recipes,
reward functions) run their code on our sandboxes unchanged.

    POST /run_code {"code": "print(input())", "language": "python", "stdin": "hi", "run_timeout": 5,
                    "files": {"data.txt": "<base64>"}, "fetch_files": ["out.txt"]}
    → {"status": "Success", "message": "", "compile_result": null,
       "run_result": {"status": "Finished", "execution_time": 0.02, "return_code": 0, "stdout": "hi\\n",
                      "stderr": ""},
       "executor_pod_name": null, "files": {"out.txt": "<base64>"}}

Languages: python (`python3 FILE`) and bash (`bash FILE`); any other language answers HTTP 200 with status
SandboxError naming the supported ones. A malformed body (no `code`, wrong types) is HTTP 422, as from
SandboxFusion's own FastAPI server.

Outcomes, as SandboxFusion reports them (Failed whenever the program failed, SandboxError when the sandbox
did): ok → Success/Finished; error, memory, killed → Failed/Finished with the return code (a signal death
reads -signal, as in SandboxFusion's asyncio runner); timeout (wall or CPU) → Failed/TimeLimitExceeded;
output_truncated → Failed/Finished with what was kept; a `SandboxError` → SandboxError with no run_result.
`message` is "" on plain success, else says why (the status detail, and any limit that was not applied).

Limits: every request runs in a fresh sandbox (`async with provider.sandbox()`), so nothing leaks between
requests. `run_timeout` lowers the provider's wall-time limit for the call; it cannot raise it (when a run
hits the lower limit, the message says so). `memory_limit_MB` > 0 below the provider's `memory_mb` is applied per call as an address-space
rlimit (`ulimit -v` in a `sh` wrapper, the same measure as the local backend's limit); above it, the
provider's limit stays (a sandbox's limit cannot be raised per call; the message says so). With
`per_call_memory=False` (backends without `sh`) it is never applied, and the message says that too.
`compile_timeout` is accepted and unused: python and bash compile nothing.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import fastapi
import uvicorn
from pydantic import BaseModel, Field

from ..errors import one_line
from ..http_thread import AppThread
from .base import ExecResult, SandboxError, SandboxProvider

log = logging.getLogger(__name__)

LANGUAGES = {"python": ("python3", ".py"), "bash": ("bash", ".sh")}
MEMORY_WRAPPER = 'ulimit -v "$1"; shift; exec "$@"'


class RunCodeRequest(BaseModel):
    """SandboxFusion's request body (unknown fields are ignored, as there)."""

    code: str
    language: str
    compile_timeout: float = 10
    run_timeout: float = Field(10, gt=0)
    memory_limit_MB: int = -1
    stdin: str | None = None
    files: dict[str, str | None] = Field(default_factory=dict)
    fetch_files: list[str] = Field(default_factory=list)


def _response(status: str, message: str = "", run_result: dict[str, Any] | None = None,
              files: dict[str, str] | None = None) -> dict[str, Any]:
    return {"status": status, "message": message, "compile_result": None, "run_result": run_result,
            "executor_pod_name": None, "files": files or {}}


def _return_code(result: ExecResult) -> int | None:
    if result.exit_code is not None:
        return result.exit_code
    match = re.fullmatch(r"killed by signal (\d+)", result.detail)  # base.classify's wording
    return -int(match.group(1)) if match else None


def fusion_result(result: ExecResult) -> tuple[str, dict[str, Any]]:
    """(response status, run_result) for one ExecResult, in SandboxFusion's terms."""
    run_status = "TimeLimitExceeded" if result.status == "timeout" else "Finished"
    run_result = {"status": run_status, "execution_time": round(result.duration, 6),
                  "return_code": _return_code(result), "stdout": result.stdout, "stderr": result.stderr}
    return ("Success" if result.status == "ok" else "Failed"), run_result


def build_app(provider: SandboxProvider, *, own_provider: bool = True, per_call_memory: bool = True) -> fastapi.FastAPI:
    """A FastAPI app serving SandboxFusion's `POST /run_code` (and `GET /health`) on `provider`.

    With `own_provider` the app starts the provider on startup and closes it on shutdown; pass False for a
    provider the caller started and will close."""

    @contextlib.asynccontextmanager
    async def lifespan(_: fastapi.FastAPI) -> AsyncIterator[None]:
        if own_provider:
            await provider.start()
        try:
            yield
        finally:
            if own_provider:
                await provider.close()

    app = fastapi.FastAPI(title="agentbench-npu SandboxFusion-compatible sandbox", lifespan=lifespan)
    limits = provider.limits

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "backend": provider.name, "languages": sorted(LANGUAGES)}

    @app.post("/run_code")
    async def run_code(request: RunCodeRequest) -> dict[str, Any]:
        if request.language not in LANGUAGES:
            return _response("SandboxError", f"language '{request.language}' is not supported by this server; "
                                             f"supported: {', '.join(sorted(LANGUAGES))}")
        files: dict[str, bytes] = {}
        for path, content in request.files.items():
            if content is None:
                continue
            try:
                files[path] = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError):
                return _response("SandboxError", f"files['{path}'] is not valid base64")

        notes: list[str] = []
        interpreter, suffix = LANGUAGES[request.language]
        script = f"main_{uuid.uuid4().hex[:8]}{suffix}"
        argv = [interpreter, script]
        memory = request.memory_limit_MB
        if memory > 0 and memory < limits.memory_mb:
            if per_call_memory:
                argv = ["sh", "-c", MEMORY_WRAPPER, "sh", str(memory * 1024), *argv]
            else:
                notes.append(f"memory_limit_MB {memory} not applied: this backend cannot lower it per call; "
                             f"the sandbox's {limits.memory_mb} MB applies")
        elif memory > limits.memory_mb:
            notes.append(f"memory_limit_MB {memory} is above this sandbox's limit, which cannot be raised per "
                         f"call; {limits.memory_mb} MB applied")

        try:
            async with provider.sandbox() as box:
                for path, content in files.items():
                    await box.write_file(path, content)
                await box.write_file(script, request.code)
                result = await box.exec(argv, timeout=request.run_timeout, stdin=request.stdin)
                fetched: dict[str, str] = {}
                for path in request.fetch_files:
                    try:
                        fetched[path] = base64.b64encode(await box.read_file(path)).decode()
                    except SandboxError as exc:
                        notes.append(f"fetch_files: {exc}")
        except SandboxError as exc:
            return _response("SandboxError", str(exc))
        except Exception as exc:  # the sandbox broke in a way it did not name: still SandboxFusion's shape
            log.exception("run_code failed")
            return _response("SandboxError", one_line(exc))

        status, run_result = fusion_result(result)
        if result.status == "output_truncated":
            notes.insert(0, f"output exceeded {limits.output_bytes} bytes; the program was stopped and the "
                            "output cut")
        elif result.detail:
            notes.insert(0, result.detail)
        if result.status == "timeout" and request.run_timeout > limits.wall_seconds:
            notes.insert(1, f"run_timeout {request.run_timeout:g} s is above this sandbox's wall limit, which "
                            f"cannot be raised per call; {limits.wall_seconds:g} s applied")
        return _response(status, "; ".join(notes), run_result, fetched)

    return app


def serve_fusion(provider: SandboxProvider, host: str = "127.0.0.1", port: int = 8080,
                 log_level: str = "warning") -> None:
    """Serve `provider` over SandboxFusion's API in the foreground until interrupted."""
    uvicorn.run(build_app(provider), host=host, port=port, log_level=log_level)


class FusionServerThread(AppThread):
    """`build_app(provider)` on a background thread, for tests and benchmarks; `port=0` picks a free port,
    entering returns once `/health` answers, `.url` is the base URL."""

    def __init__(self, provider: SandboxProvider, host: str = "127.0.0.1", port: int = 0, *,
                 log_level: str = "warning", startup_timeout: float = 60.0, stop_timeout: float = 30.0,
                 **app_options: Any):
        super().__init__(lambda: build_app(provider, **app_options), "sandbox server", host, port,
                         log_level=log_level, startup_timeout=startup_timeout, stop_timeout=stop_timeout)
        self.provider = provider
