"""Base-model pass rate per arithmetic family, at the study's sampling settings (a cheap calibration).

    .venv/bin/python experiments/calibrate_families.py --seed 1000           # 8 prompts x 4 samples per family
    .venv/bin/python experiments/calibrate_families.py --per-family 16 --samples 8 --families add_1d,sub_2d

Draws `--per-family` fresh prompts per family (seed 1000, so not the study's rows), samples `--samples`
completions each from the built-in SmolLM2-135M with the paper prompt at the study's temperature and token
budget (`gainrl-pl evaluate` underneath: same prompt, same reward), and prints per family the pass rate and
the fraction of prompts whose group is mixed (0 < pass < 1, i.e. a non-zero GRPO advantage). Writes
`experiments/results/calibration/t<T>_<tokens>tok_seed<seed>.json` (`--out`); samples go to `runs/calibration/` (a rerun resumes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (shared 2-core machine)
ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=None, help="comma-separated (default: the study's families)")
    ap.add_argument("--per-family", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--dtype", default="bfloat16", help="the study trains in bf16, so its rollouts are bf16")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--out", default=None,
                    help="result JSON (default experiments/results/calibration/t<T>_<tokens>tok_seed<seed>.json)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "experiments/results/calibration" /
                       f"t{args.temperature}_{args.max_new_tokens}tok_seed{args.seed}.json")

    import torch

    from gainrl_pl.data.arithmetic import STUDY_FAMILIES, generate_arithmetic, write_jsonl
    from gainrl_pl.evaluation.evaluate import evaluate

    torch.set_num_threads(args.threads)
    families = args.families.split(",") if args.families else list(STUDY_FAMILIES)
    rows = []
    for name in families:  # one family at a time: exact per-family counts
        rows += generate_arithmetic(args.per_family, seed=args.seed, families=[name])
    work = ROOT / "runs" / "calibration"
    # the rows' hash in the name: `evaluate` resumes from a directory's samples by row index
    digest = hashlib.sha256("\n".join(r["question"] for r in rows).encode()).hexdigest()[:10]
    data = work / f"calib_seed{args.seed}_{args.per_family}_{digest}.jsonl"
    write_jsonl(rows, data)
    t0 = time.time()
    samples_dir = work / f"{data.stem}_n{args.samples}_t{args.temperature}_{args.max_new_tokens}tok_{args.dtype}"
    evaluate(data=str(data), output_dir=samples_dir, num_samples=args.samples, temperature=args.temperature,
             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, dtype=args.dtype, seed=args.seed,
             progress=False)
    wall = time.time() - t0
    from gainrl_pl.evaluation.results import collect_samples

    records = collect_samples(samples_dir)
    per_family: dict[str, dict] = {}
    for index, row in enumerate(rows):
        correct = [bool(c) for c in records[index]["correct"]]
        fam = per_family.setdefault(row["family"], {"prompts": 0, "completions": 0, "correct": 0, "mixed": 0})
        fam["prompts"] += 1
        fam["completions"] += len(correct)
        fam["correct"] += sum(correct)
        fam["mixed"] += 0 < sum(correct) < len(correct)
    table = []
    for name in families:
        f = per_family[name]
        table.append({"family": name, "pass_rate": f["correct"] / f["completions"],
                      "mixed_fraction": f["mixed"] / f["prompts"], **f})
    result = {"command": "experiments/calibrate_families.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": vars(args), "wall_s": wall, "families": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'family':<12} pass  mixed  (prompts x samples = {args.per_family} x {args.samples}); {wall:.0f} s")
    for r in sorted(table, key=lambda r: -r["pass_rate"]):
        print(f"{r['family']:<12} {r['pass_rate']:.2f}  {r['mixed_fraction']:.2f}")


if __name__ == "__main__":
    main()
