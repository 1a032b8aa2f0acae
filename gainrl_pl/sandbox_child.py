"""What runs inside a sandbox run: the launcher (isolation, limits, privilege drop) and the test harness.

`gainrl_pl.sandbox` starts this file's text with `python -I -S -c <text>` (the job as JSON on stdin) once per program
run, so it imports only a few built-in or small stdlib modules: every import here is paid on every run (the full
set `gainrl_pl.sandbox` uses would triple the start-up time). It is never imported by the training process.

Process tree of one run (see docs/sandbox.md):

    training process -> launcher (this file, its own session / process group)
                          -> child: limits applied, privileges dropped, runs program + tests, exits

In `namespaces` mode (root only) the launcher first moves into new mount, network, PID, IPC and UTS
namespaces and makes every mount read-only except the scratch directory; the child is PID 1 of the new
PID namespace, so when it exits the kernel kills everything the program left behind.
"""

import ctypes
import marshal
import os
import resource
import signal
import sys

# Linux constants (include/uapi/linux/sched.h, mount.h, prctl.h): Python 3.11 has no os.unshare / mount.
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
# Per-mount options in /proc/self/mountinfo that a read-only remount must repeat, or it would clear them.
MOUNT_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                      "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
# Pseudo file systems: a failed read-only remount below these is tolerated (their files are root-owned and
# the program runs as an unprivileged uid without capabilities); anywhere else it aborts namespaces mode.
TOLERATED_MOUNT_PREFIXES = ("/proc", "/sys")

_libc = None


