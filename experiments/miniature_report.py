"""The 12-step miniature study of BENCHMARKS.md section 3: its report, rebuilt from the saved per-run JSONs.

Moved unchanged out of study.py when the powered study (issue 18) replaced it there; `study.py report` calls
it whenever `experiments/results/*_seed*.json` exist. RESULTS and ROOT are passed in (names kept).
"""
# ruff: noqa: N803

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ORDER = ["gainrl", "uniform", "length", "accuracy_curriculum", "gainrl_half", "adarft", "uniform_filter",
         "gainrl_layer8"]


def spearman(x, y) -> float:
    """Spearman's rho with average ranks for ties (scipy's, but NaN-safe for constant inputs)."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def load(RESULTS) -> dict[str, list[dict]]:
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(RESULTS.glob("*_seed*.json")):
        if path.stem.endswith("_gpu"):
            continue
        r = json.loads(path.read_text())
        if r.get("kind", "run") != "run":
            continue
        by_arm[r["arm"]].append(r)
    return by_arm


def val_curve(r: dict) -> tuple[np.ndarray, np.ndarray]:
    # Validation at step 0 can be logged twice (sanity pass, then a round boundary): keep the last per step.
    # The CSV logger's values are the reference (every run has them); the recorder's are a cross-check.
    points = {v["step"]: v["accuracy"] for v in (r.get("val_from_csv") or r["val"])}
    steps = np.array(sorted(points))
    return steps, np.array([points[s] for s in steps])


def steps_to_reach(r: dict, target: float) -> float | None:
    steps, acc = val_curve(r)
    hit = [s for s, a in zip(steps, acc, strict=True) if a >= target - 1e-9]
    return float(hit[0]) if hit else None


def generated_groups(r: dict, ROOT) -> float:
    """Prompt groups generated over the run: trained + dropped by the DAPO filter (from the run's CSV log).

    Runs without the filter generate exactly the trained groups (max_steps x prompts per step). The
    filter's extra generation rounds are compute the other arms do not spend, so the table shows it.
    """
    log = ROOT / "runs" / "study" / f"{r['arm']}_seed{r['seed']}" / "csv" / "version_0" / "metrics.csv"
    if "dynamic_sampling" not in " ".join(r.get("cli_args", [])) or not log.exists():
        return float(sum(len(t["indices"]) for t in r["train"]))
    total = 0.0
    with log.open() as fh:
        for row in csv.DictReader(fh):
            for key in ("dynamic_sampling/trained_groups", "dynamic_sampling/dropped_groups"):
                if row.get(key):
                    total += float(row[key])
    return total


def report(RESULTS: Path, ROOT: Path) -> None:
    """Table, summary.{json,csv}, val_accuracy.png and gainrl_mu.png of the miniature study."""
    by_arm = load(RESULTS)
    arms = [a for a in ORDER if a in by_arm] + sorted(set(by_arm) - set(ORDER))
    if not arms:
        sys.exit("no results yet in experiments/results/")
    # angle scores by question, from any full-data angle run (deterministic: same model, data, prompt)
    angle_by_q = {}
    for r in by_arm.get("gainrl", []):
        angle_by_q.update({p["question"]: p["angle_score"] for p in r["prompts"] if p["angle_score"] is not None})
    uniform_final = (float(np.mean([val_curve(r)[1][-1] for r in by_arm["uniform"]]))
                     if "uniform" in by_arm else None)

    rows, detail = [], {}
    for arm in arms:
        rs = by_arm[arm]
        finals = [val_curve(r)[1][-1] for r in rs]
        base = [val_curve(r)[1][0] for r in rs]
        reach = [steps_to_reach(r, uniform_final) for r in rs] if uniform_final is not None else []
        # first-solved step vs angle rank, over prompts drawn at least once; never solved = censored at max+1
        rhos, rhos_len, rhos_level, solved_frac = [], [], [], []
        for r in rs:
            # an angle arm's own scores (its layer, its data half); the full-data last-layer scores otherwise
            own = {p["question"]: p["angle_score"] for p in r["prompts"] if p["angle_score"] is not None}
            scores = own or angle_by_q
            drawn = [p for p in r["prompts"] if p["times_drawn"] > 0 and p["question"] in scores]
            if not drawn:
                continue
            cens = r["max_steps"] + 1
            fs = [p["first_solved_step"] if p["first_solved_step"] is not None else cens for p in drawn]
            # angle rank: 0 = highest concentration (the paper's "learn first"); rank among all scored prompts
            order = sorted(scores, key=lambda q: -scores[q])
            rank_of = {q: i for i, q in enumerate(order)}
            rhos.append(spearman([rank_of[p["question"]] for p in drawn], fs))
            rhos_len.append(spearman([p["question_tokens"] for p in drawn], fs))
            rhos_level.append(spearman([float(p["level"]) for p in drawn], fs))
            solved_frac.append(sum(p["first_solved_step"] is not None for p in drawn) / len(drawn))
        mu = [[h.get("mu") for h in r["schedule_history"]] for r in rs]
        row = {
            "arm": arm, "seeds": len(rs), "baseline_acc": float(np.mean(base)),
            "final_acc_mean": float(np.mean(finals)), "final_acc_sd": float(np.std(finals, ddof=1)) if len(rs) > 1 else 0.0,
            "final_acc_min": float(np.min(finals)), "final_acc_max": float(np.max(finals)),
            # mean over the validations after training started: uses every point, so less noisy than the final
            "mean_acc_after_step0": float(np.mean([val_curve(r)[1][1:].mean() for r in rs])),
            "steps_to_uniform_final": (None if not reach else
                                       "/".join("never" if s is None else str(int(s)) for s in reach)),
            "rho_angle_rank_first_solved": float(np.nanmean(rhos)) if rhos else float("nan"),
            "rho_qlen_first_solved": float(np.nanmean(rhos_len)) if rhos_len else float("nan"),
            "rho_level_first_solved": float(np.nanmean(rhos_level)) if rhos_level else float("nan"),
            "drawn_solved_fraction": float(np.mean(solved_frac)) if solved_frac else float("nan"),
            "mean_train_reward": float(np.mean([np.mean([t["reward"] for t in r["train"]]) for r in rs])),
            "wall_s_mean": float(np.mean([r["wall_s"] for r in rs])),
            "groups_generated_mean": float(np.mean([generated_groups(r, ROOT) for r in rs])),
        }
        rows.append(row)
        detail[arm] = {"curves": {r["seed"]: dict(zip(*(x.tolist() for x in val_curve(r)), strict=True)) for r in rs},
                       "mu": mu, "finals": finals,
                       "schedule_history": [[{k: v for k, v in h.items() if k != "drawn_ranks"}
                                             for h in r["schedule_history"]] for r in rs],
                       "ranking_summary": rs[0].get("ranking_summary")}

    # the angle score's relation to simple difficulty proxies on this training set
    proxies = {}
    for r in by_arm.get("gainrl", [])[:1]:
        ps = [p for p in r["prompts"] if p["angle_score"] is not None]
        s = [p["angle_score"] for p in ps]
        proxies = {"spearman_angle_score_question_tokens": spearman(s, [p["question_tokens"] for p in ps]),
                   "spearman_angle_score_level": spearman(s, [float(p["level"]) for p in ps]),
                   "spearman_question_tokens_level": spearman([p["question_tokens"] for p in ps],
                                                              [float(p["level"]) for p in ps])}
    n_val = next(iter(by_arm.values()))[0]["num_val_prompts"]
    summary = {"uniform_final_mean": uniform_final, "num_val_prompts": n_val, "one_prompt_is": 1.0 / n_val,
               "angle_score_proxies": proxies, "arms": rows, "detail": detail}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    with (RESULTS / "summary.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(by_arm, arms, RESULTS)
    print(markdown(rows, summary))


def markdown(rows: list[dict], summary: dict) -> str:
    head = ("| arm | seeds | val acc step 0 | final val acc (mean, sd, min-max) | mean val acc, steps 4-12 | "
            "steps to uniform's final | "
            "Spearman(angle rank, first solved) | same, question length | same, level | train reward | "
            "groups generated | s/run |")
    lines = [head, "|" + " --- |" * 12]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['seeds']} | {r['baseline_acc']:.3f} | {r['final_acc_mean']:.3f}, "
            f"{r['final_acc_sd']:.3f}, {r['final_acc_min']:.3f}-{r['final_acc_max']:.3f} | "
            f"{r['mean_acc_after_step0']:.3f} | "
            f"{r['steps_to_uniform_final']} | {r['rho_angle_rank_first_solved']:+.2f} | "
            f"{r['rho_qlen_first_solved']:+.2f} | {r['rho_level_first_solved']:+.2f} | "
            f"{r['mean_train_reward']:.3f} | {r['groups_generated_mean']:.0f} | {r['wall_s_mean']:.0f} |")
    lines.append("")
    n_val = summary["num_val_prompts"]
    lines.append(f"| arm | final val accuracy per seed (correct of {n_val}) |")
    lines.append("| --- | --- |")
    for arm, d in summary["detail"].items():
        per_seed = ", ".join(f"s{seed} {round(curve[max(curve)] * n_val)}" for seed, curve in sorted(d["curves"].items()))
        lines.append(f"| {arm} | {per_seed} |")
    lines.append("")
    lines.append(f"uniform final (mean) = {summary['uniform_final_mean']}; val prompts = {summary['num_val_prompts']} "
                 f"(one prompt = {summary['one_prompt_is']:.3f} accuracy); proxies: {summary['angle_score_proxies']}")
    return "\n".join(lines)


def plot(by_arm: dict[str, list[dict]], arms: list[str], RESULTS: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # two panels, so that seed bands stay readable: the paper's arms, then the other schedules against them
    panels = [("GAIN-RL against its baselines", ["gainrl", "uniform", "length", "gainrl_half"]),
              ("other schedules (gainrl and uniform repeated)", ["gainrl", "uniform"] + [
                  a for a in arms if a not in ("gainrl", "uniform", "length", "gainrl_half")])]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    colors = {arm: f"C{i}" for i, arm in enumerate(arms)}
    for ax, (title, members) in zip(axes, panels, strict=True):
        for arm in [a for a in members if a in by_arm]:
            curves = [val_curve(r) for r in by_arm[arm]]
            steps = curves[0][0]
            curves = [c for c in curves if len(c[0]) == len(steps) and (c[0] == steps).all()]
            acc = np.stack([c[1] for c in curves])
            ax.plot(steps, acc.mean(0), marker="o", color=colors[arm], label=f"{arm} (n={len(acc)})")
            if len(acc) > 1:  # band = min..max over seeds
                ax.fill_between(steps, acc.min(0), acc.max(0), alpha=0.12, color=colors[arm])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step (4 prompts x G=4 each)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("val accuracy (greedy, 24 prompts)")
    fig.suptitle("Miniature GAIN-RL study: SmolLM2-135M, arithmetic, CPU (mean over seeds; band = min-max)")
    fig.tight_layout()
    fig.savefig(RESULTS / "val_accuracy.png", dpi=110)
    plt.close(fig)

    runs = [r for a in ("gainrl", "gainrl_half", "gainrl_layer8") for r in by_arm.get(a, [])]
    if runs:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for k, r in enumerate(runs):  # one colour per run: mu solid, the mean rank it drew dotted
            h = r["schedule_history"]
            ax.plot([e["step"] for e in h], [e.get("mu") for e in h], marker="o", color=f"C{k}",
                    label=f"{r['arm']} s{r['seed']} (N={r['num_train_prompts']})")
            ax.plot([e["step"] for e in h], [e.get("drawn_rank_mean") for e in h], ls=":", color=f"C{k}")
        ax.set_title("mu (solid) and the mean rank of the drawn prompts (dotted)", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("rank position")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / "gainrl_mu.png", dpi=110)
        plt.close(fig)
