"""Reward functions with TRL's signature, math answer checking, and batch reward validation.

A reward function is `fn(prompts, completions, **columns) -> list[float | None]`, exactly as in TRL's
`GRPOTrainer`: `columns` holds the dataset fields of each sample as lists (e.g. `answer=[...]`), and `None`
means "this reward does not apply to this sample". Completions are strings; chat-formatted completions
(a list of `{"role", "content"}` messages) are accepted by the built-ins, which read the content.

Answer checking goes through `math-verify` (gold first: `verify(gold, prediction)` is not symmetric),
behind a fast numeric path and hard caps, because sympy can take unbounded time on hostile inputs.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

RewardFunction = Callable[..., Sequence[float | None]]

MAX_ANSWER_CHARS = 512
"""Answers (gold or predicted) longer than this are not checked: `answers_match` returns False at once."""
MAX_ANSWER_NESTING = 10
"""Bracket nesting deeper than this is not checked: math-verify's LaTeX parsing time grows exponentially with
brace depth (measured: 0.1 s at depth 4, 1 s at 12, 11 s at 16); real answers rarely pass depth 4."""
DEFAULT_TIMEOUT_SECONDS = 2.0
"""Wall-clock budget of one `answers_match` call that reaches math-verify."""


# --------------------------------------------------------------------------------------- extraction
def completion_text(completion: Any) -> str:
    """The text of a completion: a string as is; a chat message or message list -> the (last) content.

    Args:
        completion: A string, a `{"role": ..., "content": ...}` dict, or a list of such dicts (TRL's
            conversational format). Content given as a list of parts keeps the `text` parts.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content", "")
        if isinstance(content, list):  # multimodal-style parts: [{"type": "text", "text": ...}, ...]
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return "" if content is None else str(content)
    if isinstance(completion, (list, tuple)):
        return completion_text(completion[-1]) if completion else ""
    return str(completion)


_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _box_content(text: str, start: int) -> str | None:
    """Argument of a box macro whose name ends at `start`: `{...}` balanced, or `\\boxed 5` form."""
    i = start
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        if i == start:  # `\boxed5` is not valid LaTeX for a box
            return None
        # `\boxed 42$`: LaTeX boxes one token; like common MATH graders, take the run up to space or `$`.
        match = re.match(r"[^\s$]+", text[i:])
        return match.group(0) if match else None
    depth = 0
    j = i
    while j < len(text):
        ch = text[j]
        if ch == "\\":  # `\{` and `\}` are literal braces, not grouping
            j += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None  # unbalanced: the answer was cut off (e.g. by the length limit)


def extract_boxed(text: str) -> str | None:
    """Content of the LAST `\\boxed{...}` (or `\\fbox{...}`) in `text`, with balanced braces.

    The last box is taken because models often box intermediate results before the final one. If that
    last box is unbalanced (cut off), the result is None: an earlier box is not the final answer.
    `\\boxed 5` (no braces) gives the run of characters up to the next space or `$`.

    Args:
        text: A completion or solution.

    Returns:
        The box content (may be empty), or None when there is no usable final box.
    """
    last = None
    for last in _BOX_RE.finditer(text):  # noqa: B007 - only the last match is wanted; linear in len(text)
        pass
    return None if last is None else _box_content(text, last.end())


def extract_gsm8k_answer(solution: str) -> str | None:
    """GSM8K's final answer: the text after the last `####`, commas removed (`#### 1,234` -> `1234`).

    Args:
        solution: A GSM8K solution string.

    Returns:
        The stripped answer, or None when there is no `####` or nothing after it.
    """
    if "####" not in solution:
        return None
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return answer or None


# a number: optional sign, thousands-grouped or plain digits, optional decimals, optional `/denominator`
_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def last_number(text: str) -> str | None:
    """The last number in `text` (`-3`, `1,234.5`, `3/4`, `.5`), thousands separators removed.

    Args:
        text: Any text.

    Returns:
        The number as a string without commas, or None when there is none.
    """
    last = None
    for last in _NUMBER_RE.finditer(text):  # noqa: B007 - only the last match is wanted
        pass
    return None if last is None else last.group(0).replace(",", "")


def extract_prediction(completion: Any) -> str | None:
    """The answer a completion gives: its last `\\boxed{}` if it has one, else its last number.

    A completion that boxes something is judged only on the box (it chose its final answer); the last
    number is the fallback for models that answer in plain text ("... so she has 18 apples.").
    """
    text = completion_text(completion)
    if _BOX_RE.search(text):
        return extract_boxed(text)
    return last_number(text)


