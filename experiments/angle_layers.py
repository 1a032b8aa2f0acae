"""Why does the angle ranking put the hardest arithmetic first? Score every layer and weighting once.

Issue 7 asks, before any default changes, whether another layer, the reference script's (1, 8) weights,
or another sigma would make GAIN-RL's ordering agree with what the model learns first. This script does
the layer and weight part without training: one forward over the study's 192 training prompts (the
same prompts, preset and dtype as the study), the MLP input of every decoder layer captured, and the
angle concentration (intra, inter) computed per layer. For each layer and weighting it reports the
Spearman correlation of the score (high = ranked first, as GAIN-RL does) with

- `ease`: minus the generator's difficulty `level` (1 easiest .. 5 hardest; the measured base pass rates
  of the families follow it, see ../shared/notes/demo-task.md),
- `short`: minus the question's length in tokens (the `length` baseline's ordering),
- `learned_early`: minus the first-solved step of each prompt in the study's uniform arms (where what is
  drawn does not depend on the angle; never solved = 13, censored), over the prompts those arms drew.

Positive = the score puts easy / short / early-learned prompts first. Writes
`experiments/results/angle_layers.{json,png}` and prints a table.

    python experiments/angle_layers.py            # ~1-2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (BENCHMARKS.md section 1)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
WEIGHTS = {"paper (1, 1)": (1.0, 1.0), "reference script (1, 8)": (1.0, 8.0), "intra only": (1.0, 0.0),
           "inter only": (0.0, 1.0)}
CENSORED_STEP = 13


def capture_all_layers(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """MLP inputs of every decoder layer for one batch (the paper's scoring site, at each depth)."""
    from gainrl_pl.models import position_ids_from_mask
    from gainrl_pl.scoring import find_decoder_layers

    captured: list[torch.Tensor] = []
    handles = [layer.mlp.register_forward_pre_hook(lambda m, args: captured.append(args[0].float()))
               for layer in find_decoder_layers(model)]
    try:
        with torch.inference_mode():  # positions as the scorer and generate use them
            model.model(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def first_solved_from_uniform_runs() -> dict[int, list[int]]:
    """Row -> first-solved step in each uniform-sampling run that drew it (study results)."""
    out: dict[int, list[int]] = {}
    for path in sorted(RESULTS.glob("uniform*_seed*.json")):
        run = json.loads(path.read_text())
        if run.get("scale") != "cpu":
            continue
        for p in run["prompts"]:
            if p["times_drawn"]:
                out.setdefault(p["row"], []).append(p["first_solved_step"] or CENSORED_STEP)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "data/arithmetic/demo_train.jsonl"))
    ap.add_argument("--dtype", default="bfloat16", help="the study's dtype (configs/demo.yaml)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from gainrl_pl.angles import angle_concentration, weighted_score
    from gainrl_pl.data import build_examples
    from gainrl_pl.data.loading import load_rows
    from gainrl_pl.data.prompts import build_prompt, get_prompt_template
    from gainrl_pl.models import load_model, load_tokenizer
    from gainrl_pl.scoring import segment_masks, spearman

    rows = load_rows(args.data)
    examples, _ = build_examples(rows, "arithmetic")
    tokenizer = load_tokenizer("builtin")
    model = load_model("builtin", dtype=getattr(torch, args.dtype)).eval()
    template = get_prompt_template("paper")
    prompts = [build_prompt(tokenizer, e.question, template) for e in examples]

    intra: list[list[float]] = []  # [layer][prompt]
    inter: list[list[float]] = []
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].input_ids))
    per_prompt: dict[int, tuple[list[float], list[float]]] = {}
    for lo in range(0, len(order), args.batch_size):
        idx = order[lo:lo + args.batch_size]
        batch = [prompts[i] for i in idx]
        padded = tokenizer.pad({"input_ids": [p.input_ids for p in batch]}, return_tensors="pt")
        q_mask, p_mask = segment_masks(batch, padded["attention_mask"])  # the scorer's segments
        layers = capture_all_layers(model, padded["input_ids"], padded["attention_mask"])
        results = [angle_concentration(h, q_mask, p_mask) for h in layers]
        for j, i in enumerate(idx):
            per_prompt[i] = ([float(r.intra[j]) for r in results], [float(r.inter[j]) for r in results])
        print(f"[angle_layers] {lo + len(idx)}/{len(prompts)} prompts", flush=True)
    num_layers = len(per_prompt[0][0])
    intra = [[per_prompt[i][0][layer] for i in range(len(prompts))] for layer in range(num_layers)]
    inter = [[per_prompt[i][1][layer] for i in range(len(prompts))] for layer in range(num_layers)]

    ease = [-float(e.columns["level"]) for e in examples]
    short = [-float(p.num_question_tokens) for p in prompts]
    solved = first_solved_from_uniform_runs()
    solved_rows = sorted(solved)
    learned_early = [-sum(solved[r]) / len(solved[r]) for r in solved_rows]
    row_pos = {e.index: k for k, e in enumerate(examples)}

    table: dict[str, list[dict]] = {}
    for name, (w_intra, w_inter) in WEIGHTS.items():
        table[name] = []
        for layer in range(num_layers):
            score = weighted_score(torch.tensor(intra[layer]), torch.tensor(inter[layer]), w_intra, w_inter).tolist()
            table[name].append({
                "layer": layer, "ease": spearman(score, ease), "short": spearman(score, short),
                "learned_early": spearman([score[row_pos[r]] for r in solved_rows], learned_early)
                if len(solved_rows) > 2 else None})
    out = {"data": args.data, "dtype": args.dtype, "num_prompts": len(prompts), "num_layers": num_layers,
           "num_prompts_with_first_solved": len(solved_rows), "uniform_runs": sorted(
               p.name for p in RESULTS.glob("uniform*_seed*.json")), "spearman": table,
           "spearman_short_vs_ease": spearman(short, ease)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "angle_layers.json").write_text(json.dumps(out, indent=1))

    def fmt(v):
        return "  n/a" if v is None else f"{v:+.2f}"

    print(f"Spearman(score, .) per layer; {len(solved_rows)} prompts with a first-solved step; "
          f"Spearman(short, ease) = {out['spearman_short_vs_ease']:+.2f}")
    print("weights | layer | ease | short | learned_early")
    for name, rows_ in table.items():
        for r in rows_:
            if r["layer"] in (0, 1, 2, 4, 8, 12, 16, 20, 24, 27, 28, num_layers - 1):
                print(f"{name} | {r['layer']} | {fmt(r['ease'])} | {fmt(r['short'])} | {fmt(r['learned_early'])}")
    plot(table, RESULTS / "angle_layers.png")
    print(f"wrote {RESULTS / 'angle_layers.json'} and angle_layers.png")


def plot(table: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
    for ax, key, title in zip(axes, ("ease", "short", "learned_early"),
                              ("easy first (-level)", "short first (-tokens)", "learned early (uniform arms)"),
                              strict=True):
        for name, rows in table.items():
            ys = [r[key] for r in rows]
            if all(y is None for y in ys):
                continue
            ax.plot([r["layer"] for r in rows], [float("nan") if y is None else y for y in ys], label=name)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"Spearman(angle score, {title})")
        ax.set_xlabel("decoder layer (MLP input)")
    axes[0].set_ylabel("Spearman rho")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
