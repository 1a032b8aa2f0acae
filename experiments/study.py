"""The GAIN-RL schedule study: run arms x seeds one after another, a pilot and its power analysis, the report.

    .venv/bin/python experiments/study.py plan                          # the planned design, checks, wall time
    .venv/bin/python experiments/study.py run                           # the planned study, stage by stage (skips finished runs)
    .venv/bin/python experiments/study.py run --runs greso:0 mopps:0    # some runs only
    .venv/bin/python experiments/study.py pilot --arms uniform gainrl --seeds 0 1 2 --steps 10
    .venv/bin/python experiments/study.py power --dir experiments/results/pilot   # re-print a pilot's analysis
    .venv/bin/python experiments/study.py noise --dir experiments/results/power   # uniform's seed-to-seed noise
    .venv/bin/python experiments/study.py report                        # every table and plot, from saved JSON
    .venv/bin/python experiments/study.py run -- --trainer.max_steps 40   # CLI overrides for every run after --

Runs are strictly sequential (one training at a time: the machine has 2 shared cores), seed by seed (all arms
of seed 0, then of seed 1, ...) so that a study stopped half-way is still a paired comparison on the seeds it
finished. Each run writes `experiments/results/power/<arm>_seed<k>.json` when it ends (run_ab.py) and a
rerun skips the files that exist, so the study can span sessions. `report` reads only what is saved.

Designs (run_ab.py): `power` (issue 18, the default), `miniature` (the 12-step study of BENCHMARKS.md
section 3; its report is rebuilt unchanged from `experiments/results/*_seed*.json`), `gpu`.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
sys.path.insert(0, str(ROOT))  # `from gainrl_pl...` when run as a script from anywhere

from gainrl_pl.evaluation.study_stats import (  # noqa: E402
    METRICS,
    curve_area,
    label_shares_by_phase,
    minimum_detectable_difference,
    paired_bootstrap,
    paired_sd_from_arm_sd,
    sd_interval,
    seed_t_interval,
    seeds_needed,
    steps_to_reach,
    variance_components,
)

# The planned design (issue 18): every arm on seeds 0..k-1, compared with uniform seed by seed. In stages, decided
# from the pilot and the first 30-step runs (experiments/README.md, "The plan"): seed-to-seed noise is large, so
# the paper's claim and its strongest cheap baseline come first, at 10 seeds; the other arms after, at 5.
# GRESO gets one seed: its skip rule needs a prompt's earlier groups, and 30 steps x 4 prompts walk 120 of one
# permutation of 1,024 prompts, so no prompt recurs and its rounds are uniform's exactly (seed 0 measured
# identical on every metric; GRESOSampler's docstring says why). More seeds would repeat uniform's runs.
PLAN_STAGES: tuple[tuple[tuple[str, ...], int], ...] = (
    (("uniform", "gainrl", "length"), 10),
    (("accuracy_curriculum", "pass_rate_priority", "mopps", "uniform_filter"), 5),
    (("greso",), 1),
)
PLANNED_ARMS = [arm for arms, _ in PLAN_STAGES for arm in arms]
PLANNED_SEEDS = PLAN_STAGES[0][1]  # the main comparison's seeds (what the power analyses assume)
PLANNED_STEPS = 30
PLANNED_PROMPTS_PER_STEP = 4
PLANNED_VAL_PROMPTS = 256
PLANNED_VALIDATIONS = 5  # steps 6, 12, 18, 24, 30 (step 0: the shared baseline)
BASE_ARM = "uniform"
METRIC_LABEL = {"final_accuracy": "final val accuracy", "curve_area": "area under the val curve / steps",
                "steps_to_reach": "steps to reach uniform's final"}


# ============================================================================================== running


def run_one(arm: str | None, seed: int, design: str, out_dir: Path, extra: list[str], *, baseline: bool = False,
            run_root: Path | None = None) -> int:
    """One run_ab.py subprocess (a fresh process per run: no state leaks between arms); its log in runs/."""
    name = "baseline" if baseline else f"{arm}_seed{seed}"
    run_root = run_root or ROOT / "runs" / "study" / design / out_dir.name
    log = run_root / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "experiments/run_ab.py"), "--design", design, "--out-dir", str(out_dir),
           "--run-root", str(run_root)]
    cmd += ["--baseline"] if baseline else ["--arm", arm, "--seed", str(seed)]
    cmd += ["--", *extra] if extra else []
    print("[study] " + " ".join(cmd), flush=True)
    with log.open("w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    print(f"[study] {name}: exit {rc} (log {log})", flush=True)
    return rc


def run(specs: list[tuple[str, int]], design: str, out_dir: Path, extra: list[str],
        run_root: Path | None = None) -> None:
    """Run arm:seed specs in order, skipping finished ones; the shared step-0 baseline first (power/gpu)."""
    if design != "miniature" and not (out_dir / "baseline.json").exists():
        if run_one(None, 0, design, out_dir, extra, baseline=True, run_root=run_root):
            sys.exit("the baseline validation failed: see its log")
    for arm, seed in specs:
        suffix = "_gpu" if design == "gpu" else ""
        if (out_dir / f"{arm}_seed{seed}{suffix}.json").exists():
            print(f"[study] {arm} seed {seed}: done already, skipped", flush=True)
            continue
        run_one(arm, seed, design, out_dir, extra, run_root=run_root)


def planned_specs(arms: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """Seed-major order: every arm of seed 0, then of seed 1, ... (a partial study stays paired)."""
    return [(arm, seed) for seed in seeds for arm in arms]


def planned_study_specs() -> list[tuple[str, int]]:
    """The planned study's runs: stage by stage (`PLAN_STAGES`), seed-major within each."""
    return [spec for arms, seeds in PLAN_STAGES for spec in planned_specs(list(arms), list(range(seeds)))]