def gold_answer(answer: Any) -> str | None:
    """The gold answer from a dataset's `answer` field: after `####` (GSM8K), inside `\\boxed{}` (MATH
    solutions), else the field itself. None for a missing or empty answer."""
    if answer is None:
        return None
    text = str(answer).strip()
    if "####" in text:
        return extract_gsm8k_answer(text)
    if _BOX_RE.search(text):
        return extract_boxed(text)
    return text or None


# --------------------------------------------------------------------------------------- checking
def _strip_math(text: str) -> str:
    text = text.strip()
    while len(text) >= 2 and text[0] == "$" and text[-1] == "$":  # `$...$` / `$$...$$` math mode
        text = text[1:-1].strip()
    return text


_PLAIN_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_GROUPED_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_RATIO_RE = re.compile(r"([+-]?\d+)/(\d+)")
_FRAC_RE = re.compile(r"([+-]?)\\[dt]?frac\{(\d+)\}\{(\d+)\}")


def _plain_number(text: str) -> Fraction | None:
    """Exact value of a plain number (`1,234`, `$18`, `50\\%`, `3.0`, `3/4`, `\\frac{3}{4}`), else None."""
    s = _strip_math(text)
    for junk in ("\\$", "$", "\\%", "%", "\\!", "\\,", " "):
        s = s.replace(junk, "")
    if _GROUPED_RE.fullmatch(s):
        s = s.replace(",", "")
    if _PLAIN_RE.fullmatch(s):
        return Fraction(s.rstrip(".") or "0")
    if m := _RATIO_RE.fullmatch(s):
        return Fraction(int(m.group(1)), int(m.group(2))) if int(m.group(2)) else None
    if m := _FRAC_RE.fullmatch(s):
        value = Fraction(int(m.group(2)), int(m.group(3))) if int(m.group(3)) else None
        return -value if value is not None and m.group(1) == "-" else value
    return None


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "})]":
            depth = max(0, depth - 1)
    return deepest


