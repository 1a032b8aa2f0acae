"""Rows in, validated examples out: file loading, dataset presets, answer parsing, bad-row handling.

    rows = load_rows(str(resolve_data_path("data/eval/gsm8k_test.jsonl")))
    examples, report = build_examples(rows, "gsm8k")          # DataError names any bad row
    rows = load_rows("openai/gsm8k:main:train")               # a hub dataset (needs internet once)

No Lightning here: the DataModule (`gainrl_pl.datamodules`) turns examples into prompts and samplers.
The generated arithmetic set lives in `gainrl_pl.data.arithmetic`.

Reading files is `gainrl_pl.data.loading`; the import surface for both is the package, `gainrl_pl.data`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gainrl_pl.data.loading import (
    DataError,
    int_text,
    snippet,
)
from gainrl_pl.data.prompts import invalid_unicode_position, question_turn


# ----------------------------------------------------------------------------------------------- presets
def parse_gsm8k_answer(text: str) -> str:
    """GSM8K's final answer: the text after the last `####`, commas removed (`#### 1,234` -> `1234`).

    Returns "" when there is no `####` (build_examples reports that row as unparseable).
    """
    if "####" not in text:
        return ""
    return text.rsplit("####", 1)[1].strip().replace(",", "")


def parse_boxed_answer(text: str) -> str:
    """A worked solution's final answer: the content of its last `\\boxed{...}` ("" when it has none)."""
    from gainrl_pl.rewards.answers import extract_boxed

    return extract_boxed(text) or ""


# Answer parsers by name, so a preset stays a plain (YAML/CLI-friendly) dataclass.
ANSWER_PARSERS = {"gsm8k": parse_gsm8k_answer, "identity": lambda text: text, "latex": str.strip,
                  "boxed": parse_boxed_answer}


@dataclass(frozen=True)
class DatasetPreset:
    """Which columns hold the question and the answer, and how to read the final answer.

    Attributes:
        question_field: Column with the question (the prompt's user turn).
        answer_field: Column with the gold answer (or a worked solution the parser reduces to one).
        answer_parser: `gsm8k` (text after `####`, commas removed), `identity`, `latex` (stripped), or `boxed`
            (the last `\\boxed{}` of a worked solution).
        extra_fields: Other columns to keep in `Example.columns` (e.g. `level`); `None` keeps them all.
        on_bad_row: What `build_examples` does with a bad row when the caller does not say: `raise` or `skip`.
    """

    question_field: str = "question"
    answer_field: str = "answer"
    answer_parser: str = "identity"
    extra_fields: tuple[str, ...] | None = None
    on_bad_row: str = "raise"

    def __post_init__(self) -> None:
        if self.answer_parser not in ANSWER_PARSERS:
            raise ValueError(f"answer_parser={self.answer_parser!r} is unknown; allowed: {', '.join(ANSWER_PARSERS)}")
        if self.on_bad_row not in ("raise", "skip"):
            raise ValueError(f"on_bad_row={self.on_bad_row!r}: allowed values are 'raise', 'skip'")


DATASET_PRESETS: dict[str, DatasetPreset] = {
    "gsm8k": DatasetPreset("question", "answer", "gsm8k"),
    # MATH files with a final-answer column (MATH-500, data/eval/math500.jsonl). Some MATH packagings have a
    # few problems with no final answer: they are skipped and counted, so a set loads with the preset alone.
    "math": DatasetPreset("problem", "answer", "latex", on_bad_row="skip"),
    # MATH with worked solutions only (the hub's DigitalLearningGmbH/MATH-lighteval, Hendrycks' original
    # layout): the answer is the solution's last \boxed{}. MATH-500 has both columns and reads either way.
    "math_solution": DatasetPreset("problem", "solution", "boxed", on_bad_row="skip"),
    "aime": DatasetPreset("problem", "answer", "latex"),
    "amc": DatasetPreset("problem", "answer", "latex"),  # AMC answers are JSON numbers (142.0 -> "142")
    "arithmetic": DatasetPreset("question", "answer", "identity"),
    "generic": DatasetPreset("question", "answer", "identity"),
    # TRL's layout: `prompt` (text, or chat messages: TRL's conversational format) and `solution`, which
    # reward functions such as trl.rewards.accuracy_reward read; `answer` carries the same text for ours
    "trl": DatasetPreset("prompt", "solution", "latex"),
    # code rows (prompt, tests, entry_point): the tests stand in the answer column; see gainrl_pl.data.code
    "code": DatasetPreset("prompt", "tests", "identity"),
}


