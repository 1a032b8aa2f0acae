"""Rewards of a batch: `RewardComputer` calls the reward functions, validates what they return, and combines it.

A reward function that raises, returns the wrong number of values, or returns NaN/inf/non-numbers is caught
here and either stops the run with `RewardFunctionError` naming the function and the sample, or counts the
value as 0 (`on_error="zero"`): a bad reward never reaches the advantages silently.

The import surface for rewards is the package, `gainrl_pl.rewards`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gainrl_pl.rewards.answers import (
    completion_text,
)
from gainrl_pl.rewards.functions import (
    AccuracyReward,
    RewardFunction,
    get_reward_function,
)


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


COMPLETION_FORMATS = ("auto", "text", "conversational")
"""How completions (and prompts) reach reward functions; see `RewardComputer`."""


@dataclass
class ChatInputs:
    """The conversational view of a batch's prompts: what TRL hands reward functions for chat datasets.

    Attributes:
        prompts: One message list (`[{"role": ..., "content": ...}, ...]`) per completion: the dataset's own
            messages for a conversational dataset, else the messages our prompt template rendered.
        from_data: The dataset's prompts were chat messages (TRL's conversational format); with
            `completion_format="auto"` this view then goes to every reward function, as in TRL.
    """

    prompts: list[list[dict[str, Any]]]
    from_data: bool = False


def as_chat_completions(completions: Sequence[Any]) -> list[list[dict[str, Any]]]:
    """TRL's conversational completions: each one a list holding one assistant message.

    Completions already in that form (a list of messages) are kept as they are.
    """
    return [c if isinstance(c, list) else [{"role": "assistant", "content": c}] for c in completions]


def wants_chat(fn: Any, completion_format: str, chat_data: bool) -> bool:
    """Whether `fn` gets the conversational view: its own `completion_format` attribute (`text` or
    `conversational`) if it has one, else the run's `completion_format` (`auto` = as the dataset is)."""
    asked = getattr(fn, "completion_format", None)
    if asked in ("text", "conversational"):
        return asked == "conversational"
    if completion_format == "auto":
        return chat_data
    return completion_format == "conversational"


_TEXT_HINT = (" It got plain-text completions; a function written for TRL's conversational format (reading "
              "`completion[0][\"content\"]`) needs completion_format='conversational' (or chat-message prompts "
              "in the dataset)")


class RewardComputer:
    """Calls each reward function on a batch, validates what comes back, and combines the results.

    What each function receives is TRL's contract: `fn(prompts=..., completions=..., **columns)`. In the text
    view prompts are the rendered prompt strings and completions strings; in the conversational view
    (TRL's format for chat datasets) prompts are message lists and each completion is
    `[{"role": "assistant", "content": text}]`. Which view a function gets: its own `completion_format`
    attribute (`"text"` or `"conversational"`) if it sets one, else `completion_format` here.

    Args:
        funcs: Reward functions (or names/dotted paths, resolved with `get_reward_function`).
        weights: One weight per function (`None` = all 1.0), as TRL's `reward_weights`.
        on_error: `raise`: a function that raises, returns a list of the wrong length, or returns NaN/inf
            or a non-number stops with `RewardFunctionError` naming the function and the sample;
            `zero`: those values count as 0 and are counted in `RewardOutput.errors`.
        answer_extraction: How the built-in accuracy reward reads answers (`boxed` or `flexible`, see
            `answer_check.ANSWER_EXTRACTIONS`); `None` leaves each `AccuracyReward` as built (`boxed` unless
            it was given another). Functions that are not ours extract as they do.
        completion_format: `auto` (conversational when the dataset's prompts are chat messages, as TRL
            decides), `text` or `conversational` (for every function that does not say itself).
    """

    def __init__(
        self,
        funcs: Sequence[str | RewardFunction],
        weights: Sequence[float] | None = None,
        on_error: str = "raise",
        answer_extraction: str | None = None,
        completion_format: str = "auto",
    ) -> None:
        if on_error not in ("raise", "zero"):
            raise ValueError(f"on_error={on_error!r} is not one of raise, zero")
        if completion_format not in COMPLETION_FORMATS:
            raise ValueError(f"completion_format={completion_format!r} is not one of {', '.join(COMPLETION_FORMATS)}")
        self.funcs = [get_reward_function(f) for f in funcs]
        if answer_extraction is not None:
            self.funcs = [f.with_extraction(answer_extraction) if isinstance(f, AccuracyReward) else f
                          for f in self.funcs]
        self.answer_extraction = answer_extraction
        self.completion_format = completion_format
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

    def __call__(self, prompts: list, completions: list, chat: ChatInputs | None = None, /,
                 **columns) -> RewardOutput:
        """Rewards for `completions` (one prompt per completion, columns repeated likewise).

        Args:
            prompts: The rendered prompt strings, one per completion.
            completions: Completion strings (or chat messages), one per completion.
            chat: The conversational view of the prompts (positional, so no dataset column can shadow it);
                without it every function gets the text view, and one that asks for chat messages fails.
            **columns: The dataset's other columns, one value per completion (e.g. `answer`).

        Returns:
            A `RewardOutput` with the `(N, F)` per-function rewards, the weighted `(N,)` total and counters.
        """
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions: repeat each prompt per completion")
        if chat is not None and len(chat.prompts) != n:
            raise ValueError(f"{len(chat.prompts)} chat prompts for {n} completions: one per completion")
        table = torch.full((n, len(self.funcs)), float("nan"), dtype=torch.float32)
        errors = dict.fromkeys(self.names, 0)
        not_applicable = dict.fromkeys(self.names, 0)
        chat_completions = None
        for j, (fn, name) in enumerate(zip(self.funcs, self.names, strict=True)):
            if wants_chat(fn, self.completion_format, chat is not None and chat.from_data):
                if chat is None:
                    raise ValueError(f"reward function {name!r} takes TRL's conversational format, but this batch "
                                     "has no chat messages for its prompts (GainRLDataModule batches carry them as "
                                     "`prompt_messages`)")
                chat_completions = chat_completions or as_chat_completions(completions)
                values, bad = self._call_one(fn, name, chat.prompts, chat_completions, columns, hint="")
            else:
                values, bad = self._call_one(fn, name, prompts, completions, columns, hint=_TEXT_HINT)
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

    def _call_one(self, fn, name, prompts, completions, columns, hint: str) -> tuple[list[float | None], int]:
        """One function on the batch -> (values with None kept, number of samples zeroed).

        `hint` is added to the message when the function raises a TypeError/KeyError/IndexError: the text
        view's hint says what to set when a function expected chat messages.
        """
        try:
            raw = fn(prompts=prompts, completions=completions, **columns)
        except Exception as batch_err:
            return self._locate_failure(fn, name, prompts, completions, columns, batch_err, hint)
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

    def _locate_failure(self, fn, name, prompts, completions, columns, batch_err: Exception, hint: str = ""):
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
                        f"{completion_text(completions[i])[:80]!r})"
                        + (hint if isinstance(err, (TypeError, KeyError, IndexError)) else ""),
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
                    "(each sample alone succeeds)"
                    + (hint if isinstance(batch_err, (TypeError, KeyError, IndexError)) else ""),
                    cause=batch_err,
                )
            return [0.0] * n, n
        return values, bad
