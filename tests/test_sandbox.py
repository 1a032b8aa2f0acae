"""gainrl_pl.rewards.sandbox: limits, timeouts and isolation, checked by running hostile programs; what honest programs
can do through the judge (the process that runs the tests); the wire format between them.

Every hostile program guards itself: it first checks that the limit meant to stop it is in force and
refuses otherwise (the allocation, the fork loop, the kills), so a broken sandbox fails a test instead of
harming the machine. The fork loop is bounded (64 sleeping children at most) for the same reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from gainrl_pl.rewards import sandbox_child
from gainrl_pl.rewards.sandbox import BUBBLEWRAP_PREFIX, DEFAULT_UID_BASE, Sandbox, SandboxLimits, free_names

REPO = Path(__file__).resolve().parents[1]
DEFINE_F = "\ndef f():\n    return 1\n"
F_STEPS = [("assert f() == 1", True)]


@pytest.fixture(scope="module")
def namespaces_ok() -> bool:
    """Whether this machine gives the sandbox its namespaces mode (root on Linux with namespaces)."""
    if os.geteuid() != 0:
        return False
    probe = Sandbox(SandboxLimits(timeout_s=10), isolation="namespaces")
    result = probe.run("import os\nassert os.getpid() == 1 and os.getuid() != 0", [])
    return result.isolation == "namespaces" and result.loaded


@pytest.fixture()
def strict(namespaces_ok) -> Sandbox:
    """A sandbox that refuses to run without namespaces (so hostile programs never run unisolated)."""
    if not namespaces_ok:
        pytest.skip("namespaces mode needs root on Linux; rlimits mode is covered by test_rlimits_mode_*")
    return Sandbox(SandboxLimits(timeout_s=1.5), isolation="namespaces")


def processes_of(uid: int) -> list[int]:
    """PIDs of live processes whose real uid is `uid`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            if int(uid_line.split()[1]) == uid:
                pids.append(int(entry))
    return pids


# ----------------------------------------------------------------------------------------- basics
def test_limits_and_isolation_are_in_force(strict):
    # The steps run in the judge, so what the program's process sees comes back through its functions.
    probe = textwrap.dedent("""
        import os, resource, socket
        def limit(name):
            return resource.getrlimit(getattr(resource, name))
        def interfaces():
            return [name for _, name in socket.if_nameindex()]
        def ids():
            return os.getuid(), os.getgid(), os.getgroups(), os.getpid()
        def pids():
            return sorted(p for p in os.listdir('/proc') if p.isdigit())
        def cwd_env():
            return os.getcwd(), dict(os.environ)
        def status():
            return open('/proc/self/status').read()
    """)
    steps = [("assert limit('RLIMIT_AS') == (1024 * 2**20, 1024 * 2**20)", True),
             ("assert limit('RLIMIT_NPROC') == (8, 8)", True),
             ("assert limit('RLIMIT_CPU') == (3, 4)", True),  # ceil(timeout_s=1.5) + 1, hard = soft + 1
             ("assert limit('RLIMIT_FSIZE')[0] == 16 * 2**20 and limit('RLIMIT_NOFILE')[0] == 64", True),
             ("uid, gid, groups, pid = ids()\n"
              "assert uid >= 1_900_000_000 and gid == uid and groups == [] and pid == 1", True),
             ("assert pids() == ['1', '2']", True),  # its own PID namespace: itself and the judge
             ("assert interfaces() == ['lo']", True),  # a network namespace of its own
             ("cwd, env = cwd_env()\nassert cwd == env['HOME'] == env['TMPDIR']", True),
             ("assert set(cwd_env()[1]) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', 'LC_ALL', 'OMP_NUM_THREADS',"
              " 'OPENBLAS_NUM_THREADS', 'MKL_NUM_THREADS'}", True),
             ("assert 'CapEff:\\t0000000000000000' in status()", True),
             # The judge: another unprivileged uid (the program cannot signal or trace it), no capabilities.
             ("import os\nassert os.getuid() == ids()[0] + 1_000_000 and os.getpid() == 2", True),
             ("assert 'CapEff:\\t0000000000000000' in open('/proc/self/status').read()", True)]
    result = strict.run(probe, steps)
    assert result.isolation == "namespaces"
    assert (result.passed, result.total) == (12, 12), result.test_errors


