"""Prompt presets and per-sample segments: prefix / question / suffix token ranges (spec section 2).

A prompt is rendered by the tokenizer's own chat template; the question's tokens are found from the
tokenizer's character offsets, never from hard-coded token counts (the reference code's fixed offset
of 110 tokens is exactly the defect this avoids). Template tokens around the question belong to the
prefix (`<|im_start|>user\\n`) and the suffix (`<|im_end|>\\n<|im_start|>assistant\\n`).
A question comes as text (rendered with a `PromptTemplate`: `build_prompt`) or as a conversation in TRL's
format (rendered as it is, the question being its last user turn: `build_chat_prompt`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

_QUESTION = "{question}"


@dataclass
class PromptTemplate:
    """How a question becomes chat messages: optional system prompt, few-shot turns, the user message."""

    system_prompt: str | None = None
    """System message; `None` sends none (the model's chat template may still add its default one)."""
    few_shot: list[tuple[str, str]] = field(default_factory=list)
    """Worked examples as (user, assistant) turns, placed before the question."""
    question_format: str = _QUESTION
    """The last user message; `{question}` (exactly once) is replaced by the question. Other braces are
    literal, so `\\boxed{}` needs no escaping."""

    def __post_init__(self) -> None:
        if self.question_format.count(_QUESTION) != 1:
            raise ValueError(f"question_format={self.question_format!r} must contain {_QUESTION} exactly once")
        shots = []
        for shot in self.few_shot:  # YAML gives lists; keep (user, assistant) pairs
            if len(shot) != 2 or not all(isinstance(s, str) for s in shot):
                raise ValueError(f"few_shot entries must be (user, assistant) string pairs, got {shot!r}")
            shots.append((shot[0], shot[1]))
        self.few_shot = shots

    def messages(self, question: str) -> list[dict[str, str]]:
        """The chat messages for one question (system, few-shot turns, then the question's user turn)."""
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        for user, assistant in self.few_shot:
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        msgs.append({"role": "user", "content": self.question_format.replace(_QUESTION, question)})
        return msgs


PROMPT_PRESETS: dict[str, PromptTemplate] = {
    # R1-style, as in the paper's setup (spec section 6), worded by us.
    "paper": PromptTemplate(
        system_prompt=("You are a careful problem solver. Think through the problem step by step and explain "
                       "your reasoning, then give the final answer inside \\boxed{}."),
        few_shot=[("What is 2+2?",
                   "We need the sum of 2 and 2. Adding them gives 2 + 2 = 4. The final answer is \\boxed{4}.")],
    ),
    "plain": PromptTemplate(question_format=_QUESTION + " Put the final answer in \\boxed{}."),
    "none": PromptTemplate(),
    # code tasks: one fenced python block, which is what the code reward extracts first
    "code": PromptTemplate(
        system_prompt=("You are an expert Python programmer. Solve the task with a complete, self-contained "
                       "Python function, including any imports it needs."),
        question_format=("{question}\n\nReply with the complete function in a single fenced code block that "
                         "starts with ```python and ends with ```."),
    ),
}


def get_prompt_template(name_or_template: str | PromptTemplate | dict) -> PromptTemplate:
    """A preset by name (`paper`, `plain`, `none`), a `PromptTemplate` as is, or one built from a dict.

    Presets are returned as copies, so editing the result never changes the preset.
    """
    if isinstance(name_or_template, PromptTemplate):
        return name_or_template
    if isinstance(name_or_template, dict):
        return PromptTemplate(**name_or_template)
    if name_or_template not in PROMPT_PRESETS:
        raise ValueError(f"prompt={name_or_template!r} is not a known prompt preset; "
                         f"allowed: {', '.join(PROMPT_PRESETS)} (or a PromptTemplate)")
    return copy.deepcopy(PROMPT_PRESETS[name_or_template])


class PromptTooLongError(ValueError):
    """The rendered prompt has more tokens than allowed; callers skip the sample and count it."""

    def __init__(self, length: int, max_length: int) -> None:
        super().__init__(f"prompt has {length} tokens, more than max_length={max_length}")
        self.length = length
        self.max_length = max_length


@dataclass(frozen=True)
class PromptSegments:
    """A rendered prompt, its token ids, and the token ranges [start, end) of its three segments."""

    text: str
    """The prompt as the chat template renders it (generation prompt included)."""
    input_ids: list[int]
    """Token ids of `text` (no extra special tokens: the template already has them)."""
    prefix: tuple[int, int]
    """System prompt, few-shot turns and template tokens before the question."""
    question: tuple[int, int]
    """Exactly the tokens whose characters overlap the question's text."""
    suffix: tuple[int, int]
    """Template tokens after the question, ending with the generation prompt."""
    question_chars: tuple[int, int]
    """Character span of the question in `text`."""

    @property
    def num_tokens(self) -> int:
        """Total prompt length in tokens."""
        return len(self.input_ids)

    @property
    def num_question_tokens(self) -> int:
        """Question length in tokens (what the `length` baseline ranks by)."""
        return self.question[1] - self.question[0]


def _template_name(tokenizer) -> str:
    return f"the chat template of tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r}"


def _render(tokenizer, messages: list[dict[str, str]], chat_template_kwargs: dict[str, Any] | None = None) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **(chat_template_kwargs or {}))
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


_MARKER = "\u2063GAINRL_QUESTION\u2063"


