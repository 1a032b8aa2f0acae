"""Evaluation results on disk: per-sample JSONL files (resumable, one per shard), run config, summaries.

Layout of an evaluation directory:

    samples.jsonl            one JSON line per prompt (unsharded run)
    samples.rank{R}.jsonl    the same, written by shard R of a sharded run
    config.json              the settings that determine the samples (a rerun must match them)
    summary.json, summary.md the statistics over all shards' samples

A sample line: `index` (row in the source file), `question`, `gold`, and one entry per generated
completion in `completions`, `predictions` (the extracted answer), `correct`, `lengths` (tokens, EOS
included) and `truncated` (no EOS within the token limit).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from gainrl_pl.evaluation.metrics import pass_at_k, wilson_interval

SAMPLES_FILE = "samples.jsonl"
_SHARD_FILE = re.compile(r"^samples\.rank(\d+)\.jsonl$")


def samples_path(output_dir: str | Path, shard_rank: int = 0, num_shards: int = 1) -> Path:
    """Where one shard appends its samples: `samples.jsonl` unsharded, `samples.rank{R}.jsonl` otherwise."""
    name = SAMPLES_FILE if num_shards == 1 else f"samples.rank{shard_rank}.jsonl"
    return Path(output_dir) / name


def sample_files(output_dir: str | Path) -> list[Path]:
    """Every samples file in `output_dir`: the unsharded one first, then the shards by rank."""
    directory = Path(output_dir)
    if not directory.is_dir():
        return []
    shards = sorted((p for p in directory.iterdir() if _SHARD_FILE.match(p.name)),
                    key=lambda p: int(_SHARD_FILE.match(p.name).group(1)))
    plain = directory / SAMPLES_FILE
    return ([plain] if plain.exists() else []) + shards


def read_samples(path: str | Path) -> list[dict]:
    """The sample records of one file. A torn last line (a run killed mid-write) is ignored; it is redone."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: the write was cut short
                continue
            raise ValueError(f"{path}: line {number} is not valid JSON; delete the line (it is redone on the "
                             "next run) or the file") from None
    return records