def test_passed_steps_are_counted_one_by_one(strict):
    result = strict.run("def add(a, b):\n    return a + b\nprint('hello')\n",
                        [("import math", False), ("assert add(1, 2) == 3", True), ("assert add(1, 1) == 3", True),
                         ("assert add(2, 2) == 4", True), ("raise ValueError('not counted')", False)])
    assert (result.passed, result.total, result.loaded, result.timed_out) == (2, 3, True, False)
    assert result.output == "hello\n" and 2 in result.test_errors and result.fraction == pytest.approx(2 / 3)


@pytest.mark.parametrize("program", ["def f(:\n    pass", "raise SystemExit(0)\n" + DEFINE_F,
                                     "import os\nos._exit(0)\n" + DEFINE_F, "1 / 0\n" + DEFINE_F])
def test_a_program_that_does_not_finish_loading_passes_nothing(strict, program):
    result = strict.run(program, F_STEPS)
    assert result.passed == 0 and not result.loaded


def test_printed_or_forged_results_are_not_counted(strict):
    # Without the run's secret nonce, lines written to stdout or to any inherited descriptor count for nothing.
    forge = "import os\nfor fd in range(1, 64):\n    try:\n        os.write(fd, b'P 0\\nL \\nD \\n')\n" \
            "    except OSError:\n        pass\nos._exit(0)\n"
    result = strict.run(forge, F_STEPS)
    assert result.passed == 0 and not result.loaded


# ----------------------------------------------------------------------------------------- through the judge
HONEST = textwrap.dedent("""
    import collections, enum, math
    LIMIT = 10
    class Color(enum.IntEnum):
        RED = 1
    Point = collections.namedtuple("Point", "x y")
    def values():
        return (1, 2.5, "é", b"\\x00", None, True, [1, (2, 3)], {1: "a", (2, 3): {4}}, frozenset({5}), 1j,
                bytearray(b"z"), 10**5000)
    def color():
        return Color.RED
    def point():
        return Point(1, 2)
    def sort_in_place(xs, *, reverse=False):
        xs.sort(reverse=reverse)
    def fill(d, key):
        d[key] = [1]
    def squares(n):
        return (i * i for i in range(n))
    def positive(x):
        if x < 0:
            raise ValueError("negative")
        return x
    class Stack:
        def __init__(self):
            self.items = []
        def push(self, x):
            self.items.append(x)
        def pop(self):
            return self.items.pop()
        def __len__(self):
            return len(self.items)
    class Pair:
        def __init__(self, a, b):
            self.a, self.b = a, b
    def chain_length(pairs):
        end, count = float("-inf"), 0
        for p in sorted(pairs, key=lambda p: p.b):
            if p.a > end:
                end, count = p.b, count + 1
        return count
    calls = 0
    def next_id():
        global calls
        calls += 1
        return calls
    def apply(f, x):
        return f(x)
""")
HONEST_STEPS = [
    ("assert values() == (1, 2.5, 'é', b'\\x00', None, True, [1, (2, 3)], {1: 'a', (2, 3): {4}}, frozenset({5}),"
     " 1j, bytearray(b'z'), 10**5000)", True),
    ("assert type(values()[5]) is bool and type(values()[0]) is int", True),
    ("assert color() == 1 and type(color()) is int", True),  # subclasses of builtins cross as their value
    ("assert point() == (1, 2)", True),
    ("xs = [3, 1, 2]\nsort_in_place(xs, reverse=True)\nassert xs == [3, 2, 1]", True),  # in-place changes come back
    ("d = {}\nfill(d, key='k')\nassert d == {'k': [1]}", True),
    ("assert list(squares(4)) == [0, 1, 4, 9] and sum(squares(3)) == 5", True),  # iterables are iterated there
    ("try:\n    positive(-1)\nexcept ValueError as e:\n    assert str(e) == 'negative'\n"
     "else:\n    raise AssertionError('no error')", True),
    ("s = Stack()\ns.push(1)\ns.push(2)\nassert s.pop() == 2 and len(s) == 1 and s.items == [1] and s == s", True),
    ("assert Stack() != Stack() and bool(Stack()) is False", True),  # handles: identity, the program's __len__
    ("assert chain_length([Pair(1, 2), Pair(3, 4), Pair(2, 5)]) == 2", True),  # objects the tests build there
    ("assert LIMIT == 10 and math.isqrt(LIMIT * 10) == 10", True),  # the program's constant and its import
    ("assert next_id() == 1", True),
    ("assert next_id() == 2", True),  # one process for all the tests: state carries over, as before
    ("assert apply(lambda x: x, 1) == 1", True),  # a test's own function cannot cross: fails, and says why
]


