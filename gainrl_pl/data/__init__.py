"""Data: rows in, validated examples and rendered prompts out, plus the generated task sets.

- `loading`: read a file (JSON, JSONL, Parquet, CSV/TSV, a `save_to_disk` directory) or a hub id as rows.
- `examples`: dataset presets, answer parsing, bad-row handling -> `Example`s.
- `prompts`: prompt presets, chat-template rendering, the prefix/question/suffix segments (spec section 2).
- `arithmetic`, `code`: generated arithmetic at graded difficulty; code tasks (HumanEval / MBPP style).

The names below are the import surface (`from gainrl_pl.data import load_rows, build_examples`). This package
is code; the repository's top-level `data/` folder holds the shipped data files.
"""

from gainrl_pl.data.examples import (
    ANSWER_PARSERS,
    DATASET_PRESETS,
    BadRowReport,
    DatasetPreset,
    Example,
    build_examples,
    parse_boxed_answer,
    parse_gsm8k_answer,
)
from gainrl_pl.data.loading import (
    FORMATS,
    REPO_ROOT,
    DataError,
    load_rows,
    looks_like_hub_id,
    parse_hub_source,
    resolve_data_path,
)

__all__ = [
    "ANSWER_PARSERS", "DATASET_PRESETS", "FORMATS", "REPO_ROOT", "BadRowReport", "DataError", "DatasetPreset",
    "Example", "build_examples", "load_rows", "looks_like_hub_id", "parse_boxed_answer", "parse_gsm8k_answer",
    "parse_hub_source", "resolve_data_path",
]
