"""Execution reward for code tasks: run each completion's program against its sample's tests, sandboxed.

    reward = passed test cases / test cases        (or 1/0 with all_or_nothing=True)

Tests come in two styles, told apart by whether the test code defines `check`:
- assert lists (MBPP style): every top-level `assert` is one test case, run separately in the program's
  namespace, so a partly correct program earns the fraction it passes; other top-level statements
  (imports, helpers) run in order as set-up;
- HumanEval style: the test code defines `check(candidate)`; `check(<entry_point>)` is one test case,
  all or nothing.

Each program runs in its own sandboxed process (`gainrl_pl.rewards.sandbox`), and its tests in another one, the
judge, which calls into the program and decides every verdict itself: a program cannot report a test as
passed, patch the tests' builtins or hand them an object that equals everything (docs/sandbox.md,
"Verdicts"). Many programs run at once on a bounded thread pool, so one infinite loop costs one worker one
timeout, not the batch.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from gainrl_pl.rewards.sandbox import DEFAULT_UID_BASE, Sandbox, SandboxLimits, SandboxResult, free_names

# ```python / ```py / ```python3 (any case), then the code up to a closing fence or the end of the text:
# a completion cut off by max_new_tokens inside its block still yields the code it has.
_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3", "py3"}


def extract_program(completion: Any) -> str:
    """The program in a completion: the last fenced ```python block, else the last fenced block of any
    language, else the whole text.

    Args:
        completion: A string, or a chat message / message list (TRL's conversational format; the last
            message's content is used).
    """
    text = _completion_text(completion)
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE_RE.finditer(text)]
    python_blocks = [code for tag, code in blocks if tag in _PYTHON_TAGS]
    if python_blocks:
        return python_blocks[-1]
    if blocks:
        return blocks[-1][1]
    return text


def _completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, (list, tuple)):
        return _completion_text(completion[-1]) if completion else ""
    return "" if completion is None else str(completion)


@dataclass(frozen=True)
class TestPlan:
    """A sample's tests as sandbox steps.

    Attributes:
        steps: (source, counted) pairs run in order after the program; counted steps are test cases.
        style: `asserts` (each assert a case), `check` (HumanEval: one case), or `script` (no asserts and
            no `check`: the whole test code is one case that passes if it runs without an exception).
        program_names: The global names the tests take from the program: the names they read but never
            bind, builtins excluded, plus the entry point (even when it shadows a builtin).
    """

    steps: tuple[tuple[str, bool], ...]
    style: str
    program_names: tuple[str, ...] = ()

    @property
    def num_cases(self) -> int:
        """How many test cases (counted steps) there are."""
        return sum(counted for _, counted in self.steps)


def parse_tests(tests: str | Sequence[str], entry_point: str | None = None) -> TestPlan:
    """Turn a sample's test code into sandbox steps (see the module docstring for the two styles).

    Args:
        tests: Python test code, or a list of snippets (MBPP's `test_list`), joined by newlines.
        entry_point: The function under test; required when the tests define `check(candidate)`.

    Raises:
        ValueError: the test code is empty or not valid Python, or `check` tests without an entry point:
            a data problem, reported rather than scored 0 for every completion.
    """
    source = tests if isinstance(tests, str) else "\n".join(tests)
    return _parse_tests(source, entry_point or None)


@lru_cache(maxsize=4096)  # the same tests come back G times per prompt and once per round
def _parse_tests(source: str, entry_point: str | None) -> TestPlan:
    plan = _plan_steps(source, entry_point)
    names = set(free_names(tuple(step for step, _ in plan.steps)))
    if entry_point:
        names.add(entry_point)
    return TestPlan(plan.steps, plan.style, tuple(sorted(names)))


def _plan_steps(source: str, entry_point: str | None) -> TestPlan:
    if not source.strip():
        raise ValueError("empty tests: every code sample needs test code (asserts or a check function)")
    try:
        module = ast.parse(source)
    except SyntaxError as err:
        raise ValueError(f"the tests are not valid Python ({err.msg}, line {err.lineno}): {source[:200]!r}") from err
    if any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "check"
           for node in module.body):
        if not entry_point:
            raise ValueError("the tests define check(candidate) but the sample has no entry_point to pass to it")
        if not entry_point.isidentifier():
            raise ValueError(f"entry_point={entry_point!r} is not a Python identifier")
        return TestPlan(((source, False), (f"check({entry_point})", True)), "check")
    lines = source.splitlines(keepends=True)
    steps: list[tuple[str, bool]] = []
    for node in module.body:
        # Slice whole lines (not ast.get_source_segment): keeps decorators and the exact text.
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        snippet = "".join(lines[start:node.end_lineno])
        counted = isinstance(node, ast.Assert)
        if not counted and steps and not steps[-1][1]:  # merge consecutive set-up statements into one step
            steps[-1] = (steps[-1][0] + snippet, False)
        else:
            steps.append((snippet, counted))
    if not any(counted for _, counted in steps):
        return TestPlan(((source, True),), "script")
    return TestPlan(tuple(steps), "asserts")


def _column(columns: dict, name: str, n: int) -> list:
    values = columns.get(name)
    if values is None:
        return [None] * n
    if isinstance(values, (str, bytes)) or len(values) != n:
        raise ValueError(f"column {name!r} must be a list with one value per completion ({n}), "
                         f"got {type(values).__name__} of length {len(values)}")
    return list(values)


class CodeExecutionReward:
    """Reward = fraction of a sample's test cases the completion's program passes, run in a sandbox.

    Instances are reward functions with TRL's signature, `reward(prompts, completions, **columns)`.
    Columns used: `tests` (test code: asserts, or a HumanEval `check(candidate)`; a list of snippets is
    joined), falling back to `answer` (where the data pipeline puts a preset's answer field); optional
    `entry_point` (the function `check` receives) and `setup_code` (trusted code run before the program,
    e.g. the imports a HumanEval prompt shows).

    Args:
        timeout_s: Wall-clock limit per program (start-up, program and all its tests).
        memory_mb: Address-space limit per program (RLIMIT_AS), MiB.
        cpu_s: CPU-time limit per program (RLIMIT_CPU); `None` = ceil(timeout_s) + 1.
        max_processes: RLIMIT_NPROC for the program (see `SandboxLimits.max_processes`).
        max_workers: Programs run at once; `None` = the CPUs this process may use. More workers than
            cores make CPU-bound programs share cores and hit `timeout_s` sooner.
        all_or_nothing: Reward 1 only when every test case passes, else 0.
        isolation: `auto`, `namespaces` or `rlimits` (see `gainrl_pl.rewards.sandbox.Sandbox` and docs/sandbox.md).
        command_prefix: argv run before the interpreter, to use a stronger sandbox (bubblewrap, a
            container); `{scratch}` is replaced by the run's scratch directory. See docs/sandbox.md.
        python_executable: Interpreter for the programs; `None` = the training process's own.
        scratch_root: Directory for the per-run scratch directories; `None` = the system temp directory.
        uid_base: First unprivileged uid used in namespaces mode.
        site_packages: Let programs import installed packages; default: the standard library only.
        name: The reward's `__name__` (its name in logs: `reward/<name>/mean`).
    """

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 1024, cpu_s: int | None = None,
                 max_processes: int = 8, max_workers: int | None = None, all_or_nothing: bool = False,
                 isolation: str = "auto", command_prefix: list[str] | None = None,
                 python_executable: str | None = None, scratch_root: str | None = None,
                 uid_base: int = DEFAULT_UID_BASE, site_packages: bool = False,
                 name: str = "code_execution_reward") -> None:
        if max_workers is not None and max_workers < 1:
            raise ValueError(f"max_workers={max_workers} must be >= 1 (or None)")
        limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb, cpu_s=cpu_s, max_processes=max_processes)
        self.sandbox = Sandbox(limits, isolation=isolation, command_prefix=command_prefix,
                               python_executable=python_executable, scratch_root=scratch_root, uid_base=uid_base,
                               site_packages=site_packages)
        if max_workers is None:
            max_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.max_workers = max_workers
        self.all_or_nothing = all_or_nothing
        self.__name__ = name
        # Callers that name a reward by `f"{fn.__module__}.{fn.__qualname__}"` (as for functions) get the class.
        self.__qualname__ = type(self).__qualname__

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        """One reward per completion (see the class docstring for the columns)."""
        return [self.score(r) for r in self.run(completions, **columns)]

    def score(self, result: SandboxResult | None) -> float:
        """The reward of one run: passed fraction, or 1/0 with `all_or_nothing`; 0 for no run."""
        if result is None or result.total == 0:
            return 0.0
        if self.all_or_nothing:
            return float(result.passed == result.total)
        return result.passed / result.total

    def run(self, completions: list, **columns) -> list[SandboxResult | None]:
        """Run every completion against its tests; the full results (errors, output, timing) per sample.

        `None` marks a completion with no program (empty or whitespace only): nothing is run for it.

        Raises:
            ValueError: a missing tests column, a column of the wrong length, or unusable test code.
        """
        n = len(completions)
        tests = columns.get("tests") if columns.get("tests") is not None else columns.get("answer")
        if tests is None:
            raise ValueError("code_execution_reward needs a `tests` column (or `answer` holding the tests)")
        tests = _column({"tests": tests}, "tests", n)
        entry_points = _column(columns, "entry_point", n)
        setups = _column(columns, "setup_code", n)
        jobs = []
        for i in range(n):
            if tests[i] is None:
                raise ValueError(f"sample {i} has no tests")
            jobs.append((extract_program(completions[i]), parse_tests(tests[i], entry_points[i]), setups[i] or ""))
        results: list[SandboxResult | None] = [None] * n
        todo = [i for i, (program, _, _) in enumerate(jobs) if program.strip()]
        if not todo:
            return results
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(todo)),
                                thread_name_prefix="code-reward") as pool:
            futures = {i: pool.submit(self.sandbox.run, jobs[i][0], list(jobs[i][1].steps), jobs[i][2],
                                      program_names=jobs[i][1].program_names)
                       for i in todo}
            for i, future in futures.items():
                results[i] = future.result()
        return results


code_execution_reward = CodeExecutionReward()
"""The default code reward (5 s, 1 GiB per program); use as `rewards: [gainrl_pl.rewards.code.code_execution_reward]`."""
