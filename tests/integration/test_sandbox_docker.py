"""The `docker` sandbox backend against a real Docker daemon.

Needs the docker SDK (`pip install 'agentbench-npu[docker]'`), a daemon this process can reach, and the
image built by sandboxes/python-exec/build.sh; without any of them the whole module is skipped and says
which one is missing. One module-scoped provider (with a warm pool of containers) serves most tests; it is
thread-based like the local one, so each test drives it with its own `asyncio.run`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from typing import Any, Awaitable, Callable

import pytest

from agentbench_npu.errors import MissingExtraError
from agentbench_npu.sandbox import docker as docker_backend
from agentbench_npu.sandbox.base import ExecResult, SandboxError, SandboxLimits
from agentbench_npu.sandbox.conformance import CHECKS, run_checks
from agentbench_npu.sandbox.docker import DEFAULT_IMAGE, LABEL, LABEL_VALUE, PROVIDER_LABEL, DockerSandboxProvider

_why = docker_backend.unavailable()
if _why:
    pytest.skip(_why, allow_module_level=True)

import docker  # noqa: E402  (present: unavailable() said so)

LIMITS = SandboxLimits(wall_seconds=3, cpu_seconds=2, memory_mb=256, output_bytes=65536, processes=32)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def show(result: ExecResult) -> str:
    return (f"status={result.status} exit_code={result.exit_code} detail={result.detail!r} "
            f"stdout={result.stdout[:300]!r} stderr={result.stderr[-500:]!r}")


def containers(label: str) -> list[Any]:
    client = docker.from_env()
    try:
        return client.containers.list(all=True, sparse=True, filters={"label": label})
    finally:
        client.close()


@pytest.fixture(scope="module")
def provider():
    provider = DockerSandboxProvider(LIMITS, {"warm": 2})
    run(provider.start())
    yield provider
    run(provider.close())


def in_box(provider: DockerSandboxProvider, body: Callable[[Any], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        async with provider.sandbox() as box:
            return await body(box)
    return run(go())


def py(box: Any, code: str, **kwargs: Any) -> Awaitable[ExecResult]:
    return box.exec(["python3", "-c", code], **kwargs)


# -- set-up and errors --------------------------------------------------------------------------------
def test_importing_the_backend_does_not_import_the_docker_sdk():
    code = ("import sys, agentbench_npu.sandbox.docker, agentbench_npu.sandbox.plugin; "
            "print('docker' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_backend_is_registered_as_docker():
    from agentbench_npu.sandbox import plugin

    registered: list[type] = []
    plugin.register_sandboxes(registered.append)
    assert DockerSandboxProvider in registered and DockerSandboxProvider.name == "docker"


def test_a_missing_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "docker", None)  # `import docker` now raises ImportError
    with pytest.raises(MissingExtraError, match=r"agentbench-npu\[docker\]"):
        run(DockerSandboxProvider(LIMITS).start())


def test_an_unreachable_daemon_is_one_line_saying_how_to_start_it(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    provider = DockerSandboxProvider(LIMITS)
    with pytest.raises(SandboxError) as caught:
        run(provider.start())
    message = str(caught.value)
    assert "\n" not in message and "cannot reach the Docker daemon" in message and "dockerd" in message
    run(provider.close())


def test_a_missing_image_names_the_build_command(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(docker_backend, "DEFAULT_IMAGE", "agentbench-npu/no-such-image:0")
    with pytest.raises(SandboxError, match=r"sandboxes/python-exec/build\.sh"):
        run(DockerSandboxProvider(LIMITS).start())
    with pytest.raises(SandboxError, match="pull or build it"):
        run(DockerSandboxProvider(LIMITS, {"image": "agentbench-npu/other-missing:0"}).start())


def test_describe_says_container_isolation(provider: DockerSandboxProvider):
    described = provider.describe()
    assert described["backend"] == "docker" and described["isolation"] == "container"
    assert described["network"] == "none" and described["image"] == DEFAULT_IMAGE


# -- exec -------------------------------------------------------------------------------------------------
def test_python_exec_is_ok_with_stdout_stderr_and_exit_codes(provider: DockerSandboxProvider):
    async def body(box: Any) -> None:
        result = await py(box, "import sys; print('hello', 6 * 7); print('warn', file=sys.stderr)")
        assert result.status == "ok" and result.exit_code == 0, show(result)
        assert result.stdout == "hello 42\n" and result.stderr == "warn\n", show(result)
        assert (await box.run_python("print(sum(range(5)))")).stdout == "10\n"
        failed = await py(box, "import sys; sys.exit(3)")
        assert failed.status == "error" and failed.exit_code == 3, show(failed)
        shell = await box.exec("x=5; echo $((x * 2)) | tr 0 o; exit 7")
        assert shell.stdout == "1o\n" and shell.exit_code == 7 and shell.status == "error", show(shell)
        killed = await py(box, "import os; os.kill(os.getpid(), 9)")
        assert killed.status == "killed" and killed.signal == 9 and killed.exit_code is None, show(killed)
        missing = await box.exec(["no-such-program"])
        assert missing.status == "error" and "could not start" in missing.detail, show(missing)
    in_box(provider, body)


def test_stdin_text_and_large_binary(provider: DockerSandboxProvider):
    blob = os.urandom(3 * 2**20)  # larger than any argv could carry

    async def body(box: Any) -> None:
        text = await py(box, "import sys; print(sys.stdin.read().upper())", stdin="abc ü")
        assert text.stdout == "ABC Ü\n", show(text)
        big = await py(box, "import sys, hashlib; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())",
                       stdin=blob)
        import hashlib

        assert big.status == "ok" and big.stdout.strip() == hashlib.sha256(blob).hexdigest(), show(big)
        unread = await py(box, "print('ignored stdin')", stdin=blob)  # the command never reads it
        assert unread.status == "ok", show(unread)
    in_box(provider, body)


def test_env_is_minimal_plus_what_is_given(provider: DockerSandboxProvider, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AGENTBENCH_HOST_SECRET", "s3cret")

    async def body(box: Any) -> None:
        result = await py(box, "import os, json; print(json.dumps(dict(os.environ)))", env={"GIVEN": "yes"})
        import json

        seen = json.loads(result.stdout)
        assert seen["GIVEN"] == "yes" and seen["HOME"] == "/work" and "PATH" in seen
        assert "AGENTBENCH_HOST_SECRET" not in seen and "s3cret" not in result.stdout
        ids = await py(box, "import os; print(os.getuid(), os.getgid(), os.getcwd())")
        assert ids.stdout.split() == ["65534", "65534", "/work"], show(ids)
    in_box(provider, body)


def test_files_round_trip_and_are_shared_with_exec(provider: DockerSandboxProvider):
    async def body(box: Any) -> None:
        await box.write_file("note.txt", "héllo ✓\n")
        assert await box.read_file("note.txt") == "héllo ✓\n".encode()
        blob = bytes(range(256)) * 1000
        await box.write_file("a/b/c/blob.bin", blob)
        assert await box.read_file("a/b/c/blob.bin") == blob
        await box.write_file("a/b/c/blob.bin", b"short")
        assert await box.read_file("a/b/c/blob.bin") == b"short"
        made = await py(box, "open('a/b/c/new.txt', 'w').write(open('note.txt').read() * 2); print('ok')")
        assert made.status == "ok", show(made)  # the command may write into dirs write_file created
        assert await box.read_file("a/b/c/new.txt") == "héllo ✓\n".encode() * 2
        listed = await box.exec(["ls"], cwd="a/b/c")
        assert listed.stdout.split() == ["blob.bin", "new.txt"], show(listed)
        for bad in ("missing.txt", "a/b", "../etc/passwd", "/etc/passwd"):
            with pytest.raises(SandboxError):
                await box.read_file(bad)
        with pytest.raises(SandboxError):
            await box.write_file("../x", "x")
        await py(box, "import os; os.symlink('/etc/passwd', 'out'); os.symlink('note.txt', 'in')")
        with pytest.raises(SandboxError, match="outside the work dir"):
            await box.read_file("out")
        assert await box.read_file("in") == "héllo ✓\n".encode()
    in_box(provider, body)


def test_writing_outside_the_work_dir_fails(provider: DockerSandboxProvider):
    code = """
