"""Evaluation sets: the paper's benchmarks as presets over the files in `data/eval/`, or any question/answer file.

    examples, source = load_benchmark("gsm8k", limit=200)          # the first 200 GSM8K test problems
    examples, source = load_benchmark(None, data="my.jsonl", question_field="q", answer_field="a")

Answers are parsed by the same dataset presets training uses (`gainrl_pl.data.examples`), so a GSM8K gold is the
number after `####` here exactly as it is in a training reward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gainrl_pl.data import DATASET_PRESETS, Example, build_examples, load_rows, resolve_data_path


@dataclass(frozen=True)
class Benchmark:
    """A named evaluation set: where its file is and which dataset preset reads it."""

    path: str
    """Data file, relative to the working directory or the repository root (`resolve_data_path`)."""
    preset: str
    """Dataset preset in `gainrl_pl.data.DATASET_PRESETS` (question/answer fields, answer parser)."""
    description: str
    """One line for `--help` and the docs."""


# The files ship with the repository (data/eval/README.md: sources, licenses, checksums).
BENCHMARKS: dict[str, Benchmark] = {
    "gsm8k": Benchmark("data/eval/gsm8k_test.jsonl", "gsm8k", "GSM8K test, 1319 grade-school problems"),
    "math500": Benchmark("data/eval/math500.jsonl", "math", "MATH-500 (prm800k split), 500 problems"),
    # The GAIN-RL authors' amc_eval.json: 83 problems, AMC 2022 (43) and AMC 2023 (40); the paper's
    # "AMC23" column is computed on this file, so the preset keeps all of it.
    "amc23": Benchmark("data/eval/amc.json", "amc", "AMC 2022+2023 as in the paper's repo, 83 problems"),
    "aime24": Benchmark("data/eval/aime24.json", "aime", "AIME 2024, 30 problems"),
    "arithmetic": Benchmark("data/arithmetic/val.jsonl", "arithmetic", "generated arithmetic validation set, 128"),
}


def benchmark_names() -> str:
    """The preset names, comma-separated (for error messages and `--help`)."""
    return ", ".join(BENCHMARKS)


def load_benchmark(benchmark: str | None = None, *, data: str | None = None, question_field: str | None = None,
                   answer_field: str | None = None, limit: int | None = None) -> tuple[list[Example], str]:
    """Examples of a benchmark preset or of a data file, the first `limit` of them.

    Args:
        benchmark: A name in `BENCHMARKS`. With `data` it only picks the answer parser (e.g. `gsm8k` for
            a file of GSM8K-style `#### 42` solutions); `None` with `data` reads answers as they are.
        data: Any file `load_rows` reads (JSON, JSONL, Parquet, CSV, a `save_to_disk` directory).
        question_field: Column with the question (default: the preset's, else `question`).
        answer_field: Column with the gold answer (default: the preset's, else `answer`).
        limit: Keep only the first `limit` examples (a fixed subset, the same on every run).

    Returns:
        The examples (their `index` is the row in the source file) and the resolved data path.

    Raises:
        ValueError: an unknown benchmark (the message lists the presets) or a bad `limit`.
        gainrl_pl.data.DataError: a malformed file or row (names the row and the fix).
    """
    if benchmark is None and data is None:
        raise ValueError(f"pass a benchmark ({benchmark_names()}) or a data file")
    if benchmark is not None and benchmark not in BENCHMARKS:
        raise ValueError(f"benchmark={benchmark!r} is unknown; presets: {benchmark_names()} "
                         "(or pass --data PATH --question-field Q --answer-field A)")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be a positive number of examples")
    preset_name = BENCHMARKS[benchmark].preset if benchmark else "generic"
    source = resolve_data_path(data if data is not None else BENCHMARKS[benchmark].path)
    fields = {k: v for k, v in (("question_field", question_field), ("answer_field", answer_field)) if v}
    preset = replace(DATASET_PRESETS[preset_name], **fields)
    examples, _ = build_examples(load_rows(source), preset)
    return (examples if limit is None else examples[:limit]), source
