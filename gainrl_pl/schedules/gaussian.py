"""GAIN-RL's data schedule: a Gaussian over angle-ranked prompts whose mean moves each round (spec sections 4, 5).

Pure math first (`gaussian_rank_probabilities`, `update_mean`), then
`GaussianRankSampler` (GAIN-RL `angle`; with another ranking `length` and `accuracy_curriculum`).

The contract all schedules implement, `RoundSampler`, is in `gainrl_pl.schedules.base`; the peers in
`peers` and `selective`; the factory `build_sampler(name, **kwargs)` that maps every config name to its class
in `gainrl_pl.schedules` itself. No Lightning and no model here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from gainrl_pl.schedules.base import RoundSampler, finite_mean, top_k_without_replacement

# ----------------------------------------------------------------------------------------------- pure math


def resolve_rank_quantity(value: float, n: int) -> float:
    """A quantity over rank positions given in ranks or as a fraction of the ranking's length N.

    Magnitudes in (0, 1] are fractions of N (sigma = 0.1 on 7473 prompts is 747.3 ranks); anything else is
    already in ranks (sigma = 1000). The sign is kept, so a negative `min_shift` of -0.05 is -0.05 N. Sigma in
    ranks does not transfer between datasets of different size (spec section 4), fractions do.
    """
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"rank quantity {value} must be finite")
    return value * n if 0 < abs(value) <= 1 else value


def check_sigma(sigma: float, name: str = "sigma") -> float:
    """`sigma` if it is a finite number > 0 (ranks if > 1, a fraction of N if in (0, 1]); ValueError otherwise."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"{name}={sigma} must be > 0: ranks if > 1, a fraction of N if in (0, 1]")
    return sigma


def _gaussian_log_weights(n: int, mu: float, sigma: float) -> np.ndarray:
    """log p(r) + const over r = 0..n-1, shifted so the largest entry is exactly 0."""
    r = np.arange(n, dtype=np.float64)
    nearest = min(max(round(mu), 0), n - 1)  # the mode over the ranks that exist
    # -((r - mu)^2 - (nearest - mu)^2) / (2 sigma^2), factored so that a mu many sigma past the end does not
    # cancel two huge squares: the result stays exact and the mode stays at log weight 0.
    return -(r - nearest) * (r + nearest - 2.0 * mu) / (2.0 * sigma * sigma)


def gaussian_rank_probabilities(n: int, mu: float, sigma: float) -> np.ndarray:
    """p(r) proportional to exp(-(r - mu)^2 / (2 sigma^2)) over ranks r = 0..n-1, normalized (spec section 4).

    Computed in log space relative to the most likely existing rank, so the mode always has weight 1 before
    normalizing: with mu far past the end (the reference code's failure) the mass piles onto the last ranks
    instead of underflowing to all zeros.

    Args:
        n: N, the number of ranks.
        mu: The Gaussian's mean, in ranks (any finite value; it need not lie in [0, N-1]).
        sigma: The Gaussian's width in ranks, > 0.
    """
    if n < 1:
        raise ValueError(f"n={n}: the ranking must have at least one prompt")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma={sigma} must be a finite number > 0 (in ranks)")
    if not math.isfinite(mu):
        raise ValueError(f"mu={mu} must be finite")
    w = np.exp(_gaussian_log_weights(n, float(mu), float(sigma)))
    return w / w.sum()


class MeanUpdate(NamedTuple):
    """Result of one GAIN-RL mean update (spec section 5); both terms are logged so users see who moves mu."""

    new_mu: float
    """mu_{t+1}, the mean for the next round (clamped to [0, N-1] when N is known)."""
    accuracy_term: float
    """n * tanh(alpha * (acc - beta)): speeds mu up when the round was easy, slows it when hard."""
    angle_term: float
    """n * tanh(alpha * ang): with last-layer cosines near 0.7 this is ~0.89 n per round at the defaults."""
    shift: float
    """clamp(accuracy_term + angle_term, adj_min, adj_max): how far mu moved before the [0, N-1] clamp."""