def parse_specs(specs: list[str]) -> list[tuple[str, int]]:
    out = []
    for spec in specs:
        arm, _, seed = spec.partition(":")
        if not seed.isdigit():
            raise SystemExit(f"--runs {spec!r}: expected arm:seed, e.g. gainrl:0")
        out.append((arm, int(seed)))
    return out


# ============================================================================================== loading


def load_design(out_dir: Path) -> tuple[dict | None, dict[str, dict[int, dict]]]:
    """(baseline, {arm: {seed: run}}) from a power-design results directory."""
    baseline_path = out_dir / "baseline.json"
    baseline = json.loads(baseline_path.read_text()) if baseline_path.exists() else None
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    for path in sorted(out_dir.glob("*_seed*.json")):
        r = json.loads(path.read_text())
        if r.get("kind") == "run":
            runs[r["arm"]][int(r["seed"])] = r
    return baseline, dict(runs)


def run_matrix(r: dict, baseline: dict) -> tuple[np.ndarray, np.ndarray]:
    """(steps, correct[steps, prompts]) of one run, with the shared baseline as step 0."""
    if r["val_digest"] != baseline["val_digest"]:
        raise ValueError(f"{r['arm']} seed {r['seed']} was validated on other prompts than the baseline "
                         f"({r['val_digest']} != {baseline['val_digest']}): rerun one of them")
    if r.get("val_decoding") != baseline.get("val_decoding"):
        raise ValueError(f"{r['arm']} seed {r['seed']} was decoded otherwise than the baseline "
                         f"({r.get('val_decoding')!r} != {baseline.get('val_decoding')!r}): keep each design's runs "
                         "in their own directory")
    points = {0: baseline["per_prompt"]}
    for v in r["val"]:
        if v["step"] > 0:
            points[v["step"]] = v["per_prompt"]
    steps = np.array(sorted(points), dtype=np.float64)
    return steps, np.array([points[int(s)] for s in steps], dtype=np.float64)


def paired_arrays(runs: dict[str, dict[int, dict]], baseline: dict, arm: str, base: str = BASE_ARM):
    """(steps, seeds, arm[seeds, steps, prompts], base[...]) over the seeds both arms finished."""
    seeds = sorted(set(runs.get(arm, {})) & set(runs.get(base, {})))
    if not seeds:
        return None
    mats = [(run_matrix(runs[arm][s], baseline), run_matrix(runs[base][s], baseline)) for s in seeds]
    steps = mats[0][0][0]
    for (sa, _), (sb, _) in mats:
        if not (np.array_equal(sa, steps) and np.array_equal(sb, steps)):
            raise ValueError(f"{arm} and {base} were validated at different steps: {sa} / {sb} / {steps}")
    return steps, seeds, np.stack([a[1] for a, _ in mats]), np.stack([b[1] for _, b in mats])


# ============================================================================================== power report


def generated_groups(r: dict) -> int:
    """Prompt groups generated over the run (trained + dropped by the DAPO filter)."""
    return int(sum(t.get("generated_groups", len(t["indices"])) for t in r["train"]))


def trained_groups(r: dict) -> int:
    """Prompt groups trained on over the run (under DAPO's filter fewer than generated; runs saved before the
    recorder counted them: a filtered arm's were a full batch a step)."""
    filtered = r.get("arm") in ("uniform_filter", "greso_filter")
    return int(sum(t.get("trained_groups", PLANNED_PROMPTS_PER_STEP if filtered else len(t["indices"]))
                   for t in r["train"]))


def same_run(a: dict, b: dict) -> bool:
    """Two runs drew the same prompts every step and gave the same answers at every validation: one run twice
    (e.g. GRESO when no prompt recurs draws uniform's rounds)."""
    return ([t["indices"] for t in a["train"]] == [t["indices"] for t in b["train"]]
            and [v["per_prompt"] for v in a["val"]] == [v["per_prompt"] for v in b["val"]])


def spearman(x, y) -> float:
    """Spearman's rho with average ranks for ties (NaN for fewer than 3 points or a constant input)."""
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def solved_share(rs) -> dict[str, float]:
    """Share of the generated groups whose G completions were all wrong / all right (mean over runs): with a
    correctness reward those carry no GRPO gradient, so an arm that draws them trains on fewer prompts (a DAPO
    filter drops them and generates more)."""
    accs = [[a for t in r["train"] for a in t.get("per_prompt_accuracy", [])] for r in rs]
    accs = [a for a in accs if a]
    if not accs:
        return {}
    return {"groups_all_wrong": float(np.mean([np.mean([x == 0.0 for x in a]) for a in accs])),
            "groups_all_right": float(np.mean([np.mean([x == 1.0 for x in a]) for a in accs]))}


def compare(runs: dict[str, dict[int, dict]], baseline: dict, *, replicates: int = 4000) -> list[dict]:
    """Every arm against uniform on their common seeds: paired bootstrap of each metric."""
    rows = []
    for arm in [a for a in PLANNED_ARMS if a in runs] + sorted(set(runs) - set(PLANNED_ARMS)):
        rs = list(runs[arm].values())
        row = {"arm": arm, "seeds": len(rs), "seed_list": sorted(runs[arm]),
               "final_acc_mean": float(np.mean([r["val"][-1]["accuracy"] for r in rs])),
               "train_reward": float(np.mean([np.mean([t["reward"] for t in r["train"]]) for r in rs])),
               "groups_generated": float(np.mean([generated_groups(r) for r in rs])),
               "groups_trained": float(np.mean([trained_groups(r) for r in rs])),
               "wall_s": float(np.mean([r["wall_s"] for r in rs])),
               "identical_seeds": [s for s in sorted(runs[arm]) if arm != BASE_ARM and s in runs.get(BASE_ARM, {})
                                   and same_run(runs[arm][s], runs[BASE_ARM][s])],
               **solved_share(rs)}
        pair = paired_arrays(runs, baseline, arm) if arm != BASE_ARM else None
        if pair is not None:
            steps, seeds, a, b = pair
            row["paired_seeds"] = seeds
            for metric in METRICS:
                c = paired_bootstrap(steps, a, b, metric, replicates=replicates)
                row[metric] = {"arm": c.arm_mean, "uniform": c.base_mean, "difference": c.difference,
                               "low": c.low, "high": c.high, "per_seed": list(c.per_seed),
                               "resolved": c.excludes_zero}
                row[metric]["t_low"], row[metric]["t_high"] = seed_t_interval(c.per_seed)
        elif BASE_ARM in runs:  # uniform itself: its own metric values (no comparison)
            seeds = sorted(runs[arm])
            mats = [run_matrix(runs[arm][s], baseline) for s in seeds]
            curves = np.stack([m.mean(-1) for _, m in mats])
            steps = mats[0][0]
            row["final_accuracy"] = {"arm": float(curves[:, -1].mean())}
            row["curve_area"] = {"arm": float(np.mean(curve_area(steps, curves)))}
            row["steps_to_reach"] = {"arm": float(np.mean(steps_to_reach(steps, curves, curves[:, -1])))}
        rows.append(row)
    return rows


