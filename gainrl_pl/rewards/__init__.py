"""Rewards: what a completion answers, what it earns, and the sandbox that runs model-written code.

- `answers`: answer extraction (last `\\boxed{}`, GSM8K `####`, last number) and math-verify checking.
- `functions`: the built-in reward functions with TRL's signature, and the registry of their names.
- `computer`: `RewardComputer`, which calls the functions of a batch, validates and weights what they return.
- `code`, `sandbox`, `sandbox_child`: the execution reward for code tasks and the process it runs in.

Nothing here knows about GAIN-RL; the names below are the import surface (`from gainrl_pl.rewards import ...`).
They are imported on first use, so that `gainrl_pl.rewards.sandbox` stays importable without torch (the
sandbox's fallback runs under the system Python).
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module (in this package) that defines it
_EXPORTS: dict[str, str] = {
    "ANSWER_EXTRACTIONS": "answers", "DEFAULT_ANSWER_EXTRACTION": "answers",
    "DEFAULT_TIMEOUT_SECONDS": "answers", "MAX_ANSWER_CHARS": "answers", "MAX_ANSWER_NESTING": "answers",
    "answers_match": "answers", "check_answer_extraction": "answers", "completion_text": "answers",
    "extract_boxed": "answers", "extract_gsm8k_answer": "answers", "extract_prediction": "answers",
    "gold_answer": "answers", "last_number": "answers",
    "COMPLETION_FORMATS": "computer", "ChatInputs": "computer", "RewardComputer": "computer",
    "RewardFunctionError": "computer", "RewardOutput": "computer", "as_chat_completions": "computer",
    "wants_chat": "computer",
    "REWARD_FUNCTIONS": "functions", "AccuracyReward": "functions", "FormatReward": "functions",
    "LengthPenalty": "functions", "RewardFunction": "functions", "accuracy_reward": "functions",
    "format_reward": "functions", "get_reward_function": "functions", "length_penalty": "functions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