import os
for path in ('/tmp/x', '/etc/x', '/usr/x', '/x'):
    try:
        open(path, 'w').write('x')
        print(path, 'WRITTEN')
    except OSError as exc:
        print(path, 'blocked', exc.errno)
"""
    async def body(box: Any) -> None:
        result = await py(box, code)
        assert result.status == "ok" and "WRITTEN" not in result.stdout and result.stdout.count("blocked") == 4, \
            show(result)
    in_box(provider, body)


def test_a_wall_timeout_is_status_timeout(provider: DockerSandboxProvider):
    async def body(box: Any) -> None:
        started = time.monotonic()
        result = await py(box, "import time; print('started', flush=True); time.sleep(60)", timeout=1)
        assert result.status == "timeout" and result.stdout == "started\n", show(result)
        assert time.monotonic() - started < LIMITS.wall_seconds + 2
        busy = await py(box, "while True: pass")
        assert busy.status == "timeout", show(busy)
        assert (await py(box, "print(1)")).stdout == "1\n"
    in_box(provider, body)


def test_memory_past_the_limit_is_status_memory(provider: DockerSandboxProvider):
    # One big block: the address-space rlimit answers MemoryError. Several processes that each stay under
    # that rlimit but together pass the container's memory: the cgroup's OOM killer, seen by the supervisor.
    oom = """