def val_families(baseline: dict) -> tuple[list[str], list[str]]:
    """(the family of each validation prompt, the family names easiest level first)."""
    families = [p["family"] for p in baseline["val_prompts"]]
    level = {p["family"]: p["level"] for p in baseline["val_prompts"]}
    return families, sorted(set(families), key=lambda f: (level[f], f))


def drawn_families(run: dict) -> list[list[str]]:
    """The family of every prompt the run drew, step by step."""
    family = {p["position"]: p["family"] for p in run["prompts"]}
    return [[family[i] for i in t["indices"]] for t in run["train"]]


def family_table(runs: dict[str, dict[int, dict]], baseline: dict) -> dict[str, dict[str, float]]:
    """Final accuracy per validation family, per arm (mean over seeds); step 0 as `baseline`."""
    families, names = val_families(baseline)

    def by_family(values):
        v = np.asarray(values, dtype=np.float64)
        return {f: float(v[[i for i, g in enumerate(families) if g == f]].mean()) for f in names}

    out = {"baseline": by_family(baseline["per_prompt"])}
    for arm, rs in runs.items():
        per_seed = [by_family(r["val"][-1]["per_prompt"]) for r in rs.values()]
        out[arm] = {f: float(np.mean([p[f] for p in per_seed])) for f in names}
    return out


def family_differences(runs: dict[str, dict[int, dict]], baseline: dict, *,
                       replicates: int = 2000) -> dict[str, dict[str, dict]]:
    """Per arm and validation family: final accuracy minus uniform's on the same seeds (paired bootstrap 95 %
    over seeds and that family's prompts), beside the share of that family among the prompts the arm and
    uniform drew over the whole run. Why an arm wins or loses: where its accuracy moved against what it
    trained on."""
    families, names = val_families(baseline)

    def drawn_share(rs: dict[int, dict], seeds: list[int]) -> dict[str, float]:
        shares = []
        for s in seeds:
            shares.append(label_shares_by_phase(drawn_families(rs[s]), 1)[0])
        return {f: float(np.mean([sh.get(f, 0.0) for sh in shares])) for f in names}

    out = {}
    for arm in runs:
        pair = paired_arrays(runs, baseline, arm) if arm != BASE_ARM else None
        if pair is None:
            continue
        steps, seeds, a, b = pair
        arm_share, base_share = drawn_share(runs[arm], seeds), drawn_share(runs[BASE_ARM], seeds)
        out[arm] = {}
        for f in names:
            idx = [i for i, g in enumerate(families) if g == f]
            c = paired_bootstrap(steps, a[:, :, idx], b[:, :, idx], "final_accuracy", replicates=replicates)
            out[arm][f] = {"difference": c.difference, "low": c.low, "high": c.high, "resolved": c.excludes_zero,
                           "drawn_share": arm_share[f], "uniform_drawn_share": base_share[f]}
    return out


def drawn_family_table(runs: dict[str, dict[int, dict]], phases: int = 3) -> dict[str, list[dict]]:
    """Per arm: the share of each task family among the prompts drawn in each third of training (mean over
    seeds), with the steps each third spans. Why an arm ends where it does: what it trained on late."""
    out = {}
    for arm, rs in runs.items():
        per_seed, spans = [], None
        arm_phases = min([phases] + [len(r["train"]) for r in rs.values()])  # a smoke run may have fewer steps
        if arm_phases < 1:
            continue
        for r in rs.values():
            steps = [t["step"] for t in r["train"]]
            per_seed.append(label_shares_by_phase(drawn_families(r), arm_phases))
            spans = [(int(s[0]), int(s[-1])) for s in np.array_split(np.asarray(steps), arm_phases)]
        names = {f for shares in per_seed for phase in shares for f in phase}
        out[arm] = [{"steps": list(span), "shares": {f: float(np.mean([s[k].get(f, 0.0) for s in per_seed]))
                                                      for f in sorted(names)}}
                    for k, span in enumerate(spans)]
    return out


def first_solved_spearman(runs: dict[str, dict[int, dict]]) -> dict[str, dict[str, float]]:
    """Over the prompts each run drew: Spearman of first-solved step with the angle rank, length and level.

    Positive = that ordering's early prompts got solved early (the paper's claim for the angle rank). The angle
    scores (by training-set position) come from the arm's own run, or from a gainrl run for the others (same
    model and data).
    """
    shared = next((r["angle_scores"] for r in runs.get("gainrl", {}).values() if r.get("angle_scores")), None)
    out = {}
    for arm, rs in runs.items():
        rho = defaultdict(list)
        for r in rs.values():
            scores = r.get("angle_scores") or shared
            drawn = [p for p in r["prompts"] if p["times_drawn"] > 0]
            cens = r["max_steps"] + 1
            fs = [p["first_solved_step"] if p["first_solved_step"] is not None else cens for p in drawn]
            if scores:
                rank_of = {pos: i for i, pos in enumerate(sorted(range(len(scores)), key=lambda q: -scores[q]))}
                rho["angle_rank"].append(spearman([rank_of[p["position"]] for p in drawn], fs))
            rho["question_tokens"].append(spearman([p["question_tokens"] for p in drawn], fs))
            rho["level"].append(spearman([float(p["level"]) for p in drawn], fs))
        out[arm] = {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in rho.items()}
    return out


