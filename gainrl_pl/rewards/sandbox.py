"""Run untrusted Python (model-written programs) in a separate, resource-limited process.

One `Sandbox.run` = one fresh `python -I -S` process tree in its own session, with a scratch working
directory that is removed afterwards, resource limits set in the child (memory, CPU, processes, file size,
open files), a wall-clock timeout after which the whole process group is SIGKILLed, and a scrubbed
environment. As root it also uses Linux namespaces and an unprivileged uid (`namespaces` mode); otherwise
it falls back to `rlimits` mode. What each mode does and does not protect: docs/sandbox.md.

Verdicts: the tests run in a separate judge process that never runs program code; the program's process only
answers the judge's calls with plain data, so nothing the program does inside its interpreter can report a
test as passed (docs/sandbox.md, "Verdicts").

The code that runs inside the sandbox lives in `gainrl_pl/rewards/sandbox_child.py`; this module only prepares,
starts, times out, reads and cleans up.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import itertools
import logging
import marshal
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import symtable
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

ISOLATION_MODES = ("auto", "namespaces", "rlimits")
_CHILD_SOURCE = (Path(__file__).with_name("sandbox_child.py")).read_text(encoding="utf-8")
# The launcher's code, compiled once here: compiling its source took ~14 ms of every run. It goes ahead of the
# job on stdin and a tiny `-c` bootstrap runs it; only this interpreter can load it (marshal is
# version-specific), so another `python_executable` gets the source instead.
# dont_inherit: not this module's `from __future__ import annotations`, which the child's own compile() calls
# would pass on to every program (postponed annotations: `def f(xs: List[int])` without the import would load).
_CHILD_CODE = marshal.dumps(compile(_CHILD_SOURCE, "<sandbox_child>", "exec", dont_inherit=True))
_BOOTSTRAP = """import marshal, os
def read(n):
    chunks = []
    while n:
        chunk = os.read(0, n)
        if not chunk:
            raise SystemExit(3)
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)
exec(marshal.loads(read(int(read(8), 16))), {"__name__": "__main__"})
"""
_OUTPUT_CHARS = 2000  # how much of the program's stdout/stderr a result keeps, for diagnostics
# Unprivileged uids for namespaces mode: one per run for the program, so RLIMIT_NPROC (counted per uid) is per
# run and runs cannot signal each other, and one from the next span for the run's judge, so the program cannot
# signal or trace it. High enough not to collide with real users; no passwd entry is needed.
DEFAULT_UID_BASE = 1_900_000_000
_UID_SPAN = 1_000_000
_MAX_UID = 2**32 - 2
_run_counter = itertools.count()

BUBBLEWRAP_PREFIX = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
                     "--bind", "{scratch}", "{scratch}", "--unshare-all", "--cap-drop", "ALL", "--die-with-parent",
                     "--new-session", "--"]
"""A `command_prefix` for bubblewrap (no root needed where unprivileged user namespaces are enabled): a
read-only view of the host, private /tmp, /dev and /proc, no network, its own PID namespace, and no
capabilities (bubblewrap run as root keeps them all otherwise, and a program with CAP_SYS_PTRACE could trace
the judge). See docs/sandbox.md."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one run (the `RLIMIT_*` values are set in the child before the program starts)."""

    timeout_s: float = 5.0
    """Wall-clock limit of the whole run (interpreter start, program and tests); then the process group is
    SIGKILLed."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) in MiB: an allocation past it raises MemoryError at once."""
    cpu_s: int | None = None
    """CPU-time limit (RLIMIT_CPU) in seconds; `None` = ceil(timeout_s) + 1 (a backstop to the timeout)."""
    max_processes: int = 8
    """RLIMIT_NPROC: processes/threads of the run's uid. In namespaces mode the uid is fresh per run, so this
    is per run; in rlimits mode it counts all processes of the user (so forking is practically impossible),
    and as root the kernel ignores it."""
    max_file_mb: int = 16
    """RLIMIT_FSIZE in MiB: no file (the output log included) grows past this."""
    max_open_files: int = 64
    """RLIMIT_NOFILE: open file descriptors."""
    scratch_mb: int = 64
    """Size of the scratch directory in namespaces mode (a private tmpfs, in memory). In rlimits mode the
    scratch directory is on disk and only each file's size is limited."""

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s={self.timeout_s} must be > 0")
        for name in ("memory_mb", "max_processes", "max_file_mb", "max_open_files", "scratch_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.cpu_s is not None and self.cpu_s < 1:
            raise ValueError(f"cpu_s={self.cpu_s} must be >= 1 (or None)")

    def child_limits(self) -> dict:
        """The limits as sent to the child (cpu_s resolved)."""
        out = asdict(self)
        out["cpu_s"] = self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1
        return out


@dataclass
class SandboxResult:
    """What one run did.

    Attributes:
        passed: Counted test steps that ran without an exception.
        total: Counted test steps.
        loaded: The program's top level (after the setup code) ran to the end.
        timed_out: The wall-clock timeout fired and the process group was killed.
        returncode: Exit status of the launcher (128 + signal number when killed by a signal).
        isolation: The mode actually applied (`namespaces` or `rlimits`); `""` if the child never started.
        error: Why the program or the run failed (the program's exception, a setup failure), if known.
        test_errors: The first few failing steps' exceptions, by step index.
        output: The start of the program's stdout and stderr (merged).
        duration_s: Wall-clock seconds from start to cleanup.
        note: Why `auto` fell back to `rlimits`, if it did.
    """

    passed: int = 0
    total: int = 0
    loaded: bool = False
    timed_out: bool = False
    returncode: int | None = None
    isolation: str = ""
    error: str | None = None
    test_errors: dict[int, str] = field(default_factory=dict)
    output: str = ""
    duration_s: float = 0.0
    note: str = ""

    @property
    def fraction(self) -> float:
        """passed / total (0 when there are no counted steps)."""
        return self.passed / self.total if self.total else 0.0


@dataclass
class Sandbox:
    """Settings for running programs; `run` is safe to call from many threads at once.

    Attributes:
        limits: Resource limits of each run.
        isolation: `auto` (namespaces when root and the kernel allows, else rlimits, with a warning once),
            `namespaces` (fail each run if unavailable), or `rlimits`. See docs/sandbox.md.
        command_prefix: argv put before the interpreter command, to run inside a stronger sandbox (e.g.
            bubblewrap, firejail, a container). `{scratch}` in an item is replaced by the run's scratch
            directory, which the wrapped command must see at the same path. See docs/sandbox.md.
        python_executable: Interpreter for the sandboxed process; `None` = this one (`sys.executable`).
            Set it when `command_prefix` runs a container with its own Python (e.g. `python3`).
        scratch_root: Where scratch directories are created; `None` = the system temp directory.
        uid_base: First of the unprivileged uids used in namespaces mode: programs get uids from
            [uid_base, uid_base + 10^6), their judges the same offset in the next 10^6.
        site_packages: Let programs import the interpreter's installed packages (numpy, ...); by default
            they get the standard library only (`python -S`), which is faster to start and all that
            HumanEval/MBPP-style tasks need.
    """

    limits: SandboxLimits = field(default_factory=SandboxLimits)
    isolation: str = "auto"
    command_prefix: list[str] | None = None
    python_executable: str | None = None
    scratch_root: str | None = None
    uid_base: int = DEFAULT_UID_BASE
    site_packages: bool = False

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation={self.isolation!r}; allowed: {', '.join(ISOLATION_MODES)}")
        if self.command_prefix is not None and (
            isinstance(self.command_prefix, str) or not all(isinstance(a, str) for a in self.command_prefix)
        ):
            raise TypeError("command_prefix must be a list of strings (an argv), e.g. ['bwrap', ...]")
        if not 0 < self.uid_base <= _MAX_UID - 2 * _UID_SPAN:
            raise ValueError(f"uid_base={self.uid_base} must be in 1..{_MAX_UID - 2 * _UID_SPAN} (two spans of "
                             f"{_UID_SPAN} uids follow it)")
        self._warned_fallback = False

    def run(self, program: str, steps: list[tuple[str, bool]], setup: str = "", *,
            program_names: Sequence[str] | None = None, uid: int | None = None) -> SandboxResult:
        """Run `setup` + `program` in one sandboxed process and the test steps in another (the judge), which
        calls into the program; never raises for what the program does.

        Args:
            program: The untrusted Python source.
            steps: (source, counted) pairs the judge runs in order, after `setup`, once the program loaded;
                counted steps are the test cases (pass = no exception), the others are test set-up.
            setup: Trusted source run before the program in its namespace (e.g. imports a problem statement
                promises), and before the steps in the judge's.
            program_names: The global names the steps take from the program (the function under test,
                classes it defines); `None` = `free_names(steps)`. A name the setup defines is never taken
                from the program, nor is a builtin (unless listed here).
            uid: The program's unprivileged uid in namespaces mode; `None` = a fresh one from `uid_base`.

        Returns:
            A `SandboxResult`; `passed` counts only what the judge reported before it ended.
        """
        start = time.perf_counter()
        counted = [i for i, (_, c) in enumerate(steps) if c]
        result = SandboxResult(total=len(counted))
        if uid is None:
            uid = self.uid_base + (os.getpid() * 7919 + next(_run_counter)) % _UID_SPAN
        base = Path(tempfile.mkdtemp(prefix="gainrl_sandbox_", dir=self.scratch_root))
        if program_names is None:
            program_names = free_names(tuple(source for source, _ in steps))
        try:
            self._run_in(base, program, steps, setup, list(program_names), uid, result, start)
        finally:
            _remove_tree(base)
            result.duration_s = time.perf_counter() - start
        if result.note and self.isolation == "auto" and not self._warned_fallback:
            self._warned_fallback = True
            log.warning("sandbox: namespaces unavailable (%s); running in rlimits mode, which does not stop "
                        "writes to world-writable paths or signals to your own processes (docs/sandbox.md)",
                        result.note)
        return result

    # ------------------------------------------------------------------------------------------ internals
    def _run_in(self, base: Path, program: str, steps, setup: str, names: list[str], uid: int,
                result: SandboxResult, start: float) -> None:
        # base: the result and log files, which the program must not touch. Made read-only (0511) before the
        # run, so even a same-uid program (rlimits mode) cannot create files next to its work dir without first
        # chmod-ing it back. base/work: the program's cwd, HOME and TMPDIR; in namespaces mode a private
        # size-limited tmpfs is mounted on it, the only place the program can write.
        work = base / "work"
        work.mkdir(mode=0o700)
        # With a command_prefix the wrapper is the isolation: `auto` then means rlimits inside it.
        isolation = "rlimits" if self.command_prefix and self.isolation == "auto" else self.isolation
        key = secrets.token_bytes(32)  # authenticates the result lines (sandbox_child._write_result)
        result_path, log_path = base / "result.txt", base / "output.log"
        # Root-owned 0600 in namespaces mode; in rlimits mode the program may read or append to it, but a
        # line only counts with the keyed hash of the run's key, which never reaches the program.
        result_path.touch(mode=0o600)
        judge_uid = uid + _UID_SPAN if uid + _UID_SPAN <= _MAX_UID else uid - _UID_SPAN
        # Part 1 is all the program's process ever holds; part 2 (the tests and the key) is read by the
        # launcher only after it forked the program (sandbox_child.main).
        part1 = {"program": program, "setup": setup, "workdir": str(work), "result_path": str(result_path),
                 "uid": uid, "judge_uid": judge_uid, "limits": self.limits.child_limits(), "isolation": isolation}
        part2 = {"steps": [[s, bool(c)] for s, c in steps], "names": names, "key": key}
        prefix = [a.replace("{scratch}", str(base)) for a in (self.command_prefix or [])]
        # -I: ignore PYTHON* variables and the user site, no script dir on sys.path; -S: stdlib only,
        # unless site_packages (then also the interpreter's site-packages).
        flags = ["-I"] if self.site_packages else ["-I", "-S"]
        if self.python_executable in (None, sys.executable):
            argv, head = [*prefix, sys.executable, *flags, "-c", _BOOTSTRAP], _frame(_CHILD_CODE)
        else:
            argv, head = [*prefix, self.python_executable, *flags, "-c", _CHILD_SOURCE], b""
        # Scrubbed: nothing of the training process's environment (tokens, proxies, CUDA settings) passes.
        # One BLAS/OpenMP thread: threads count against RLIMIT_NPROC, and runs already go in parallel.
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work),
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        with open(log_path, "wb") as out:
            base.chmod(0o511)
            # start_new_session: the launcher leads a new process group, killed as a whole on timeout.
            # No preexec_fn: it is unsafe in a multi-threaded parent; the limits are set in the launcher.
            # The job goes through stdin, so it never lies in a file the program could read.
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=work, env=env, start_new_session=True, close_fds=True)
            deadline = start + self.limits.timeout_s
            try:
                job = head + _frame(marshal.dumps(part1)) + _frame(marshal.dumps(part2))
                sent = _send(proc, job, deadline)
                result.timed_out = not (sent and _wait_for_exit(proc, deadline))
            finally:
                # Always, not only on timeout: in rlimits mode leftovers of the program may still run.
                _kill_group(proc.pid)
                proc.wait()
        result.returncode = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        self._read_results(result_path, key, steps, result)
        with open(log_path, "rb") as f:
            result.output = f.read(_OUTPUT_CHARS * 4).decode("utf-8", "replace")[:_OUTPUT_CHARS]

    @staticmethod
    def _read_results(path: Path, key: bytes, steps, result: SandboxResult) -> None:
        try:
            with open(path, "rb") as f:
                data = f.read(64 * 1024 * 1024)
        except OSError:  # e.g. a same-uid program deleted it: nothing it could have said counts anyway
            data = b""
        counted = {i for i, (_, c) in enumerate(steps) if c}
        passed = set()
        # Complete lines only: a line cut short when its writer was killed must not read as another verdict.
        for line in data.split(b"\n")[:-1]:
            mac, _, body = line.partition(b" ")
            expected = hashlib.blake2b(body, key=key, digest_size=16).hexdigest().encode()
            if not hmac.compare_digest(mac, expected):  # only the launcher and the judge hold the run's key
                continue
            rest = body.decode("utf-8", "replace")
            tag, _, detail = rest.partition(" ")
            if tag == "I":
                result.isolation, _, result.note = detail.partition(" ")
                result.note = result.note.strip()
            elif tag == "L":
                result.loaded = True
            elif tag == "P" and detail.strip().isdigit() and int(detail) in counted:
                passed.add(int(detail))
            elif tag == "T" and len(result.test_errors) < 5:
                index, _, message = detail.partition(" ")
                if index.isdigit():
                    result.test_errors[int(index)] = message
            elif tag in ("E", "X"):
                result.error = detail.strip()
        result.passed = len(passed)
        if result.error is None:
            if result.timed_out:
                result.error = "timed out"
            elif not result.isolation:  # e.g. a command_prefix that failed: the output says why
                result.error = f"the sandbox exited with status {result.returncode} before running the program"
            elif result.returncode:
                result.error = f"the sandbox exited with status {result.returncode}"