def update_mean(
    mu: float,
    accuracy: float,
    angle_signal: float,
    *,
    step_size: float = 500.0,
    sensitivity: float = 2.0,
    target_accuracy: float = 0.5,
    min_shift: float = 0.0,
    max_shift: float = 1000.0,
    num_prompts: int | None = None,
) -> MeanUpdate:
    """GAIN-RL's dynamic mean: mu + clamp(n tanh(alpha (acc - beta)) + n tanh(alpha ang), adj_min, adj_max).

    Args:
        mu: mu_t, the current mean (ranks).
        accuracy: acc, mean accuracy of the round's rollouts, in [0, 1] (the reference code halves its 0/2
            reward to get here).
        angle_signal: ang, mean angle concentration observed on the round's data.
        step_size: n, scale of each term, in ranks (reference: 500).
        sensitivity: alpha, tanh sensitivity of both terms (reference: 2).
        target_accuracy: beta, the accuracy at which the accuracy term is zero (reference: 0.5). Not called
            `beta`, which every GRPO user reads as the KL coefficient.
        min_shift: adj_min, lower clamp of the shift in ranks (reference: 0, mu never moves back).
        max_shift: adj_max, upper clamp of the shift in ranks (reference: 1000).
        num_prompts: N; when given, the new mu is clamped to [0, N-1] (the reference never bounds mu, and once it
            runs many sigma past N every probability underflows).
    """
    values = dict(mu=mu, accuracy=accuracy, angle_signal=angle_signal, step_size=step_size,
                  sensitivity=sensitivity, target_accuracy=target_accuracy, min_shift=min_shift, max_shift=max_shift)
    for name, value in values.items():
        if not math.isfinite(float(value)):
            raise ValueError(f"update_mean: {name}={value} must be finite")
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"update_mean: accuracy={accuracy} must be in [0, 1] (a mean of 0/1 correctness; "
                         "rescale rewards such as the reference code's 0/2 first)")
    if min_shift > max_shift:
        raise ValueError(f"update_mean: min_shift={min_shift} (adj_min) must be <= max_shift={max_shift} (adj_max)")
    accuracy_term = step_size * math.tanh(sensitivity * (accuracy - target_accuracy))
    angle_term = step_size * math.tanh(sensitivity * angle_signal)
    shift = min(max(accuracy_term + angle_term, min_shift), max_shift)
    new_mu = float(mu) + shift
    if num_prompts is not None:
        new_mu = min(max(new_mu, 0.0), float(num_prompts - 1))
    return MeanUpdate(new_mu, accuracy_term, angle_term, shift)


# ------------------------------------------------------------------------------------------------ samplers


