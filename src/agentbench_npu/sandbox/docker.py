"""The `docker` sandbox: one container per sandbox, every exec run by a small supervisor inside it.

Each sandbox is a container of `image` (default agentbench-npu/python-exec:1, built offline from Debian
packages by sandboxes/python-exec/build.sh) that only waits: PID 1 is a Python loop that reaps orphans and
has no signal handlers (so nothing inside can kill it). The container has no network (`network_mode=none`,
and the supervisor takes loopback down as well, as in a fresh network namespace), a read-only root file
system, the work dir /work on an anonymous volume (deleted with the container), every capability dropped
except the ones the supervisor needs (SETUID, SETGID, KILL; NET_ADMIN without network), `no-new-privileges`,
a memory cgroup of `memory_mb` (swap included) and a pids cgroup of `processes` (plus PID 1 and the
supervisor).

An exec is one `docker exec` of SUPERVISOR (standard library only, passed with `python3 -c`, so any image
with python3 works). The request (argv, env, cwd, limits) and the command's stdin arrive on the
supervisor's stdin, so neither meets the argv size limit. As root in the container it forks the command,
which, before it runs: gets a new session, rlimits (CPU, address space = memory_mb, file size, open files,
no core dumps), an OOM score that makes it the out-of-memory killer's first choice, and then drops to uid
65534 (so it can signal neither the supervisor nor PID 1; all its capabilities go with root). The supervisor
feeds stdin, keeps stdout and stderr up to `output_bytes` (more stops the command), kills the command's
group at the wall limit, and, once the command has ended, kills every process left in the container but
PID 1 (`kill(-1)`), setsid daemons included. It answers one JSON line; `base.classify` turns it into the
same statuses as the local backend, and an out-of-memory kill (the cgroup's `oom_kill` counter went up
during the exec) is status `memory`. Execs on one sandbox run one at a time.

The host side never blocks the event loop (every SDK call runs in the provider's thread pool) and does not
trust the supervisor to answer: the exec's socket has a deadline of the wall limit plus a margin, after
which everything in the container is killed and the exec reports `timeout`.

Creating a container costs seconds with the vfs storage driver (it copies the image), so the provider keeps
`warm` started containers ready and removes closed ones in the background; `close()` of the provider waits
for all of that, and removes anything labelled with its id.

Files move with `put_archive`/`get_archive` (a tar in memory), paths relative to /work via `inside()`;
a planted symlink can only lead to the container's own files, never the host's.

Options: `image`, `uid` (the command's uid, default 65534), `warm` (containers kept ready, default 2),
`cpus` (CPU cores per sandbox, default no limit), `network_mode` (used when limits.network is true; default
"bridge"), `threads` (the thread pool, default 64), `exec_margin` (seconds added to the wall limit before the
host gives up on an exec, default 20).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import uuid
from typing import Any, Callable, Mapping

from ..errors import MissingExtraError, one_line
from .base import SandboxError, SandboxLimits, SandboxProvider
from .docker_sandbox import DEFAULT_PATH, WORKDIR, DockerSandbox

DEFAULT_IMAGE = "agentbench-npu/python-exec:1"
BUILD_COMMAND = "sandboxes/python-exec/build.sh"
LABEL = "agentbench-npu"
LABEL_VALUE = "sandbox"
PROVIDER_LABEL = "agentbench-npu.provider"

# PID 1 of every sandbox container: waits forever, reaps whatever is re-parented to it, and has no signal
# handler, so the kernel drops every signal sent to it from inside the container (SIGINT's default Python
# handler is removed for that).
KEEPALIVE = """
import os, signal
signal.signal(signal.SIGINT, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
while True:
    signal.sigtimedwait({signal.SIGCHLD}, 3600)
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
"""



def _import_docker() -> Any:
    try:
        import docker  # the SDK is an optional extra
    except ImportError:
        raise MissingExtraError("the docker sandbox", "docker", "docker") from None
    return docker


def connect(image: str = DEFAULT_IMAGE, **client_options: Any) -> tuple[Any, dict[str, Any]]:
    """A client of a daemon that answers and holds `image`, and the daemon's version; else SandboxError
    (MissingExtraError without the SDK) saying what is missing and how to get it."""
    docker = _import_docker()
    try:
        client = docker.from_env(**client_options)
        client.ping()
        server = client.version()
    except Exception as exc:
        raise SandboxError(
            f"cannot reach the Docker daemon ({one_line(exc)}); start it (`systemctl start docker`, or "
            "`dockerd --iptables=false --bridge=none --storage-driver=vfs &` as root) or point DOCKER_HOST "
            "at one") from None
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        client.close()
        how = (f"build it with `{BUILD_COMMAND}` (from the agentbench-npu source tree)"
               if image == DEFAULT_IMAGE else "pull or build it first")
        raise SandboxError(f"docker image {image!r} is not on this machine: {how}") from None
    except Exception as exc:
        client.close()
        raise SandboxError(f"cannot look up docker image {image!r}: {one_line(exc)}") from None
    return client, server


def unavailable(image: str = DEFAULT_IMAGE) -> str | None:
    """Why the docker backend cannot run here (no SDK, no daemon, no image), or None."""
    try:
        client, _ = connect(image, timeout=10)
    except (SandboxError, MissingExtraError) as exc:
        return str(exc)
    client.close()
    return None


class DockerSandboxProvider(SandboxProvider):
    name = "docker"
    description = "one Docker container per sandbox: no network, read-only root, cgroup memory/pids limits"

    def __init__(self, limits: SandboxLimits | None = None, options: Mapping[str, Any] | None = None):
        super().__init__(limits, options)
        self.image = str(self.options.get("image") or DEFAULT_IMAGE)
        self.uid = int(self.options.get("uid", 65534))
        cpus = self.options.get("cpus")
        self.cpus = float(cpus) if cpus not in (None, "", 0) else None
        self.network_mode = str(self.options.get("network_mode") or "bridge")
        self.exec_margin = float(self.options.get("exec_margin", 20.0))
        self.threads = int(self.options.get("threads", 64))
        self.warm = max(0, int(self.options.get("warm", 2)))
        if self.threads < 2:
            raise SandboxError(f"sandbox option threads must be at least 2; got {self.threads}")
        self.id = uuid.uuid4().hex[:12]
        self.client: Any = None
        self.docker: Any = None
        self.server: dict[str, Any] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._boxes: set[DockerSandbox] = set()
        self._ready: list[Any] = []  # started containers nobody uses yet (the warm pool)
        self._pending: set[concurrent.futures.Future] = set()  # warm-ups and removals in flight
        self._closing = False
        self._lock = threading.RLock()  # re-entrant: a finished future's callback may run where it is added
        self._warmed = threading.Condition(self._lock)  # notified whenever a warm-up ends

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="docker-sandbox")
            self._closing = False
        await self._call(self._start_sync)

    def _start_sync(self) -> None:
        with self._lock:
            if self.client is not None:
                return
            docker = _import_docker()
            client, self.server = connect(self.image, max_pool_size=self.threads)
            self.docker, self.client = docker, client
        self._refill()

    async def close(self) -> None:
        if self._pool is None:
            return
        await self._call(self._close_sync)
        pool, self._pool = self._pool, None
        pool.shutdown(wait=False)

    def _close_sync(self) -> None:
        with self._warmed:
            self._closing = True
            self._warmed.notify_all()
            boxes = list(self._boxes)
        for box in boxes:
            try:
                box._close_sync(wait=True)
            except SandboxError:
                pass  # the label sweep below tries again
        while True:  # warm-ups finish into the pool (and are removed below); removals finish
            with self._lock:
                pending = list(self._pending)
            if not pending:
                break
            concurrent.futures.wait(pending)
        with self._lock:
            ready, self._ready = self._ready, []
        for container in ready:
            _remove(container, quiet=True)
        client = self.client
        if client is None:
            return
        try:  # anything of ours a failed start or a crash left behind
            for container in client.containers.list(all=True, sparse=True,
                                                    filters={"label": f"{PROVIDER_LABEL}={self.id}"}):
                _remove(container, quiet=True)
        except Exception:
            pass
        client.close()
        self.client = None

    def sandbox(self) -> DockerSandbox:
        return DockerSandbox(self)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "isolation": "container", "image": self.image, "uid": self.uid,
                "network": self.network_mode if self.limits.network else "none", "warm": self.warm,
                "docker_version": self.server.get("Version"), "api_version": self.server.get("ApiVersion")}

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking call on the provider's threads; the event loop never waits on Docker."""
        if self._pool is None:
            raise SandboxError("the docker sandbox provider is not started (or already closed)")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- containers ------------------------------------------------------------------------------------
    def _new_container(self) -> Any:
        """A started sandbox container (creating one costs a second or more: the storage driver copies
        the image)."""
        docker, limits = self.docker, self.limits
        memory = f"{int(limits.memory_mb)}m"
        caps = ["SETUID", "SETGID", "KILL"] + ([] if limits.network else ["NET_ADMIN"])
        kwargs: dict[str, Any] = dict(
            command=["python3", "-I", "-S", "-c", KEEPALIVE], detach=True, auto_remove=False,
            network_mode=self.network_mode if limits.network else "none",
            mem_limit=memory, memswap_limit=memory, pids_limit=int(limits.processes) + 2,
            user="0:0", working_dir=WORKDIR, read_only=True,
            mounts=[docker.types.Mount(WORKDIR, None, type="volume")],
            cap_drop=["ALL"], cap_add=caps, security_opt=["no-new-privileges"],
            labels={LABEL: LABEL_VALUE, PROVIDER_LABEL: self.id},
            environment={"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}, hostname="sandbox",
            log_config=docker.types.LogConfig(type="none"))
        if self.cpus:
            kwargs["nano_cpus"] = int(self.cpus * 1e9)
        try:
            return self.client.containers.run(self.image, **kwargs)
        except Exception as exc:
            raise SandboxError(f"could not start a docker sandbox from {self.image!r}: {one_line(exc)}") from None

    def _take_container(self) -> Any:
        if self.client is None:
            self._start_sync()
        with self._warmed:
            # a container on its way costs less than a new one, which would compete with it for the disk
            while not self._ready and self._warming() and not self._closing:
                self._warmed.wait()
            if self._closing:
                raise SandboxError("the docker sandbox provider is closing; no new sandbox can open")
            container = self._ready.pop() if self._ready else None
        if container is None:
            container = self._new_container()
        self._refill()
        return container

    def _warming(self) -> int:
        return sum(1 for f in self._pending if getattr(f, "warm_up", False))

    def _refill(self) -> None:
        """Start containers in the background until `warm` of them wait for a sandbox."""
        with self._lock:
            if self._closing or self._pool is None:
                return
            for _ in range(self.warm - len(self._ready) - self._warming()):
                future = self._pool.submit(self._warm_one)
                future.warm_up = True  # type: ignore[attr-defined]
                self._pending.add(future)
                future.add_done_callback(self._done)

    def _warm_one(self) -> None:
        try:
            container = self._new_container()
        except SandboxError:
            return  # the sandbox that needs one will create it and report why it cannot
        with self._lock:
            if not self._closing:
                self._ready.append(container)
                return
        _remove(container, quiet=True)

    def _discard(self, container: Any, wait: bool) -> None:
        """Remove a container (and its work dir volume), in the background unless `wait`."""
        with self._lock:
            pool = None if self._closing else self._pool
            if pool is not None and not wait:
                future = pool.submit(_remove, container, True)
                self._pending.add(future)
                future.add_done_callback(self._done)
                return
        _remove(container, quiet=wait is False)

    def _done(self, future: concurrent.futures.Future) -> None:
        with self._warmed:
            self._pending.discard(future)
            self._warmed.notify_all()

    # -- leak checks (the conformance suite's hook) --------------------------------------------------
    async def leftover_processes(self, box: DockerSandbox) -> int:
        """Live processes in the sandbox's container other than PID 1: 0 once an exec has ended."""
        if box.container is None:
            return 0
        return int((await self._call(box._control_sync, "count"))["count"])


def _remove(container: Any, quiet: bool = False) -> None:
    try:
        container.remove(force=True, v=True)
    except Exception as exc:  # already gone, or being removed by another call
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if not quiet and status not in (404, 409) and "No such container" not in str(exc):
            raise SandboxError(f"could not remove sandbox container {container.short_id}: {one_line(exc)}") from None