def _question_char_span(tokenizer, text: str, question: str, marker_messages: list[dict],
                        chat_template_kwargs: dict[str, Any] | None = None) -> tuple[int, int]:
    """Where the question's characters are in the rendered prompt.

    `marker_messages` are the prompt's messages with a placeholder in the question's place. Rendering them
    tells where the template puts the question, and the search starts there, so an identical string in the
    system prompt or a few-shot turn is never mistaken for the question. Templates that trim message content
    are fine because the question is stripped before rendering.
    """
    rendered = _render(tokenizer, marker_messages, chat_template_kwargs)
    cut = rendered.find(_MARKER)
    start = 0
    if cut >= 0 and text.startswith(rendered[:cut]):
        start = cut
    elif text.rfind(question) >= 0:
        start = text.rfind(question)  # content-dependent template: the question is in the last user turn
    pos = text.find(question, start)
    if pos < 0:
        raise ValueError(f"could not locate the question in the prompt rendered by {_template_name(tokenizer)} "
                         f"(the template seems to rewrite message content); question={question[:80]!r}")
    return pos, pos + len(question)


def invalid_unicode_position(text: str) -> int | None:
    """Index of the first character UTF-8 cannot encode (a lone surrogate: JSON allows "\\ud800"), else None.

    Such text passes through Python but makes the tokenizer fail later with an error that names nothing.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def _check_question(question: Any) -> str:
    """The question stripped, or a ValueError for an empty one or one that is not valid Unicode."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question={question!r} is empty or whitespace only; a prompt needs a question")
    bad = invalid_unicode_position(question)
    if bad is not None:  # a lone surrogate: the tokenizer's own TypeError would not say where
        raise ValueError(f"question {question[:80]!r} is not valid Unicode (a lone surrogate at character {bad}); "
                         "fix or drop the row (files loaded by the DataModule skip such rows and count them)")
    return question.strip()


def build_prompt(tokenizer, question: str, template: PromptTemplate, *, max_length: int | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None) -> PromptSegments:
    """Render `question` with `template` and the tokenizer's chat template, and find its segments.

    The question is stripped of surrounding whitespace first. Tokens are those of the rendered text
    with `add_special_tokens=False` (the template carries its own special tokens). `question` is the
    token range overlapping the question's characters (offset mapping; needs a fast tokenizer),
    `prefix` everything before it, `suffix` everything after. `chat_template_kwargs` are extra variables for
    the chat template (e.g. `{"enable_thinking": false}` for Qwen3), as TRL's option of that name.

    Raises:
        ValueError: empty or whitespace-only question, or a template that hides the question's text.
        PromptTooLongError: the prompt has more than `max_length` tokens.
    """
    question = _check_question(question)
    return _segments(tokenizer, template.messages(question), question, template.messages(_MARKER), max_length,
                     chat_template_kwargs)


def question_turn(messages: Any) -> int:
    """Index of the question in a conversation: its last message, which must be a user turn with text.

    Raises:
        ValueError: not a non-empty list of `{"role": str, "content": str}` messages ending with a user turn.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"a conversational prompt is a non-empty list of chat messages, got {messages!r:.80}")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(f"message {i} of a conversational prompt is not a {{'role': str, 'content': str}} "
                             f"dict: {message!r:.80}")
    if messages[-1]["role"] != "user":
        raise ValueError(f"a conversational prompt must end with the user turn that asks the question; its last "
                         f"message has role {messages[-1]['role']!r}")
    return len(messages) - 1


def build_chat_prompt(tokenizer, messages: list[dict[str, Any]], *, max_length: int | None = None,
                      chat_template_kwargs: dict[str, Any] | None = None) -> PromptSegments:
    """Render a conversation (TRL's conversational `prompt`) as it is, and find its segments.

    The question is the content of the last message, a user turn (surrounding whitespace aside): its
    tokens are found from the tokenizer's character offsets exactly as in `build_prompt`. Everything
    before it (system prompt, few-shot turns, template tokens) is the prefix; the template tokens after it
    and the generation prompt are the suffix. The messages are rendered unchanged (no prompt preset).

    Raises:
        ValueError: malformed messages (see `question_turn`), an empty question, or a template that hides it.
        PromptTooLongError: the prompt has more than `max_length` tokens.
    """
    last = question_turn(messages)
    content = messages[last]["content"]
    question = _check_question(content)
    marker_messages = [*messages[:last], {**messages[last], "content": content.replace(question, _MARKER, 1)}]
    return _segments(tokenizer, messages, question, marker_messages, max_length, chat_template_kwargs)


def _segments(tokenizer, messages: list[dict], question: str, marker_messages: list[dict],
              max_length: int | None, chat_template_kwargs: dict[str, Any] | None = None) -> PromptSegments:
    text = _render(tokenizer, messages, chat_template_kwargs)
    q0, q1 = _question_char_span(tokenizer, text, question, marker_messages, chat_template_kwargs)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as err:  # slow (Python) tokenizers have no offset mapping
        raise TypeError("build_prompt needs a fast tokenizer (offset mapping) to find the question's tokens; "
                        f"got {type(tokenizer).__name__}") from err
    ids = list(enc["input_ids"])
    if max_length is not None and len(ids) > max_length:
        raise PromptTooLongError(len(ids), max_length)
    # Overlap of half-open spans; zero-width offsets (some special tokens) overlap nothing.
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < q1 and b > q0 and b > a]
    if not inside:
        raise ValueError(f"no token of the prompt rendered by {_template_name(tokenizer)} overlaps the question "
                         f"{question[:80]!r}; the tokenizer's offsets look wrong")
    start, end = inside[0], inside[-1] + 1
    return PromptSegments(text=text, input_ids=ids, prefix=(0, start), question=(start, end),
                          suffix=(end, len(ids)), question_chars=(q0, q1))