class GaussianRankSampler(RoundSampler):
    """GAIN-RL (spec sections 4-5): a Gaussian over rank positions whose mean moves after every round.

    Each round draws `subset_size` distinct ranks without replacement with p(r) proportional to
    exp(-(r - mu)^2 / (2 sigma^2)), sorts them ascending (most concentrated first) and maps them through the
    ranking to dataset indices. After the round, `update()` moves mu by the rule of `update_mean` and clamps it
    to [0, N-1]. With the angle ranking this is `angle`; with question length (shortest first) `length`; with
    measured pass rate (easiest first) `accuracy_curriculum`.

    Rank quantities (sigma, step_size, min_shift, max_shift) are ranks when their magnitude is > 1 and
    fractions of N when it is in (0, 1] (`resolve_rank_quantity`).

    Args:
        ranking: Dataset indices ordered best first (rank 0 first); `None` to install it later with
            `set_ranking` (then `num_prompts` is required).
        subset_size: Prompts per round over all ranks (reference: 256).
        batch_size: Prompts per batch on each rank.
        sigma: Gaussian width: ranks if > 1, a fraction of N if <= 1 (reference: 1000 ranks).
        mu: mu_0, the starting mean: a rank (0 = top of the ranking), or a fraction of N if 0 < mu < 1; values
            past the end are clamped to N-1.
        num_prompts: N; inferred from the ranking when it is given.
        step_size: n, scale of the mean update's terms: ranks if > 1, a fraction of N if <= 1 (reference: 500).
        sensitivity: alpha, tanh sensitivity of both terms (reference: 2).
        target_accuracy: beta (paper), accuracy at which the accuracy term is zero (reference: 0.5).
        min_shift: adj_min, smallest shift per round (reference: 0, the mean never moves back).
        max_shift: adj_max, largest shift per round (reference: 1000 ranks).
        reference_lag: Draw each round with the mean from before the latest update (one-round lag), as the
            reference TRL script does; off = the new mean is used at once (verl fork, ours).
        num_replicas: DDP world size.
        rank: This process's DDP rank.
        seed: Seed of the draws (the same on every rank).
        drop_uneven: Drop the round's tail instead of padding it (see `RoundSampler`).
    """

    def __init__(self, ranking: Sequence[int] | None = None, subset_size: int = 256, batch_size: int = 8,
                 sigma: float = 1000.0, mu: float = 0.0, *, num_prompts: int | None = None,
                 step_size: float = 500.0, sensitivity: float = 2.0, target_accuracy: float = 0.5,
                 min_shift: float = 0.0, max_shift: float = 1000.0, reference_lag: bool = False,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0, drop_uneven: bool = False) -> None:
        if num_prompts is None:
            if ranking is None:
                raise ValueError("GaussianRankSampler needs a ranking or num_prompts (to set the ranking later)")
            num_prompts = len(ranking)
        super().__init__(num_prompts, subset_size, batch_size, num_replicas=num_replicas, rank=rank, seed=seed,
                         drop_uneven=drop_uneven)
        check_sigma(sigma)
        if not (math.isfinite(step_size) and step_size >= 0):
            raise ValueError(f"step_size={step_size} (n) must be >= 0: ranks if > 1, a fraction of N if in (0, 1]")
        if not math.isfinite(mu) or mu < 0:
            raise ValueError(f"mu={mu} must be >= 0: a rank (0 = top of the ranking) or a fraction of N in (0, 1)")
        n = self.num_prompts
        self.sigma = resolve_rank_quantity(sigma, n)
        self.step_size = resolve_rank_quantity(step_size, n)
        self.min_shift = resolve_rank_quantity(min_shift, n)
        self.max_shift = resolve_rank_quantity(max_shift, n)
        if self.min_shift > self.max_shift:
            raise ValueError(f"min_shift={min_shift} (adj_min) must be <= max_shift={max_shift} (adj_max)")
        self.sensitivity = float(sensitivity)
        self.target_accuracy = float(target_accuracy)
        if not 0 <= self.target_accuracy <= 1:
            raise ValueError(f"target_accuracy={target_accuracy} (beta) must be in [0, 1]")
        self.reference_lag = bool(reference_lag)
        mu = mu * n if 0 < mu < 1 else float(mu)
        self._mu = min(float(mu), n - 1.0)
        self._draw_mu = self._mu  # the mean the next round is drawn with (differs only with reference_lag)
        self.ranking: list[int] | None = None
        if ranking is not None:
            self.set_ranking(ranking)

    @property
    def mu(self) -> float:
        """The current mean over rank positions, in [0, N-1]."""
        return self._mu

    @property
    def draw_mu(self) -> float:
        """The mean the next round is drawn with: `mu`, or the previous one with `reference_lag`."""
        return self._draw_mu

    def set_ranking(self, order: Sequence[int]) -> None:
        """Install the ranking: the N dataset indices 0..N-1 ordered best first. A round in progress keeps its
        prompts; mu stays a rank position, so a re-ranking moves which prompts sit under the Gaussian."""
        order = [int(i) for i in order]
        if len(order) != self.num_prompts or sorted(order) != list(range(self.num_prompts)):
            raise ValueError(f"ranking must be a permutation of the dataset indices 0..{self.num_prompts - 1} "
                             f"(got {len(order)} entries, {len(set(order))} distinct)")
        self.ranking = order

    def drawn_ranks(self) -> list[int]:
        """Draw `subset_size` distinct ranks, ascending (advances the RNG; `indices_for_round` uses it)."""
        log_w = _gaussian_log_weights(self.num_prompts, self._draw_mu, self.sigma)
        return sorted(int(r) for r in top_k_without_replacement(log_w, self.subset_size, self._rng))

    def indices_for_round(self) -> list[int]:
        """The round's dataset indices: Gaussian-drawn ranks, ascending, mapped through the ranking."""
        if self.ranking is None:
            raise RuntimeError("GaussianRankSampler has no ranking: call set_ranking(order) first (the "
                               "GainRLScheduler callback does it at fit start)")
        return [self.ranking[r] for r in self.drawn_ranks()]

    def update(self, prompt_indices: Sequence[int], per_prompt_accuracy: Sequence[float],
               per_prompt_signal: Sequence[float]) -> dict[str, float]:
        """Move mu with the round's mean accuracy and mean angle signal (spec section 5).

        Returns {"mu", "accuracy_term", "angle_term", "shift"}; an empty round changes nothing and returns {}.
        """
        if not (len(prompt_indices) == len(per_prompt_accuracy) == len(per_prompt_signal)):
            raise ValueError(f"update: {len(prompt_indices)} indices, {len(per_prompt_accuracy)} accuracies and "
                             f"{len(per_prompt_signal)} signals must have the same length")
        if len(prompt_indices) == 0:
            return {}
        result = update_mean(self._mu, finite_mean("per_prompt_accuracy", per_prompt_accuracy),
                             finite_mean("per_prompt_signal", per_prompt_signal), step_size=self.step_size,
                             sensitivity=self.sensitivity, target_accuracy=self.target_accuracy,
                             min_shift=self.min_shift, max_shift=self.max_shift, num_prompts=self.num_prompts)
        # reference_lag: the TRL script draws round t+1 with mu_t (the mean before this update).
        self._draw_mu = self._mu if self.reference_lag else result.new_mu
        self._mu = result.new_mu
        return {"mu": result.new_mu, "accuracy_term": result.accuracy_term, "angle_term": result.angle_term,
                "shift": result.shift}

    def _extra_state(self) -> dict[str, Any]:
        return {"mu": self._mu, "draw_mu": self._draw_mu}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._mu, self._draw_mu = float(state["mu"]), float(state["draw_mu"])
