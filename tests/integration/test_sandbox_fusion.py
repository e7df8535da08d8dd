"""SandboxFusion's /run_code served over the local sandbox on a real loopback port, spoken to with plain
HTTP in SandboxFusion's request shape."""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from agentbench_npu.sandbox.base import (
    ExecResult,
    Sandbox,
    SandboxError,
    SandboxLimits,
    SandboxProvider,
)
from agentbench_npu.sandbox.fusion import FusionServerThread, build_app, fusion_result
from agentbench_npu.sandbox.local import LocalSandboxProvider

LIMITS = SandboxLimits(wall_seconds=3, cpu_seconds=3, memory_mb=512, output_bytes=4096, file_mb=4)
OPTIONS: dict = {}  # the default isolation: namespaces as root, rlimits otherwise


def local() -> LocalSandboxProvider:
    return LocalSandboxProvider(LIMITS, OPTIONS)


@pytest.fixture(scope="module")
def server():
    with FusionServerThread(local()) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def run_code(client: httpx.Client, code: str, language: str = "python", **fields) -> dict:
    response = client.post("/run_code", json={"code": code, "language": language, "compile_timeout": 10,
                                              "run_timeout": 10, "memory_limit_MB": -1, **fields})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"status", "message", "compile_result", "run_result", "executor_pod_name", "files"}
    return body


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def test_health(client):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["backend"] == "local" and body["languages"] == ["bash", "python"]


def test_success(client):
    body = run_code(client, "print('hello')")
    assert body["status"] == "Success" and body["message"] == ""
    assert body["compile_result"] is None and body["executor_pod_name"] is None and body["files"] == {}
    rr = body["run_result"]
    assert (rr["status"], rr["return_code"], rr["stdout"], rr["stderr"]) == ("Finished", 0, "hello\n", "")
    assert 0 <= rr["execution_time"] < 3


def test_stdin(client):
    body = run_code(client, "import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))", stdin="1 2 3\n")
    assert body["status"] == "Success" and body["run_result"]["stdout"] == "6\n"


def test_files_in_and_fetch_files_out(client):
    code = ("data = open('data/in.txt').read()\nopen('out.bin', 'wb').write(bytes([0, 255]) + data.encode())\n"
            "print(data)")
    body = run_code(client, code, files={"data/in.txt": b64("from a file"), "empty": None},
                    fetch_files=["out.bin", "missing.txt"])
    assert body["status"] == "Success" and body["run_result"]["stdout"] == "from a file\n"
    assert base64.b64decode(body["files"]["out.bin"]) == b"\x00\xfffrom a file"
    assert "missing.txt" not in body["files"] and "missing.txt" in body["message"]


def test_each_request_gets_a_fresh_sandbox(client):
    run_code(client, "open('left.txt', 'w').write('x')")
    body = run_code(client, "import os; print(os.path.exists('left.txt'))")
    assert body["run_result"]["stdout"] == "False\n"


def test_failing_program(client):
    body = run_code(client, "import sys\nprint('before')\nraise SystemExit(3)")
    assert body["status"] == "Failed"
    rr = body["run_result"]
    assert (rr["status"], rr["return_code"], rr["stdout"]) == ("Finished", 3, "before\n")
    crash = run_code(client, "1 / 0")
    assert crash["status"] == "Failed" and crash["run_result"]["return_code"] == 1
    assert "ZeroDivisionError" in crash["run_result"]["stderr"]


def test_timeout_uses_run_timeout_below_the_wall_limit(client):
    started = time.monotonic()
    body = run_code(client, "import time\nprint('started', flush=True)\ntime.sleep(30)", run_timeout=1)
    took = time.monotonic() - started
    assert body["status"] == "Failed"
    rr = body["run_result"]
    assert rr["status"] == "TimeLimitExceeded" and rr["return_code"] is None
    assert rr["stdout"] == "started\n"
    assert took < 2.5 and 0.9 <= rr["execution_time"] < 2


def test_run_timeout_cannot_raise_the_wall_limit(client):
    body = run_code(client, "import time; time.sleep(30)", run_timeout=60)
    assert body["run_result"]["status"] == "TimeLimitExceeded"
    assert body["run_result"]["execution_time"] < 4
    assert "wall limit" in body["message"] and "3 s applied" in body["message"]