def test_honest_programs_through_the_judge(namespaces_ok):
    sandbox = Sandbox(SandboxLimits(timeout_s=10))
    result = sandbox.run(HONEST, HONEST_STEPS)
    assert result.loaded and result.total == len(HONEST_STEPS)
    assert result.passed == len(HONEST_STEPS) - 1, result.test_errors
    assert list(result.test_errors) == [len(HONEST_STEPS) - 1]
    assert "function cannot be passed to the program" in result.test_errors[len(HONEST_STEPS) - 1]


def test_what_the_tests_take_from_the_program():
    tests = ("import math\nMETADATA = {}\n\ndef check(candidate):\n    xs = [1]\n"
             "    assert math.fabs(poly(xs, candidate(xs))) < 1e-6\n    assert all(helper(x) for x in xs)\n",
             "check(find_zero)")
    assert free_names(tests) == ("find_zero", "helper", "poly")  # not math, check, METADATA, xs, all, abs
    assert free_names(("assert add(1, 2) == 3\nbig = list(range(3))\nassert add(*big) == 3",)) == ("add",)
    assert free_names(("assert (",)) == ()  # not Python: the judge reports the SyntaxError


def test_a_name_the_setup_defines_is_the_setups(namespaces_ok):
    """The trusted setup code (e.g. HumanEval's `poly`) wins over the program's definition in the judge."""
    sandbox = Sandbox(SandboxLimits(timeout_s=5))
    setup = "def helper(x):\n    return x + 1\n"
    program = "def helper(x):\n    return 0\ndef f(x):\n    return helper(x)\n"
    steps = [("assert helper(1) == 2", True), ("assert f(1) == 0", True)]
    assert sandbox.run(program, steps, setup).passed == 2


# ----------------------------------------------------------------------------------------- wire format
def decode(text: str):
    return sandbox_child.make_decoder(lambda n: ("handle", n))(text.encode())


def exact_builtins_only(value) -> bool:
    kinds = (type(None), bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset)
    if type(value) not in kinds:
        return False
    if type(value) in (list, tuple, set, frozenset):
        return all(exact_builtins_only(v) for v in value)
    if type(value) is dict:
        return all(exact_builtins_only(k) and exact_builtins_only(v) for k, v in value.items())
    return True


def test_program_values_cross_as_exact_builtins():
    class Int(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    encoder = sandbox_child.ProgramEncoder()
    values = [0, -1, 10**400, 1.5, float("inf"), -0.0, "a\u00e9\n\x00\ud800", b"\xff", None, True, [], (1,),
              {"k": [1, (2, {3})]}, {(1, 2): frozenset({b"x"})}, 2 + 3j, bytearray(b"ab"), [[[]]], {1: None}]
    for value in values:
        decoded = decode(encoder.encode(value))
        assert decoded == value and type(decoded) is type(value) and exact_builtins_only(decoded), value
    assert decode(encoder.encode(Int(-7))) == -7 and type(decode(encoder.encode(Int(-7)))) is int
    assert decode(encoder.encode([object(), Int(2)])) == [("handle", 1), 2]
    nan = decode(encoder.encode(float("nan")))
    assert nan != nan


@pytest.mark.parametrize("text", ['{"t": 1}', '{"x": []}', '{"t": [], "s": []}', '{"d": [[1]]}', '{"d": [[[1], 2]]}',
                                  '{"h": "1"}', '{"h": 0}', '{"c": [1, "2"]}', '[1] [2]', "nope", '{"s": [[1]]}',
                                  '"\\ud800', "[" * 100_000 + "]" * 100_000])
def test_malformed_program_data_is_refused(text):
    with pytest.raises((ValueError, TypeError, RecursionError, SystemError)):
        decode(text)


def test_frames_are_checked():
    read_fd, write_fd = os.pipe()
    try:
        channel = sandbox_child.Channel(read_fd, write_fd)
        channel.send(b"hello")
        channel.send(b"x" * 30_000)  # the pipe's buffer holds both: nothing reads yet
        assert channel.receive() == b"hello" and channel.receive() == b"x" * 30_000
        os.write(write_fd, b"0000000zjunk")
        with pytest.raises(ValueError, match="malformed frame header"):
            channel.receive()
    finally:
        os.close(read_fd)
        os.close(write_fd)
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"fffffffff")
    os.close(write_fd)
    with pytest.raises(ValueError, match="over the limit"):
        sandbox_child.Channel(read_fd, -1).receive()
    os.close(read_fd)


