"""Rows in, validated examples out: file loading, dataset presets, answer parsing, bad-row handling.

    rows = load_rows(str(resolve_data_path("../shared/data/gsm8k/train.jsonl")))
    examples, report = build_examples(rows, "gsm8k")          # DataError names any bad row

No Lightning here: the DataModule (`gainrl_pl.datamodules`) turns examples into prompts and samplers.
The generated arithmetic set lives in `gainrl_pl.arithmetic`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Where `data/...` and `../shared/data/...` in shipped configs are meant to be relative to.
REPO_ROOT = Path(__file__).resolve().parents[1]

# Values for `load_rows(fmt=...)`: `hf` = a `save_to_disk` directory, `hub` = a Hugging Face hub id.
FORMATS = ("json", "jsonl", "parquet", "csv", "tsv", "hf", "hub")
_EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet",
               ".csv": "csv", ".tsv": "tsv"}
# A hub id is `name` or `owner/name`; anything with a data-file extension or a path prefix is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_REENCODE_HINT = "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`, or re-export as UTF-8)"


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file/row, the field, and the fix.

    Attributes:
        row: Row index in the source (0-based), when the error is about one row.
        field: The field (column) at fault, when there is one.
        reason: A short machine-readable reason (e.g. `missing_answer_field`), when about one row.
    """

    def __init__(self, message: str, *, row: int | None = None, field: str | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message)
        self.row, self.field, self.reason = row, field, reason


def _int_text(value: int) -> str | None:
    # Python refuses to print ints over ~4300 digits (a guard against quadratic-time conversion).
    try:
        return str(value)
    except ValueError:
        return None


def _snippet(value: Any, limit: int = 80) -> str:
    """A short, safe printable form of a value for error messages (never raises)."""
    if isinstance(value, int) and not isinstance(value, bool):
        text = _int_text(value) or f"<integer of about {int(value.bit_length() * 0.30103)} digits>"
    else:
        try:
            text = repr(value)
        except Exception:  # a repr that fails must not hide the real error
            text = f"<{type(value).__name__}>"
    return text[:limit] + "..." if len(text) > limit else text


# ----------------------------------------------------------------------------------------------- loading
def looks_like_hub_id(source: str) -> bool:
    """True if `source` could be a Hugging Face hub dataset id (`name` or `owner/name`, no file extension)."""
    return bool(_HUB_ID.match(source)) and Path(source).suffix.lower() not in _EXTENSIONS


def resolve_data_path(path: str | os.PathLike) -> str:
    """Find a data file or directory: relative paths are tried against the CWD, then the repository root.

    So `data/arithmetic/train.jsonl` and `../shared/data/gsm8k/train.jsonl` in the shipped configs work
    from any directory. A string that does not exist but looks like a hub id (`openai/gsm8k`) is returned
    unchanged for `load_rows` to fetch. Raises FileNotFoundError naming every place tried.
    """
    text = os.fspath(path)
    candidate = Path(text).expanduser()
    tried = [candidate] if candidate.is_absolute() else [Path.cwd() / candidate, REPO_ROOT / candidate]
    tried = list(dict.fromkeys(p.resolve() for p in tried))  # same place twice when run from the repo root
    for place in tried:
        if place.exists():
            return str(place)
    if looks_like_hub_id(text):
        return text
    raise FileNotFoundError(f"data file {text!r} not found; tried: {', '.join(str(p) for p in tried)}")


def load_rows(source: str, *, split: str | None = None, fmt: str | None = None,
              config_name: str | None = None) -> list[dict]:
    """Read every row of a dataset as a list of dicts (row i of the source is element i).

    Args:
        source: A file (`.json` = one JSON array of objects, `.jsonl`, `.parquet`, `.csv`, `.tsv`), a
            directory written by `datasets.Dataset.save_to_disk`, or a Hugging Face hub id such as
            `openai/gsm8k`. A hub id is used only when `source` is not an existing path, and fetching it
            needs internet access (nothing else here touches the network).
        split: Which split of a `DatasetDict` (saved directory or hub id); may be left out when there is one.
        fmt: Force a format (one of `FORMATS`) instead of guessing from the extension.
        config_name: The hub dataset's configuration (e.g. `main` for `openai/gsm8k`).

    Raises:
        FileNotFoundError: the path does not exist (named in the message).
        DataError: malformed content, with the line (JSONL/CSV) or byte offset (non-UTF-8) and the fix.
    """
    path = Path(source)
    if fmt is None:
        if path.is_dir():
            fmt = "hf"
        elif path.exists():
            fmt = _EXTENSIONS.get(path.suffix.lower())
            if fmt is None:
                raise DataError(f"{source}: cannot tell the format from the extension {path.suffix!r}; "
                                f"pass fmt= one of {', '.join(FORMATS)}")
        elif looks_like_hub_id(source):
            fmt = "hub"
        else:
            raise FileNotFoundError(f"data file {source!r} not found (absolute: {path.resolve()})")
    if fmt not in FORMATS:
        raise DataError(f"fmt={fmt!r} is unknown; allowed: {', '.join(FORMATS)}")
    if fmt == "hub":
        return _load_hub(source, split, config_name)
    if not path.exists():
        raise FileNotFoundError(f"data file {source!r} not found (absolute: {path.resolve()})")
    if fmt == "hf":
        return _load_saved_dataset(path, split)
    if fmt == "parquet":
        return _load_parquet(path)
    if fmt == "jsonl":
        return _load_jsonl(path)
    text = _decode(path.read_bytes(), path)
    return _parse_json(text, path) if fmt == "json" else _parse_csv(text, path, "\t" if fmt == "tsv" else ",")