def _math_verify_match(gold: str, prediction: str) -> bool:
    """math-verify on two answer strings, with its own (signal-based) timeouts off: callers bound the time."""
    from math_verify import parse, verify

    # Boxing both sides makes math-verify take the whole string as the answer instead of guessing.
    gold_parsed = parse(f"\\boxed{{{_strip_math(gold)}}}", parsing_timeout=None)
    pred_parsed = parse(f"\\boxed{{{_strip_math(prediction)}}}", parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


class _DeadlineExceeded(BaseException):
    """Raised by our SIGALRM handler. A BaseException, so math-verify's `except Exception` does not eat it."""


def _match_with_alarm(gold: str, prediction: str, seconds: float) -> bool | None:
    """Main thread: one interval timer bounds parsing and comparison together (sub-second precision).

    Returns None when signals cannot be used here (e.g. a sub-interpreter), so the caller falls back.
    """
    armed = [True]

    def on_alarm(signum, frame):
        if armed[0]:
            raise _DeadlineExceeded

    try:
        previous = signal.signal(signal.SIGALRM, on_alarm)
    except ValueError:
        return None
    outer_delay, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        return _math_verify_match(gold, prediction)
    except _DeadlineExceeded:
        return False
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay:  # someone else's timer was running: give back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, outer_delay - (time.monotonic() - started)))


class _MatchWorker:
    """A child Python process that checks answers, for calls from threads other than the main one.

    signal.alarm only works in the main thread, and a thread cannot be killed, so off the main thread the
    comparison runs in this child (which uses the alarm in its own main thread) and the caller waits at
    most the budget plus a grace second; a child that overruns is killed and replaced on the next call.
    A plain subprocess, not multiprocessing, so the user's `__main__` is never re-imported.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-c", "from gainrl_pl.rewards import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        if self._read_line(proc, timeout=120.0) != "ready":  # first start imports torch and sympy
            proc.kill()
            raise RuntimeError("the answer-checking worker process did not start")
        return proc

    @staticmethod
    def _read_line(proc: subprocess.Popen, timeout: float) -> str | None:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        return proc.stdout.readline().strip() if ready else None

    def match(self, gold: str, prediction: str, seconds: float) -> bool:
        with self.lock:
            request = json.dumps([gold, prediction, seconds]) + "\n"
            try:
                if self.proc is None or self.proc.poll() is not None:
                    self.proc = self._start()
                self.proc.stdin.write(request)
                self.proc.stdin.flush()
            except BrokenPipeError:  # the child died since the last call: start a fresh one
                self.proc = self._start()
                self.proc.stdin.write(request)
                self.proc.stdin.flush()
            line = self._read_line(self.proc, timeout=seconds + 1.0)
            if line is None:  # overran (stuck in C code): kill it, a fresh one starts next time
                self.proc.kill()
                self.proc.wait()
                self.proc = None
                return False
            return line == "1"


_WORKER = _MatchWorker()


def _serve() -> None:
    """Entry point of the `_MatchWorker` child: one JSON request per line in, `1`/`0` per line out."""
    print("ready", flush=True)
    for line in sys.stdin:
        gold, prediction, seconds = json.loads(line)
        print("1" if answers_match(gold, prediction, timeout_seconds=seconds) else "0", flush=True)


def answers_match(
    gold: str,
    prediction_text: str,
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    max_chars: int = MAX_ANSWER_CHARS,
) -> bool:
    """Whether a predicted answer equals the gold answer (numbers, fractions, LaTeX, sets, equations).

    Steps, cheapest first:
    1. Empty, longer than `max_chars`, or nested deeper than `MAX_ANSWER_NESTING` -> False at once (a
       10k-digit number or a megabyte of `\\frac` is never handed to sympy).
    2. Both sides plain numbers (`1,234`, `$18`, `50%`, `3.0`, `3/4`, `\\frac{3}{4}`) -> compared exactly
       with fractions (integers must be equal; non-integers may differ by 1e-6 relative, in the spirit
       of math-verify's 6-digit float rounding) without calling math-verify, which is slow.
    3. Otherwise math-verify `parse` both, `verify(gold, prediction)` (gold first), within
       `timeout_seconds` of wall clock for the whole check. In the main thread the budget is enforced
       by a SIGALRM interval timer (what math-verify itself uses, which is why it only works there); in
       any other thread the check runs in a helper child process that is killed if it overruns.
       Exceeding the budget counts as no match.

    Args:
        gold: The reference answer (already extracted, e.g. by `gold_answer`).
        prediction_text: The predicted answer (e.g. by `extract_prediction`); `$...$` is allowed.
        timeout_seconds: Wall-clock budget for the math-verify step (> 0).
        max_chars: Length cap for each side.

    Returns:
        True when they match.
    """
    if timeout_seconds <= 0:
        raise ValueError(f"timeout_seconds={timeout_seconds} must be > 0")
    gold, prediction = (gold or "").strip(), (prediction_text or "").strip()
    if not gold or not prediction or len(gold) > max_chars or len(prediction) > max_chars:
        return False
    if max(_nesting_depth(gold), _nesting_depth(prediction)) > MAX_ANSWER_NESTING:
        return False
    gold_value, pred_value = _plain_number(gold), _plain_number(prediction)
    if gold_value is not None and pred_value is not None:
        if gold_value == pred_value:
            return True
        if gold_value.denominator == 1 and pred_value.denominator == 1:
            return False
        return abs(gold_value - pred_value) <= Fraction(1, 10**6) * max(1, abs(gold_value))
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        result = _match_with_alarm(gold, prediction, timeout_seconds)
        if result is not None:
            return result
    return _WORKER.match(gold, prediction, timeout_seconds)


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its timeouts are off; here they are off on purpose (see answers_match)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


# --------------------------------------------------------------------------------------- built-in rewards
def accuracy_reward(
    prompts: list, completions: list, answer: list | None = None, **columns
) -> list[float | None]:
    """1.0 when the completion's answer matches the gold answer, else 0.0 (TRL signature).

    The prediction is the completion's last `\\boxed{}` if it has any box, else its last number
    (`extract_prediction`); the gold comes from the `answer` column via `gold_answer` (GSM8K `####`,
    MATH `\\boxed{}`, or a bare answer). A sample with no gold answer gets None (not applicable).

    Args:
        prompts: The prompts (unused).
        completions: Completion strings or chat messages.
        answer: The dataset's `answer` column, one entry per completion.
        **columns: Other dataset columns (ignored).
    """
    if answer is None:
        raise ValueError(f"accuracy_reward needs the dataset column `answer`; got columns {sorted(columns)}")
    if len(answer) != len(completions):
        raise ValueError(f"accuracy_reward: {len(answer)} answers for {len(completions)} completions")
    rewards: list[float | None] = []
    for completion, reference in zip(completions, answer, strict=True):
        gold = gold_answer(reference)
        if gold is None:
            rewards.append(None)
            continue
        prediction = extract_prediction(completion)
        rewards.append(1.0 if prediction is not None and answers_match(gold, prediction) else 0.0)
    return rewards


class FormatReward:
    """1.0 when a completion has the expected answer format, else 0.0 (TRL signature).

    Default: exactly one `\\boxed{...}`/`\\fbox{...}` and it is balanced (one final answer, not cut
    off). With `pattern`: 1.0 when `re.search(pattern, text, re.DOTALL)` matches; anchor it with `^...$`
    for a whole-completion format such as `^<think>.*</think>.*\\\\boxed\\{.*\\}$`.

    Args:
        pattern: Optional regular expression replacing the default box check.
    """

    __name__ = "format_reward"

    def __init__(self, pattern: str | None = None) -> None:
        self.pattern = None if pattern is None else re.compile(pattern, re.DOTALL)

    def __call__(self, prompts: list, completions: list, **columns) -> list[float]:
        """Score each completion: 1.0 for the expected format, 0.0 otherwise."""
        scores = []
        for completion in completions:
            text = completion_text(completion)
            if self.pattern is not None:
                ok = self.pattern.search(text) is not None
            else:
                ok = len(_BOX_RE.findall(text)) == 1 and extract_boxed(text) is not None
            scores.append(1.0 if ok else 0.0)
        return scores


class LengthPenalty:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) as a reward in [-scale, 0].

    With L = max_length, C = cache_length and n the completion length: 0 when n <= L - C, then a linear
    ramp ((L - C) - n) / C * scale down to -scale at n = L, and -scale beyond L. It discourages running
    into the generation limit without punishing every long answer.

    Args:
        max_length: L, where the penalty reaches its full value (characters or tokens, see `unit`).
        cache_length: C, the width of the soft ramp before `max_length` (0 = a hard step at L).
        scale: The full penalty (the reward is -scale at and beyond L).
        unit: `chars` (length of the completion text) or `tokens` (TRL's `completion_ids` column when
            the caller passes it, else `tokenizer`).
        tokenizer: For `unit="tokens"` without `completion_ids`: an object with `encode(text)`, a callable
            text -> token list, or a path/name loaded with `gainrl_pl.models.load_tokenizer`.
    """

    __name__ = "length_penalty"

    def __init__(
        self,
        max_length: int = 1024,
        cache_length: int = 256,
        scale: float = 1.0,
        unit: str = "chars",
        tokenizer: Any = None,
    ) -> None:
        if unit not in ("chars", "tokens"):
            raise ValueError(f"unit={unit!r} is not one of chars, tokens")
        if max_length < 1 or not 0 <= cache_length <= max_length:
            raise ValueError(
                f"need max_length >= 1 and 0 <= cache_length <= max_length, got "
                f"max_length={max_length}, cache_length={cache_length}"
            )
        self.max_length, self.cache_length, self.scale, self.unit = max_length, cache_length, scale, unit
        self.tokenizer = tokenizer

    def _length(self, text: str, ids: Any) -> int:
        if self.unit == "chars":
            return len(text)
        if ids is not None:
            return len(ids)
        if self.tokenizer is None:
            raise ValueError(
                "length_penalty with unit='tokens' needs a `completion_ids` column or a tokenizer"
            )
        if isinstance(self.tokenizer, str):
            from gainrl_pl.models import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer)
        encode = getattr(self.tokenizer, "encode", self.tokenizer)
        return len(encode(text))

    def __call__(
        self, prompts: list, completions: list, completion_ids: list | None = None, **columns
    ) -> list[float]:
        """Penalty per completion (0 for short ones, down to -scale for overlong ones)."""
        soft_start = self.max_length - self.cache_length
        out = []
        for i, completion in enumerate(completions):
            n = self._length(
                completion_text(completion), None if completion_ids is None else completion_ids[i]
            )
            if n <= soft_start:
                out.append(0.0)
            elif n <= self.max_length:
                out.append((soft_start - n) / self.cache_length * self.scale)
            else:
                out.append(-float(self.scale))
        return out


format_reward = FormatReward()
length_penalty = LengthPenalty()

REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "length_penalty": length_penalty,
}
"""Built-in reward functions by name (each also answers to its `__name__`, e.g. `accuracy_reward`)."""