def test_test_data_for_the_program_keeps_its_types():
    blob, refs = sandbox_child.pack(((1, [2], {3: b"4"}, {5}), {"k": 1.5}))
    assert not refs and sandbox_child.marshal.loads(blob) == ((1, [2], {3: b"4"}, {5}), {"k": 1.5})
    with pytest.raises(TypeError, match="cannot be passed to the program"):
        sandbox_child.pack(((object(),), {}))


# ----------------------------------------------------------------------------------------- hostile programs
@pytest.mark.parametrize("program", ["while True:\n    pass", "import time\ntime.sleep(3600)",
                                     "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass"])
def test_a_program_that_never_ends_is_killed_at_the_timeout(strict, program):
    start = time.perf_counter()
    result = strict.run(program + DEFINE_F, F_STEPS)
    elapsed = time.perf_counter() - start
    assert result.timed_out and result.passed == 0 and result.returncode == 128 + signal.SIGKILL
    assert 1.5 <= elapsed < 3.5


def test_a_hanging_test_keeps_the_results_before_it(strict):
    result = strict.run("def f(x):\n    while x:\n        pass\n    return 0\n",
                        [("assert f(0) == 0", True), ("assert f(1) == 0", True), ("assert f(0) == 0", True)])
    assert result.timed_out and (result.passed, result.total) == (1, 3)


def test_a_fork_loop_is_stopped_and_leaves_no_process(strict):
    uid = DEFAULT_UID_BASE + 999_001
    program = textwrap.dedent("""
        import os, resource, time
        soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
        assert 0 < soft <= 64, f"no process limit ({soft}): refusing to fork"
        for _ in range(64):  # bounded: even unlimited, this is 64 sleeping processes
            if os.fork() == 0:
                time.sleep(30)
                os._exit(0)
    """)
    result = strict.run(program + DEFINE_F, F_STEPS, uid=uid)
    assert result.passed == 0 and result.error.startswith("BlockingIOError"), result.error
    assert processes_of(uid) == []  # the children died with the PID namespace


def test_a_huge_allocation_fails_at_once(strict):
    program = textwrap.dedent("""
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        assert 0 < soft <= 2**31, f"no memory limit ({soft}): refusing to allocate 10 GiB"
        data = bytearray(10 * 2**30)
    """)
    result = strict.run(program + DEFINE_F, F_STEPS)
    assert result.passed == 0 and result.error.startswith("MemoryError") and not result.timed_out
    assert result.duration_s < 1.5


def test_the_memory_limit_is_the_configured_one(namespaces_ok):
    if not namespaces_ok:
        pytest.skip("namespaces mode needs root on Linux")
    small = Sandbox(SandboxLimits(timeout_s=5, memory_mb=128), isolation="namespaces")
    result = small.run("data = bytearray(256 * 2**20)" + DEFINE_F, F_STEPS)  # 256 MiB > 128 MiB: refused
    assert result.error.startswith("MemoryError") and result.passed == 0
    assert small.run("data = bytearray(32 * 2**20)" + DEFINE_F, F_STEPS).passed == 1


