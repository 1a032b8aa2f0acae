"""Rankings for the data schedules, and the schedule plot: the work behind the GainRLScheduler callback.

A ranking is a list of prompt positions, best first. `angle_ranking` scores the prompts by angle concentration
(spec sections 2, 3, 8) and orders them with `rank_scores`; `ranking_from_values` orders them by any other
per-prompt value (question length, a difficulty, a pass rate).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gainrl_pl.distributed import from_rank_zero, gather_objects
from gainrl_pl.scoring import AngleScorer, PromptScore, ScoreCache, ranking_summary


def ranking_from_values(values: Sequence[float], descending: bool = False) -> list[int]:
    """Positions ordered by a per-prompt value, ties by position (stable).

    Ascending (default) puts the smallest value first: question length for `length` (shortest first), a
    difficulty for `accuracy_curriculum`; `descending=True` for a pass rate (easiest first) or an angle score.

    Args:
        values: One finite number per prompt.
        descending: Largest value first.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"values must be one number per prompt, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"values[{int(bad[0])}]={arr[bad[0]]} is not finite; every prompt needs a number to be ranked")
    return [int(i) for i in np.argsort(-arr if descending else arr, kind="stable")]


def rank_scores(scores: Sequence[PromptScore]) -> list[int]:
    """Positions in `scores`, highest score first; ties by `index`; NaN scores last (never first)."""
    def key(i: int):
        s = scores[i].score
        nan = s != s
        return (nan, 0.0 if nan else -s, scores[i].index, i)

    return sorted(range(len(scores)), key=key)


def angle_ranking(model, tokenizer, items: list[dict], strategy=None, *, layer: int = -1, site: str = "mlp_input",
                  w_intra: float = 1.0, w_inter: float = 1.0, intra_diagonal: bool = True, batch_size: int = 16,
                  cache_dir: str | None = None, use_cache: bool = True,
                  model_id: str = "") -> tuple[list[int], list, dict[str, Any]]:
    """Score every training prompt with `model` and rank them, best (most concentrated) first.

    Under DDP each rank scores a strided shard and the scores are gathered, so N ranks score N times
    faster and every rank ends with the same ranking. Rank 0 alone reads the score cache and broadcasts
    what it found: with node-local caches a hit on one rank and a miss on another would otherwise leave
    the missing rank waiting in the gather. Returns (order, PromptScore by position, summary).
    """
    world = strategy.world_size if strategy is not None else 1
    rank = strategy.global_rank if strategy is not None else 0
    segments = [it["segments"] for it in items]
    cache = ScoreCache(cache_dir) if use_cache else None
    key = None
    if cache is not None:
        key = cache.key(model, segments, layer=layer, site=site, w_intra=w_intra, w_inter=w_inter,
                        intra_diagonal=intra_diagonal, model_id=model_id)
        cached = from_rank_zero(cache.load(key) if rank == 0 else None)
        if cached is not None:
            return rank_scores(cached), cached, ranking_summary(cached, [it["question_tokens"] for it in items])
    scorer = AngleScorer(model, tokenizer, layer=layer, site=site, batch_size=batch_size, w_intra=w_intra,
                         w_inter=w_inter, intra_diagonal=intra_diagonal, show_progress=rank == 0)
    mine = list(range(rank, len(items), world))
    local = scorer.score([segments[i] for i in mine])
    pairs = list(zip(mine, local, strict=True))
    merged = sorted((p for part in gather_objects(pairs) for p in part), key=lambda p: p[0])
    results = [_reindex(s, pos) for pos, s in merged]
    summary = ranking_summary(results, [it["question_tokens"] for it in items])
    if cache is not None and rank == 0:
        cache.save(key, results, summary)
    return rank_scores(results), results, summary


def _reindex(score, position: int):
    """Scores come back indexed within the shard; give them their position in the training set."""
    return dataclasses.replace(score, index=position)


def plot_schedule(history: list[dict[str, Any]], path: str | Path, num_prompts: int) -> Path:
    """PNG with mu over rounds (and the update's two terms) and the ranks drawn each round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    rounds = [h["round"] for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    if any("mu" in h for h in history):
        ax.plot(rounds, [h.get("mu", float("nan")) for h in history], label="mu (rank)")
        ax.set_ylim(0, num_prompts)
        ax2 = ax.twinx()
        ax2.plot(rounds, [h.get("accuracy_term", float("nan")) for h in history], "--", alpha=0.6, label="accuracy term")
        ax2.plot(rounds, [h.get("angle_term", float("nan")) for h in history], ":", alpha=0.6, label="angle term")
        ax2.set_ylabel("shift terms")
        ax2.legend(loc="lower right", fontsize=8)
    ax.plot(rounds, [h["accuracy"] * num_prompts for h in history], alpha=0.4, label="accuracy x N")
    ax.set_xlabel("round")
    ax.set_ylabel("rank")
    ax.set_title("Gaussian mean over the ranking")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[1]
    for h in history:
        ranks = h.get("drawn_ranks") or []
        ax.scatter([h["round"]] * len(ranks), ranks, s=4, alpha=0.4, color="tab:blue")
    ax.set_ylim(num_prompts, 0)
    ax.set_xlabel("round")
    ax.set_ylabel("rank of drawn prompt (0 = top)")
    ax.set_title("Prompts drawn each round")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