def _decode(data: bytes, path: Path, first_line: int = 1, base_offset: int = 0) -> str:
    # Strict decoding: a wrong byte silently replaced would corrupt a question or an answer. utf-8-sig
    # drops a leading byte-order mark (spreadsheet exports write one).
    try:
        return data.decode("utf-8-sig" if base_offset == 0 else "utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        raise DataError(f"{path}: line {line} (byte offset {base_offset + err.start}) is not valid UTF-8 "
                        f"(byte 0x{data[err.start:err.start + 1].hex()}); {_REENCODE_HINT}") from None


def _load_jsonl(path: Path) -> list[dict]:
    rows, offset = [], 0
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        line = _decode(raw, path, number, offset).strip()
        offset += len(raw) + 1
        if not line:  # blank lines (often a trailing one) are not rows
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {number} is not valid JSON ({err.msg} at column {err.colno}): "
                            f"{_snippet(line)}; each line must be one JSON object") from None
        except ValueError as err:  # e.g. an integer over Python's 4300-digit conversion limit
            raise DataError(f"{path}: line {number} cannot be read ({err}): {_snippet(line)}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number} is a JSON {type(row).__name__}, not an object: "
                            f"{_snippet(line)}; each line must be one JSON object like {{\"question\": ...}}")
        rows.append(row)
    return rows


def _parse_json(text: str, path: Path) -> list[dict]:
    try:
        data = json.loads(text)
    except ValueError as err:
        if not isinstance(err, json.JSONDecodeError):  # e.g. an integer over the 4300-digit limit
            raise DataError(f"{path}: cannot be read ({err})") from None
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return _load_jsonl(path)  # several top-level objects: a JSONL file named .json (common on the hub)
        lines = text.splitlines()
        context = lines[err.lineno - 1] if err.lineno <= len(lines) else ""
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): "
                        f"{_snippet(context)}") from None
    if isinstance(data, dict):
        raise DataError(f"{path}: the top level is a JSON object (keys: {', '.join(map(str, list(data)[:8]))}), "
                        "not an array of row objects; write the rows as a JSON array or as JSONL")
    if not isinstance(data, list):
        raise DataError(f"{path}: the top level is a JSON {type(data).__name__}, not an array of row objects")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: element {i} of the array is a JSON {type(row).__name__}, not an object: "
                            f"{_snippet(row)}; every element must be an object like {{\"question\": ...}}")
    return data


def _parse_csv(text: str, path: Path, delimiter: str) -> list[dict]:
    # Short rows get None (reported by build_examples as a missing value); surplus cells are kept under
    # one key so no data vanishes silently.
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, restkey="_extra_cells")
    try:
        return [dict(row) for row in reader]
    except csv.Error as err:
        raise DataError(f"{path}: CSV line {reader.line_num}: {err}") from None


def _load_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        # pyarrow gives plain Python values (pandas would give numpy scalars and NaN for missing cells).
        return pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several unrelated types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None


def _pick_split(splits: dict, split: str | None, source: Any):
    names = list(splits)
    if split is None and len(names) == 1:
        return splits[names[0]]
    if split is None or split not in splits:
        raise DataError(f"{source} has splits {names}; pass split= one of them (got {split!r})")
    return splits[split]


def _load_saved_dataset(path: Path, split: str | None) -> list[dict]:
    import datasets

    marker_files = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / name).exists() for name in marker_files):
        files = sorted(p.name for p in path.iterdir() if p.suffix.lower() in _EXTENSIONS)
        hint = f"; pass one of its files instead: {', '.join(files[:6])}" if files else ""
        raise DataError(f"{path} is a directory but not one saved by `datasets` (save_to_disk){hint}")
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        data = _pick_split(data, split, path)
    return data.to_list()


def _load_hub(source: str, split: str | None, config_name: str | None) -> list[dict]:
    import datasets

    try:
        data = datasets.load_dataset(source, config_name, split=split)
    except Exception as err:  # offline, unknown id, missing config: all end here, with the cause attached
        raise DataError(f"{source!r} is not a local path, and loading it as a Hugging Face hub dataset failed "
                        f"({type(err).__name__}: {err}). Hub ids need internet access; offline, point at a "
                        "local file or a `save_to_disk` directory instead") from err
    if isinstance(data, datasets.DatasetDict):
        data = _pick_split(data, split, source)
    return data.to_list()