def test_output_past_the_file_size_limit_fails(namespaces_ok):
    if not namespaces_ok:
        pytest.skip("namespaces mode needs root on Linux")
    sandbox = Sandbox(SandboxLimits(timeout_s=5, max_file_mb=1), isolation="namespaces")
    result = sandbox.run("while True:\n    print('x' * 1000)" + DEFINE_F, F_STEPS)
    # Python ignores SIGXFSZ, so the write past RLIMIT_FSIZE raises instead of killing the process.
    assert result.passed == 0 and not result.timed_out and "File too large" in result.error


def test_writes_outside_the_scratch_dir_fail(strict):
    tag = uuid.uuid4().hex
    targets = {"tmp": f"/tmp/gainrl_escape_{tag}", "shm": f"/dev/shm/gainrl_escape_{tag}",
               "var_tmp": f"/var/tmp/gainrl_escape_{tag}", "repo": str(REPO / f"gainrl_escape_{tag}")}
    for name, path in targets.items():
        result = strict.run(f"open({path!r}, 'w').write('x')" + DEFINE_F, F_STEPS)
        assert result.passed == 0 and "Read-only file system" in result.error, (name, result.error)
        assert not os.path.exists(path), name
    # The scratch dir's parent (where the sandbox keeps its result file): also refused.
    escape = f"import os\nopen(os.path.join(os.getcwd(), '..', 'escape_{tag}'), 'w').write('x')"
    assert strict.run(escape + DEFINE_F, F_STEPS).passed == 0
    # ...while the scratch dir itself is writable (and removed afterwards).
    inside = "import os\nos.makedirs('a/b')\nopen('a/b/f.txt', 'w').write('ok')\nos.chmod('a', 0)" + DEFINE_F
    assert strict.run(inside, F_STEPS).passed == 1


def test_the_scratch_dir_is_a_small_private_tmpfs(strict):
    program = textwrap.dedent("""
        import os
        assert os.statvfs('.').f_blocks * os.statvfs('.').f_frsize == 64 * 2**20
        chunk = b'x' * 2**20
        for i in range(5):  # 5 x 16 MiB (each file at the RLIMIT_FSIZE cap) > 64 MiB
            with open(f'f{i}', 'wb') as f:
                for _ in range(16):
                    f.write(chunk)
    """)
    result = strict.run(program + DEFINE_F, F_STEPS)
    assert result.passed == 0 and "No space left on device" in result.error, result.error


def test_the_scratch_dir_is_removed(namespaces_ok, tmp_path):
    sandbox = Sandbox(SandboxLimits(timeout_s=1), isolation="auto", scratch_root=str(tmp_path))
    sandbox.run("open('f', 'w').write('x')\nimport os\nos.mkdir('d')\nos.chmod('d', 0)" + DEFINE_F, F_STEPS)
    sandbox.run("while True:\n    pass", F_STEPS)
    assert list(tmp_path.iterdir()) == []


def test_no_network_not_even_the_hosts_localhost(strict):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    try:
        for address in (("127.0.0.1", port), ("1.1.1.1", 53)):
            program = f"import socket\nsocket.create_connection({address!r}, timeout=1)" + DEFINE_F
            result = strict.run(program, F_STEPS)
            assert result.passed == 0 and "unreachable" in result.error, result.error
        with pytest.raises(socket.timeout):
            server.accept()  # nothing ever connected
    finally:
        server.close()


def test_killing_the_parent_or_anything_else_harms_nobody(strict):
    canary = subprocess.Popen(["sleep", "60"])
    try:
        program = textwrap.dedent(f"""
            import os, signal
            assert os.getpid() == 1 and os.getuid() != 0  # guard: only ever signal from a fresh PID namespace
            os.kill(os.getppid(), signal.SIGKILL)  # getppid() is 0: its process group = itself + the root launcher
            try:
                os.kill(-1, signal.SIGKILL)  # every process it may signal
            except ProcessLookupError:
                pass
            os.kill({canary.pid}, signal.SIGKILL)  # the machine's processes: not even visible
            os.kill({os.getpid()}, signal.SIGKILL)  # the training process
        """)
        result = strict.run(program + DEFINE_F, F_STEPS)
        assert result.passed == 0 and result.error.startswith("ProcessLookupError"), result.error
        assert canary.poll() is None  # the canary and this test process are alive
        hang = strict.run("import os, time\nos.kill(os.getppid(), 9)\ntime.sleep(60)" + DEFINE_F, F_STEPS)
        assert hang.timed_out and hang.passed == 0
    finally:
        canary.kill()
        canary.wait()


