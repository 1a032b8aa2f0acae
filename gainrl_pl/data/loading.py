"""Rows in: read a dataset file (JSON, JSONL, Parquet, CSV/TSV, a `save_to_disk` directory, a hub id) as dicts.

    rows = load_rows(resolve_data_path("data/arithmetic/train.jsonl"))
    rows = load_rows("openai/gsm8k:main:train")          # hub id, configuration, split (needs internet)

Readers are strict: a byte that is not UTF-8, a line that is not one JSON object, or a damaged Parquet file is a
`DataError` naming the file, the line (or byte offset) and the fix, never a silently corrupted row. Validating
the rows (question/answer fields, presets) is `gainrl_pl.data.examples`'s job, which re-exports everything here.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

# Where `data/...` and `configs/...` in the README and the shipped configs are meant to be relative to.
REPO_ROOT = Path(__file__).resolve().parents[2]
# A wheel install (not editable) has no repository around it: `data/` and `configs/` ship inside the package as
# gainrl_pl/shipped/data and gainrl_pl/shipped/configs (pyproject's package-dir), found there the same way.
SHIPPED_ROOT = Path(__file__).resolve().parents[1] / "shipped"


def _places(candidate: Path) -> list[Path]:
    """Where a path is looked for, in order: itself if absolute; else the CWD, the checkout, the wheel's copy."""
    if candidate.is_absolute():
        return [candidate]
    # after a wheel install REPO_ROOT is site-packages, where another distribution's data/ must not shadow ours
    checkout = [REPO_ROOT / candidate] if (REPO_ROOT / "pyproject.toml").is_file() else []
    return [Path.cwd() / candidate, *checkout, SHIPPED_ROOT / candidate]


def shipped_file(path: str | os.PathLike) -> Path | None:
    """An existing file or directory for `path`: itself (absolute, or relative to the CWD), else the same relative
    path under the repository root, else under the copy a wheel install ships. None when none exists."""
    candidate = Path(path).expanduser()
    for place in _places(candidate):
        if place.exists():
            return place.resolve()
    return None

# Values for `load_rows(fmt=...)`: `hf` = a `save_to_disk` directory, `hub` = a Hugging Face hub id.
FORMATS = ("json", "jsonl", "parquet", "csv", "tsv", "hf", "hub")
_EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet",
               ".csv": "csv", ".tsv": "tsv"}
# A hub source is `name` or `owner/name`, optionally `:config` and `:split` (`openai/gsm8k:main:train`, or
# `owner/name::train` with no configuration); anything with a data-file extension or a path prefix is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]*(:.+)?)?$")
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


def int_text(value: int) -> str | None:
    """`str(value)`, or None for an int too long for Python to print."""
    # Python refuses to print ints over ~4300 digits (a guard against quadratic-time conversion).
    try:
        return str(value)
    except ValueError:
        return None


def snippet(value: Any, limit: int = 80) -> str:
    """A short, safe printable form of a value for error messages (never raises)."""
    if isinstance(value, int) and not isinstance(value, bool):
        text = int_text(value) or f"<integer of about {int(value.bit_length() * 0.30103)} digits>"
    else:
        try:
            text = repr(value)
        except Exception:  # a repr that fails must not hide the real error
            text = f"<{type(value).__name__}>"
    return text[:limit] + "..." if len(text) > limit else text


# ----------------------------------------------------------------------------------------------- loading
def looks_like_hub_id(source: str) -> bool:
    """True if `source` could be a Hugging Face hub dataset (`name` or `owner/name`, optionally `:config:split`)."""
    return bool(_HUB_ID.match(source)) and Path(source.split(":")[0]).suffix.lower() not in _EXTENSIONS


def parse_hub_source(source: str) -> tuple[str, str | None, str | None]:
    """`owner/name[:config[:split]]` -> (hub id, configuration or None, split or None).

    `openai/gsm8k:main:train` -> ("openai/gsm8k", "main", "train"); `owner/name::test` -> no configuration,
    split `test`; a split may use `datasets`' slicing (`train[:1000]`).
    """
    name, _, rest = source.partition(":")
    config, _, split = rest.partition(":")
    return name, config or None, split or None