def get_reward_function(spec: str | RewardFunction) -> RewardFunction:
    """Resolve a reward function from a built-in name, a dotted import path, or a callable.

    Args:
        spec: A callable (returned as is; a class is instantiated with no arguments), a name from
            `REWARD_FUNCTIONS` (or its `__name__`), or an import path `package.module.function` (also
            `package.module:function`); an imported class is instantiated with no arguments.

    Raises:
        ValueError: unknown name or a path that does not import, with the built-in names listed.
        TypeError: the resolved object is not callable.
    """
    if isinstance(spec, type):
        return spec()
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(
            f"a reward function must be a name, a dotted path or a callable, got {type(spec).__name__}"
        )
    if spec in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[spec]
    for fn in REWARD_FUNCTIONS.values():
        if getattr(fn, "__name__", None) == spec:
            return fn
    known = ", ".join(REWARD_FUNCTIONS)
    module_name, sep, attr = spec.replace(":", ".").rpartition(".")
    if not sep:
        raise ValueError(
            f"unknown reward function {spec!r}: use one of {known} or a dotted path `package.module.function`"
        )
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import reward function {spec!r} ({err}); built-in names: {known}") from err
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise TypeError(f"reward function {spec!r} resolved to a non-callable {type(obj).__name__}")
    return obj