def _call_libc(name, *args):
    """Call a libc function that returns 0 on success; raise OSError with errno otherwise."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
        _libc.unshare.argtypes = [ctypes.c_int]
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    if getattr(_libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}{args[:2]}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None):
    def enc(s):
        return None if s is None else s.encode()

    _call_libc("mount", enc(source), enc(target), enc(fstype), flags, enc(data))


def _unescape_mount_path(path):
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return path.encode().decode("unicode_escape").encode("latin-1").decode() if "\\" in path else path


# ----------------------------------------------------------------------------------------- namespaces
def _first_blocker(path):
    """(directory, child) where `path` stops being reachable for other users (no o+x), or None."""
    parts = [p for p in path.split("/") if p]
    current = "/"
    for name in parts:
        try:
            if not os.stat(current).st_mode & 0o001:
                return current, name
        except OSError:
            return None
        current = os.path.join(current, name)
    return None


def _open_up(paths):
    """Make `paths` reachable for the unprivileged sandbox uid inside this mount namespace.

    The interpreter's stdlib may live under a directory others cannot enter (pyenv under /root, mode
    0700). Changing its mode would change the host; instead, a tmpfs is mounted over the blocking
    directory and only the needed children are bind-mounted back into it, which also hides the rest of
    that directory (e.g. the rest of /root) from the program.
    """
    for _ in range(8):  # each round opens one level; deeper blockers are found in the next round
        blocked = {}
        for path in paths:
            hit = _first_blocker(path)
            if hit:
                blocked.setdefault(hit[0], set()).add(hit[1])
        if not blocked:
            return
        for directory, children in blocked.items():
            # O_PATH handles keep the children reachable after the tmpfs hides them.
            handles = {c: os.open(os.path.join(directory, c), os.O_PATH) for c in children}
            kinds = {c: os.path.isdir(os.path.join(directory, c)) for c in children}
            _mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64k")
            for child, fd in handles.items():
                target = os.path.join(directory, child)
                if kinds[child]:
                    os.mkdir(target)
                else:
                    os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
                _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
                os.close(fd)
    raise OSError("could not make the interpreter's paths reachable: " + ", ".join(paths))


def _remount_all_readonly():
    """Remount every mount of this (private) mount namespace read-only and nosuid."""
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    for line in lines:
        fields = line.split()
        target, options = _unescape_mount_path(fields[4]), fields[5].split(",")
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        for option in options:
            flags |= MOUNT_OPTION_FLAGS.get(option, 0)
        try:
            _mount(None, target, None, flags)
        except OSError:
            if not target.startswith(TOLERATED_MOUNT_PREFIXES):
                raise


def enter_namespaces(workdir, uid, scratch_mb):
    """Unshare mount/net/PID/IPC/UTS namespaces; leave only `workdir` writable. Needs root (CAP_SYS_ADMIN).

    `workdir` becomes a private tmpfs of `scratch_mb` MiB owned by `uid`: the program cannot fill the
    host's disk, and its files vanish with the namespace. The next fork becomes PID 1 of the new PID
    namespace. The new network namespace has only a loopback interface, which is down: no connection to
    anything, the host's localhost included.
    """
    _call_libc("unshare", CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS)
    # First, before any other mount call: nothing done below may propagate back to the host.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _open_up([p for p in sys.path if os.path.exists(p)] + [workdir])
    _remount_all_readonly()
    _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={scratch_mb}m,nr_inodes=4096,mode=0700,uid={uid},gid={uid}")


# ----------------------------------------------------------------------------------------- child setup
def _set_limits(limits):
    mib = 1024 * 1024
    pairs = [
        (resource.RLIMIT_AS, limits["memory_mb"] * mib),
        (resource.RLIMIT_FSIZE, limits["max_file_mb"] * mib),
        (resource.RLIMIT_NOFILE, limits["max_open_files"]),
        (resource.RLIMIT_NPROC, limits["max_processes"]),
        (resource.RLIMIT_CORE, 0),
    ]
    for which, value in pairs:
        resource.setrlimit(which, (value, value))
    # The soft CPU limit sends SIGXCPU (kills: no handler yet), the hard one a second later SIGKILL.
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))


def _drop_privileges(uid):
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # an unprivileged uid: all capabilities are gone from here on


def _block_sockets():
    """Python-level socket guard for `rlimits` mode (no network namespace): socket creation raises.

    Best effort only: ctypes or a subprocess can still reach the C library directly.
    """
    import _socket
    import socket

    class NoNetworkSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            raise PermissionError(1, "network access is disabled in the sandbox")

    def refuse(*args, **kwargs):
        raise PermissionError(1, "network access is disabled in the sandbox")

    _socket.socket = _socket.SocketType = socket.socket = socket.SocketType = NoNetworkSocket
    socket.socketpair = socket.fromfd = socket.create_connection = socket.create_server = refuse


def _describe(err):
    text = f"{type(err).__name__}: {err}"
    return " ".join(text.split())[:300]


def run_harness(job, report):
    """Run setup code, the program, then each test step in one namespace; report through `report`.

    Reports `L` once the program's top level ran, then `P i` / `F i` for each counted step i (as it
    finishes, so a later step that hangs still leaves the earlier results), and `D` at the end. A program
    that raises (SystemExit included) reports `E <error>` and no step runs. The program runs as
    `__main__`, as a script would (its `if __name__ == "__main__":` block runs, with an empty stdin).
    """
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        if job.get("setup"):
            exec(compile(job["setup"], "<setup>", "exec"), namespace)
        exec(compile(job["program"], "<program>", "exec"), namespace)
    except BaseException as err:  # noqa: B036 (SystemExit too: the program did not finish defining itself)
        report("E", _describe(err))
        return
    report("L")
    for index, (source, counted) in enumerate(job["steps"]):
        try:
            exec(compile(source, f"<test {index}>", "exec"), namespace)
            ok = True
        except BaseException as err:  # noqa: B036
            ok = False
            if counted:
                report("T", f"{index} {_describe(err)}")
        if counted:
            report("P" if ok else "F", str(index))
    report("D")


def _child(job, isolation, result_fd):
    """Runs in the forked child: limits, privilege drop, then the harness. Never returns."""
    code = 0
    try:
        if isolation == "namespaces":
            # A /proc for the new PID namespace: the program sees only its own processes.
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
        try:  # the OOM killer should pick a sandbox before the training process
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        _set_limits(job["limits"])
        if isolation == "namespaces":
            _drop_privileges(job["uid"])
        else:
            _block_sockets()
        if sys.platform.startswith("linux"):  # elsewhere (rlimits mode only) the process-group kill remains
            _call_libc("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            # Set after the uid change (a uid change clears it): die with the launcher when it is killed.
            _call_libc("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.chdir(job["workdir"])
        os.umask(0o077)
        nonce = job["nonce"]

        def report(tag, text=""):
            os.write(result_fd, f"{nonce} {tag} {text}\n".encode("utf-8", "replace"))

        run_harness(job, report)
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: B036 (the program may have closed or replaced them)
            pass
    except BaseException as err:  # noqa: B036 (a setup failure must end the child, never fall through)
        try:
            os.write(result_fd, f"{job['nonce']} X child setup failed: {_describe(err)}\n".encode())
        except OSError:
            pass
        code = 3
    os._exit(code)  # skips atexit handlers and non-daemon threads the program may have left


def main():
    """Launcher entry point: read the job from stdin, isolate, fork the child, relay its exit status."""
    job = marshal.loads(sys.stdin.buffer.read())  # marshal: no import cost, unlike json
    result_fd = os.open(job["result_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    nonce = job["nonce"]
    isolation, note = "rlimits", ""
    if job["isolation"] == "namespaces" or (job["isolation"] == "auto" and os.geteuid() == 0):
        try:
            enter_namespaces(job["workdir"], job["uid"], job["limits"]["scratch_mb"])
            isolation = "namespaces"
        except OSError as err:
            note = _describe(err)
            if job["isolation"] == "namespaces":
                os.write(result_fd, f"{nonce} X namespaces unavailable: {note}\n".encode())
                os._exit(3)
    os.write(result_fd, f"{nonce} I {isolation} {note}\n".encode())
    pid = os.fork()
    if pid == 0:
        _child(job, isolation, result_fd)
    os.close(result_fd)
    _, status = os.waitpid(pid, 0)
    os._exit(min(255, max(0, os.waitstatus_to_exitcode(status))) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()