def resolve_data_path(path: str | os.PathLike) -> str:
    """Find a data file or directory: relative paths are tried against the CWD, then the repository root, then
    the copy of `data/` a wheel install ships (`shipped_file`).

    So `data/eval/gsm8k_test.jsonl` in the shipped configs works from any directory. A string that does not
    exist but looks like a hub dataset (`openai/gsm8k:main:train`) is returned unchanged for `load_rows` to
    fetch. Raises FileNotFoundError naming every place tried.
    """
    text = os.fspath(path)
    found = shipped_file(text)
    if found is not None:
        return str(found)
    candidate = Path(text).expanduser()
    tried = list(dict.fromkeys(p.resolve() for p in _places(candidate)))  # same place twice when run from the repo root
    if looks_like_hub_id(text):
        return text
    raise FileNotFoundError(f"data file {text!r} not found; tried: {', '.join(str(p) for p in tried)}")


def load_rows(source: str, *, split: str | None = None, fmt: str | None = None,
              config_name: str | None = None) -> list[dict]:
    """Read every row of a dataset as a list of dicts (row i of the source is element i).

    Args:
        source: A file (`.json` = one JSON array of objects, `.jsonl`, `.parquet`, `.csv`, `.tsv`), a
            directory written by `datasets.Dataset.save_to_disk`, or a Hugging Face hub dataset
            `owner/name[:config[:split]]` such as `openai/gsm8k:main:train` (`parse_hub_source`). A hub id is
            used only when `source` is not an existing path, and fetching it needs internet access (nothing
            else here touches the network); `datasets` caches it (`HF_DATASETS_CACHE`).
        split: Which split of a `DatasetDict` (saved directory or hub id); may be left out when there is one.
            For a hub source, the split in `source` if it names one.
        fmt: Force a format (one of `FORMATS`) instead of guessing from the extension.
        config_name: The hub dataset's configuration (e.g. `main` for `openai/gsm8k`); the one in `source` if
            it names one.

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
        name, config_in_source, split_in_source = parse_hub_source(source)
        for what, given, named in (("config_name", config_name, config_in_source), ("split", split, split_in_source)):
            if given is not None and named is not None and given != named:
                raise DataError(f"{source!r} names {what} {named!r} but {what}={given!r} was passed; give it once")
        return _load_hub(name, split or split_in_source, config_name or config_in_source)
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
                            f"{snippet(line)}; each line must be one JSON object") from None
        except ValueError as err:  # e.g. an integer over Python's 4300-digit conversion limit
            raise DataError(f"{path}: line {number} cannot be read ({err}): {snippet(line)}") from None
        except RecursionError:  # `[[[[...` thousands deep: the decoder runs out of stack, not a JSON error
            raise DataError(f"{path}: line {number} is nested deeper than Python can decode: {snippet(line)}; "
                            "rows must be flat objects of question/answer fields") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number} is a JSON {type(row).__name__}, not an object: "
                            f"{snippet(line)}; each line must be one JSON object like {{\"question\": ...}}")
        rows.append(row)
    return rows


def _parse_json(text: str, path: Path) -> list[dict]:
    try:
        data = json.loads(text)
    except RecursionError:  # `[[[[...` thousands deep: the decoder runs out of stack, not a JSON error
        raise DataError(f"{path}: nested deeper than Python can decode; write the rows as a JSON array of "
                        "flat objects or as JSONL") from None
    except ValueError as err:
        if not isinstance(err, json.JSONDecodeError):  # e.g. an integer over the 4300-digit limit
            raise DataError(f"{path}: cannot be read ({err})") from None
        if err.msg == "Extra data" and text.lstrip().startswith("{"):
            return _load_jsonl(path)  # several top-level objects: a JSONL file named .json (common on the hub)
        lines = text.splitlines()
        context = lines[err.lineno - 1] if err.lineno <= len(lines) else ""
        raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): "
                        f"{snippet(context)}") from None
    if isinstance(data, dict):
        raise DataError(f"{path}: the top level is a JSON object (keys: {', '.join(map(str, list(data)[:8]))}), "
                        "not an array of row objects; write the rows as a JSON array or as JSONL")
    if not isinstance(data, list):
        raise DataError(f"{path}: the top level is a JSON {type(data).__name__}, not an array of row objects")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: element {i} of the array is a JSON {type(row).__name__}, not an object: "
                            f"{snippet(row)}; every element must be an object like {{\"question\": ...}}")
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
