"""The local sandbox's warm worker: a lean Python process that forks one isolated child per exec.

Started once per provider as `python -I zygote.py FD CONFIG` (standard library only; it never imports
agentbench_npu, so its address space stays small and holds none of the runner's state). It reads
requests from a SOCK_SEQPACKET socket (fd FD), each a JSON message plus the child's stdin, stdout and
stderr fds, and answers with `started` and `exited` messages. Forking a warm interpreter and running a
Python snippet in the child costs a few milliseconds; spawning `python3 -c` costs 15 or more.

Run as root (see local.py for the unprivileged fallback), the worker first moves itself into new mount,
network, IPC and UTS namespaces: every mount read-only except the sandboxes' root dir, no network interface
up (not even loopback). Each child inherits that, then, before any untrusted code runs: a new session;
rlimits on address space, CPU time, processes, file size, open files and core dumps; supplementary groups
dropped and uid/gid set to the slot's unprivileged ids, which drops every capability; the environment
replaced; all inherited fds above 2 closed.
When a child exits, every process left under its uid is killed before `exited` is sent, so nothing it
started in the background outlives the exec. A run that arrives while its uid is being cleared waits until
the clearing ends (the reaper's kill(-1) would kill it too); a reap asked for meanwhile cancels it. The worker is a child subreaper, so orphans come back to it
and are reaped rather than left as zombies.
"""

import ctypes
import errno
import gc
import json
import os
import resource
import runpy
import select
import signal
import socket
import sys
import traceback
import types

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWNET = 0x00020000, 0x04000000, 0x08000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18)
MIN_UID = 1000  # sandbox uids below this would be root or a system account: refused
PR_SET_CHILD_SUBREAPER = 36  # (no PDEATHSIG: it fires when the starting *thread* ends; EOF on the socket is ours)
# File systems an unprivileged uid can never write to anyway: remounting them read-only buys nothing and
# costs a syscall per mount on every exec.
ROOT_ONLY_FS = {"proc", "sysfs", "cgroup", "cgroup2", "devpts", "devtmpfs", "securityfs", "debugfs", "tracefs",
                "bpf", "pstore", "configfs", "fusectl", "hugetlbfs", "binfmt_misc", "autofs", "rpc_pipefs", "nsfs"}
# Imported once here, so snippets that use them start instantly (and work even where the interpreter's
# own files are unreadable to the sandbox uid, as with a Python installed under /root).
PRELOAD = ("math", "cmath", "json", "re", "random", "itertools", "functools", "collections", "fractions", "decimal",
           "statistics", "string", "pkgutil", "datetime", "time", "heapq", "bisect", "operator", "subprocess", "typing",
           "dataclasses", "copy", "textwrap", "numbers", "struct", "base64", "hashlib", "io", "pathlib", "tempfile",
           "shutil", "threading", "multiprocessing", "unicodedata", "array", "enum", "contextlib", "abc", "glob")
_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
    _check(_libc.mount(source, target.encode() if target else None, fstype, ctypes.c_ulong(flags), data),
           f"mount {target}")


def _make_reachable(paths):
    """Let unprivileged uids reach `paths` (the interpreter's own files) inside this mount namespace.

    A Python installed under a private home (pyenv or conda in a mode-0700 /root) is out of reach of the
    sandbox uids. Over each such closed directory we mount an empty tmpfs and bind back just the needed
    subtrees, so the sandbox sees the interpreter and nothing else that lived there.
    """
    wanted = sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)})
    wanted = [p for p in wanted if not any(p != q and p.startswith(q + "/") for q in wanted)]
    closed = {}
    for path in wanted:
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:depth])
            if not os.stat(ancestor).st_mode & 0o001:
                closed.setdefault(ancestor, []).append(path)
                break
    for top, subtrees in closed.items():
        held = [(sub, os.open(sub, os.O_PATH)) for sub in subtrees]  # still reachable after the tmpfs hides them
        _mount(b"tmpfs", top, b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=64k")
        for sub, fd in held:
            os.makedirs(sub, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}".encode(), sub, None, MS_BIND | MS_REC)
            os.close(fd)


def _mount_points():
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")
            options = fields[5].split(",")
            fstype = fields[fields.index("-") + 1]
            if "ro" not in options and fstype not in ROOT_ONLY_FS:
                points.append((point, options))
    return points


def _read_only_except(workdir):
    """Every mount read-only, except a bind mount of `workdir` onto itself."""
    _mount(workdir.encode(), workdir, None, MS_BIND | MS_REC)
    for point, options in _mount_points():
        if point == workdir or point == "/proc" or point.startswith("/proc/"):
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for name, bit in (("nosuid", MS_NOSUID), ("nodev", MS_NODEV), ("noexec", MS_NOEXEC)):
            if name in options:
                flags |= bit
        _mount(None, point, None, flags)  # a mount left writable would be a hole: fail, and auto falls back


def isolate_worker(config):
    """Once, in the worker itself: the namespaces every child inherits.

    A private mount namespace in which every mount is read-only except the sandboxes' root dir (each
    sandbox's work dir inside it belongs to its own uid, mode 0700), and, unless network was asked for, a
    network namespace with no interface up. Doing this once, not per exec, keeps an exec at a few ms.
    """
    if config["isolation"] != "namespaces":
        return
    flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | (0 if config["network"] else CLONE_NEWNET)
    _check(_libc.unshare(flags), "unshare")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _make_reachable([sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))])
    _read_only_except(config["root"])


