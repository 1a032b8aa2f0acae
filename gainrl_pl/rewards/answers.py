"""Answer extraction and checking: what a completion answers, what the gold answer is, whether they match.

Extraction is plain string work (last `\\boxed{}`, GSM8K `####`, last number), under a named rule
(`ANSWER_EXTRACTIONS`: `boxed`, the paper's, or `flexible`) that training rewards and evaluation share.
Checking goes through `math-verify` (gold first: `verify(gold, prediction)` is not symmetric), behind a fast
exact-number path and hard caps, because sympy can take unbounded time on hostile inputs; a wall-clock
budget bounds every call.

No torch and no Lightning here, so the answer-checking worker process (`_MatchWorker`) starts quickly.
The reward functions built on these live in `gainrl_pl.rewards.computer`, which re-exports every public name here.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

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


BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
"""A `\\boxed` or `\\fbox` macro (not `\\boxedfoo`); `FormatReward` counts these."""


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
    for last in BOX_RE.finditer(text):  # noqa: B007 - only the last match is wanted; linear in len(text)
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


ANSWER_EXTRACTIONS = ("boxed", "flexible")
"""How a completion's answer is read (`extract_prediction`):

- `boxed`: the last `\\boxed{}` only; a completion without one has no answer (scores 0). The paper's rule
  (spec section 6): the model must say which number is its final answer.
- `flexible`: the last `\\boxed{}` if there is one, else the last number in the text. Kinder to small models
  that answer in prose ("... so she has 18 apples."), but it also credits a completion whose last number
  is an intermediate step that happens to equal the gold ("Step 1: 7, step 2: 9" for gold 9).
"""
DEFAULT_ANSWER_EXTRACTION = "boxed"
"""What the built-in accuracy reward, `GRPOModule` and `gainrl-pl evaluate` use unless told otherwise."""


def check_answer_extraction(extraction: str) -> str:
    """`extraction` if it is one of `ANSWER_EXTRACTIONS`, else a ValueError naming the allowed values."""
    if extraction not in ANSWER_EXTRACTIONS:
        raise ValueError(f"answer_extraction={extraction!r} is not supported; allowed values: "
                         f"{', '.join(ANSWER_EXTRACTIONS)} (boxed = the last \\boxed{{}} only, the paper's rule; "
                         "flexible = the last \\boxed{} or else the last number)")
    return extraction


def extract_prediction(completion: Any, extraction: str = DEFAULT_ANSWER_EXTRACTION) -> str | None:
    """The answer a completion gives, read as `extraction` says (see `ANSWER_EXTRACTIONS`).

    Under both rules a completion that boxes something is judged only on its last box (it chose its
    final answer; a cut-off last box gives None). Without a box, `boxed` gives None and `flexible` the
    last number in the text.

    Args:
        completion: A string or chat message(s) (see `completion_text`).
        extraction: `boxed` (the paper's rule) or `flexible`.
    """
    check_answer_extraction(extraction)
    text = completion_text(completion)
    if BOX_RE.search(text):
        return extract_boxed(text)
    return last_number(text) if extraction == "flexible" else None


def gold_answer(answer: Any) -> str | None:
    """The gold answer from a dataset's `answer` field: after `####` (GSM8K), inside `\\boxed{}` (MATH
    solutions), else the field itself. None for a missing or empty answer."""
    if answer is None:
        return None
    text = str(answer).strip()
    if "####" in text:
        return extract_gsm8k_answer(text)
    if BOX_RE.search(text):
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
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-c", "from gainrl_pl.rewards.answers import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        if self._read_line(proc, timeout=120.0) != "ready":  # first start imports sympy
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

    def close(self) -> None:
        """End the child: EOF on its stdin ends its loop; one that does not exit within a second is killed."""
        with self.lock:
            proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
            proc.wait(timeout=1.0)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        proc.stdout.close()


_WORKER = _MatchWorker()
# The child would exit at EOF anyway when this process ends, but unreaped, and Python warns at exit that the
# subprocess "is still running" (pytest shows that warning at the end of every suite that checked answers).
atexit.register(_WORKER.close)


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
