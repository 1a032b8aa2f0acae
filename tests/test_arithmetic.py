"""The generated arithmetic set (gainrl_pl.arithmetic) and the files shipped in data/arithmetic."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from gainrl_pl.arithmetic import FAMILIES, generate_arithmetic, main
from gainrl_pl.data import REPO_ROOT, build_examples, load_rows

DATA = REPO_ROOT / "data" / "arithmetic"


def recompute(row: dict) -> int:
    """The answer from the question text alone, per family (independent of the generator's code)."""
    a, b = map(int, re.findall(r"\d+", row["question"]))
    family = row["family"]
    if family == "mul_1d" or family == "word_boxes":
        return a * b
    if family == "sub_2d":
        return a - b
    return a + b


def test_deterministic_for_a_seed():
    assert generate_arithmetic(200, seed=3) == generate_arithmetic(200, seed=3)
    assert generate_arithmetic(200, seed=3) != generate_arithmetic(200, seed=4)


def test_distinct_correct_and_balanced():
    rows = generate_arithmetic(700, seed=0)
    assert len({r["question"] for r in rows}) == 700
    for row in rows:
        assert row["answer"] == str(recompute(row)), row
        assert row["level"] == FAMILIES[row["family"]].level
    assert set(Counter(r["family"] for r in rows).values()) == {100}
    assert min(int(r["answer"]) for r in rows if r["family"] == "sub_2d") > 0


def test_family_subset_is_stable_and_exhaustion_redistributes():
    alone = generate_arithmetic(50, seed=0, families=["add_2d_2d"])
    assert {r["family"] for r in alone} == {"add_2d_2d"}
    # add_1d has 243 questions: asking for 600 from two families leaves the rest to the other one
    rows = generate_arithmetic(600, seed=0, families=["add_1d", "add_2d_1d"])
    assert Counter(r["family"] for r in rows) == {"add_1d": 243, "add_2d_1d": 357}
    with pytest.raises(ValueError, match="only 243"):
        generate_arithmetic(244, seed=0, families=["add_1d"])
    with pytest.raises(ValueError, match="unknown"):
        generate_arithmetic(1, seed=0, families=["nope"])


def test_exclude_gives_disjoint_sets():
    train = generate_arithmetic(300, seed=0)
    val = generate_arithmetic(100, seed=1, exclude=[r["question"] for r in train])
    assert not {r["question"] for r in train} & {r["question"] for r in val}


def test_shipped_files_match_the_generator_and_are_disjoint():
    train = load_rows(str(DATA / "train.jsonl"))
    val = load_rows(str(DATA / "val.jsonl"))
    assert train == generate_arithmetic(512, seed=0)
    assert val == generate_arithmetic(128, seed=1, exclude=[r["question"] for r in train])
    assert not {r["question"] for r in train} & {r["question"] for r in val}
    examples, report = build_examples(val, "arithmetic")
    assert len(examples) == 128 and report.skipped == {}
    assert examples[0].columns.keys() == {"family", "level"}


def test_command_line_writes_the_same_rows(tmp_path, capsys):
    out = tmp_path / "val.jsonl"
    main(["--n", "128", "--seed", "1", "--out", str(out), "--exclude", str(DATA / "train.jsonl")])
    assert out.read_bytes() == (DATA / "val.jsonl").read_bytes()
    assert "wrote 128 rows" in capsys.readouterr().out
    main(["--n", "5", "--seed", "0", "--out", str(out), "--families", "sub_2d,mul_1d"])
    assert {json.loads(line)["family"] for line in out.read_text().splitlines()} <= {"sub_2d", "mul_1d"}