def test_memory_limit_per_call_and_above_the_sandbox(client):
    code = "x = bytearray(200 * 2**20); print('allocated')"
    assert run_code(client, code)["status"] == "Success"  # the sandbox's 512 MB allows it
    low = run_code(client, code, memory_limit_MB=100)
    assert low["status"] == "Failed" and "MemoryError" in low["run_result"]["stderr"]
    assert low["run_result"]["status"] == "Finished" and "memory" in low["message"]
    high = run_code(client, "x = bytearray(700 * 2**20)", memory_limit_MB=4096)
    assert high["status"] == "Failed" and "cannot be raised" in high["message"]


def test_output_truncated(client):
    body = run_code(client, "print('x' * 100000)")
    assert body["status"] == "Failed" and body["run_result"]["status"] == "Finished"
    assert len(body["run_result"]["stdout"]) == 4096 and "output exceeded" in body["message"]


def test_bash(client):
    body = run_code(client, 'read name; echo "hi $name"; echo oops >&2; exit 2', language="bash", stdin="bob\n")
    assert body["status"] == "Failed"
    rr = body["run_result"]
    assert (rr["stdout"], rr["stderr"], rr["return_code"]) == ("hi bob\n", "oops\n", 2)
    assert run_code(client, "echo ok", language="bash")["status"] == "Success"


def test_unsupported_language(client):
    body = run_code(client, "int main() {}", language="cpp")
    assert body["status"] == "SandboxError" and body["run_result"] is None
    assert "cpp" in body["message"] and "python" in body["message"]


def test_bad_base64_is_a_sandbox_error(client):
    body = run_code(client, "print(1)", files={"f": "***not base64***"})
    assert body["status"] == "SandboxError" and "base64" in body["message"]


def test_escaping_file_path_is_a_sandbox_error(client):
    body = run_code(client, "print(1)", files={"../../etc/evil": b64("x")})
    assert body["status"] == "SandboxError" and "outside" in body["message"]


@pytest.mark.parametrize("payload", [{"language": "python"}, {"code": 5, "language": "python"},
                                     {"code": "print(1)", "language": "python", "run_timeout": "soon"},
                                     {"code": "print(1)", "language": "python", "run_timeout": 0},
                                     {"code": "print(1)"}])
def test_malformed_request_is_422(client, payload):
    response = client.post("/run_code", json=payload)
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


def test_not_json_is_422(client):
    response = client.post("/run_code", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422


def test_concurrent_requests(client):
    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda i: run_code(client, f"print({i} * 2)"), range(16)))
    assert [b["run_result"]["stdout"] for b in bodies] == [f"{i * 2}\n" for i in range(16)]


# --------------------------------------------------------------------------------------------------
# the mapping on its own, and a backend that breaks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("result, status, run_status, code", [
    (ExecResult("ok", 0, "", "", 0.1), "Success", "Finished", 0),
    (ExecResult("error", 2, "", "", 0.1, "exit code 2"), "Failed", "Finished", 2),
    (ExecResult("memory", 1, "", "MemoryError", 0.1, "memory limit reached"), "Failed", "Finished", 1),
    (ExecResult("killed", None, "", "", 0.1, "killed by signal 9"), "Failed", "Finished", -9),
    (ExecResult("timeout", None, "", "", 3.0, "wall-time limit reached"), "Failed", "TimeLimitExceeded", None),
    (ExecResult("output_truncated", None, "xx", "", 0.1, "output"), "Failed", "Finished", None),
])
def test_status_mapping(result, status, run_status, code):
    got_status, run_result = fusion_result(result)
    assert (got_status, run_result["status"], run_result["return_code"]) == (status, run_status, code)


class BrokenProvider(SandboxProvider):
    name = "broken"

    def sandbox(self) -> Sandbox:
        class Box(Sandbox):
            async def start(self):
                raise SandboxError("the sandbox daemon is down")

            async def close(self): ...
            async def exec(self, *a, **k): ...
            async def write_file(self, *a, **k): ...
            async def read_file(self, *a, **k): ...

        return Box()


def test_sandbox_error_status():
    with FusionServerThread(BrokenProvider(LIMITS)) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        body = c.post("/run_code", json={"code": "print(1)", "language": "python"}).json()
    assert body["status"] == "SandboxError" and body["run_result"] is None
    assert body["message"] == "the sandbox daemon is down"
    assert build_app(BrokenProvider(LIMITS)).title.startswith("agentbench-npu")


def test_memory_note_when_the_backend_cannot_lower_it():
    with FusionServerThread(local(), per_call_memory=False) as srv, \
            httpx.Client(base_url=srv.url, timeout=10) as c:
        body = c.post("/run_code", json={"code": "print(1)", "language": "python", "memory_limit_MB": 64}).json()
    assert body["status"] == "Success" and "not applied" in body["message"]
