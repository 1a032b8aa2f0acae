"""Generated arithmetic problems at graded difficulty, for the CPU demo and the miniature GAIN-RL study.

GRPO learns only from prompts the policy sometimes solves. For the built-in SmolLM2-135M, GSM8K is out of
reach (~0 %), while short arithmetic spans the useful range. The families below are ordered (`level` 1-7)
by the base model's measured pass rate, easiest first (shared notes, demo-task.md: roughly 73 % for
one-digit addition down to ~5 % for subtraction at temperature 0.7).

    python -m gainrl_pl.arithmetic --n 512 --seed 0 --out data/arithmetic/train.jsonl
    python -m gainrl_pl.arithmetic --n 128 --seed 1 --out data/arithmetic/val.jsonl \
        --exclude data/arithmetic/train.jsonl
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


def _gets_more(person, item, a, b):
    name, pronoun = person
    return f"{name} has {a} {item}. {pronoun} gets {b} more. How many {item} does {name} have now?", a + b


def _subtract(variant, a, b):
    return (variant.format(a=a, b=b), a - b) if b < a else None  # only "minus a smaller number"


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
)}


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
    names = list(FAMILIES) if families is None else list(families)
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
    """`python -m gainrl_pl.arithmetic`: write a generated set as JSONL and print its family counts."""
    parser = argparse.ArgumentParser(prog="python -m gainrl_pl.arithmetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, required=True, help="number of rows")
    parser.add_argument("--seed", type=int, required=True, help="random seed (same seed -> same file)")
    parser.add_argument("--out", required=True, help="JSONL file to write")
    parser.add_argument("--families", default=None,
                        help=f"comma-separated subset of: {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--exclude", action="append", default=[],
                        help="JSONL file whose questions must not appear (repeatable), e.g. the train set")
    args = parser.parse_args(argv)
    excluded = [json.loads(line)["question"] for path in args.exclude
                for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    families = args.families.split(",") if args.families else None
    rows = generate_arithmetic(args.n, seed=args.seed, families=families, exclude=excluded)
    write_jsonl(rows, args.out)
    counts = Counter(row["family"] for row in rows)
    print(f"wrote {len(rows)} rows to {args.out}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