# --------------------------------------------------------------------------------------- batch validation
class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned a wrong-length list or a non-finite/non-numeric value.

    Attributes:
        function: Name of the reward function.
        index: Index of the offending sample in the batch (None when the fault is batch-wide).
        value: The offending value (None when the function raised).
    """

    def __init__(self, message: str, function: str, index: int | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.function, self.index, self.value = function, index, value


@dataclass
class RewardOutput:
    """Rewards of one batch.

    Attributes:
        per_function: `(N, F)` float32; NaN where a function returned None (not applicable).
        total: `(N,)` weighted sum over functions, NaN counted as 0 (TRL's nansum).
        names: The F function names, in column order.
        errors: Per function, the samples whose value was replaced by 0 (`on_error="zero"`).
        not_applicable: Per function, the samples it returned None for.
    """

    per_function: torch.Tensor
    total: torch.Tensor
    names: list[str]
    errors: dict[str, int] = field(default_factory=dict)
    not_applicable: dict[str, int] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> RewardOutput:
        """A copy with the tensors on `device`."""
        return RewardOutput(
            self.per_function.to(device),
            self.total.to(device),
            self.names,
            dict(self.errors),
            dict(self.not_applicable),
        )


def _function_name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _as_reward(value: Any) -> float | None:
    """A finite float, None for None, or raise ValueError for anything else (NaN, inf, strings, ...)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (str, bytes)):  # float("1") would pass, but a string reward is a bug upstream
        raise ValueError("not a number")
    try:
        number = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError("not a number") from err
    if not math.isfinite(number):
        raise ValueError("not finite")
    return number