# ----------------------------------------------------------------------------------------------- examples
@dataclass
class Example:
    """One validated question/answer pair.

    Attributes:
        index: The row's index in the source (position in `load_rows`' list), so reports and scores map back.
        question: The question text, surrounding whitespace stripped; never empty. For a conversational row,
            the content of its last (user) message.
        answer: The gold final answer as text (parsed by the preset; numbers converted); never empty.
        columns: The row's other fields, converted to JSON-able values (passed to reward functions). An answer
            column not named `answer` is kept here too, as it was (TRL's functions read e.g. `solution`).
        messages: For a conversational row (the question field holds chat messages, TRL's format): the
            messages, rendered as they are; None for a question given as text.
    """

    index: int
    question: str
    answer: str
    columns: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] | None = None


@dataclass
class BadRowReport:
    """What `build_examples` left out and why.

    Attributes:
        total: Rows looked at.
        kept: Rows that became examples.
        skipped: Count of skipped rows per reason (e.g. `missing_answer_field`, `question_too_long`).
        first_rows: The first few skipped row indices per reason, to find them in the file.
    """

    total: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first_rows: dict[str, list[int]] = field(default_factory=dict)

    def add(self, reason: str, row: int, keep_first: int = 5) -> None:
        """Count one skipped row under `reason`, remembering its index if among the first few."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        rows = self.first_rows.setdefault(reason, [])
        if len(rows) < keep_first:
            rows.append(row)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able summary (keys chosen not to clash with the DataModule's own summary keys)."""
        return {"bad_rows": sum(self.skipped.values()), "skipped_by_reason": dict(self.skipped),
                "skipped_first_rows": {k: list(v) for k, v in self.first_rows.items()}}