import os, sys, time
pids = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        block = b'x' * (100 * 2**20)
        time.sleep(1)
        os._exit(0)
    pids.append(pid)
killed = sum(os.WIFSIGNALED(os.waitpid(pid, 0)[1]) for pid in pids)
sys.exit(1 if killed else 0)
"""
    async def body(box: Any) -> None:
        block = await py(box, "bytearray(10**10)")
        assert block.status == "memory" and "MemoryError" in block.stderr, show(block)
        many = await py(box, oom)
        assert many.status == "memory", show(many)
        assert (await py(box, "print(1)")).stdout == "1\n"
    in_box(provider, body)


def test_output_past_the_limit_is_truncated(provider: DockerSandboxProvider):
    async def body(box: Any) -> None:
        result = await py(box, "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)")
        assert result.status == "output_truncated", show(result)
        assert len(result.stdout) + len(result.stderr) == LIMITS.output_bytes
        exact = await py(box, f"import sys; sys.stdout.write('y' * {LIMITS.output_bytes})")
        assert exact.status == "ok" and len(exact.stdout) == LIMITS.output_bytes, show(exact)
    in_box(provider, body)


def test_there_is_no_network_not_even_loopback(provider: DockerSandboxProvider):
    code = """
import socket
def connect(addr):
    try:
        socket.create_connection(addr, timeout=2).close()
        return 'CONNECTED'
    except OSError as exc:
        return f'blocked {exc.errno}'
def loopback_inside():
    try:
        server = socket.socket(); server.bind(('127.0.0.1', 0)); server.listen()
    except OSError as exc:
        return f'blocked {exc.errno}'
    return connect(server.getsockname())
print(connect(('127.0.0.1', 80)), connect(('1.1.1.1', 53)), loopback_inside(), sep='|')
"""
    async def body(box: Any) -> None:
        result = await py(box, code)
        assert result.status == "ok" and "CONNECTED" not in result.stdout and result.stdout.count("blocked") == 3, \
            show(result)
    in_box(provider, body)


def test_a_fork_bomb_is_contained_by_the_pids_limit(provider: DockerSandboxProvider):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"

    async def body(box: Any) -> None:
        result = await py(box, bomb)
        assert result.status != "ok", show(result)
        assert result.duration < LIMITS.wall_seconds + 10, show(result)
        assert await provider.leftover_processes(box) == 0
        assert (await py(box, "print(1)")).stdout == "1\n"
    in_box(provider, body)


def test_background_processes_are_gone_after_the_exec(provider: DockerSandboxProvider):
    code = """
import os, subprocess
subprocess.Popen(['sleep', '1000'])
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execvp('sleep', ['sleep', '1001'])
    os._exit(0)
print('left them running')
"""
    async def body(box: Any) -> None:
        started = await py(box, code)
        assert started.status == "ok" and started.stdout == "left them running\n", show(started)
        assert await provider.leftover_processes(box) == 0
        ps = await box.exec(["ps", "-o", "pid,comm"])
        assert "sleep" not in ps.stdout, show(ps)
        shell = await box.exec("sleep 1002 & echo started")  # the shell's own job, same story
        assert shell.status == "ok" and shell.duration < LIMITS.wall_seconds, show(shell)
        assert await provider.leftover_processes(box) == 0
    in_box(provider, body)


def test_code_cannot_kill_the_supervisor_or_pid_1(provider: DockerSandboxProvider):
    code = """
import os, signal
for pid, sig in ((1, 9), (1, 2), (1, 15), (os.getppid(), 9)):
    try:
        os.kill(pid, sig)
        print(pid, sig, 'SENT')
    except OSError as exc:
        print(pid, sig, 'blocked', exc.errno)