class RewardComputer:
    """Calls each reward function on a batch, validates what comes back, and combines the results.

    Args:
        funcs: Reward functions (or names/dotted paths, resolved with `get_reward_function`).
        weights: One weight per function (`None` = all 1.0), as TRL's `reward_weights`.
        on_error: `raise`: a function that raises, returns a list of the wrong length, or returns NaN/inf
            or a non-number stops with `RewardFunctionError` naming the function and the sample;
            `zero`: those values count as 0 and are counted in `RewardOutput.errors`.
    """

    def __init__(
        self,
        funcs: Sequence[str | RewardFunction],
        weights: Sequence[float] | None = None,
        on_error: str = "raise",
    ) -> None:
        if on_error not in ("raise", "zero"):
            raise ValueError(f"on_error={on_error!r} is not one of raise, zero")
        self.funcs = [get_reward_function(f) for f in funcs]
        if not self.funcs:
            raise ValueError("RewardComputer needs at least one reward function")
        if weights is None:
            weights = [1.0] * len(self.funcs)
        if len(weights) != len(self.funcs):
            raise ValueError(
                f"{len(weights)} reward weights for {len(self.funcs)} reward functions "
                f"({', '.join(_function_name(f) for f in self.funcs)})"
            )
        if not all(math.isfinite(float(w)) for w in weights):
            raise ValueError(f"reward weights must be finite, got {list(weights)}")
        self.weights = torch.tensor([float(w) for w in weights], dtype=torch.float32)
        self.on_error = on_error
        names = [_function_name(f) for f in self.funcs]
        # duplicate names (the same function twice) get a suffix so their columns and counters stay apart
        self.names = [
            n if names[:i].count(n) == 0 else f"{n}_{names[:i].count(n) + 1}" for i, n in enumerate(names)
        ]

    def __call__(self, prompts: list, completions: list, **columns) -> RewardOutput:
        """Rewards for `completions` (one prompt per completion, columns repeated likewise).

        Returns:
            A `RewardOutput` with the `(N, F)` per-function rewards, the weighted `(N,)` total and counters.
        """
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions: repeat each prompt per completion")
        table = torch.full((n, len(self.funcs)), float("nan"), dtype=torch.float32)
        errors = dict.fromkeys(self.names, 0)
        not_applicable = dict.fromkeys(self.names, 0)
        for j, (fn, name) in enumerate(zip(self.funcs, self.names, strict=True)):
            values, bad = self._call_one(fn, name, prompts, completions, columns)
            for i, value in enumerate(values):
                table[i, j] = float("nan") if value is None else value
            errors[name] = bad
            not_applicable[name] = sum(v is None for v in values)
        total = torch.nansum(table * self.weights, dim=1)
        return RewardOutput(table, total, list(self.names), errors, not_applicable)

    def _fail(
        self,
        name: str,
        message: str,
        index: int | None = None,
        value: Any = None,
        cause: BaseException | None = None,
    ) -> None:
        err = RewardFunctionError(
            f"reward function {name!r}: {message}. Fix the function, or set "
            "on_error='zero' to count such values as 0.",
            name,
            index,
            value,
        )
        raise err from cause

    def _call_one(self, fn, name, prompts, completions, columns) -> tuple[list[float | None], int]:
        """One function on the batch -> (values with None kept, number of samples zeroed)."""
        try:
            raw = fn(prompts=prompts, completions=completions, **columns)
        except Exception as batch_err:
            return self._locate_failure(fn, name, prompts, completions, columns, batch_err)
        return self._validate(name, raw, completions)

    def _validate(self, name, raw, completions, offset: int = 0) -> tuple[list[float | None], int]:
        """Check a function's output for `completions` (sample indices start at `offset` in the batch)."""
        n = len(completions)
        if isinstance(raw, torch.Tensor):
            raw = raw.tolist()
        if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)) or len(raw) != n:
            got = f"{len(raw)} values" if isinstance(raw, Sequence) else f"a {type(raw).__name__}"
            if self.on_error == "raise":
                self._fail(name, f"returned {got} for {n} completions (one reward or None per completion)")
            return [0.0] * n, n
        values: list[float | None] = []
        bad = 0
        for i, value in enumerate(raw):
            try:
                values.append(_as_reward(value))
            except ValueError:
                if self.on_error == "raise":
                    self._fail(
                        name,
                        f"returned {value!r} for sample {offset + i} (completion "
                        f"{completion_text(completions[i])[:80]!r}); rewards must be finite numbers or None",
                        index=offset + i,
                        value=value,
                    )
                values.append(0.0)
                bad += 1
        return values, bad

    def _locate_failure(self, fn, name, prompts, completions, columns, batch_err: Exception):
        """The batch call raised: call sample by sample to name the failing samples (and zero only those).

        This costs N more calls, but only on the error path, and turns "something in the batch" into the
        sample index (and completion) a user can debug.
        """
        n = len(completions)
        values: list[float | None] = []
        bad = 0
        for i in range(n):
            one = {
                k: v[i : i + 1] if isinstance(v, Sequence) and len(v) == n else v for k, v in columns.items()
            }
            try:
                out = fn(prompts=prompts[i : i + 1], completions=completions[i : i + 1], **one)
            except Exception as err:
                if self.on_error == "raise":
                    self._fail(
                        name,
                        f"raised {type(err).__name__}: {err} on sample {i} (completion "
                        f"{completion_text(completions[i])[:80]!r})",
                        index=i,
                        cause=err,
                    )
                values.append(0.0)
                bad += 1
                continue
            one_value, one_bad = self._validate(name, out, completions[i : i + 1], offset=i)
            values += one_value
            bad += one_bad
        if bad == 0:  # only the whole batch fails: the fault is not tied to one sample
            if self.on_error == "raise":
                self._fail(
                    name,
                    f"raised {type(batch_err).__name__}: {batch_err} on the batch of {n} "
                    "(each sample alone succeeds)",
                    cause=batch_err,
                )
            return [0.0] * n, n
        return values, bad