# ----------------------------------------------------------------------------------------- rlimits mode
def test_rlimits_mode_basics():
    sandbox = Sandbox(SandboxLimits(timeout_s=10, cpu_s=2), isolation="rlimits")  # a loaded CI machine: no timeouts
    ok = sandbox.run("import os, resource\nassert resource.getrlimit(resource.RLIMIT_AS)[0] == 2**30" + DEFINE_F,
                     F_STEPS)
    assert ok.isolation == "rlimits" and ok.passed == 1
    blocked = sandbox.run("import socket\nsocket.socket()" + DEFINE_F, F_STEPS)  # the Python-level guard
    assert blocked.passed == 0 and blocked.error.startswith("PermissionError")
    looped = Sandbox(SandboxLimits(timeout_s=1), isolation="rlimits").run("while True:\n    pass" + DEFINE_F, F_STEPS)
    assert looped.timed_out and looped.passed == 0


DRIVER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, sys.argv[1])
    from gainrl_pl.rewards.sandbox import Sandbox, SandboxLimits
    sandbox = Sandbox(SandboxLimits(timeout_s=2), isolation="auto")
    define_f, steps = "\\ndef f():\\n    return 1\\n", [("assert f() == 1", True)]
    programs = {
        "ok": "",
        "fork": "import os, resource, time\\nassert 0 < resource.getrlimit(resource.RLIMIT_NPROC)[0] <= 64\\n"
                "for _ in range(64):\\n    if os.fork() == 0:\\n        time.sleep(30)\\n        os._exit(0)\\n",
        "kill_parent": "import os, time\\nos.kill(os.getppid(), 9)\\ntime.sleep(30)\\n",
        "socket": "import socket\\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\\n",
        "scratch_parent": "import os\\nopen(os.path.join(os.getcwd(), '..', 'x'), 'w').write('x')\\n",
        "memory": "import resource\\nassert 0 < resource.getrlimit(resource.RLIMIT_AS)[0] <= 2**31\\n"
                  "data = bytearray(10 * 2**30)\\n",
    }
    out = {}
    for name, program in programs.items():
        r = sandbox.run(program + define_f, steps)
        out[name] = {"passed": r.passed, "isolation": r.isolation, "error": r.error}
    print(json.dumps({"uid": os.getuid(), "results": out}))