try:
    os.kill(-1, 9)
except OSError as exc:
    print('kill -1 blocked', exc.errno)
"""
    async def body(box: Any) -> None:
        result = await py(box, code)
        assert "SENT" not in result.stdout, show(result)
        assert (await py(box, "print(1)")).stdout == "1\n"
    in_box(provider, body)


def test_execs_on_one_sandbox_at_once_both_finish(provider: DockerSandboxProvider):
    async def body(box: Any) -> list[ExecResult]:
        return list(await asyncio.gather(py(box, "import time; time.sleep(0.5); print('a')"),
                                         py(box, "import time; time.sleep(0.5); print('b')")))
    first, second = in_box(provider, body)
    assert (first.stdout, second.stdout) == ("a\n", "b\n") and first.ok and second.ok


def test_a_hung_exec_is_cut_by_the_host_side_deadline():
    # a negative margin makes the host give up before the supervisor's own wall limit: as if it hung
    provider = DockerSandboxProvider(LIMITS.replace(wall_seconds=6), {"exec_margin": -4.5, "warm": 0})

    async def go() -> None:
        async with provider, provider.sandbox() as box:
            result = await py(box, "import time; time.sleep(60)")
            assert result.status == "timeout" and "did not answer" in result.detail, show(result)
            assert result.duration < 5, show(result)
            assert await provider.leftover_processes(box) == 0
            assert (await py(box, "print(1)")).stdout == "1\n"
    run(go())


def test_a_string_command_without_a_shell_in_the_image_is_a_clear_error():
    client = docker.from_env()
    image = "agentbench-npu/python-exec-test:no-shell"
    builder = client.containers.run(DEFAULT_IMAGE, ["python3", "-c", "import os; os.remove('/bin/sh')"],
                                    detach=True, network_mode="none")
    try:
        assert builder.wait(timeout=60)["StatusCode"] == 0
        builder.commit(*image.split(":"))
    finally:
        builder.remove(force=True)
    try:
        provider = DockerSandboxProvider(LIMITS, {"image": image, "warm": 0})

        async def go() -> None:
            async with provider, provider.sandbox() as box:
                result = await box.exec("echo hi")
                assert result.status == "error" and "no /bin/sh" in result.detail, show(result)
                assert (await py(box, "print(1)")).stdout == "1\n"
        run(go())
    finally:
        client.images.remove(image, force=True)
        client.close()


def test_closing_the_provider_leaves_no_container_and_fails_a_running_exec():
    before = len(containers(f"{LABEL}={LABEL_VALUE}"))
    provider = DockerSandboxProvider(LIMITS.replace(wall_seconds=30), {"warm": 2})

    async def go() -> None:
        await provider.start()
        async with provider.sandbox() as box:
            await box.write_file("f.txt", "x")
        second = provider.sandbox()
        await second.start()
        assert len(containers(f"{PROVIDER_LABEL}={provider.id}")) >= 1
        running = asyncio.ensure_future(py(second, "import time; time.sleep(60)"))
        await asyncio.sleep(1.0)
        await provider.close()
        with pytest.raises(SandboxError):
            await asyncio.wait_for(running, 20)
        with pytest.raises(SandboxError):
            await second.exec(["true"])
        await second.close()  # safe after the provider closed it
    run(go())
    assert containers(f"{PROVIDER_LABEL}={provider.id}") == []
    assert len(containers(f"{LABEL}={LABEL_VALUE}")) <= before


# -- the conformance suite ---------------------------------------------------------------------------
@pytest.mark.parametrize("check", CHECKS, ids=[f"{c.kind}-{c.name}" for c in CHECKS])
def test_the_docker_sandbox_passes_every_conformance_check(provider: DockerSandboxProvider, check):
    [result] = run(run_checks(provider, names=[check.name]))
    if result.skipped:
        pytest.skip(f"{check.name}: {result.detail}")
    assert result.passed, f"{check.name} ({check.description}): {result.detail}"


def test_after_everything_only_the_warm_pool_is_left(provider: DockerSandboxProvider):
    ours = containers(f"{PROVIDER_LABEL}={provider.id}")
    deadline = time.monotonic() + 30
    while len(ours) > provider.warm and time.monotonic() < deadline:  # removals finish in the background
        time.sleep(0.2)
        ours = containers(f"{PROVIDER_LABEL}={provider.id}")
    assert len(ours) <= provider.warm
