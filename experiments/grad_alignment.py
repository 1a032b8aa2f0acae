"""The paper's mechanism, measured directly: per-prompt GRPO gradients at step 0 against the angle score.

    .venv/bin/python experiments/grad_alignment.py --num-prompts 256        # resumable: reruns add what is missing
    .venv/bin/python experiments/grad_alignment.py --report                 # tables and plot from what is saved

GAIN-RL argues that prompts with higher angle concentration give larger, better-aligned gradients, and so
are learned first. This script measures that at step 0 on the study's training set. For each prompt (a
family-balanced, seeded order of `data/arithmetic/study_train.jsonl`; `--num-prompts` takes a prefix, so a
longer run extends a shorter one): sample G completions (the study's temperature, token budget and dtype),
score them with the training reward, compute GRPO advantages, and take the gradient of that group's GRPO
loss (DAPO token mean, no KL, ratio 1 at step 0) with respect to the trainable LoRA weights. Recorded: the
gradient's norm and, at report time, its cosine with the batch gradient of the other prompts (the mean of
all other measured prompts' gradients, zero-variance prompts counting as zero; leaving the prompt out keeps
its own share of the mean, which grows with its norm, from counting as alignment). Reported: Spearman of both with the angle score at
the default (last) layer and at the best layer of `experiments/angle_layers.py` (the layer whose score
ranks ease best, read from results/angle_layers.json), beside question length and the base pass rate.

Why LoRA gradients: the study trains LoRA r=16 on all linear layers, so these are the gradients that move
its model. At step 0 LoRA's B is zero, so only B has a gradient, and it is the full weight gradient times
A^T, a random projection (A's seeded init) of the full-parameter gradient of every linear layer: norms and
inner products of full gradients are preserved in expectation, at a 20th of the storage. The full 135M-
parameter gradient per prompt (540 MB) cannot be kept for hundreds of prompts on this machine.

Saved as it goes (append-only, so it can span sessions): `<out-dir>/meta.json` (settings, the model's
fingerprint, angle scores), `<out-dir>/prompts.jsonl` (one line per measured prompt), each gradient's
direction (unit vector, fp16) in `runs/grad_alignment/grads/<position>.npy` (5 MB each, not committed) and a
8,192-bucket CountSketch of it in `<out-dir>/sketches/<position>.npy` (16 KB, committed): the report's cosines
are exact where the full gradients are on disk, else estimated from the sketches (error ~0.01 in a cosine).
A rerun with other settings refuses to mix them into the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (shared 2-core machine)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "experiments" / "results" / "grad_alignment"
GRADS = ROOT / "runs" / "grad_alignment" / "grads"


def balanced_order(rows: list[dict], seed: int) -> list[int]:
    """Row positions in a family-balanced order: each family's rows seeded-shuffled, then round-robin over the
    families (sorted by level), so every prefix of length k * families has k prompts of each family."""
    by_family: dict[str, list[int]] = {}
    for pos, row in enumerate(rows):
        by_family.setdefault(row["family"], []).append(pos)
    families = sorted(by_family, key=lambda f: (rows[by_family[f][0]]["level"], f))
    for fam in families:
        random.Random(f"{seed}:{fam}").shuffle(by_family[fam])
    order = []
    for k in range(max(len(v) for v in by_family.values())):
        order += [by_family[f][k] for f in families if k < len(by_family[f])]
    return order


def best_angle_layer(path: Path = ROOT / "experiments/results/angle_layers.json") -> int:
    """The layer whose paper-weighted score correlated best with ease in angle_layers.py (BENCHMARKS sec. 3)."""
    data = json.loads(path.read_text())
    rows = data["spearman"]["paper (1, 1)"]
    return int(max(rows, key=lambda r: r["ease"])["layer"])


SKETCH_DIM = 8192


def count_sketch(vector, seed: int, dim: int = SKETCH_DIM):
    """A CountSketch of `vector` (each coordinate added, with a seeded random sign, to a seeded random bucket).

    Linear, and inner products of sketches estimate inner products of the vectors without bias (error
    about |a| |b| / sqrt(dim)): the committed sketches let the report compute cosines with the batch gradient
    on a machine that no longer has the full gradients (5 MB each, kept only in runs/).
    """
    import numpy as np

    rng = np.random.default_rng([seed, 7919, vector.size])
    buckets = rng.integers(0, dim, size=vector.size)
    signs = rng.integers(0, 2, size=vector.size) * 2.0 - 1.0
    return np.bincount(buckets, weights=signs * vector, minlength=dim)


def _save_npy(path: Path, array) -> None:
    import numpy as np

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, array)
    os.replace(tmp, path)


def load_lines(path: Path) -> list[dict]:
    """The JSONL's complete lines (a torn last line from a killed run is ignored; it is measured again)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def settings_of(args) -> dict:
    return {"data": args.data, "seed": args.seed, "num_generations": args.num_generations,
            "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "dtype": args.dtype,
            "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"}, "loss": "dapo (group token mean)",
            "scale_rewards": "group", "prompt": "paper", "threads": args.threads}


