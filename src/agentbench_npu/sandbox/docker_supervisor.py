"""The docker sandbox's per-exec supervisor: runs inside the container, standard library only.

Not imported: docker.py sends this file's text to `python3 -c` with every `docker exec`. It runs as root in
the container (without the capabilities that make root dangerous), once per exec. stdin: one JSON line (the
request), then `stdin_len` bytes for the command. stdout: one JSON line (the outcome). See docker.py.
"""
import base64, json, os, resource, select, signal, sys, time

def read_exact(n):
    chunks = []
    while n > 0:
        chunk = os.read(0, min(n, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)

def read_line():
    data = bytearray()
    while not data.endswith(b"\n"):
        chunk = os.read(0, 1)
        if not chunk:
            break
        data += chunk
    return bytes(data)

def oom_kills():
    for path, key in (("/sys/fs/cgroup/memory.events", "oom_kill"),
                      ("/sys/fs/cgroup/memory/memory.oom_control", "oom_kill")):
        try:
            with open(path) as f:
                for line in f:
                    name, _, value = line.partition(" ")
                    if name == key:
                        return int(value)
        except (OSError, ValueError):
            continue
    return None

def others():
    """Live (not zombie) processes in the container other than PID 1 and this one."""
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in (1, me):
            try:
                with open(f"/proc/{name}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state not in ("Z", "X"):
                found.append(int(name))
    return found

def kill_all():
    """SIGKILL everything but PID 1 and us, until nothing is left (a fork bomb refills while we kill)."""
    with open("/proc/1/cmdline", "rb") as f:
        if b"sigtimedwait" not in f.read():  # PID 1 is not our keep-alive: this is not the sandbox's own PID
            raise SystemExit("refusing kill(-1): not in the sandbox container's own PID namespace")
    killed = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = others()
        if not left:
            break
        killed = max(killed, len(left))
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.002)
    return killed

def prepare(req):
    """Before the first command of a container (cheap checks after that): no loopback when the network is
    off, as in a fresh network namespace (lo without 127.0.0.1, and down; needs CAP_NET_ADMIN), and a work
    dir the command's uid can write (an image without a /work of mode 1777 leaves a root-owned volume)."""
    if not req["limits"]["network"]:
        with open("/sys/class/net/lo/flags") as f:
            up = int(f.read(), 16) & 1
        if up:
            import fcntl, socket, struct
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                fcntl.ioctl(s, 0x8916, struct.pack("16sH2s4s8s", b"lo", socket.AF_INET, b"", b"", b""))
                flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0))[:18])[1]
                fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags & ~1))
    if os.stat(req["workdir"]).st_mode & 0o7777 != 0o1777:
        os.chmod(req["workdir"], 0o1777)

def child(req, fds):
    try:
        os.setsid()
        for number, fd in enumerate(fds):
            os.dup2(fd, number)
        os.closerange(3, 1 << 16)
        for sig in (signal.SIGPIPE, signal.SIGINT, signal.SIGTERM, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        limits = req["limits"]
        memory = int(limits["memory_mb"]) * 2**20
        cpu = max(1, int(-(-float(limits["cpu_seconds"]) // 1)))
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limits["file_mb"]) * 2**20,) * 2)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        try:
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")  # the OOM killer takes the command, never the supervisor or PID 1
        except OSError:
            pass
        uid = int(req["uid"])
        if os.getuid() == 0 and uid != 0:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        os.umask(0o077)
        os.chdir(req["cwd"])
        argv = req["argv"]
        os.execvpe(argv[0], argv, req["env"])
    except BaseException as exc:
        try:
            os.write(2, f"sandbox: could not start {req['argv'][:1]}: {exc}\n".encode())
        finally:
            os._exit(127 if isinstance(exc, FileNotFoundError) else 126)

def answer(**result):
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()

def main():
    req = json.loads(read_line())
    if req.get("op") == "reap":
        answer(killed=kill_all())
        return
    if req.get("op") == "count":
        answer(count=len(others()))
        return
    data = read_exact(int(req.get("stdin_len", 0)))
    if req.get("shell") and not os.path.exists(req["argv"][0]):
        answer(start_error=f"this image has no {req['argv'][0]}, so a command string cannot run; pass an argv "
                           "list such as ['python3', '-c', code], or use an image with a shell")
        return
    try:
        prepare(req)
    except OSError as exc:
        answer(setup_error=f"could not prepare the sandbox container: {exc}")
        return
    limit = int(req["limits"]["output_bytes"])
    wall = float(req["wall"])
    oom_before = oom_kills()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        child(req, (in_r, out_w, err_w))
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    deadline = started + wall
    streams = {out_r: bytearray(), err_r: bytearray()}
    kept = 0
    truncated = timed_out = False
    pending = memoryview(data)
    writers = [in_w] if pending else []
    if not pending:
        os.close(in_w)
    else:
        os.set_blocking(in_w, False)
    try:
        exit_fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        exit_fd = None
    status = usage = None

    def stop():
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass

    def take(fd, chunk):
        nonlocal kept, truncated
        room = limit - kept
        if len(chunk) > room:
            streams[fd] += chunk[:max(room, 0)]
            kept = limit
            truncated = True
            return False
        streams[fd] += chunk
        kept += len(chunk)
        return True

    readers = [out_r, err_r]
    while status is None:
        now = time.monotonic()
        if now >= deadline and not timed_out:
            timed_out = True
            stop()
        wait_for = list(readers) + ([exit_fd] if exit_fd is not None else [])
        timeout = 0.01 if exit_fd is None else (max(0.0, deadline - now) if not timed_out else 0.05)
        try:
            ready, writable, _ = select.select(wait_for, writers, [], timeout)
        except InterruptedError:
            continue
        for fd in writable:
            try:
                n = os.write(fd, pending[:65536])
                pending = pending[n:]
            except BlockingIOError:
                continue
            except OSError:
                pending = pending[:0]
            if not pending:
                os.close(fd)
                writers.remove(fd)
        for fd in ready:
            if fd == exit_fd:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                readers.remove(fd)
                os.close(fd)
            elif not truncated and not take(fd, chunk):
                stop()
        done, raw, usage = os.wait4(pid, os.WNOHANG)
        if done:
            status = raw
    for fd in writers:
        os.close(fd)
    killed = kill_all()  # background processes, setsid daemons, a fork bomb's children
    for fd in readers:  # every writer is dead now: read what is left, up to end of file
        os.set_blocking(fd, False)
        while True:
            try:
                chunk = os.read(fd, 65536)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            if not truncated:
                take(fd, chunk)
        os.close(fd)
    oom_after = oom_kills()
    answer(exit_code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
           signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
           stdout=base64.b64encode(streams[out_r]).decode(), stderr=base64.b64encode(streams[err_r]).decode(),
           timed_out=timed_out, truncated=truncated, cpu=usage.ru_utime + usage.ru_stime,
           oom_killed=bool(oom_before is not None and oom_after is not None and oom_after > oom_before),
           leftovers=killed, seconds=time.monotonic() - started)

if __name__ == "__main__":
    main()
