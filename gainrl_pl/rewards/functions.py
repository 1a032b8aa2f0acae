"""Built-in reward functions with TRL's signature, and the registry that resolves reward names.

A reward function is `fn(prompts, completions, **columns) -> list[float | None]`, exactly as in TRL's
`GRPOTrainer`: `columns` holds the dataset fields of each sample as lists (e.g. `answer=[...]`), and `None`
means "this reward does not apply to this sample". Completions are strings, or TRL's conversational format
(a list holding one `{"role": "assistant", "content": ...}` message; see `RewardComputer`): the built-ins
accept both and read the content.

Import from `gainrl_pl.rewards.computer`, which re-exports everything here beside `RewardComputer`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import Any

from gainrl_pl.rewards.answers import (
    BOX_RE,
    DEFAULT_ANSWER_EXTRACTION,
    answers_match,
    check_answer_extraction,
    completion_text,
    extract_boxed,
    extract_prediction,
    gold_answer,
)

RewardFunction = Callable[..., Sequence[float | None]]
"""TRL's reward signature: `fn(prompts, completions, **columns) -> list[float | None]`."""


# --------------------------------------------------------------------------------------- built-in rewards
class AccuracyReward:
    """1.0 when the completion's answer matches the gold answer, else 0.0 (TRL signature).

    The prediction is read by `extract_prediction` under `extraction` (`boxed`: the last `\\boxed{}` only,
    the paper's rule; `flexible`: the last box, else the last number); the gold comes from the `answer`
    column via `gold_answer` (GSM8K `####`, MATH `\\boxed{}`, or a bare answer). A sample with no gold
    answer gets None (not applicable). Completions may be strings or TRL's chat messages.

    Args:
        extraction: `boxed` or `flexible`; `None` = not chosen here: `GRPOModule`'s `answer_extraction`
            (through `RewardComputer`) decides, and a direct call uses `DEFAULT_ANSWER_EXTRACTION` (`boxed`).
    """

    __name__ = "accuracy_reward"

    def __init__(self, extraction: str | None = None) -> None:
        self.extraction = None if extraction is None else check_answer_extraction(extraction)

    def with_extraction(self, extraction: str) -> AccuracyReward:
        """This reward with `extraction` filled in (itself if already so); a different explicit choice raises.

        Raises:
            ValueError: this reward was built with another extraction (two rules for one run).
        """
        check_answer_extraction(extraction)
        if self.extraction == extraction:
            return self
        if self.extraction is not None:
            raise ValueError(f"accuracy_reward was built with extraction={self.extraction!r} but the run says "
                             f"answer_extraction={extraction!r}; set one of them (the run's option also decides "
                             "validation)")
        return type(self)(extraction)

    def __call__(self, prompts: list, completions: list, answer: list | None = None, **columns) -> list[float | None]:
        """Score each completion against its gold answer: 1.0, 0.0, or None when there is no gold.

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
        extraction = self.extraction or DEFAULT_ANSWER_EXTRACTION
        rewards: list[float | None] = []
        for completion, reference in zip(completions, answer, strict=True):
            gold = gold_answer(reference)
            if gold is None:
                rewards.append(None)
                continue
            prediction = extract_prediction(completion, extraction)
            rewards.append(1.0 if prediction is not None and answers_match(gold, prediction) else 0.0)
        return rewards

    def __repr__(self) -> str:
        return f"AccuracyReward(extraction={self.extraction!r})"


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
                ok = len(BOX_RE.findall(text)) == 1 and extract_boxed(text) is not None
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


accuracy_reward = AccuracyReward()
"""The built-in accuracy reward (`accuracy`); its extraction is the run's `answer_extraction`, else `boxed`."""
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
