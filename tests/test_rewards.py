"""Answer extraction, math-verify checking (and its time bounds), built-in rewards, reward validation."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gainrl_pl.rewards import (
    ANSWER_EXTRACTIONS,
    REWARD_FUNCTIONS,
    AccuracyReward,
    ChatInputs,
    FormatReward,
    LengthPenalty,
    RewardComputer,
    RewardFunctionError,
    accuracy_reward,
    answers_match,
    as_chat_completions,
    completion_text,
    extract_boxed,
    extract_gsm8k_answer,
    extract_prediction,
    format_reward,
    get_reward_function,
    gold_answer,
    last_number,
    wants_chat,
)


@pytest.fixture(scope="module", autouse=True)
def warm_math_verify():
    """The first math-verify call imports sympy and its LaTeX parser; keep that out of the timed tests."""
    answers_match("x+1", "1+x")


def timed(fn, *args, **kwargs):
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start


# ----------------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
        (r"first \boxed{1}, then \boxed{2}", "2"),  # several boxes: the last is the final answer
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces do not close the box
        (r"\fbox{7}", "7"),
        (r"$\boxed 5$", "5"),  # brace-less form: up to space or `$`
        (r"\boxed {3}", "3"),
        (r"\boxed{}", ""),
        (r"\boxed{1} and \boxed{2", None),  # the final box is cut off: no answer, not the earlier one
        (r"\boxed{\frac{1}{2}", None),
        (r"\boxedfoo{3}", None),  # another macro, not a box
        ("no box here 12", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_gsm8k_last_number_and_prediction():
    assert extract_gsm8k_answer("She pays 3 * 400 = 1,200 dollars.\n#### 1,200") == "1200"
    assert extract_gsm8k_answer("#### ") is None and extract_gsm8k_answer("no marker") is None
    assert last_number("costs $1,234.50 and then 7 more, -3 left") == "-3"
    assert last_number("we get 1,234,567 apples") == "1234567"
    assert last_number("the ratio is 3/4.") == "3/4"
    assert last_number("no digits") is None
    assert extract_prediction(r"try 5 \boxed{6} then 7") == "6"  # a box wins over later numbers
    assert extract_prediction(r"try 5 \boxed{6} then 7", "flexible") == "6"  # under both rules
    assert extract_prediction("so the answer is 18.", "flexible") == "18"
    assert extract_prediction("so the answer is 18.") is None  # the default is the paper's rule: boxed only
    assert gold_answer("blah\n#### 72") == "72" and gold_answer(r"so $\boxed{\pi}$") == r"\pi"
    assert gold_answer(3) == "3" and gold_answer(None) is None and gold_answer("  ") is None


def test_chat_formatted_completions():
    assert completion_text([{"role": "assistant", "content": "hi 3"}]) == "hi 3"
    assert (
        completion_text({"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "image"}]})
        == "a"
    )
    assert completion_text([]) == ""


# ----------------------------------------------------------------------------------------------- checking
@pytest.mark.parametrize(
    "gold, prediction, expected",
    [
        (r"\frac{1}{2}", "0.5", True),
        ("0.5", r"\frac{1}{2}", True),
        ("1,234", "1234", True),
        ("1234", "1,234.0", True),
        ("18", r"\$18", True),
        ("50", r"50\%", True),
        ("3/4", "0.75", True),
        ("0.333333", "1/3", True),  # non-integers within 1e-6 relative (math-verify rounds to 6 digits)
        ("1234", "1235", False),
        ("0.5", "0.6", False),
        (r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2", True),  # these go through math-verify
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \frac{\pi}{2})", True),
        ("x+1", "1+x", True),
        (r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}", False),
        ("2", "", False),
        ("", "2", False),
    ],
)
def test_answers_match(gold, prediction, expected):
    assert answers_match(gold, prediction) is expected


@pytest.mark.parametrize(
    "prediction",
    [
        "9" * 10_000,  # a 10k-digit number: over the length cap
        "\\boxed{" * 5_000,  # unbalanced boxes
        "\\frac{1}{" * 2_000 + "2" + "}" * 2_000,  # huge nested fraction
        "{" * 9 + "1" + "}" * 9 + "{" * 11 + "1" + "}" * 11,  # short but deeply nested (sympy time explodes)
    ],
)
def test_adversarial_answers_return_fast(prediction):
    result, seconds = timed(answers_match, "2", prediction)
    assert result is False and seconds < 2.0


def test_adversarial_completions_return_fast():
    huge = "the answer is " + "1" * 1_000_000  # a megabyte completion
    result, seconds = timed(
        accuracy_reward, ["p"] * 3, [huge, "\\boxed{" + "x" * 1_000_000, "9" * 10_000], answer=["1", "1", "1"]
    )
    assert result == [0.0, 0.0, 0.0] and seconds < 2.0


def test_deadline_bounds_math_verify_in_main_thread():
    tower = "^".join(["9"] * 30)  # 9^9^...: short, shallow, and sympy would compute for a very long time
    result, seconds = timed(answers_match, "2", tower, timeout_seconds=0.5)
    assert result is False and seconds < 1.5


def test_off_main_thread_uses_a_bounded_worker():
    results = []

    def run():
        results.append(answers_match(r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2"))  # starts the worker (imports)
        results.append(timed(answers_match, "2", "^".join(["9"] * 30), timeout_seconds=0.5))
        results.append(answers_match("x+1", "1+x"))  # a fresh worker after the overrun, or the same one

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=120)
    assert results[0] is True
    assert results[1][0] is False and results[1][1] < 2.5
    assert results[2] is True


def test_the_answer_worker_is_reaped_at_exit():
    """A process that checked answers off the main thread exits without leaving or warning about its worker."""
    program = textwrap.dedent("""
        import threading
        from gainrl_pl.rewards.answers import _WORKER, answers_match
        thread = threading.Thread(target=answers_match, args=("x+1", "1+x"))
        thread.start()
        thread.join()
        print(_WORKER.proc.pid, flush=True)
    """)
    done = subprocess.run([sys.executable, "-X", "dev", "-c", program], capture_output=True, text=True,
                          timeout=180, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert "still running" not in done.stderr, done.stderr
    worker = int(done.stdout.split()[-1])
    with pytest.raises(ProcessLookupError):
        os.kill(worker, 0)  # gone, and reaped (a zombie would still answer signal 0)


# ----------------------------------------------------------------------------------------------- rewards
def test_accuracy_reward():
    completions = [
        r"so \boxed{18}",
        "the answer is 1,234.",
        [{"role": "assistant", "content": r"\boxed{\frac12}"}],
        r"\boxed{17}",
        "no answer",
        "anything",
    ]
    answers = ["#### 18", "1234", r"\frac{1}{2}", "18", "5", None]
    flexible = AccuracyReward("flexible")
    assert flexible(["p"] * 6, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 0.0, None]
    # boxed (the default): the unboxed "1,234" is no answer
    assert accuracy_reward(["p"] * 6, completions, answer=answers) == [1.0, 0.0, 1.0, 0.0, 0.0, None]
    with pytest.raises(ValueError, match="needs the dataset column `answer`.*question"):
        accuracy_reward(["p"], ["x"], question=["q"])


def test_format_reward():
    assert format_reward(["p"] * 4, [r"\boxed{1}", r"\boxed{1} \boxed{2}", r"\boxed{1", "none"]) == [
        1.0,
        0.0,
        0.0,
        0.0,
    ]
    think = FormatReward(r"^<think>.*</think>.*\\boxed\{.*\}$")
    assert think(["p"] * 2, ["<think>a\nb</think> \\boxed{3}", "\\boxed{3}"]) == [1.0, 0.0]


def test_length_penalty_dapo_shape():
    # L = 10, C = 4: no penalty up to 6, linear ramp (6 - n) / 4 to -1 at 10, then -1 (x scale 0.5)
    penalty = LengthPenalty(max_length=10, cache_length=4, scale=0.5)
    out = penalty([""] * 5, ["a" * n for n in (3, 6, 8, 10, 50)])
    assert out == pytest.approx([0.0, 0.0, -0.25, -0.5, -0.5])
    tokens = LengthPenalty(max_length=4, cache_length=2, unit="tokens", tokenizer=str.split)
    assert tokens(["p"] * 2, ["a b", "a b c"]) == pytest.approx([0.0, -0.5])
    assert tokens(["p"], ["ignored"], completion_ids=[[1, 2, 3, 4, 5]]) == [-1.0]  # TRL's column wins
    with pytest.raises(ValueError, match="completion_ids"):
        LengthPenalty(unit="tokens")(["p"], ["x"])
    with pytest.raises(ValueError, match="cache_length"):
        LengthPenalty(max_length=4, cache_length=5)


def test_registry_and_dotted_paths():
    assert get_reward_function("accuracy") is accuracy_reward
    assert get_reward_function("accuracy_reward") is accuracy_reward
    assert get_reward_function("gainrl_pl.rewards.accuracy_reward") is accuracy_reward
    assert isinstance(
        get_reward_function("gainrl_pl.rewards:LengthPenalty"), LengthPenalty
    )  # class -> instance
    assert set(REWARD_FUNCTIONS) == {"accuracy", "format", "length_penalty"}
    with pytest.raises(ValueError, match="unknown reward function 'acc'.*accuracy, format, length_penalty"):
        get_reward_function("acc")
    with pytest.raises(ValueError, match="cannot import reward function 'nopkg.mod.fn'"):
        get_reward_function("nopkg.mod.fn")
    with pytest.raises(TypeError, match="non-callable"):
        get_reward_function("gainrl_pl.rewards.MAX_ANSWER_CHARS")


# ----------------------------------------------------------------------------------------------- validation
def const(value, name):
    def fn(prompts, completions, **columns):
        return [value(i) if callable(value) else value for i in range(len(completions))]

    fn.__name__ = name
    return fn


def test_weighted_total_with_none_as_not_applicable():
    a = const(lambda i: float(i), "a")
    b = const(lambda i: None if i == 1 else 1.0, "b")
    out = RewardComputer([a, b], weights=[2.0, 0.5])(["p"] * 3, ["x", "y", "z"])
    # totals: 2 * [0, 1, 2] + 0.5 * [1, None -> 0, 1] = [0.5, 2, 4.5]
    torch.testing.assert_close(out.total, torch.tensor([0.5, 2.0, 4.5]))
    assert out.per_function.shape == (3, 2) and math.isnan(out.per_function[1, 1])
    assert (
        out.names == ["a", "b"] and out.not_applicable == {"a": 0, "b": 1} and out.errors == {"a": 0, "b": 0}
    )
    assert out.to("cpu").total.shape == (3,)


def test_weights_and_options_validated():
    with pytest.raises(ValueError, match="1 reward weights for 2 reward functions"):
        RewardComputer([const(1.0, "a"), const(1.0, "b")], weights=[1.0])
    with pytest.raises(ValueError, match="on_error='skip'"):
        RewardComputer([const(1.0, "a")], on_error="skip")
    with pytest.raises(ValueError, match="2 prompts for 3 completions"):
        RewardComputer([const(1.0, "a")])(["p"] * 2, ["x"] * 3)


def flaky(prompts, completions, **columns):
    """Raises on any batch holding the completion `boom`."""
    if "boom" in completions:
        raise KeyError("no such field")
    return [1.0] * len(completions)


@pytest.mark.parametrize(
    "bad, match",
    [
        (const(lambda i: float("nan") if i == 2 else 1.0, "nan_fn"), r"'nan_fn': returned nan for sample 2"),
        (const(lambda i: float("inf") if i == 0 else 1.0, "inf_fn"), r"'inf_fn': returned inf for sample 0"),
        (const(lambda i: "1" if i else "one", "str_fn"), r"'str_fn': returned 'one' for sample 0"),
        (lambda prompts, completions, **kw: [1.0], r"returned 1 values for 3 completions"),
        (flaky, r"'flaky': raised KeyError: 'no such field' on sample 1"),
    ],
)
def test_bad_rewards_raise_naming_function_and_sample(bad, match):
    good = const(1.0, "good")
    with pytest.raises(RewardFunctionError, match=match) as info:
        RewardComputer([good, bad])(["p"] * 3, ["x", "boom", "z"])
    assert info.value.function != "good"
    if isinstance(info.value.__cause__, KeyError):  # the original exception is chained
        assert info.value.index == 1


def test_on_error_zero_replaces_and_counts():
    nan_fn = const(lambda i: float("nan") if i == 2 else 1.0, "nan_fn")
    short = const(1.0, "short")
    short_fn = lambda prompts, completions, **kw: short(prompts, completions[:1])  # noqa: E731
    short_fn.__name__ = "short_fn"
    out = RewardComputer([nan_fn, short_fn, flaky], on_error="zero")(["p"] * 3, ["x", "boom", "z"])
    torch.testing.assert_close(
        out.per_function, torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    )
    assert out.errors == {"nan_fn": 1, "short_fn": 3, "flaky": 1}  # flaky: only the failing sample is zeroed
    torch.testing.assert_close(out.total, torch.tensor([2.0, 1.0, 1.0]))


def test_batch_only_failure_and_duplicate_names():
    def batch_only(prompts, completions, **columns):
        if len(completions) > 1:
            raise RuntimeError("needs a single sample")
        return [1.0]

    with pytest.raises(RewardFunctionError, match="on the batch of 2 .each sample alone succeeds"):
        RewardComputer([batch_only])(["p"] * 2, ["x", "y"])
    out = RewardComputer([batch_only, "accuracy", "accuracy"], on_error="zero")(
        ["p"] * 2, ["\\boxed{1}", "\\boxed{2}"], answer=["1", "1"]
    )
    assert (
        out.names == ["batch_only", "accuracy_reward", "accuracy_reward_2"] and out.errors["batch_only"] == 2
    )
    torch.testing.assert_close(out.total, torch.tensor([2.0, 0.0]))


# ----------------------------------------------------------------------------------------------- properties
@settings(max_examples=50, deadline=None)
@given(
    st.text(alphabet=st.characters(blacklist_characters="{}\\", blacklist_categories=("Cs",))),
    st.text(alphabet="abc 12{}", max_size=20).filter(lambda s: s.count("{") == s.count("}") == 0),
)
def test_boxed_round_trip(content, prefix):
    assert extract_boxed(f"{prefix} \\boxed{{{content}}}") == content
    assert extract_boxed(f"{prefix} \\boxed{{\\frac{{{content}}}{{2}}}}") == f"\\frac{{{content}}}{{2}}"


@settings(max_examples=50, deadline=None)
@given(st.integers(-(10**12), 10**12))
def test_thousands_separated_numbers_round_trip(n):
    assert last_number(f"total: {n:,} units") == str(n)
    assert answers_match(str(n), f"{n:,}")


# ----------------------------------------------------------------------------------------------- answer extraction rules
ISSUE_EXAMPLE = "Step 1: 7, step 2: 9"  # the last number is an intermediate step that equals the gold


@pytest.mark.parametrize(
    "text, boxed, flexible",
    [
        (ISSUE_EXAMPLE, None, "9"),
        (r"Step 1: 7, so \boxed{7}. Step 2: 9", "7", "7"),  # a box is the chosen answer under both rules
        (r"\boxed{1} then \boxed{9", None, None),  # a cut-off last box is no answer, not the earlier one
        ("no number at all", None, None),
        ([{"role": "assistant", "content": "it is 9"}], None, "9"),  # TRL's chat format
    ],
)
def test_extraction_rules_say_what_they_accept(text, boxed, flexible):
    assert ANSWER_EXTRACTIONS == ("boxed", "flexible")
    assert extract_prediction(text, "boxed") == boxed
    assert extract_prediction(text, "flexible") == flexible
    assert extract_prediction(text) == boxed  # boxed (the paper's rule) is the default


def test_the_issue_example_earns_nothing_under_boxed():
    assert AccuracyReward("boxed")(["p"], [ISSUE_EXAMPLE], answer=["9"]) == [0.0]
    assert AccuracyReward("flexible")(["p"], [ISSUE_EXAMPLE], answer=["9"]) == [1.0]
    assert accuracy_reward(["p"], [ISSUE_EXAMPLE], answer=["9"]) == [0.0]
    with pytest.raises(ValueError, match="answer_extraction='lenient'.*boxed, flexible"):
        extract_prediction("9", "lenient")
    with pytest.raises(ValueError, match="boxed, flexible"):
        AccuracyReward("lenient")


def test_the_run_option_reaches_the_built_in_accuracy_reward():
    """One option for training and validation: RewardComputer binds it into every built-in accuracy reward."""
    for spec in ("accuracy", "accuracy_reward", "gainrl_pl.rewards.functions.accuracy_reward", AccuracyReward):
        for extraction, expected in (("flexible", 1.0), ("boxed", 0.0)):
            computer = RewardComputer([spec], answer_extraction=extraction)
            assert computer(["p"], [ISSUE_EXAMPLE], answer=["9"]).total.tolist() == [expected], (spec, extraction)
            assert computer.funcs[0].extraction == extraction
    assert accuracy_reward.extraction is None  # the shared built-in itself is never changed
    # no run option: the function's own choice, else boxed
    assert RewardComputer([AccuracyReward("flexible")])(["p"], [ISSUE_EXAMPLE], answer=["9"]).total.tolist() == [1.0]
    assert RewardComputer(["accuracy"])(["p"], [ISSUE_EXAMPLE], answer=["9"]).total.tolist() == [0.0]
    with pytest.raises(ValueError, match="extraction='boxed' but the run says answer_extraction='flexible'"):
        RewardComputer([AccuracyReward("boxed")], answer_extraction="flexible")


# ----------------------------------------------------------------------------------------------- TRL's chat format
def trl_style_reward(completions, solution, **kwargs):
    """Written as TRL's own reward functions are: reads completion[0]["content"] and a `solution` column."""
    return [1.0 if c[0]["content"].strip().endswith(s) else 0.0 for c, s in zip(completions, solution, strict=True)]