@lru_cache(maxsize=4096)  # the same tests come back G times per prompt and once per round
def free_names(sources: tuple[str, ...]) -> tuple[str, ...]:
    """The global names test code reads but never binds itself, builtins and dunders left out: what the judge
    takes from the program (the function under test, a class the tests construct, a helper they call).

    `sources` run in order in one namespace; () if they do not parse (the judge then reports the error).
    """
    try:
        table = symtable.symtable("\n".join(sources), "<tests>", "exec")
    except (SyntaxError, ValueError):
        return ()
    bound = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    used: set[str] = set()
    tables = [table]
    while tables:
        current = tables.pop()
        used.update(s.get_name() for s in current.get_symbols()
                    if s.is_referenced() and (current is table or s.is_global()))
        tables.extend(current.get_children())
    return tuple(sorted(n for n in used - bound if not hasattr(builtins, n) and not n.startswith("__")))


def _frame(payload: bytes) -> bytes:
    return b"%08x" % len(payload) + payload


def _send(proc: subprocess.Popen, data: bytes, deadline: float) -> bool:
    """Write `data` to the process's stdin and close it, giving up at `deadline` (a wrapper that never reads
    its stdin must not hang the worker); False if the deadline passed first."""
    fd = proc.stdin.fileno()
    os.set_blocking(fd, False)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    view = memoryview(data)
    try:
        while view:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return False
            if poller.poll(remaining * 1000):
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    continue
        return True
    except BrokenPipeError:  # the launcher died first (e.g. a bad command_prefix): its exit tells the rest
        return True
    finally:
        proc.stdin.close()


def _wait_for_exit(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait until `proc` exits or `time.perf_counter()` passes `deadline`; True if it exited.

    `Popen.wait(timeout=...)` polls with sleeps growing to 50 ms, which added ~15 ms to every run; a pidfd
    (Linux >= 5.3) wakes up the moment the process exits.
    """
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (older kernel, not Linux): fall back to polling
        try:
            proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while proc.poll() is None:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return False
            poller.poll(remaining * 1000)
        return True
    finally:
        os.close(pidfd)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove_tree(path: Path) -> None:
    def retry(func, target, _exc):
        # The program may have made its files read-only or its directories unsearchable (same-uid mode).
        try:
            os.chmod(os.path.dirname(target), 0o700)
            os.chmod(target, 0o700)
            func(target)
        except OSError:
            pass

    try:
        path.chmod(0o700)
    except OSError:
        pass
    shutil.rmtree(path, onerror=retry)
    if path.exists():
        log.warning("sandbox: could not remove scratch directory %s", path)