# ----------------------------------------------------------------------------------------------- presets
def parse_gsm8k_answer(text: str) -> str:
    """GSM8K's final answer: the text after the last `####`, commas removed (`#### 1,234` -> `1234`).

    Returns "" when there is no `####` (build_examples reports that row as unparseable).
    """
    if "####" not in text:
        return ""
    return text.rsplit("####", 1)[1].strip().replace(",", "")


# Answer parsers by name, so a preset stays a plain (YAML/CLI-friendly) dataclass.
ANSWER_PARSERS = {"gsm8k": parse_gsm8k_answer, "identity": lambda text: text, "latex": str.strip}


@dataclass(frozen=True)
class DatasetPreset:
    """Which columns hold the question and the answer, and how to read the final answer.

    Attributes:
        question_field: Column with the question (the prompt's user turn).
        answer_field: Column with the gold answer (or a worked solution the parser reduces to one).
        answer_parser: `gsm8k` (text after `####`, commas removed), `identity`, or `latex` (stripped).
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
    # MATH as packaged in ../shared/data has 2 (train.jsonl) / 4 (train.json) problems with no final
    # answer: they are skipped and counted in the report, so the set loads with the preset alone.
    "math": DatasetPreset("problem", "answer", "latex", on_bad_row="skip"),
    "aime": DatasetPreset("problem", "answer", "latex"),
    "amc": DatasetPreset("problem", "answer", "latex"),  # AMC answers are JSON numbers (142.0 -> "142")
    "arithmetic": DatasetPreset("question", "answer", "identity"),
    "generic": DatasetPreset("question", "answer", "identity"),
}


# ----------------------------------------------------------------------------------------------- examples
@dataclass
class Example:
    """One validated question/answer pair.

    Attributes:
        index: The row's index in the source (position in `load_rows`' list), so reports and scores map back.
        question: The question text, surrounding whitespace stripped; never empty.
        answer: The gold final answer as text (parsed by the preset; numbers converted); never empty.
        columns: The row's other fields, converted to JSON-able values (passed to reward functions).
    """

    index: int
    question: str
    answer: str
    columns: dict[str, Any] = field(default_factory=dict)


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
        return value if _int_text(value) is not None else _snippet(value)  # json.dumps fails on huge ints
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
        return _int_text(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    return None


def _is_blank(text: str) -> bool:
    # "Empty" means nothing visible: whitespace and invisible format/control characters (e.g. U+200B) only.
    return not any(ch.isprintable() and not ch.isspace() for ch in text)


def _is_encodable(text: str) -> bool:
    # Lone surrogates (JSON allows "\ud800") pass Python but crash the tokenizer later.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_preset(preset_or_fields: DatasetPreset | str | dict) -> DatasetPreset:
    if isinstance(preset_or_fields, DatasetPreset):
        return preset_or_fields
    if isinstance(preset_or_fields, str):
        if preset_or_fields not in DATASET_PRESETS:
            raise ValueError(f"preset={preset_or_fields!r} is unknown; allowed: {', '.join(DATASET_PRESETS)}")
        return DATASET_PRESETS[preset_or_fields]
    return DatasetPreset(**preset_or_fields)


def _field_names(row: dict) -> str:
    names = sorted(k if isinstance(k, str) else _snippet(k) for k in row)
    return ", ".join(_snippet(k, 40) for k in names[:12]) + (", ..." if len(names) > 12 else "") or "none"


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
    if not isinstance(question, str):
        return "question_not_text", q_field, question
    if _is_blank(question):
        return "question_empty", q_field, question
    if not _is_encodable(question):
        return "question_invalid_unicode", q_field, question
    if max_question_chars is not None and len(question) > max_question_chars:
        return "question_too_long", q_field, question
    answer = _answer_text(raw_answer)
    if answer is None:
        return "answer_not_text", a_field, raw_answer
    if not _is_encodable(answer):
        return "answer_invalid_unicode", a_field, raw_answer
    if _is_blank(answer):
        return "answer_empty", a_field, raw_answer
    answer = ANSWER_PARSERS[preset.answer_parser](answer)
    if _is_blank(answer):
        return "answer_unparseable", a_field, raw_answer
    keep = preset.extra_fields
    columns = {str(k): _jsonable(v) for k, v in row.items()
               if k not in (q_field, a_field) and (keep is None or k in keep)}
    return Example(-1, question.strip(), answer.strip(), columns)


_FIXES = {
    "missing_question_field": "set question_field to the column that holds the question",
    "missing_answer_field": "set answer_field to the column that holds the final answer",
    "answer_unparseable": "check answer_parser (gsm8k answers end with '#### <number>') or the answer_field",
    "not_an_object": "every row must be an object (dict) holding the question and answer fields",
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
            shown = f"the row has fields {value}" if reason.startswith("missing") else f"value {_snippet(value)}"
            where = f"field {field_name!r}; " if field_name else ""
            raise DataError(f"row {index} (0-based): {reason.replace('_', ' ')} ({where}{shown}). "
                            f"Fix: {fix}, or set on_bad_row='skip' to skip and count such rows.",
                            row=index, field=field_name, reason=reason)
        report.add(reason, index)
    report.kept = len(examples)
    return examples, report