def measure(args) -> None:
    import numpy as np
    import torch

    from gainrl_pl.data import load_rows
    from gainrl_pl.data.prompts import build_prompt, get_prompt_template
    from gainrl_pl.grpo import compute_advantages, policy_loss, token_logprobs
    from gainrl_pl.models import LoraSettings, build_policy, load_tokenizer
    from gainrl_pl.rewards.functions import accuracy_reward
    from gainrl_pl.rollout import eos_token_ids, generate_completions
    from gainrl_pl.scoring import AngleScorer, model_fingerprint

    torch.set_num_threads(args.threads)
    out, grads = Path(args.out_dir), Path(args.grads_dir)
    sketches = out / "sketches"
    for d in (out, grads, sketches):
        d.mkdir(parents=True, exist_ok=True)
    rows = load_rows(str(ROOT / args.data))
    order = balanced_order(rows, args.seed)[: args.num_prompts]

    tokenizer = load_tokenizer("builtin")
    torch.manual_seed(args.seed)  # LoRA A's init: the random projection, fixed by the seed
    policy = build_policy("builtin", dtype=args.dtype, lora=LoraSettings(r=16, alpha=32, target_modules="all-linear"))
    fingerprint = model_fingerprint(policy)
    settings = settings_of(args)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {
        "settings": settings, "fingerprint": fingerprint, "best_layer": best_angle_layer(), "angle_scores": {}}
    if meta["settings"] != settings or meta["fingerprint"] != fingerprint:
        sys.exit(f"{meta_path} was measured with other settings or another model/LoRA init "
                 f"({meta['settings']} / {meta['fingerprint']}); use another --out-dir")
    template = get_prompt_template("paper")
    prompts = {pos: build_prompt(tokenizer, rows[pos]["question"], template) for pos in order}

    # angle scores (prompt-only forwards, cheap) for every prompt in the order that has none yet
    missing = [pos for pos in order if str(pos) not in meta["angle_scores"]]
    if missing:
        layers = {"last": -1, "best": meta["best_layer"]}
        values = {}
        for name, layer in layers.items():
            scorer = AngleScorer(policy, tokenizer, layer=layer, batch_size=16, show_progress=False)
            values[name] = scorer.score([prompts[p] for p in missing])
        for k, pos in enumerate(missing):
            meta["angle_scores"][str(pos)] = {name: values[name][k].score for name in layers}
        tmp = meta_path.with_name("meta.json.tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, meta_path)

    lines_path = out / "prompts.jsonl"
    done = {line["position"] for line in load_lines(lines_path)}
    if lines_path.exists():  # drop a torn tail before appending
        lines_path.write_text("".join(json.dumps(line) + "\n" for line in load_lines(lines_path)))
    params = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    eos = eos_token_ids(policy, tokenizer)
    G = args.num_generations
    todo = [pos for pos in order if pos not in done]
    print(f"[grad] {len(done)} prompts measured already, {len(todo)} to go (G={G}, {args.max_new_tokens} tokens)",
          flush=True)
    for pos in todo:
        t0 = time.time()
        seg = prompts[pos]
        ids = torch.tensor([seg.input_ids])
        torch.manual_seed(args.seed * 1_000_003 + pos)  # each prompt's completions, whatever ran before
        rollout = generate_completions(policy, ids, torch.ones_like(ids), num_generations=G,
                                       max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                       eos_ids=eos, do_sample=True, temperature=args.temperature)
        texts = tokenizer.batch_decode([c[m.bool()].tolist() for c, m in
                                        zip(rollout.completion_ids, rollout.completion_mask, strict=True)],
                                       skip_special_tokens=True)
        rewards = [float(r or 0.0) for r in accuracy_reward([seg.text] * G, texts, answer=[rows[pos]["answer"]] * G)]
        advantages = compute_advantages(torch.tensor([rewards]), "group")[0]
        policy.zero_grad(set_to_none=True)
        norm, norm_a = 0.0, 0.0
        if bool(advantages.abs().sum() > 0):
            full = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
            attention = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
            width = rollout.completion_ids.shape[1]
            logits = policy(input_ids=full, attention_mask=attention, use_cache=False,
                            logits_to_keep=width + 1).logits[:, :-1]
            logp = token_logprobs(logits, rollout.completion_ids, temperature=args.temperature)
            loss, _ = policy_loss(logp, None, None, advantages, rollout.completion_mask, loss_type="dapo")
            loss.backward()
            flat = torch.cat([p.grad.detach().float().reshape(-1) if p.grad is not None else
                              torch.zeros(p.numel()) for _, p in params])
            norm = float(flat.norm())
            norm_a = float(torch.cat([p.grad.detach().float().reshape(-1) for n, p in params
                                      if "lora_A" in n and p.grad is not None] or [torch.zeros(1)]).norm())
            unit = (flat / max(norm, 1e-30)).numpy()
            _save_npy(grads / f"{pos}.npy", unit.astype(np.float16))
            _save_npy(sketches / f"{pos}.npy", count_sketch(unit, args.seed).astype(np.float16))
        record = {"position": pos, "row": pos, "family": rows[pos]["family"], "level": rows[pos]["level"],
                  "question": rows[pos]["question"], "question_tokens": seg.num_question_tokens,
                  "rewards": rewards, "pass_rate": sum(rewards) / G, "zero_variance": norm == 0.0,
                  "grad_norm": norm, "grad_norm_lora_a": norm_a,
                  "completion_tokens": int(rollout.completion_mask.sum()), "seconds": time.time() - t0,
                  **{f"angle_{k}": v for k, v in meta["angle_scores"][str(pos)].items()}}
        with open(lines_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        print(f"[grad] {pos} {rows[pos]['family']:<10} pass {record['pass_rate']:.2f} |g| {norm:.3e} "
              f"({record['seconds']:.1f} s)", flush=True)


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def report(args, *, source: str | None = None) -> dict:
    import numpy as np

    out, grads = Path(args.out_dir), Path(args.grads_dir)
    lines = load_lines(out / "prompts.jsonl")
    if not lines:
        sys.exit(f"nothing measured yet in {out}")
    meta = json.loads((out / "meta.json").read_text())
    # the batch gradient: the mean over all measured prompts (zero-variance prompts add zero). Exact from the
    # full gradients when this machine has them all, else estimated from the committed sketches.
    nonzero = [r for r in lines if not r["zero_variance"]]
    (out / "sketches").mkdir(exist_ok=True)
    for r in nonzero:  # sketches of gradients measured before sketches were kept (or lost): from the full ones
        sketch, full = out / "sketches" / f"{r['position']}.npy", grads / f"{r['position']}.npy"
        if not sketch.exists() and full.exists():
            _save_npy(sketch, count_sketch(np.load(full).astype(np.float32), meta["settings"]["seed"]).astype(np.float16))
    if source is None:
        source = "exact" if all((grads / f"{r['position']}.npy").exists() for r in nonzero) else "sketch"
    cosines = {}
    if nonzero:
        units = {r["position"]: np.load((grads if source == "exact" else out / "sketches") / f"{r['position']}.npy")
                 .astype(np.float32) for r in nonzero}
        total = sum(r["grad_norm"] * units[r["position"]] for r in nonzero)
        # leave-one-out: the batch gradient of the *other* prompts, so a prompt's own share of the mean (which
        # grows with its norm) does not count as alignment
        for r in nonzero:
            u = units[r["position"]]
            others = (total - r["grad_norm"] * u) / max(len(lines) - 1, 1)
            cosines[r["position"]] = float(u @ others / max(float(np.linalg.norm(others)), 1e-30))
    for r in lines:
        r["cosine_with_batch"] = cosines.get(r["position"]) if not r["zero_variance"] else 0.0

    def table(subset: list[dict]) -> dict:
        against = {"angle score, last layer": [r["angle_last"] for r in subset],
                   f"angle score, layer {meta['best_layer']}": [r["angle_best"] for r in subset],
                   "question length (tokens)": [r["question_tokens"] for r in subset],
                   "base pass rate (these G samples)": [r["pass_rate"] for r in subset],
                   "p (1 - p)": [r["pass_rate"] * (1 - r["pass_rate"]) for r in subset]}
        result = {}
        for target in ("grad_norm", "cosine_with_batch"):
            ys = [r[target] for r in subset]
            if any(y is None for y in ys):
                continue
            result[target] = {name: spearman(xs, ys) for name, xs in against.items()}
        return result

    families = sorted({r["family"] for r in lines}, key=lambda f: next(r["level"] for r in lines if r["family"] == f))
    summary = {
        "prompts": len(lines), "zero_variance": len(lines) - len(nonzero), "settings": meta["settings"],
        "cosines_from": source,
        "best_layer": meta["best_layer"], "seconds_per_prompt": float(np.mean([r["seconds"] for r in lines])),
        "lora_a_grad_norm_max": max(r["grad_norm_lora_a"] for r in lines),
        "spearman_all_prompts": table(lines),
        "spearman_nonzero_prompts": table(nonzero) if len(nonzero) >= 3 else {},
        "by_family": {f: {"prompts": sum(r["family"] == f for r in lines),
                          "pass_rate": float(np.mean([r["pass_rate"] for r in lines if r["family"] == f])),
                          "grad_norm": float(np.mean([r["grad_norm"] for r in lines if r["family"] == f])),
                          "cosine": float(np.mean([r["cosine_with_batch"] or 0.0 for r in lines if r["family"] == f])),
                          "angle_last": float(np.mean([r["angle_last"] for r in lines if r["family"] == f])),
                          "angle_best": float(np.mean([r["angle_best"] for r in lines if r["family"] == f]))}
                      for f in families},
        "per_prompt": [{k: r[k] for k in ("position", "family", "pass_rate", "grad_norm", "cosine_with_batch",
                                          "angle_last", "angle_best", "question_tokens")} for r in lines]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    text = markdown(summary)
    (out / "summary.md").write_text(text + "\n")
    print(text)
    plot(lines, meta["best_layer"], out)
    return summary


def markdown(s: dict) -> str:
    lines = [f"{s['prompts']} prompts ({s['zero_variance']} with zero reward variance: zero gradient), "
             f"G={s['settings']['num_generations']}, T={s['settings']['temperature']}, "
             f"{s['settings']['max_new_tokens']} tokens, LoRA-B gradients at step 0 "
             f"(max |grad A| = {s['lora_a_grad_norm_max']:.1e}); cosines {s['cosines_from']}; "
             f"{s['seconds_per_prompt']:.1f} s per prompt.", ""]
    for title, key in (("all prompts", "spearman_all_prompts"), ("prompts with a non-zero gradient",
                                                                  "spearman_nonzero_prompts")):
        tab = s[key]
        if not tab:
            continue
        cols = list(next(iter(tab.values())))
        lines += [f"| Spearman, {title} | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
        for target, vals in tab.items():
            lines.append(f"| {target} | " + " | ".join(f"{vals[c]:+.2f}" for c in cols) + " |")
        lines.append("")
    lines += ["| family | prompts | pass rate | mean grad norm | mean cosine | angle (last) | angle (best) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for f, v in s["by_family"].items():
        lines.append(f"| {f} | {v['prompts']} | {v['pass_rate']:.2f} | {v['grad_norm']:.3e} | {v['cosine']:+.3f} | "
                     f"{v['angle_last']:.3f} | {v['angle_best']:.3f} |")
    return "\n".join(lines)


def plot(lines: list[dict], best_layer: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({r["family"] for r in lines})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for k, fam in enumerate(families):
        rs = [r for r in lines if r["family"] == fam]
        for ax, key in zip(axes[:2], ("angle_last", "angle_best"), strict=True):
            ax.scatter([r[key] for r in rs], [r["grad_norm"] for r in rs], s=14, color=f"C{k}", label=fam)
        axes[2].scatter([r["pass_rate"] for r in rs], [r["grad_norm"] for r in rs], s=14, color=f"C{k}", label=fam)
    for ax, label in zip(axes, ("angle score, last layer", f"angle score, layer {best_layer}", "base pass rate"),
                         strict=True):
        ax.set_xlabel(label)
        ax.set_ylabel("GRPO gradient norm at step 0 (LoRA)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "grad_alignment.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=256, help="a prefix of the family-balanced order")
    ap.add_argument("--report", action="store_true", help="measure nothing: tables and plot from saved results")
    ap.add_argument("--data", default="data/arithmetic/study_train.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-generations", type=int, default=8, help="G (the paper's 8: fewer zero-variance groups)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", help="the study's training dtype")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out-dir", default=str(OUT))
    ap.add_argument("--grads-dir", default=str(GRADS))
    ap.add_argument("--cosines-from", choices=["exact", "sketch"], default=None,
                    help="default: exact when every full gradient is on disk, else the committed sketches")
    args = ap.parse_args(argv)
    if not args.report:
        measure(args)
    report(args, source=args.cosines_from)


if __name__ == "__main__":
    main()
