"""Generated arithmetic problems at graded difficulty, for the CPU demo and the miniature GAIN-RL study.

GRPO learns only from prompts the policy sometimes solves. For the built-in SmolLM2-135M, GSM8K is out of
reach (~0 %), while short arithmetic spans the useful range. The families below are ordered (`level` 1-7)
by the base model's measured pass rate, easiest first (shared notes, demo-task.md: roughly 73 % for
one-digit addition down to ~5 % for subtraction at temperature 0.7).

    python -m gainrl_pl.data.arithmetic --n 512 --seed 0 --out data/arithmetic/train.jsonl
    python -m gainrl_pl.data.arithmetic --n 128 --seed 1 --out data/arithmetic/val.jsonl \
        --exclude data/arithmetic/train.jsonl
    python -m gainrl_pl.data.arithmetic --study --seed 0 --out data/arithmetic      # study_{train,val}.jsonl

The schedule study (issue 18) uses its own eight families (`STUDY_FAMILIES`, `level` 1-8 from a calibration
at the study's settings) in exact per-family counts, with a held-out validation set from the same families:
`generate_study_sets`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

_NAMES = (("Max", "He"), ("Lena", "She"), ("Omar", "He"), ("Mia", "She"),
          ("Sam", "He"), ("Ava", "She"), ("Leo", "He"), ("Zoe", "She"))
_ITEMS = ("stickers", "apples", "marbles", "pencils", "cookies", "shells", "cards", "coins")


@dataclass(frozen=True)
class Family:
    """One kind of problem: every combination of its `axes` is one candidate question.

    Attributes:
        name: Identifier written to the `family` column.
        level: Difficulty rank, 1 = easiest for the base model (written to the `level` column).
        description: What the problems look like (for READMEs and `--help`).
        axes: The values each slot ranges over (wording variant, operands, names, ...).
        render: Maps one combination of axis values to (question, answer), or None if it is not valid.
    """

    name: str
    level: int
    description: str
    axes: tuple[Sequence, ...]
    render: Callable[..., tuple[str, int] | None]

    @property
    def capacity(self) -> int:
        """Number of axis combinations (an upper bound on distinct questions)."""
        return math.prod(len(axis) for axis in self.axes)

    def questions(self, rng: random.Random) -> Iterator[tuple[str, int]]:
        """Every valid question once, in an order drawn from `rng` (mixed-radix decoding of a permutation)."""
        for flat in rng.sample(range(self.capacity), self.capacity):
            values = []
            for axis in reversed(self.axes):
                flat, digit = divmod(flat, len(axis))
                values.append(axis[digit])
            rendered = self.render(*reversed(values))
            if rendered is not None:
                yield rendered


def _binary(templates: dict[str, Callable[[int, int], int]]):
    """A renderer for "What is a OP b?" questions: the variant picks the wording and the operation."""
    return lambda variant, a, b: (variant.format(a=a, b=b), templates[variant](a, b))


_ADD = {"What is {a} + {b}?": int.__add__, "What is {a} plus {b}?": int.__add__,
        "What is the sum of {a} and {b}?": int.__add__}
_MUL = {"What is {a} times {b}?": int.__mul__, "What is {a} multiplied by {b}?": int.__mul__,
        "What is the product of {a} and {b}?": int.__mul__}
_SUB = {"What is {a} - {b}?": int.__sub__, "What is {a} minus {b}?": int.__sub__}


def _boxes(person, item, a, b):
    name = person[0]
    return (f"{name} has {a} boxes with {b} {item} in each box. How many {item} does {name} have in total?",
            a * b)


def _has(person, item, a):
    name = person[0]
    return f"{name} has {a} {item}. How many {item} does {name} have?", a


def _add_zero(variant, a):
    return variant.format(a=a), a


def _gets_more(person, item, a, b):
    name, pronoun = person
    return f"{name} has {a} {item}. {pronoun} gets {b} more. How many {item} does {name} have now?", a + b


def _subtract(variant, a, b):
    return (variant.format(a=a, b=b), a - b) if b < a else None  # only "minus a smaller number"


def _successor(variant, n):
    return variant.format(n=n), n + 1


_SMALL = {"What is {a} + {b}?": int.__add__, "What is {a} plus {b}?": int.__add__,
          "What is the sum of {a} and {b}?": int.__add__, "How much is {a} + {b}?": int.__add__,
          "Add {a} and {b}.": int.__add__, "What do you get when you add {a} and {b}?": int.__add__}
_TEN_TIMES = {"What is 10 times {b}?": lambda a, b: 10 * b, "What is {b} times 10?": lambda a, b: 10 * b,
              "What is {b} multiplied by 10?": lambda a, b: 10 * b}
_SUCC = ("What number comes right after {n}?", "What is one more than {n}?", "What is {n} + 1?")
_TENS = {"What is {a} + {b}?": int.__add__, "What is {a} plus {b}?": int.__add__,
         "What is the sum of {a} and {b}?": int.__add__}

# Ordered by measured base-model pass rate (demo-task.md), which is what `level` encodes.
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("add_1d", 1, "one-digit addition: What is 7 + 5?", (tuple(_ADD), range(1, 10), range(1, 10)),
           _binary(_ADD)),
    Family("mul_1d", 2, "one-digit multiplication: What is 8 times 6?", (tuple(_MUL), range(2, 10), range(2, 10)),
           _binary(_MUL)),
    Family("add_2d_1d", 3, "two-digit plus one-digit: What is 66 + 9?",
           (tuple(_ADD)[:2], range(10, 100), range(1, 10)), _binary(_ADD)),
    Family("word_boxes", 4, "a boxes of b: Max has 8 boxes with 2 stickers in each box...",
           (_NAMES, _ITEMS, range(2, 10), range(2, 10)), _boxes),
    Family("add_2d_2d", 5, "two-digit plus two-digit: What is 47 + 38?",
           (tuple(_ADD)[:2], range(10, 100), range(10, 100)), _binary(_ADD)),
    Family("word_more", 6, "has a, gets b more: Lena has 23 marbles. She gets 14 more...",
           (_NAMES, _ITEMS, range(10, 60), range(10, 40)), _gets_more),
    Family("sub_2d", 7, "subtraction, 10-60 minus a smaller number: What is 42 - 17?",
           (tuple(_SUB), range(10, 61), range(1, 60)), _subtract),
    # Not part of the default set (whose files are shipped): candidates for an easier end of the study set.
    Family("succ", 0, "the next number: What number comes right after 37?", (_SUCC, range(1, 99)), _successor),
    Family("word_has", 0, "the answer is in the question: Max has 7 apples. How many apples does Max have?",
           (_NAMES, _ITEMS, range(2, 100)), _has),
    Family("add_zero", 0, "plus zero: What is 37 + 0?", (("What is {a} + 0?", "What is {a} plus 0?"), range(1, 100)),
           _add_zero),
    Family("add_small", 0, "small sums, six wordings: What is 3 + 2?", (tuple(_SMALL), range(1, 6), range(1, 6)),
           _binary(_SMALL)),
    Family("mul_10", 0, "times ten: What is 10 times 7?", (tuple(_TEN_TIMES), range(1), range(2, 100)),
           _binary(_TEN_TIMES)),
    Family("add_tens", 0, "multiples of ten: What is 30 + 40?", (tuple(_TENS), range(10, 100, 10), range(10, 100, 10)),
           _binary(_TENS)),
)}


DEFAULT_FAMILIES = ("add_1d", "mul_1d", "add_2d_1d", "word_boxes", "add_2d_2d", "word_more", "sub_2d")
"""The families of the shipped demo/train/val files (levels 1-7), the default of `generate_arithmetic`."""


STUDY_FAMILIES = ("add_1d", "add_zero", "mul_1d", "word_boxes", "mul_10", "add_2d_1d", "sub_2d", "add_2d_2d")
"""The study set's families, easiest first: the order of the base model's pass rate at the study's settings
(T=0.7, 64 new tokens, paper prompt, bf16), pooled over two calibrations of 8 prompts x 4 samples per family
(`experiments/calibrate_families.py --seed 1000` and `--seed 1001`: 0.38, 0.34, 0.30, 0.30, 0.13, 0.08,
0.05, 0.03; mul_1d before word_boxes, tied here, as in the shared notes). The study files' `level` column
encodes this order (1 = add_1d ... 8 = add_2d_2d). Families at ~0 % (word_more) are left out: every group of
theirs has zero reward variance."""


def generate_arithmetic(n: int, *, seed: int, families: Iterable[str] | None = None,
                        exclude: Iterable[str] = ()) -> list[dict]:
    """Draw `n` distinct arithmetic problems, spread evenly over the families, in a seeded random order.

    Args:
        n: Number of rows.
        seed: Same seed (and arguments) -> same rows, on any machine (string-seeded `random.Random`).
        families: Family names from `FAMILIES` (default: all). A family that runs out of questions leaves
            its share to the others.
        exclude: Question texts never to produce (e.g. the training set's, to make a disjoint validation set).

    Returns:
        Rows `{"question", "answer" (integer as text), "family", "level"}`.
    """
    names = list(DEFAULT_FAMILIES) if families is None else list(families)
    unknown = [name for name in names if name not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"families={names!r}: unknown {unknown}; allowed: {', '.join(FAMILIES)}")
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    excluded = set(exclude)
    # One stream per family, seeded by (seed, family): adding or dropping a family leaves the others' draws.
    streams = {name: FAMILIES[name].questions(random.Random(f"{seed}:{name}")) for name in names}
    rows: list[dict] = []
    # Round-robin over families gives an even split; exhausted families drop out.
    for name in itertools.cycle(names):
        if len(rows) == n or not streams:
            break
        if name not in streams:
            continue
        for question, answer in streams[name]:
            if question not in excluded:
                excluded.add(question)  # distinct within the set too
                rows.append({"question": question, "answer": str(answer), "family": name,
                             "level": FAMILIES[name].level})
                break
        else:
            del streams[name]
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} distinct questions are available in families {names} "
                         f"(after {len(set(exclude))} excluded); asked for {n}")
    random.Random(f"{seed}:order").shuffle(rows)
    return rows


def generate_study_sets(*, seed: int, train_per_family: int = 128, val_per_family: int = 32,
                        families: Sequence[str] = STUDY_FAMILIES) -> tuple[list[dict], list[dict]]:
    """The study's training and validation sets: exact per-family counts, disjoint, from the same families.

    Each family's questions come in one seeded order (seeded by (seed, family), so adding a family leaves the
    others unchanged); validation takes its first `val_per_family`, training the next `train_per_family`, so
    no question is in both (numbers may repeat in other wording for the one-digit families, whose number
    pairs are fewer than the rows). `level` is the family's 1-based position in `families` (easiest first),
    not the demo set's level. Each set is shuffled (seeded).

    Returns:
        (train, val): rows `{"question", "answer", "family", "level"}`.
    """
    names = list(families)
    unknown = [name for name in names if name not in FAMILIES]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"families={names!r}: unknown or repeated {unknown}; allowed: {', '.join(FAMILIES)}")
    if train_per_family < 0 or val_per_family < 0:
        raise ValueError(f"train_per_family={train_per_family} and val_per_family={val_per_family} must be >= 0")
    train: list[dict] = []
    val: list[dict] = []
    for level, name in enumerate(names, start=1):
        need = val_per_family + train_per_family
        stream = FAMILIES[name].questions(random.Random(f"study:{seed}:{name}"))
        drawn = list(itertools.islice(stream, need))
        if len(drawn) < need:
            raise ValueError(f"family {name} has only {len(drawn)} distinct questions; asked for {val_per_family} "
                             f"validation + {train_per_family} training rows")
        rows = [{"question": q, "answer": str(a), "family": name, "level": level} for q, a in drawn]
        val += rows[:val_per_family]
        train += rows[val_per_family:]
    random.Random(f"study:{seed}:train-order").shuffle(train)
    random.Random(f"study:{seed}:val-order").shuffle(val)
    return train, val


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> None:
    """Write rows as JSONL atomically (a partial file never replaces a good one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    """`python -m gainrl_pl.data.arithmetic`: write a generated set as JSONL and print its family counts."""
    parser = argparse.ArgumentParser(prog="python -m gainrl_pl.data.arithmetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="number of rows (not with --study)")
    parser.add_argument("--seed", type=int, required=True, help="random seed (same seed -> same file)")
    parser.add_argument("--out", required=True, help="JSONL file to write (with --study: the directory)")
    parser.add_argument("--study", action="store_true",
                        help="write the schedule study's study_train.jsonl and study_val.jsonl into --out")
    parser.add_argument("--train-per-family", type=int, default=128, help="with --study")
    parser.add_argument("--val-per-family", type=int, default=32, help="with --study")
    parser.add_argument("--families", default=None,
                        help=f"comma-separated subset of: {', '.join(FAMILIES)} (default: the demo's 7; with "
                        "--study: STUDY_FAMILIES, easiest first)")
    parser.add_argument("--exclude", action="append", default=[],
                        help="JSONL file whose questions must not appear (repeatable), e.g. the train set")
    args = parser.parse_args(argv)
    if args.study:
        families = args.families.split(",") if args.families else STUDY_FAMILIES
        train, val = generate_study_sets(seed=args.seed, train_per_family=args.train_per_family,
                                         val_per_family=args.val_per_family, families=families)
        for name, rows in (("study_train", train), ("study_val", val)):
            path = Path(args.out) / f"{name}.jsonl"
            write_jsonl(rows, path)
            counts = Counter(row["family"] for row in rows)
            print(f"wrote {len(rows)} rows to {path}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        return
    if args.n is None:
        parser.error("--n is required (or --study)")
    excluded = [json.loads(line)["question"] for path in args.exclude
                for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    families = args.families.split(",") if args.families else None
    rows = generate_arithmetic(args.n, seed=args.seed, families=families, exclude=excluded)
    write_jsonl(rows, args.out)
    counts = Counter(row["family"] for row in rows)
    print(f"wrote {len(rows)} rows to {args.out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