def test_as_chat_completions_is_trls_format():
    assert as_chat_completions(["a", "b"]) == [[{"role": "assistant", "content": "a"}],
                                               [{"role": "assistant", "content": "b"}]]
    already = [[{"role": "assistant", "content": "a"}]]
    assert as_chat_completions(already) == already


def test_chat_view_goes_to_functions_when_the_data_is_conversational():
    seen = {}

    def spy(prompts, completions, **columns):
        seen["prompts"], seen["completions"] = prompts, completions
        return [0.0] * len(completions)

    chat_prompts = [[{"role": "user", "content": "What is 4 + 5?"}]] * 2
    texts = ["so 9", "so 8"]
    computer = RewardComputer([trl_style_reward, spy, "accuracy"], answer_extraction="flexible")
    out = computer(["<rendered>"] * 2, texts, ChatInputs(chat_prompts, from_data=True), solution=["9", "9"],
                   answer=["9", "9"])
    assert out.per_function[:, 0].tolist() == [1.0, 0.0]  # TRL-style function ran unchanged
    assert out.per_function[:, 2].tolist() == [1.0, 0.0]  # ours reads both formats
    assert seen["prompts"] == chat_prompts
    assert seen["completions"] == [[{"role": "assistant", "content": t}] for t in texts]

    # data given as text: TRL passes strings, and a chat-only function fails with a hint saying what to set
    with pytest.raises(RewardFunctionError, match="completion_format='conversational'"):
        computer(["<rendered>"] * 2, texts, ChatInputs(chat_prompts, from_data=False), solution=["9", "9"],
                 answer=["9", "9"])
    # ...which works: the run's option, or the function's own attribute
    forced = RewardComputer([trl_style_reward], completion_format="conversational")
    assert forced(["p"] * 2, texts, ChatInputs(chat_prompts), solution=["9", "9"]).total.tolist() == [1.0, 0.0]

    def asks(completions, solution, **kwargs):
        return trl_style_reward(completions, solution)

    asks.completion_format = "conversational"
    assert RewardComputer([asks])(["p"] * 2, texts, ChatInputs(chat_prompts), solution=["9", "9"]).total.tolist() == [
        1.0, 0.0]
    with pytest.raises(ValueError, match="no chat messages"):
        RewardComputer([asks])(["p"] * 2, texts, solution=["9", "9"])
    # text forced: strings even for a conversational dataset
    seen.clear()
    RewardComputer([spy], completion_format="text")(["p"] * 2, texts, ChatInputs(chat_prompts, from_data=True))
    assert seen["completions"] == texts and seen["prompts"] == ["p", "p"]
    with pytest.raises(ValueError, match="completion_format='chat'.*auto, text, conversational"):
        RewardComputer(["accuracy"], completion_format="chat")


def test_a_dataset_column_cannot_shadow_the_chat_view():
    # `chat` is positional-only in RewardComputer.__call__: a dataset column of that name is just a column
    got = {}

    def fn(prompts, completions, chat, **columns):
        got["chat"] = chat
        return [1.0] * len(completions)

    RewardComputer([fn])(["p"], ["x"], chat=["a column value"])
    assert got["chat"] == ["a column value"]


@pytest.mark.parametrize("attr, fmt, data, expected", [
    (None, "auto", True, True), (None, "auto", False, False), (None, "text", True, False),
    (None, "conversational", False, True), ("text", "conversational", True, False),
    ("conversational", "text", False, True),
])
def test_wants_chat_precedence(attr, fmt, data, expected):
    def fn(prompts, completions, **columns):
        return []

    if attr:
        fn.completion_format = attr
    assert wants_chat(fn, fmt, data) is expected
