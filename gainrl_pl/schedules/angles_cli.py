"""`gainrl-pl angles`: score a dataset's prompts by angle concentration and write the ranking.

    gainrl-pl angles --data openai/gsm8k:main:train --preset gsm8k --output scores.jsonl

Writes one JSON object per kept input row (`index`, `score`, `intra`, `inter`, `rank`, `num_tokens`;
rank 0 = highest score), prints a ranking summary, and caches scores per (model, layer, prompts, weights).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from gainrl_pl.data import DATASET_PRESETS
from gainrl_pl.scoring import SITES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gainrl-pl angles", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="rows to score: JSON/JSONL/Parquet/CSV, a datasets dir, or hub id")
    p.add_argument("--output", required=True, help="JSONL file to write (one object per scored row)")
    p.add_argument("--model", default="builtin", help="model dir, .gguf file, hub id, or `builtin` (default)")
    p.add_argument("--preset", default="gsm8k", choices=sorted(DATASET_PRESETS), help="dataset preset (fields)")
    p.add_argument("--question-field", default=None, help="override the preset's question column")
    p.add_argument("--answer-field", default=None, help="override the preset's answer column")
    p.add_argument("--prompt", default="paper", help="prompt preset: paper, plain, none")
    p.add_argument("--max-prompt-length", type=int, default=512, help="longer prompts are skipped and counted")
    p.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    p.add_argument("--on-bad-row", default="raise", choices=["raise", "skip"], help="malformed rows: raise or skip")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward")
    p.add_argument("--layer", type=int, default=-1, help="decoder layer (negative counts from the end)")
    p.add_argument("--site", default="mlp_input", choices=SITES)
    p.add_argument("--intra-weight", type=float, default=1.0, help="weight of C_intra (paper 1)")
    p.add_argument("--inter-weight", type=float, default=1.0, help="weight of C_inter (paper 1, reference script 8)")
    p.add_argument("--no-intra-diagonal", action="store_true", help="C_intra over i != j pairs only")
    p.add_argument("--dtype", default="float32", help="model dtype (float32, bfloat16)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--cache-dir", default=None, help="score cache dir (default ~/.cache/gainrl_pl/scores)")
    p.add_argument("--no-cache", action="store_true", help="recompute even if cached")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    import torch

    from gainrl_pl.datamodules import GainRLDataModule
    from gainrl_pl.models import load_model
    from gainrl_pl.schedules.rankings import angle_ranking

    if args.threads:
        torch.set_num_threads(args.threads)
    dm = GainRLDataModule(train_data=args.data, preset=args.preset, question_field=args.question_field,
                          answer_field=args.answer_field, prompt=args.prompt, tokenizer=args.model,
                          max_prompt_length=args.max_prompt_length, on_bad_row=args.on_bad_row)
    items, summary = dm.build_split(args.data, "data", limit=args.limit)
    model = load_model(args.model, dtype=args.dtype)
    start = time.perf_counter()
    order, scores, ranking = angle_ranking(
        model, dm.tokenizer, items, layer=args.layer, site=args.site, w_intra=args.intra_weight,
        w_inter=args.inter_weight, intra_diagonal=not args.no_intra_diagonal, batch_size=args.batch_size,
        cache_dir=args.cache_dir, use_cache=not args.no_cache, model_id=args.model)
    seconds = time.perf_counter() - start
    rank_of = {pos: r for r, pos in enumerate(order)}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for pos, item in enumerate(items):
            s = scores[pos]
            fh.write(json.dumps({"index": item["index"], "score": float(s.score), "intra": float(s.intra),
                                 "inter": float(s.inter), "rank": rank_of[pos],
                                 "num_tokens": len(item["input_ids"])}) + "\n")
    os.replace(tmp, out)
    skipped = summary.get("bad_rows", 0) + summary["too_long"]
    report = {"rows": summary["rows"], "scored": len(items), "skipped": skipped, "too_long": summary["too_long"],
              "beyond_limit": summary["rows"] - len(items) - skipped, "seconds": round(seconds, 2),
              "prompts_per_s": round(len(items) / max(seconds, 1e-9), 2),
              **ranking}
    print(json.dumps(report, indent=1))
    top = [items[p]["question"][:80] for p in order[:3]]
    print("top-ranked questions:", *top, sep="\n  ", file=sys.stdout)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