""")


def test_rlimits_mode_as_an_unprivileged_user():
    """The fallback as a non-root user would see it: the system Python, run as `nobody`."""
    python = "/usr/bin/python3"
    if os.geteuid() != 0 or not os.access(python, os.X_OK):
        pytest.skip("needs root (to become nobody) and a system /usr/bin/python3")
    version = subprocess.run([python, "-c", "import sys; print(sys.version_info >= (3, 10))"],
                             capture_output=True, text=True).stdout.strip()
    if version != "True":
        pytest.skip("the system Python is older than 3.10")
    proc = subprocess.run([python, "-I", "-c", DRIVER, str(REPO)], user=65534, group=65534, extra_groups=[],
                          env={"PATH": "/usr/bin:/bin"}, cwd="/", capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and "Permission denied" in proc.stderr:
        pytest.skip(f"nobody cannot read the repository: {proc.stderr[-200:]}")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    results = report["results"]
    assert report["uid"] == 65534 and {r["isolation"] for r in results.values()} == {"rlimits"}
    assert results["ok"]["passed"] == 1
    for name in ("fork", "kill_parent", "socket", "scratch_parent", "memory"):
        assert results[name]["passed"] == 0, (name, results[name])
    assert results["fork"]["error"].startswith("BlockingIOError")
    assert results["socket"]["error"].startswith("PermissionError")
    assert results["memory"]["error"].startswith("MemoryError")


# ----------------------------------------------------------------------------------------- options
def test_command_prefix_wraps_the_interpreter(tmp_path):
    # `env VAR=1 python ...` stands in for a real wrapper such as `bwrap ... --`; {scratch} is substituted.
    sandbox = Sandbox(SandboxLimits(timeout_s=5), isolation="rlimits", scratch_root=str(tmp_path),
                      command_prefix=["env", "GAINRL_WRAPPED=yes", "GAINRL_SCRATCH={scratch}"])
    program = ("import os\nassert os.environ['GAINRL_WRAPPED'] == 'yes'\n"
               "assert os.path.dirname(os.getcwd()) == os.environ['GAINRL_SCRATCH']" + DEFINE_F)
    assert sandbox.run(program, F_STEPS).passed == 1
    broken = Sandbox(SandboxLimits(timeout_s=5), command_prefix=["/nonexistent-wrapper"])
    with pytest.raises(FileNotFoundError):  # a misconfiguration raises; it is not scored 0
        broken.run(DEFINE_F, F_STEPS)
    failing = Sandbox(SandboxLimits(timeout_s=5), command_prefix=["false"]).run(DEFINE_F, F_STEPS)
    assert failing.passed == 0 and "before running the program" in failing.error
    # A wrapper that never reads its stdin (the job is bigger than a pipe buffer) still ends at the timeout.
    stuck = Sandbox(SandboxLimits(timeout_s=1), command_prefix=["sh", "-c", "sleep 60", "wrapper"])
    result = stuck.run("x = " + repr("a" * 300_000) + DEFINE_F, F_STEPS)
    assert result.timed_out and result.duration_s < 2.5


def test_bubblewrap_prefix_when_installed(tmp_path):
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        pytest.skip("bubblewrap (bwrap) is not installed")
    sandbox = Sandbox(SandboxLimits(timeout_s=2), command_prefix=[bwrap, *BUBBLEWRAP_PREFIX[1:]])
    escape = f"/tmp/gainrl_escape_{uuid.uuid4().hex}"
    probe = "import socket\nassert [n for _, n in socket.if_nameindex()] == ['lo']" + DEFINE_F
    result = sandbox.run(probe, F_STEPS)
    assert result.passed == 1 and result.isolation == "rlimits", (result.error, result.output)
    sandbox.run(f"open({escape!r}, 'w').write('x')", [])  # lands in bwrap's private /tmp
    assert not os.path.exists(escape)
    assert sandbox.run("while True:\n    pass", F_STEPS).timed_out


def test_another_interpreter_gets_the_launcher_as_source(tmp_path):
    """The launcher's code goes precompiled to this interpreter; any other `python_executable` (a container's
    python3) gets its source, which every Python >= 3.10 can run."""
    other = tmp_path / "python-other"
    other.symlink_to(sys.executable)
    sandbox = Sandbox(SandboxLimits(timeout_s=5), python_executable=str(other))
    result = sandbox.run("def add(a, b):\n    return a + b\n", [("assert add(1, 2) == 3", True), ("assert add(1, 1) == 3", True)])
    assert (result.passed, result.total, result.loaded) == (1, 2, True), result


def test_site_packages_are_opt_in():
    pytest.importorskip("numpy")
    program = "import numpy\nassert numpy.arange(4).sum() == 6" + DEFINE_F
    assert Sandbox(SandboxLimits(timeout_s=5)).run(program, F_STEPS).error.startswith("ModuleNotFoundError")
    assert Sandbox(SandboxLimits(timeout_s=10), site_packages=True).run(program, F_STEPS).passed == 1


def test_settings_are_validated():
    with pytest.raises(ValueError, match="isolation"):
        Sandbox(isolation="docker")
    with pytest.raises(TypeError, match="command_prefix"):
        Sandbox(command_prefix="bwrap --")
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=0)
    with pytest.raises(ValueError, match="uid_base"):  # programs' and judges' uids must fit below 2**32 - 1
        Sandbox(uid_base=2**32 - 10)
    assert SandboxLimits(timeout_s=2.5).child_limits()["cpu_s"] == 4
    assert sys.executable  # the default interpreter is this one