def _jsonable(value: Any) -> Any:
    """Convert a cell to a JSON-able value (numpy scalars, NaN, bytes and dates come out of Parquet/HF)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value if int_text(value) is not None else snippet(value)  # json.dumps fails on huge ints
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalar or array
        return _jsonable(value.tolist())
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _answer_text(value: Any) -> str | None:
    """A gold answer as text: strings as they are, finite numbers printed exactly (142.0 -> "142")."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):  # bool is an int subclass; True is not an answer
        return None
    if isinstance(value, int):
        return int_text(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def _is_blank(text: str) -> bool:
    # "Empty" means nothing visible: whitespace and invisible format/control characters (e.g. U+200B) only.
    return not any(ch.isprintable() and not ch.isspace() for ch in text)


def _as_preset(preset_or_fields: DatasetPreset | str | dict) -> DatasetPreset:
    if isinstance(preset_or_fields, DatasetPreset):
        return preset_or_fields
    if isinstance(preset_or_fields, str):
        if preset_or_fields not in DATASET_PRESETS:
            raise ValueError(f"preset={preset_or_fields!r} is unknown; allowed: {', '.join(DATASET_PRESETS)}")
        return DATASET_PRESETS[preset_or_fields]
    return DatasetPreset(**preset_or_fields)


def _field_names(row: dict) -> str:
    names = sorted(k if isinstance(k, str) else snippet(k) for k in row)
    return ", ".join(snippet(k, 40) for k in names[:12]) + (", ..." if len(names) > 12 else "") or "none"


def _check_row(row: Any, preset: DatasetPreset, max_question_chars: int | None) -> tuple[str, str, Any] | Example:
    """An Example (with index -1), or (reason, field, offending value) for a bad row."""
    q_field, a_field = preset.question_field, preset.answer_field
    if not isinstance(row, dict):
        return "not_an_object", "", row
    if q_field not in row:
        return "missing_question_field", q_field, _field_names(row)
    if a_field not in row:
        return "missing_answer_field", a_field, _field_names(row)
    question, raw_answer = row[q_field], row[a_field]
    messages = None
    if isinstance(question, list):  # TRL's conversational format: the question is the last (user) turn
        try:
            messages = [_jsonable(m) for m in question]
            question = messages[question_turn(messages)]["content"]
        except (ValueError, RecursionError):
            return "question_messages_malformed", q_field, question
        if any(invalid_unicode_position(m["content"]) is not None for m in messages):
            return "question_invalid_unicode", q_field, row[q_field]
    if not isinstance(question, str):
        return "question_not_text", q_field, question
    if _is_blank(question):
        return "question_empty", q_field, question
    if invalid_unicode_position(question) is not None:
        return "question_invalid_unicode", q_field, question
    if max_question_chars is not None and len(question) > max_question_chars:
        return "question_too_long", q_field, question
    answer = _answer_text(raw_answer)
    if answer is None:
        return "answer_not_text", a_field, raw_answer
    if invalid_unicode_position(answer) is not None:
        return "answer_invalid_unicode", a_field, raw_answer
    if _is_blank(answer):
        return "answer_empty", a_field, raw_answer
    answer = ANSWER_PARSERS[preset.answer_parser](answer)
    if _is_blank(answer):
        return "answer_unparseable", a_field, raw_answer
    keep = preset.extra_fields
    columns = {}
    for k, v in row.items():
        # the answer column keeps its own name too unless that is `answer` (which holds the parsed gold)
        if k == q_field or k == "answer" == a_field or (keep is not None and k not in keep and k != a_field):
            continue
        try:
            columns[str(k)] = _jsonable(v)
        except RecursionError:  # a cell nested ~1000 deep (JSON allows it) exhausts the recursive conversion
            return "column_too_nested", str(k), v
    return Example(-1, question.strip(), answer.strip(), columns, messages)


_FIXES = {
    "column_too_nested": "a column holds lists/objects nested ~1000 deep: flatten or drop that column",
    "missing_question_field": "set question_field to the column that holds the question",
    "missing_answer_field": "set answer_field to the column that holds the final answer",
    "answer_unparseable": "check answer_parser (gsm8k answers end with '#### <number>') or the answer_field",
    "not_an_object": "every row must be an object (dict) holding the question and answer fields",
    "question_messages_malformed": "a chat-message prompt must be a list of {'role': str, 'content': str} messages "
                                   "ending with the user turn that asks the question",
    "question_invalid_unicode": "the text holds a lone surrogate (a \\ud800-style JSON escape): fix that row",
    "answer_invalid_unicode": "the text holds a lone surrogate (a \\ud800-style JSON escape): fix that row",
}


def build_examples(rows: list, preset_or_fields: DatasetPreset | str | dict, *, on_bad_row: str | None = None,
                   max_question_chars: int | None = 16_384) -> tuple[list[Example], BadRowReport]:
    """Validate rows and turn them into Examples, reporting every row that cannot be used.

    Args:
        rows: Rows from `load_rows` (anything else in the list is reported as `not_an_object`).
        preset_or_fields: A `DatasetPreset`, a preset name from `DATASET_PRESETS`, or a dict of
            `DatasetPreset` fields (e.g. `{"question_field": "prompt", "answer_field": "target"}`).
        on_bad_row: `raise` a DataError naming the first bad row (its index, field, value and the fix), or
            `skip` and count it in the report; `None` uses the preset's choice.
        max_question_chars: Questions longer than this are skipped and counted (`question_too_long`) in
            either mode: they are not malformed, just unusable. The default is far above real sets (MATH's
            longest is ~4.3k characters) and guards the tokenizer against megabyte cells; the token-level
            `max_prompt_length` filter in the DataModule is the precise one. `None` = no limit.

    Returns:
        The examples in source order and a `BadRowReport`.
    """
    preset = _as_preset(preset_or_fields)
    mode = on_bad_row or preset.on_bad_row
    if mode not in ("raise", "skip"):
        raise ValueError(f"on_bad_row={on_bad_row!r}: allowed values are 'raise', 'skip'")
    examples, report = [], BadRowReport(total=len(rows))
    for index, row in enumerate(rows):
        checked = _check_row(row, preset, max_question_chars)
        if isinstance(checked, Example):
            checked.index = index
            examples.append(checked)
            continue
        reason, field_name, value = checked
        if mode == "raise" and reason != "question_too_long":
            fix = _FIXES.get(reason, f"fix or remove the row, or check that {field_name!r} is the right column")
            shown = f"the row has fields {value}" if reason.startswith("missing") else f"value {snippet(value)}"
            where = f"field {field_name!r}; " if field_name else ""
            raise DataError(f"row {index} (0-based): {reason.replace('_', ' ')} ({where}{shown}). "
                            f"Fix: {fix}, or set on_bad_row='skip' to skip and count such rows.",
                            row=index, field=field_name, reason=reason)
        report.add(reason, index)
    report.kept = len(examples)
    return examples, report
