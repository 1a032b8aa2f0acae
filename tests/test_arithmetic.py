"""The generated arithmetic set (gainrl_pl.data.arithmetic) and the files shipped in data/arithmetic."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from gainrl_pl.data import REPO_ROOT, build_examples, load_rows
from gainrl_pl.data.arithmetic import FAMILIES, STUDY_FAMILIES, generate_arithmetic, generate_study_sets, main

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


# ----------------------------------------------------------------------------------------- the study sets (issue 18)


def recompute_any(row: dict) -> int:
    """The answer from the question text alone, for every family the generator has."""
    numbers = list(map(int, re.findall(r"\d+", row["question"])))
    family = row["family"]
    if family in ("mul_1d", "word_boxes", "mul_10"):
        a, b = numbers
        return a * b
    if family == "sub_2d":
        a, b = numbers
        return a - b
    if family == "succ":
        return numbers[0] + 1
    if family == "word_has":
        return numbers[0]
    return sum(numbers)  # the additions, add_zero included


def test_every_family_renders_correct_answers():
    for name in FAMILIES:
        rows = generate_arithmetic(40, seed=5, families=[name])
        assert len({r["question"] for r in rows}) == 40
        for row in rows:
            assert row["answer"] == str(recompute_any(row)), row


def test_study_sets_are_balanced_disjoint_correct_and_ordered_by_level():
    train, val = generate_study_sets(seed=0)
    assert len(train) == 1024 and len(val) == 256
    assert Counter(r["family"] for r in train) == {f: 128 for f in STUDY_FAMILIES}
    assert Counter(r["family"] for r in val) == {f: 32 for f in STUDY_FAMILIES}
    assert not {r["question"] for r in train} & {r["question"] for r in val}
    assert len({r["question"] for r in train}) == 1024 and len({r["question"] for r in val}) == 256
    for row in train + val:
        assert row["answer"] == str(recompute_any(row)), row
        assert row["level"] == STUDY_FAMILIES.index(row["family"]) + 1
    # shuffled: not grouped by family
    assert len({r["family"] for r in train[:16]}) > 3


def test_study_sets_are_seeded():
    assert generate_study_sets(seed=3, train_per_family=10, val_per_family=4) == \
        generate_study_sets(seed=3, train_per_family=10, val_per_family=4)
    assert generate_study_sets(seed=3, train_per_family=10, val_per_family=4) != \
        generate_study_sets(seed=4, train_per_family=10, val_per_family=4)
    # a family's rows do not depend on which other families are in the set
    alone, _ = generate_study_sets(seed=3, train_per_family=10, val_per_family=4, families=["sub_2d"])
    both, _ = generate_study_sets(seed=3, train_per_family=10, val_per_family=4, families=["add_1d", "sub_2d"])
    assert {r["question"] for r in alone} == {r["question"] for r in both if r["family"] == "sub_2d"}


def test_study_sets_refuse_what_a_family_cannot_give():
    with pytest.raises(ValueError, match="mul_1d has only 192"):
        generate_study_sets(seed=0, train_per_family=180, val_per_family=20, families=["mul_1d"])
    with pytest.raises(ValueError, match="unknown"):
        generate_study_sets(seed=0, families=["nope"])


def test_shipped_study_files_regenerate_byte_identically(tmp_path, capsys):
    main(["--study", "--seed", "0", "--out", str(tmp_path)])
    for name in ("study_train.jsonl", "study_val.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes()
    assert "wrote 1024 rows" in capsys.readouterr().out
    examples, report = build_examples(load_rows(str(DATA / "study_val.jsonl")), "arithmetic")
    assert len(examples) == 256 and report.skipped == {}
