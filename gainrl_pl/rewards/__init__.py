"""Rewards: what a completion answers, what it earns, and the sandbox that runs model-written code.

- `answers`: answer extraction (last `\\boxed{}`, GSM8K `####`, last number) and math-verify checking.
- `functions`: the built-in reward functions with TRL's signature, and the registry of their names.
- `computer`: `RewardComputer`, which calls the functions of a batch, validates and weights what they return.
- `code`, `sandbox`, `sandbox_child`: the execution reward for code tasks and the process it runs in.

Nothing here knows about GAIN-RL; the names below are the import surface (`from gainrl_pl.rewards import ...`).
"""

from gainrl_pl.rewards.answers import (
    ANSWER_EXTRACTIONS,
    DEFAULT_ANSWER_EXTRACTION,
    DEFAULT_TIMEOUT_SECONDS,
    MAX_ANSWER_CHARS,
    MAX_ANSWER_NESTING,
    answers_match,
    check_answer_extraction,
    completion_text,
    extract_boxed,
    extract_gsm8k_answer,
    extract_prediction,
    gold_answer,
    last_number,
)
from gainrl_pl.rewards.computer import (
    COMPLETION_FORMATS,
    ChatInputs,
    RewardComputer,
    RewardFunctionError,
    RewardOutput,
    as_chat_completions,
    wants_chat,
)
from gainrl_pl.rewards.functions import (
    REWARD_FUNCTIONS,
    AccuracyReward,
    FormatReward,
    LengthPenalty,
    RewardFunction,
    accuracy_reward,
    format_reward,
    get_reward_function,
    length_penalty,
)

__all__ = [
    "ANSWER_EXTRACTIONS", "COMPLETION_FORMATS", "DEFAULT_ANSWER_EXTRACTION", "DEFAULT_TIMEOUT_SECONDS",
    "MAX_ANSWER_CHARS", "MAX_ANSWER_NESTING", "REWARD_FUNCTIONS", "AccuracyReward", "ChatInputs", "FormatReward",
    "LengthPenalty", "RewardComputer", "RewardFunction", "RewardFunctionError", "RewardOutput", "accuracy_reward",
    "answers_match", "as_chat_completions", "check_answer_extraction", "completion_text", "extract_boxed",
    "extract_gsm8k_answer", "extract_prediction", "format_reward", "get_reward_function", "gold_answer",
    "last_number", "length_penalty", "wants_chat",
]