def _isolate(req):
    """In each child: limits, then the slot's unprivileged uid (which drops every capability)."""
    limits = req["limits"]
    memory = int(limits["memory_mb"]) * 2**20
    cpu = max(1, int(-(-float(limits["cpu_seconds"]) // 1)))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limits["file_mb"]) * 2**20,) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    if req.get("uid") is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (int(limits["processes"]),) * 2)
        os.setgroups([])
        os.setgid(req["gid"])
        os.setuid(req["uid"])
        if req["uid"] < MIN_UID or os.getuid() != req["uid"] or os.geteuid() != req["uid"]:
            raise PermissionError(f"refusing to run sandboxed code as uid {os.getuid()}")


def _run_python(argv):
    """What `python3 -c CODE ...` or `python3 FILE ...` would do, in this already-warm interpreter."""
    sys.argv = ["-c"] + argv[3:] if argv[1] == "-c" else argv[1:]
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    code = 0
    try:
        if argv[1] == "-c":
            exec(compile(argv[2], "<string>", "exec"), main.__dict__)
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[1])))
            runpy.run_path(argv[1], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException as exc:
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next  # the user's frames only, as `python3 -c` would print them
        traceback.print_exception(type(exc), exc, tb)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def _child(req, fds):
    """In the forked child: isolate, then become the command. Never returns."""
    try:
        gc.disable()
        os.setsid()
        for number, fd in enumerate(fds):
            os.dup2(fd, number)
        os.closerange(3, 1 << 16)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        _isolate(req)
        os.umask(0o077)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        argv = req["argv"]
        sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)
        sys.stdin = open(0, "r", encoding="utf-8", errors="replace", closefd=False)
        if os.path.basename(argv[0]) in ("python", "python3") and len(argv) > 1 and (
                (argv[1] == "-c" and len(argv) > 2) or argv[1].endswith(".py")):
            _run_python(argv)
        if os.path.basename(argv[0]) in ("python", "python3"):
            argv = [sys.executable] + argv[1:]
        os.execvpe(argv[0], argv, req["env"])
    except BaseException as exc:
        try:
            os.write(2, f"sandbox: could not start {req['argv'][:1]}: {exc}\n".encode())
        finally:
            os._exit(126 if not isinstance(exc, FileNotFoundError) else 127)