def repair_tail(path: str | Path) -> None:
    """Cut a torn last line off a samples file before appending, so the next record starts on its own line."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def collect_samples(output_dir: str | Path) -> dict[int, dict]:
    """Records of all samples files by `index`; an index found twice keeps its first record."""
    records: dict[int, dict] = {}
    for path in sample_files(output_dir):
        for record in read_samples(path):
            records.setdefault(int(record["index"]), record)
    return records


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename: readers (other shards) never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


def check_run_config(output_dir: str | Path, settings: dict[str, Any], *, replace: bool = False,
                     legacy: dict[str, Any] | None = None) -> None:
    """Refuse to mix samples made with other settings; write `config.json` on the first run.

    With `replace` (after `--overwrite`) the settings are written without comparing. `legacy` gives the
    value a setting had before it was recorded: a `config.json` without that key is read as having it.

    Raises:
        ValueError: `config.json` exists with different settings (the message lists them).
    """
    path = Path(output_dir) / "config.json"
    if path.exists() and not replace:
        saved = {**(legacy or {}), **json.loads(path.read_text(encoding="utf-8"))}
        diff = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if diff:
            shown = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in diff.items())
            raise ValueError(f"{output_dir} holds samples made with other settings ({shown}). Use another "
                             "output directory, or --overwrite to delete them.")
        return
    write_json_atomic(path, settings)


def remove_results(output_dir: str | Path, shard_rank: int = 0, num_shards: int = 1) -> None:
    """Delete what `--overwrite` replaces: this shard's samples file; shard 0 also the summaries,
    the config and the unsharded/extra shard files (other shards delete their own)."""
    directory = Path(output_dir)
    samples_path(directory, shard_rank, num_shards).unlink(missing_ok=True)
    if shard_rank != 0:
        return
    for name in ("summary.json", "summary.md", "config.json", SAMPLES_FILE):
        (directory / name).unlink(missing_ok=True)
    for path in sample_files(directory):
        match = _SHARD_FILE.match(path.name)
        if match and int(match.group(1)) >= num_shards:
            path.unlink()


def summarize(records: list[dict], *, num_samples: int, expected: int | None = None,
              **header: Any) -> dict[str, Any]:
    """Accuracy, pass@k, mean length and a 95% interval over per-prompt records.

    accuracy: mean over prompts of the fraction of correct samples (= pass@1).
    pass@k: the unbiased estimator (Chen et al. 2021) averaged over prompts, for k = 1 and k = n.
    ci95: Wilson score interval. Greedy (n = 1): over the prompts' 0/1 outcomes, the textbook case. n > 1:
        the per-prompt accuracies (fractions) are the successes over `prompts` trials; since a [0, 1]
        variable with mean p has variance at most p(1 - p), this is conservative, and it accounts for
        samples of one prompt being correlated (it does not treat n*prompts samples as independent).
    mean_length: mean completion length in tokens (EOS included) over all samples.

    Args:
        records: Sample records (see the module docstring), each with `num_samples` completions.
        num_samples: n, completions per prompt.
        expected: How many prompts the evaluation has; `missing` counts the ones without a record.
        **header: Fields put first in the summary (model, benchmark, ...).
    """
    prompts = len(records)
    correct_counts = [sum(bool(c) for c in r["correct"]) for r in records]
    for record in records:
        if len(record["correct"]) != num_samples:
            raise ValueError(f"sample {record['index']} has {len(record['correct'])} completions, expected "
                             f"{num_samples}: the samples files mix runs with different --num-samples")
    per_prompt = [c / num_samples for c in correct_counts]
    accuracy = sum(per_prompt) / prompts if prompts else math.nan
    ks = sorted({1, num_samples})
    pass_k = {f"pass@{k}": (sum(pass_at_k(num_samples, c, k) for c in correct_counts) / prompts if prompts
                            else math.nan) for k in ks}
    lengths = [n for r in records for n in r["lengths"]]
    truncated = [t for r in records for t in r["truncated"]]
    low, high = wilson_interval(sum(per_prompt), prompts)
    return {**header, "prompts": prompts, "num_samples": num_samples, "accuracy": accuracy,
            "ci95": [low, high],
            "ci_method": "wilson" if num_samples == 1 else "wilson over per-prompt accuracies (conservative)",
            "pass_at_k": pass_k, "mean_length": sum(lengths) / len(lengths) if lengths else math.nan,
            "truncated_fraction": sum(truncated) / len(truncated) if truncated else math.nan,
            "missing": (expected - prompts) if expected is not None else 0}


_COLUMNS = ("model", "benchmark", "n", "samples/prompt", "accuracy", "95% CI", "pass@k", "mean length (tokens)",
            "answer extraction")


def markdown_row(summary: dict[str, Any]) -> str:
    """One Markdown table row for a summary (numbers as percentages with one decimal)."""
    low, high = summary["ci95"]
    pass_k = ", ".join(f"{k} {100 * v:.1f}%" for k, v in summary["pass_at_k"].items())
    cells = [f"`{summary.get('model')}`", str(summary.get("benchmark")), str(summary["prompts"]),
             str(summary["num_samples"]), f"{100 * summary['accuracy']:.1f}%",
             f"[{100 * low:.1f}, {100 * high:.1f}]", pass_k, f"{summary['mean_length']:.1f}",
             # summaries written before the option existed were all scored the flexible way
             str(summary.get("answer_extraction", "flexible"))]
    return "| " + " | ".join(cells) + " |"


def markdown_table(summaries: list[dict[str, Any]]) -> str:
    """A Markdown table with one row per summary (per benchmark)."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + " --- |" * len(_COLUMNS)]
    return "\n".join(lines + [markdown_row(s) for s in summaries]) + "\n"


def write_summary(output_dir: str | Path, summary: dict[str, Any]) -> None:
    """Write `summary.json` and `summary.md` (a one-row table) into `output_dir`."""
    directory = Path(output_dir)
    write_json_atomic(directory / "summary.json", summary)
    (directory / "summary.md").write_text(markdown_table([summary]), encoding="utf-8")