def _ci(d: dict | None, fmt: str = "+.3f") -> str:
    if not d or "difference" not in d:
        return "-"
    mark = " *" if d["resolved"] else ""
    return f"{d['difference']:{fmt}} [{d['low']:{fmt}}, {d['high']:{fmt}}]{mark}"


def power_markdown(rows: list[dict], baseline: dict, families: dict, solved: dict,
                   drawn: dict | None = None, fam_diff: dict | None = None) -> str:
    lines = [f"Validation: {baseline['num_val_prompts']} prompts, {baseline['val_decoding']}; step-0 accuracy "
             f"{baseline['accuracy']:.3f} (shared by every run). Differences are arm - uniform on the same seeds, "
             "mean over seeds, with 95 % paired bootstrap intervals over seeds and validation prompts; * = the "
             "interval excludes 0. Steps to reach: each seed's own uniform final accuracy; never = last step + "
             "one validation interval.", "",
             "| arm | seeds | final val acc | vs uniform | area under curve | vs uniform | steps to uniform's "
             "final | vs uniform | train reward | groups all wrong / all right | groups generated / trained "
             "| s/run |",
             "|" + " --- |" * 12]
    for r in rows:
        fin, auc, reach = r.get("final_accuracy") or {}, r.get("curve_area") or {}, r.get("steps_to_reach") or {}
        lines.append(
            f"| {r['arm']} | {r['seeds']} | {r['final_acc_mean']:.3f} | {_ci(fin)} | "
            f"{auc.get('arm', float('nan')):.3f} | {_ci(auc)} | "
            f"{reach.get('arm', float('nan')):.1f} | {_ci(reach, '+.1f')} | {r['train_reward']:.3f} | "
            f"{r.get('groups_all_wrong', float('nan')):.2f} / {r.get('groups_all_right', float('nan')):.2f} | "
            f"{r['groups_generated']:.0f} / {r['groups_trained']:.0f} | {r['wall_s']:.0f} |")
    if any(r["arm"] != BASE_ARM and r["seeds"] < 2 for r in rows):
        lines += ["", "**An arm with 1 seed**: its interval resamples the validation prompts only, not the training "
                  "noise between seeds (which is larger): a * there is not evidence of a difference."]
    for r in rows:
        if r.get("identical_seeds"):
            seeds = ", ".join(map(str, r["identical_seeds"]))
            lines += ["", f"**{r['arm']} is uniform's run** on seed(s) {seeds}: the same prompts every step, the same "
                      "answer to every validation prompt at every validation (not a tie: the same run)."]
    compared = [r for r in rows if "t_low" in (r.get("final_accuracy") or {})]
    if compared:
        lines += ["", "| the same differences, t interval over the seeds' paired differences (seeds only, 95 %) | "
                  + " | ".join(METRIC_LABEL[m] for m in METRICS) + " |", "|" + " --- |" * (len(METRICS) + 1)]
        for r in compared:
            lines.append(f"| {r['arm']} | " + " | ".join(
                f"{r[m]['difference']:+.3f} [{r[m]['t_low']:+.3f}, {r[m]['t_high']:+.3f}]" for m in METRICS) + " |")
    names = list(families["baseline"])
    lines += ["", "| final val accuracy by family | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
    for arm, fam in families.items():
        lines.append(f"| {arm} | " + " | ".join(f"{fam[n]:.2f}" for n in names) + " |")
    if drawn:
        lines += ["", "| share of the prompts drawn, by family (mean over seeds) | " + " | ".join(names) + " |",
                  "|" + " --- |" * (len(names) + 1)]
        for arm, phases in drawn.items():
            for phase in phases:
                first, last = phase["steps"]
                lines.append(f"| {arm}, steps {first}-{last} | "
                             + " | ".join(f"{phase['shares'].get(n, 0.0):.2f}" for n in names) + " |")
    if fam_diff:
        lines += ["", "| final val accuracy by family, arm - uniform (paired 95 %) / share drawn (uniform's) | "
                  + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
        for arm, per in fam_diff.items():
            lines.append(f"| {arm} - uniform | " + " | ".join(_ci(per[n], "+.2f") for n in names) + " |")
            lines.append(f"| {arm}, share drawn | " + " | ".join(
                f"{per[n]['drawn_share']:.2f} ({per[n]['uniform_drawn_share']:.2f})" for n in names) + " |")
    lines += ["", "| Spearman(first-solved step, ...) over drawn prompts | angle rank | question tokens | level |",
              "| --- | --- | --- | --- |"]
    for arm, rho in solved.items():
        lines.append(f"| {arm} | {rho.get('angle_rank', float('nan')):+.2f} | {rho['question_tokens']:+.2f} | "
                     f"{rho['level']:+.2f} |")
    return "\n".join(lines)


def plot_power(runs: dict[str, dict[int, dict]], baseline: dict, rows: list[dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [r["arm"] for r in rows]
    colors = {arm: f"C{i}" for i, arm in enumerate(arms)}
    fig, ax = plt.subplots(figsize=(8.5, 5))
    for arm in arms:
        mats = [run_matrix(r, baseline) for r in runs[arm].values()]
        steps = mats[0][0]
        curves = np.stack([m.mean(-1) for s, m in mats if np.array_equal(s, steps)])
        ax.plot(steps, curves.mean(0), marker="o", color=colors[arm], label=f"{arm} (n={len(curves)})",
                lw=2.5 if arm in ("uniform", "gainrl") else 1.3)
        if len(curves) > 1:
            ax.fill_between(steps, curves.min(0), curves.max(0), alpha=0.08, color=colors[arm])
    ax.set_xlabel(f"optimizer step ({PLANNED_PROMPTS_PER_STEP} prompts x G=4 each)")
    ax.set_ylabel(f"val accuracy (greedy fp32, {baseline['num_val_prompts']} prompts)")
    ax.set_title("Schedule study: SmolLM2-135M, arithmetic, CPU (mean over seeds; band = min-max)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "val_accuracy.png", dpi=110)
    plt.close(fig)

    compared = [r for r in rows if "difference" in (r.get("final_accuracy") or {})]
    if not compared:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.5 * len(compared) + 2), sharey=True)
    for ax, metric in zip(axes, METRICS, strict=True):
        for y, r in enumerate(compared):
            d = r[metric]
            ax.errorbar(d["difference"], y, xerr=[[d["difference"] - d["low"]], [d["high"] - d["difference"]]],
                        fmt="o", color=colors[r["arm"]], capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(f"{METRIC_LABEL[metric]}: arm - uniform", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_yticks(range(len(compared)), [r["arm"] for r in compared])
    fig.suptitle("Paired differences from uniform, 95 % bootstrap intervals (seeds and validation prompts)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "differences.png", dpi=110)
    plt.close(fig)


def report_power(out_dir: Path, *, replicates: int = 4000) -> dict | None:
    baseline, runs = load_design(out_dir)
    if baseline is None or not runs:
        print(f"[report] {out_dir}: no baseline or no runs yet")
        return None
    rows = compare(runs, baseline, replicates=replicates)
    families = family_table(runs, baseline)
    solved = first_solved_spearman(runs)
    drawn = drawn_family_table(runs)
    fam_diff = family_differences(runs, baseline, replicates=max(replicates // 2, 200))
    summary = {"baseline_accuracy": baseline["accuracy"], "num_val_prompts": baseline["num_val_prompts"],
               "val_decoding": baseline["val_decoding"], "arms": rows, "families": families,
               "first_solved_spearman": solved, "drawn_families": drawn,
               "family_differences": fam_diff,
               "wall_time": {c: wall_time_model(runs, baseline, clock=c) for c in ("wall", "cpu")}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    flat = []
    for r in rows:
        item = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
        for metric in METRICS:
            for k, v in (r.get(metric) or {}).items():
                if not isinstance(v, list):
                    item[f"{metric}_{k}"] = v
        flat.append(item)
    keys = sorted({k for item in flat for k in item}, key=lambda k: (k != "arm", k))
    with (out_dir / "summary.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(flat)
    plot_power(runs, baseline, rows, out_dir)
    text = power_markdown(rows, baseline, families, solved, drawn, fam_diff)
    (out_dir / "summary.md").write_text(text + "\n")
    print(f"## {out_dir.relative_to(ROOT) if out_dir.is_relative_to(ROOT) else out_dir}\n\n{text}\n")
    return summary


# ============================================================================================== pilot and power


def power_analysis(out_dir: Path, *, seeds: int = PLANNED_SEEDS, val_prompts: int = PLANNED_VAL_PROMPTS) -> dict:
    """Noise of each metric's paired difference in a pilot, and the gap the planned design can resolve.

    Final accuracy and curve area: per-prompt differences d[seed, prompt] (arm - uniform, every arm of the
    pilot against uniform) split into a seed part, a prompt part and seed-by-prompt noise
    (`variance_components`); the planned design's standard error is then sqrt((seed + noise / P) / S +
    prompt / P) for S seeds and P prompts (the prompt part is fixed: the same prompts serve every seed).
    With one seed per arm only an upper bound of the prompt part exists, and no seed part: the result is a
    floor (what the prompts alone cost), said so. Steps to reach: per-seed differences only (>= 2 seeds).
    A pilot shorter than the planned runs measures the noise of shorter runs.
    """
    baseline, runs = load_design(out_dir)
    if baseline is None or BASE_ARM not in runs:
        raise SystemExit(f"{out_dir}: a pilot needs the baseline and uniform runs")
    out = {"pilot_dir": str(out_dir), "planned_seeds": seeds, "planned_val_prompts": val_prompts, "metrics": {}}
    pairs = [paired_arrays(runs, baseline, arm) for arm in runs if arm != BASE_ARM]
    pairs = [p for p in pairs if p is not None]
    for metric in METRICS:
        entry: dict = {"pilot_pairs": len(pairs), "pilot_seeds": [len(p[1]) for p in pairs]}
        if metric == "steps_to_reach":
            sds = [float(np.std(paired_bootstrap(st, a, b, metric, replicates=50, resample_prompts=False).per_seed,
                                ddof=1)) for st, sl, a, b in pairs if len(sl) >= 2]
            if sds:
                sd = float(np.sqrt(np.mean(np.square(sds))))
                entry.update(sd_per_seed_difference=sd, mdd=minimum_detectable_difference(sd, seeds),
                             seeds_for={str(g): seeds_needed(sd, g) for g in (1, 2, 4)})
            out["metrics"][metric] = entry
            continue
        comps = []
        for st, _, a, b in pairs:
            if metric == "final_accuracy":
                d = a[:, -1] - b[:, -1]
            else:
                d = curve_area(st, np.moveaxis(a, 1, -1)) - curve_area(st, np.moveaxis(b, 1, -1))
            comps.append(variance_components(d))
        if not comps:
            out["metrics"][metric] = entry
            continue
        separated = all(c.prompt is not None for c in comps)
        seed_var = float(np.mean([c.seed for c in comps]))
        noise = float(np.mean([c.noise for c in comps]))
        prompt_var = float(np.mean([c.prompt if separated else c.prompt_upper for c in comps]))
        per_seed_sd = float(np.sqrt(seed_var + noise / val_prompts))
        fixed_se = float(np.sqrt(prompt_var / val_prompts))
        entry.update(seed_variance=seed_var, prompt_variance=prompt_var, noise_variance=noise,
                     prompt_part_separated=separated, per_seed_sd_planned=per_seed_sd, fixed_se_planned=fixed_se)
        if separated:
            entry.update(mdd=minimum_detectable_difference(per_seed_sd, seeds, fixed_se=fixed_se),
                         seeds_for={str(g): seeds_needed(per_seed_sd, g, fixed_se=fixed_se)
                                    for g in (0.02, 0.03, 0.05, 0.1)})
        else:
            entry["mdd_floor_upper"] = minimum_detectable_difference(0.0, seeds, fixed_se=fixed_se)
        out["metrics"][metric] = entry
    return out


def single_arm_noise(out_dir: Path, arm: str = BASE_ARM, *, correlation: float = 0.0,
                     planned: tuple[int, ...] = (5, PLANNED_SEEDS)) -> dict:
    """Seed-to-seed noise of one arm's runs, and the gaps a paired design could resolve if the compared arm
    were as noisy.

    Before a second arm exists at the planned length, its paired difference's spread is read off one arm:
    sd_diff = sd * sqrt(2 (1 - rho)) (`paired_sd_from_arm_sd`; rho = `correlation`, the same-seed correlation
    of the two arms' outcomes, 0 in the pilot). The sd's chi-square interval says how much the few seeds
    pin it down. Per validated step too, to show whether the noise grows with training.
    """
    baseline, runs = load_design(out_dir)
    if baseline is None or arm not in runs:
        raise SystemExit(f"{out_dir}: needs baseline.json and runs of arm {arm!r}")
    seeds = sorted(runs[arm])
    if len(seeds) < 2:
        raise SystemExit(f"{out_dir}: arm {arm!r} has {len(seeds)} seed(s); the noise needs >= 2")
    mats = [run_matrix(runs[arm][s], baseline) for s in seeds]
    steps = mats[0][0]
    if any(not np.array_equal(m[0], steps) for m in mats):
        raise SystemExit(f"{out_dir}: {arm}'s seeds were validated at different steps")
    curves = np.stack([m[1].mean(-1) for m in mats])  # [seeds, steps]
    out: dict = {"dir": str(out_dir), "arm": arm, "seeds": seeds, "steps": steps.tolist(),
                 "curves": curves.tolist(), "sd_by_step": curves.std(0, ddof=1).tolist(),
                 "correlation": correlation, "metrics": {}}
    for metric, values in (("final_accuracy", curves[:, -1]), ("curve_area", curve_area(steps, curves))):
        sd = float(np.std(values, ddof=1))
        sd_diff = paired_sd_from_arm_sd(sd, correlation=correlation)
        low, high = sd_interval(sd, len(seeds))
        out["metrics"][metric] = {
            "values": [float(v) for v in values], "mean": float(np.mean(values)), "sd": sd,
            "sd_interval_95": [low, high], "sd_difference": sd_diff,
            "mdd": {str(n): minimum_detectable_difference(sd_diff, n) for n in planned},
            "mdd_at_sd_interval": {str(n): [minimum_detectable_difference(paired_sd_from_arm_sd(x, correlation=correlation), n)
                                            for x in (low, high)] for n in planned},
            "seeds_for": {str(g): seeds_needed(sd_diff, g) for g in (0.03, 0.05, 0.1)}}
    return out


def print_noise(noise: dict) -> None:
    print(f"\n## Seed-to-seed noise of {noise['arm']} ({len(noise['seeds'])} seeds: {noise['seeds']}), "
          f"from {noise['dir']}\n")
    print("step   " + "  ".join(f"{int(s):>6d}" for s in noise["steps"]))
    for seed, curve in zip(noise["seeds"], noise["curves"], strict=True):
        print(f"seed {seed:<2d}" + "  ".join(f"{v:6.3f}" for v in curve))
    print("sd     " + "  ".join(f"{v:6.3f}" for v in noise["sd_by_step"]))
    for metric, e in noise["metrics"].items():
        low, high = e["sd_interval_95"]
        print(f"- {METRIC_LABEL[metric]}: per seed " + ", ".join(f"{v:.3f}" for v in e["values"])
              + f"; sd {e['sd']:.4f} (95% interval {low:.4f}-{high:.4f}); paired difference sd "
              f"{e['sd_difference']:.4f} (same-seed correlation {noise['correlation']:+.2f}) -> minimum detectable "
              "gap " + ", ".join(f"{n} seeds {v:.3f} (sd interval: {e['mdd_at_sd_interval'][n][0]:.3f}-"
                                 f"{e['mdd_at_sd_interval'][n][1]:.3f})" for n, v in e["mdd"].items())
              + "; seeds per arm for a gap of " + ", ".join(f"{g}: {n if n else '>1000'}"
                                                          for g, n in e["seeds_for"].items()))


def print_power(analysis: dict) -> None:
    print(f"\n## Power of the planned design ({analysis['planned_seeds']} seeds, {analysis['planned_val_prompts']} "
          f"validation prompts), from {analysis['pilot_dir']}\n")
    for metric, e in analysis["metrics"].items():
        head = f"- {METRIC_LABEL[metric]} ({e['pilot_pairs']} arm pairs, seeds {e['pilot_seeds']}): "
        if "mdd" in e and "fixed_se_planned" in e:
            print(head + f"per-seed sd {e['per_seed_sd_planned']:.4f} (seed part {np.sqrt(e['seed_variance']):.4f}), "
                  f"fixed validation-prompt SE {e['fixed_se_planned']:.4f} -> minimum detectable gap "
                  f"{e['mdd']:.4f} (alpha 0.05, power 0.8); seeds needed for a gap of "
                  + ", ".join(f"{g}: {n if n else '>1000'}" for g, n in e["seeds_for"].items()))
        elif "mdd" in e:
            print(head + f"sd of per-seed differences {e['sd_per_seed_difference']:.2f} steps -> minimum detectable "
                  f"gap {e['mdd']:.2f} steps; seeds needed for " +
                  ", ".join(f"{g} steps: {n if n else '>1000'}" for g, n in e["seeds_for"].items()))
        elif "mdd_floor_upper" in e:
            print(head + "only 1 seed per arm: the seed part is unknown and the prompt part only bounded "
                  f"(prompt variance <= {e['prompt_variance']:.4f}, planned fixed SE <= {e['fixed_se_planned']:.4f}). "
                  f"What the prompts alone cost: a gap below {e['mdd_floor_upper']:.4f} may be unresolvable "
                  "whatever the seeds (an upper bound); run >= 2 seeds per arm for the full figure")
        else:
            print(head + "needs >= 2 paired seeds")


def wall_time_model(runs: dict[str, dict[int, dict]], baseline: dict | None, *, clock: str = "wall") -> dict:
    """Seconds per training step (by arm), per validated prompt, and per run outside both, from saved runs.

    clock `wall`: as measured (on a shared machine: with its contention); `cpu`: the process's CPU seconds
    divided by its torch threads, the wall time it would take with its cores to itself and perfect thread
    scaling (a lower bound; runs saved before CPU time was recorded are left out).
    """
    def t(record: dict, threads: int) -> float | None:
        if clock == "wall":
            return record.get("seconds")
        return None if record.get("cpu_s") is None else record["cpu_s"] / threads

    steps, val_s, val_prompts, other = defaultdict(list), 0.0, 0, []
    for arm, rs in runs.items():
        for r in rs.values():
            threads = r.get("threads", 2)
            times = [t(x, threads) for x in r["train"]]
            vals = [t(v, threads) for v in r["val"]]
            total = r["wall_s"] if clock == "wall" else (r.get("cpu_s") or 0) / threads
            if None in times or None in vals or not total:
                continue
            # the first step carries one-off costs (ranking, warm-up): counted with the overhead
            steps[arm] += times[1:]
            val_s += sum(vals)
            val_prompts += len(vals) * r["num_val_prompts"]
            other.append(total - sum(times[1:]) - sum(vals))
    base = None
    if baseline and t(baseline, baseline.get("threads", 2)) is not None:
        base = t(baseline, baseline.get("threads", 2)) / baseline["num_val_prompts"]
    return {"clock": clock, "train_step_s": {arm: float(np.mean(v)) for arm, v in steps.items() if v},
            "groups_per_step": {arm: float(np.mean([generated_groups(r) / max(1, r["global_step"])
                                                    for r in rs.values()])) for arm, rs in runs.items()},
            "val_s_per_prompt": val_s / val_prompts if val_prompts else None, "baseline_s_per_prompt": base,
            "per_run_overhead_s": float(np.mean(other)) if other else None}


def estimate_plan_hours(model: dict) -> dict:
    """`estimate_study_hours` of every stage of `PLAN_STAGES`, the shared baseline counted once."""
    stages = [estimate_study_hours(model, list(arms), seeds, baseline=i == 0)
              for i, (arms, seeds) in enumerate(PLAN_STAGES)]
    return {"per_run_s": {a: v for e in stages for a, v in e["per_run_s"].items()},
            "total_hours": sum(e["total_hours"] for e in stages), "runs": sum(e["runs"] for e in stages)}


def estimate_study_hours(model: dict, arms: list[str] = PLANNED_ARMS, seeds: int = PLANNED_SEEDS,
                         steps: int = PLANNED_STEPS, validations: int = PLANNED_VALIDATIONS,
                         val_prompts: int = PLANNED_VAL_PROMPTS, baseline: bool = True) -> dict:
    """Wall time of the planned study from measured unit costs (arms not measured: the measured mean per
    generated group, times their groups per step; DAPO-filtered arms: 2.1 groups per trained group, as in
    the miniature study)."""
    measured = model["train_step_s"]
    if not measured or model["val_s_per_prompt"] is None:
        return {"per_run_s": {}, "total_hours": float("nan"), "runs": seeds * len(arms)}
    per_group = np.mean([measured[a] / model["groups_per_step"][a] for a in measured])
    per_arm = {}
    for arm in arms:
        if arm in measured:
            step = measured[arm]
        else:
            groups = PLANNED_PROMPTS_PER_STEP * (2.1 if arm.endswith("_filter") else 1.0)
            step = per_group * groups
        # the overhead holds the first step (one-off costs), so the steps add steps - 1
        run_s = (steps - 1) * step + validations * val_prompts * model["val_s_per_prompt"] + model["per_run_overhead_s"]
        per_arm[arm] = run_s
    total = seeds * sum(per_arm.values()) + baseline * val_prompts * (model["baseline_s_per_prompt"] or 0.0)
    return {"per_run_s": per_arm, "total_hours": total / 3600, "runs": seeds * len(arms)}


# ============================================================================================== miniature


MINIATURE_ORDER = ["gainrl", "uniform", "length", "accuracy_curriculum", "gainrl_half", "adarft", "uniform_filter",
                   "gainrl_layer8"]


def report_miniature() -> None:
    """The 12-step miniature of BENCHMARKS.md section 3, rebuilt from experiments/results/*_seed*.json."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from miniature_report import report as miniature_report

    miniature_report(RESULTS, ROOT)


# ============================================================================================== main


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:  # CLI overrides for every run (and the baseline), passed to run_ab.py
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="run arm:seed specs one after another (default: the planned study)")
    p.add_argument("--runs", nargs="+", default=None, help="e.g. gainrl:0 uniform:0 (default: planned arms x seeds)")
    p.add_argument("--design", choices=["power", "miniature", "gpu"], default="power")
    p.add_argument("--scale", choices=["cpu", "gpu"], default=None, help="old spelling: cpu = miniature")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--run-root", default=None, help="Lightning logs and run logs (default runs/study/<design>/<dir>)")
    p = sub.add_parser("pilot", help="a few arms x seeds x steps, then the power analysis of the planned design")
    p.add_argument("--arms", nargs="+", default=["uniform", "gainrl"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run (even: rounds are 2 steps)")
    p.add_argument("--val-limit", type=int, default=None, help="validate on the first N of the 256 prompts")
    p.add_argument("--val-every-rounds", type=int, default=None, help="default: steps/2 (one validation at the end)")
    p.add_argument("--out-dir", default=str(RESULTS / "pilot"))
    p.add_argument("--run-root", default=None, help="Lightning logs and run logs (default runs/study/power/pilot)")
    p = sub.add_parser("power", help="print the power analysis of a pilot's (or the study's) saved runs")
    p.add_argument("--dir", default=str(RESULTS / "pilot"))
    p = sub.add_parser("noise", help="one arm's seed-to-seed noise and the gaps it lets a paired design resolve")
    p.add_argument("--dir", default=str(RESULTS / "power"))
    p.add_argument("--arm", default=BASE_ARM)
    p.add_argument("--correlation", type=float, default=0.0,
                   help="assumed same-seed correlation of two arms' outcomes (the pilot's: none)")
    p = sub.add_parser("plan", help="print the planned design, its checks and (from saved runs) its wall time")
    p.add_argument("--dir", default=str(RESULTS / "pilot"), help="runs whose unit costs give the wall time")
    p = sub.add_parser("report", help="rebuild every table and plot from saved JSON")
    p.add_argument("--design", choices=["all", "power", "miniature"], default="all")
    p.add_argument("--replicates", type=int, default=4000)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        design = {"cpu": "miniature", "gpu": "gpu"}.get(args.scale, args.design)
        out_dir = Path(args.out_dir) if args.out_dir else (RESULTS if design == "miniature" else RESULTS / design)
        specs = parse_specs(args.runs) if args.runs else planned_study_specs()
        run(specs, design, out_dir, extra, Path(args.run_root) if args.run_root else None)
    elif args.cmd == "pilot":
        if args.steps % 2:
            raise SystemExit("--steps must be even (a round is 2 steps)")
        rounds = args.steps // 2
        every = args.val_every_rounds or rounds
        extra = ["--trainer.max_steps", str(args.steps), "--trainer.check_val_every_n_epoch", str(every), *extra]
        if args.val_limit:
            extra += ["--data.val_limit", str(args.val_limit)]
        out_dir = Path(args.out_dir)
        run(planned_specs(args.arms, args.seeds), "power", out_dir, extra,
            Path(args.run_root) if args.run_root else None)
        report_power(out_dir, replicates=1000)
        print_power(power_analysis(out_dir))
        print_plan(out_dir)
    elif args.cmd == "power":
        print_power(power_analysis(Path(args.dir)))
    elif args.cmd == "noise":
        print_noise(single_arm_noise(Path(args.dir), args.arm, correlation=args.correlation))
    elif args.cmd == "plan":
        print_plan(Path(args.dir))
    else:
        if args.design in ("all", "miniature") and any(RESULTS.glob("*_seed*.json")):
            report_miniature()
        if args.design in ("all", "power"):  # the study and every pilot: each directory with a baseline
            for out_dir in sorted(p.parent for p in RESULTS.glob("*/baseline.json")):
                report_power(out_dir, replicates=args.replicates)


def print_plan(measured_dir: Path) -> None:
    draws = PLANNED_STEPS * PLANNED_PROMPTS_PER_STEP
    n_train = sum(1 for _ in (ROOT / "data/arithmetic/study_train.jsonl").open()) \
        if (ROOT / "data/arithmetic/study_train.jsonl").exists() else 0
    stages = "; ".join(f"stage {i + 1}: {', '.join(arms)} x {seeds} seeds ({len(arms) * seeds} runs)"
                       for i, (arms, seeds) in enumerate(PLAN_STAGES))
    print(f"\n## Planned design\n\n{stages}; {PLANNED_STEPS} steps of {PLANNED_PROMPTS_PER_STEP} prompts "
          f"x G=4, validation on {PLANNED_VAL_PROMPTS} prompts at {PLANNED_VALIDATIONS} steps + the shared step 0.")
    print(f"A run draws {draws} prompts of {n_train}: "
          + ("no prompt comes back within a run, so GRESO (which only skips prompts it has seen) draws exactly "
             "uniform's rounds, and pass-rate priority and MoPPS act only through candidates they have seen "
             "(MoPPS's candidate pool of 16 x 8 per round passes over the data about "
             f"{PLANNED_STEPS // 2 * 128 / max(n_train, 1):.1f} times)." if draws < n_train else
             "prompts come back within a run."))
    baseline, runs = load_design(measured_dir)
    if runs and baseline:
        for clock, label in (("wall", "wall time as measured (with this machine's contention at the time)"),
                             ("cpu", "CPU time / threads (the cores to itself, perfect thread scaling: a floor)")):
            model = wall_time_model(runs, baseline, clock=clock)
            est = estimate_plan_hours(model)
            if not model["train_step_s"]:
                continue
            print(f"{label}, from {measured_dir}: train step (s) "
                  + ", ".join(f"{a} {v:.1f}" for a, v in model["train_step_s"].items())
                  + f"; validation {model['val_s_per_prompt']:.2f} s per prompt; per-run overhead "
                  f"{model['per_run_overhead_s']:.0f} s. Estimated study: {est['runs']} runs, "
                  f"{est['total_hours']:.1f} h (per run: "
                  + ", ".join(f"{a} {s_ / 60:.0f} min" for a, s_ in est["per_run_s"].items()) + ")")


if __name__ == "__main__":
    main()
