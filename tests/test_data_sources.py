"""Where data comes from on a user's machine: hub ids for training sets, shipped files for evaluation sets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gainrl_pl.data import (
    DataError,
    build_examples,
    load_rows,
    looks_like_hub_id,
    parse_hub_source,
    resolve_data_path,
)
from gainrl_pl.evaluation.sets import BENCHMARKS, load_benchmark

REPO = Path(__file__).resolve().parents[1]


def test_hub_source_syntax():
    assert parse_hub_source("openai/gsm8k") == ("openai/gsm8k", None, None)
    assert parse_hub_source("openai/gsm8k:main:train") == ("openai/gsm8k", "main", "train")
    assert parse_hub_source("owner/name::test") == ("owner/name", None, "test")
    assert parse_hub_source("owner/name:cfg:train[:100]") == ("owner/name", "cfg", "train[:100]")
    assert looks_like_hub_id("DigitalLearningGmbH/MATH-lighteval:default:train")
    for path in ("data/eval/gsm8k_test.jsonl", "train.jsonl", "./x/y", "../a/b/c"):
        assert not looks_like_hub_id(path), path
    assert resolve_data_path("openai/gsm8k:main:train") == "openai/gsm8k:main:train"  # left for load_rows


@pytest.fixture()
def fake_hub(monkeypatch):
    """datasets.load_dataset without the network: records its arguments and returns two rows."""
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        table = datasets.Dataset.from_list([{"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"},
                                            {"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"}])
        return table if split else datasets.DatasetDict({"train": table, "test": table})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_dataset_config_and_split_reach_load_dataset(fake_hub):
    rows = load_rows("openai/gsm8k:main:train")
    assert fake_hub == [("openai/gsm8k", "main", "train")] and rows[1]["question"] == "What is 2 + 2?"
    with pytest.raises(DataError, match=r"splits \['train', 'test'\]"):  # several splits and none named
        load_rows("openai/gsm8k:main")
    with pytest.raises(DataError, match="give it once"):
        load_rows("openai/gsm8k:main:train", split="test")


def test_the_paper_configs_training_set_loads_through_the_datamodule(fake_hub, tiny_model_dir):
    import yaml
    from gainrl_pl.datamodules import GainRLDataModule

    data = yaml.safe_load((REPO / "configs/gsm8k_qwen05b_paper.yaml").read_text())["data"]
    dm = GainRLDataModule(train_data=data["train_data"], preset=data["preset"], prompt="none",
                          tokenizer=str(tiny_model_dir))
    items, summary = dm.build_split(data["train_data"], "train")
    assert fake_hub == [("openai/gsm8k", "main", "train")]
    assert [it["columns"]["answer"] for it in items] == ["2", "4"] and summary["used"] == 2


def test_math_solution_preset_reads_the_answer_from_the_last_box():
    rows = [{"problem": "Compute $1+1$.", "solution": "First $\\boxed{3}$ is wrong; so $\\boxed{\\frac{4}{2}}$.",
             "level": "Level 1", "type": "Algebra"},
            {"problem": "No box.", "solution": "The answer is 2.", "level": "Level 1", "type": "Algebra"}]
    examples, report = build_examples(rows, "math_solution")
    assert [e.answer for e in examples] == ["\\frac{4}{2}"] and report.skipped == {"answer_unparseable": 1}
    # MATH-500 has both a solution and an answer column: both presets read the same 500 answers
    math500 = load_rows(resolve_data_path("data/eval/math500.jsonl"))
    by_solution, _ = build_examples(math500, "math_solution")
    by_answer, _ = build_examples(math500, "math")
    squash = lambda text: re.sub(r"\s+", "", text)  # noqa: E731
    assert len(by_solution) == 500 and [squash(e.answer) for e in by_solution] == [squash(e.answer) for e in by_answer]


def test_evaluation_presets_point_at_files_that_ship_with_their_licenses():
    expected = {"gsm8k": 1319, "math500": 500, "amc23": 83, "aime24": 30}
    for name, count in expected.items():
        examples, source = load_benchmark(name)
        assert Path(source).is_relative_to(REPO / "data" / "eval") and len(examples) == count, name
    assert all(not b.path.startswith("..") for b in BENCHMARKS.values())
    readme = (REPO / "data/eval/README.md").read_text()
    for license_file in ("LICENSE-gsm8k", "LICENSE-prm800k", "LICENSE-MATH", "LICENSE-GAINRL"):
        assert (REPO / "data/eval" / license_file).is_file() and license_file in readme
        assert "MIT License" in (REPO / "data/eval" / license_file).read_text()


def test_readme_angles_command_runs(tiny_model_dir, tmp_path):
    """The README's `gainrl-pl angles` line, as a subprocess: the hub id swapped for the shipped GSM8K test
    file (tests stay offline) and the tiny model for the built-in one."""
    readme = (REPO / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith("gainrl-pl angles "))
    args = line.split("#")[0].split()[2:]
    assert args[args.index("--data") + 1] == "openai/gsm8k:main:train"
    args[args.index("--data") + 1] = str(REPO / "data/eval/gsm8k_test.jsonl")
    out = tmp_path / args[args.index("--output") + 1]
    args[args.index("--output") + 1] = str(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GAINRL_PL_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([str(Path(sys.executable).with_name("gainrl-pl")), "angles", *args, "--limit", "8",
                           "--model", str(tiny_model_dir)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8 and sorted(r["rank"] for r in rows) == list(range(8))