class Worker:
    def __init__(self, sock):
        self.sock = sock
        self.running = {}  # pid -> request (a run's child)
        self.reapers = {}  # reaper pid -> the uid it clears
        self.reaping = {}  # uid -> its reaper's pid
        self.waiting = {}  # uid -> messages to send once nothing of that uid is left
        self.again = set()  # uids to clear once more when their reaper ends
        self.deferred = {}  # uid -> runs that wait for that uid's reaper: its kill(-1) would kill them too

    def send(self, message):
        self.sock.send(json.dumps(message).encode())

    def serve(self):
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        while True:
            try:
                ready, _, _ = select.select([self.sock, wake_r], [], [])
            except InterruptedError:
                continue
            if wake_r in ready:
                os.read(wake_r, 4096)
                self.collect_children()
            if self.sock in ready:
                try:
                    data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 3)
                except ConnectionResetError:
                    data, fds = b"", []
                if not data:
                    self.shutdown()  # the runner closed us (or died)
                    return
                self.handle(json.loads(data), fds)

    def handle(self, req, fds):
        op = req["op"]
        if op == "run":
            if req.get("uid") in self.reaping:
                self.deferred.setdefault(req["uid"], []).append((req, fds))
            else:
                self.start(req, fds)
        elif op == "reap":  # stop everything under a uid (or a process group) now; say when it is done
            for waiting, waiting_fds in self.deferred.pop(req.get("uid"), []):
                self.cancel(waiting, waiting_fds)  # sent before this request: it counts as running, and is stopped
            for pid, running in self.running.items():  # a child may not have taken its uid yet: kill(-1) misses it
                if req.get("uid") is not None and running.get("uid") == req["uid"]:
                    os.kill(pid, signal.SIGKILL)
            pgid = req.get("pgid")
            if pgid is not None and pgid not in self.running:
                pgid = None  # already reaped: its pid may belong to someone else by now
            self.reap(req.get("uid"), pgid, {"op": "reaped", "id": req.get("id")})
        elif op == "ping":
            self.send({"op": "pong", "id": req.get("id")})

    def start(self, req, fds):
        pid = os.fork()
        if pid == 0:
            _child(req, fds)
        for fd in fds:
            os.close(fd)
        self.running[pid] = req
        self.send({"op": "started", "id": req["id"], "pid": pid})

    def cancel(self, req, fds):
        """A deferred run that is stopped before it started: it ends as if killed (SIGKILL)."""
        for fd in fds:
            os.close(fd)
        self.send({"op": "exited", "id": req["id"], "status": signal.SIGKILL, "cpu": 0.0, "maxrss_kb": 0})

    def reap(self, uid, pgid, finished):
        """Kill every process of `uid` (from a child that takes that uid), or the group `pgid`; send
        `finished` once that is done. One reaper per uid at a time: two would kill each other."""
        if uid is None:
            if pgid is not None:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if finished is not None:
                self.send(finished)
            return
        if finished is not None:
            self.waiting.setdefault(uid, []).append(finished)
        if uid in self.reaping:
            self.again.add(uid)  # the running reaper may have missed what this request is about
            return
        self._fork_reaper(uid)

    def _fork_reaper(self, uid):
        pid = os.fork()
        if pid == 0:
            try:
                os.closerange(3, 1 << 16)
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                if uid < MIN_UID or os.getuid() != uid or os.geteuid() != uid:
                    os._exit(1)  # kill(-1) as root or a system uid would hit the host
                for _ in range(10_000):  # a fork bomb refills while we kill; it runs dry at RLIMIT_NPROC
                    try:
                        os.kill(-1, signal.SIGKILL)
                    except ProcessLookupError:
                        break
                    if not _alive(uid):
                        break
            finally:
                os._exit(0)
        self.reaping[uid] = pid
        self.reapers[pid] = uid

    def collect_children(self):
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.running:
                req = self.running.pop(pid)
                finished = {"op": "exited", "id": req["id"], "status": status,
                            "cpu": usage.ru_utime + usage.ru_stime, "maxrss_kb": usage.ru_maxrss}
                uid = req.get("uid")
                if uid is not None and uid not in self.reaping and not self.strays(uid):
                    self.send(finished)  # the common case: nothing left behind, no reaper needed
                else:
                    self.reap(uid, pid, finished)
            elif pid in self.reapers:
                uid = self.reapers.pop(pid)
                del self.reaping[uid]
                if uid in self.again:
                    self.again.discard(uid)
                    self._fork_reaper(uid)
                else:
                    for message in self.waiting.pop(uid, []):
                        self.send(message)
                    for req, fds in self.deferred.pop(uid, []):
                        self.start(req, fds)
            # anything else is an orphan handed to us as subreaper: reaped, nothing to say

    def shutdown(self):
        """Kill and reap every descendant, so nothing is left to the system's init as a zombie."""
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        while True:
            kids = _children()
            if not kids:
                return
            for pid in kids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for _ in kids:  # orphans of what we kill come back to us: the outer loop takes them too
                try:
                    os.waitpid(-1, 0)
                except ChildProcessError:
                    break

    def strays(self, uid):
        """Whether a live process of `uid` is left after its exec's main process exited.

        We are a child subreaper, so anything the exec left running was re-parented to us the moment
        its parent died: our untracked children are the only places to look.
        """
        children = _children()
        if children is None:
            return True  # cannot tell: reap to be sure
        for pid in children - set(self.running) - set(self.reapers):
            found = _uid_state(pid)
            if found is not None and found[0] == uid and found[1] not in ("Z", "X"):
                return True
        return False


def _children():
    """Our child pids (zombies included), or None where the kernel does not list them."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as f:
            return {int(p) for p in f.read().split()}
    except OSError:
        return None


def _uid_state(pid):
    """(real uid, state letter) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    uid = state = None
    for line in text.splitlines():
        if line.startswith("State:"):
            state = line.split()[1]
        elif line.startswith("Uid:"):
            uid = int(line.split()[1])
    return None if uid is None else (uid, state)


def _alive(uid):
    """Whether a live (not zombie) process of `uid` other than this one exists."""
    me = str(os.getpid())
    for name in os.listdir("/proc"):
        if name.isdigit() and name != me:
            found = _uid_state(int(name))
            if found is not None and found[0] == uid and found[1] != "Z":
                return True
    return False


def main():
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    gc.freeze()  # keep the collector from touching (and so copying) the shared heap in every child
    fd = int(sys.argv[1])
    sock = socket.socket(fileno=fd)
    isolate_worker(json.loads(sys.argv[2]))
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")
    try:
        Worker(sock).serve()
    except OSError as exc:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            raise


if __name__ == "__main__":
    main()
