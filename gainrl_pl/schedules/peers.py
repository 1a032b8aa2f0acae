"""Baseline data schedules on the `RoundSampler` contract: uniform (vanilla GRPO), AdaRFT, pass-rate priority.

GAIN-RL's own schedule, `GaussianRankSampler`, and the name -> class factory `build_sampler` are in
`gainrl_pl.schedules.gaussian`, which re-exports these classes. No Lightning and no model here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gainrl_pl.schedules.base import RoundSampler, finite_mean, top_k_without_replacement


class UniformSampler(RoundSampler):
    """Vanilla GRPO: every prompt equally likely, a new permutation for each pass over the data.

    Rounds walk through a seeded permutation of all N prompts, `subset_size` at a time, so a pass over the data
    visits each prompt exactly once. A round that straddles two passes takes the old pass's tail and the head of
    the next permutation, with the tail's prompts moved to the end of the new permutation: no prompt repeats
    within a round, and the new pass still visits each prompt once.

    Args:
        num_prompts: N, the number of prompts.
        subset_size: Prompts per round over all ranks.
        batch_size: Prompts per batch on each rank.
        num_replicas: DDP world size.
        rank: This process's DDP rank.
        seed: Seed of the permutations (the same on every rank).
        drop_uneven: Drop the round's tail instead of padding it (see `RoundSampler`).
    """

    def __init__(self, num_prompts: int, subset_size: int = 256, batch_size: int = 8, *, num_replicas: int = 1,
                 rank: int = 0, seed: int = 0, drop_uneven: bool = False) -> None:
        super().__init__(num_prompts, subset_size, batch_size, num_replicas=num_replicas, rank=rank, seed=seed,
                         drop_uneven=drop_uneven)
        self.permutation: list[int] = []
        """The current pass's order over all prompts (empty before the first round)."""
        self.position = 0
        """How many prompts of the current pass earlier rounds took."""
        self.passes = 0
        """Permutations drawn so far (passes over the data started)."""

    def _new_pass(self, defer: Sequence[int] = ()) -> None:
        perm = self._rng.permutation(self.num_prompts).tolist()
        deferred = set(defer)
        self.permutation = [i for i in perm if i not in deferred] + [i for i in perm if i in deferred]
        self.position, self.passes = 0, self.passes + 1

    def indices_for_round(self) -> list[int]:
        """The next `subset_size` prompts of the current pass (starting a new pass when it runs out)."""
        if not self.permutation:
            self._new_pass()
        take = self.permutation[self.position:self.position + self.subset_size]
        self.position += len(take)
        if len(take) < self.subset_size:
            self._new_pass(defer=take)
            rest = self.subset_size - len(take)
            take = take + self.permutation[:rest]
            self.position = rest
        return take

    def _extra_state(self) -> dict[str, Any]:
        return {"permutation": list(self.permutation), "position": self.position, "passes": self.passes}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.permutation = [int(i) for i in state["permutation"]]
        self.position, self.passes = int(state["position"]), int(state["passes"])


class AdaRFTSampler(RoundSampler):
    """AdaRFT (Shi et al. 2025, arXiv 2504.05520): the prompts closest to a target difficulty that tracks reward.

    Each round takes the `subset_size` prompts with the smallest |d_i - T| (ties broken by a seeded random
    order, redrawn each round), yielded in ascending difficulty. After the round,
    T <- clamp(T + eta tanh(alpha (R_avg - beta)), d_min, d_max), with R_avg the round's mean reward: the
    target gets harder while the model succeeds more often than `target_reward`, easier otherwise.

    Args:
        difficulty: One finite difficulty per prompt, higher = harder (e.g. MATH `level`, or 1 - the base
            model's pass rate).
        subset_size: Prompts per round over all ranks.
        batch_size: Prompts per batch on each rank.
        num_prompts: N, checked against len(difficulty) when given.
        initial_target: T_0; default the easiest difficulty (the paper starts at T = 0 on its 0-100 scale).
        step_size: eta, the largest move of T per round, in difficulty units; default half the difficulty
            range (the paper: 50 on 0-100).
        sensitivity: alpha (paper: 2).
        target_reward: beta, the mean reward the curriculum aims for (paper: 0.5).
        min_difficulty: d_min, lower bound of T; default the easiest difficulty.
        max_difficulty: d_max, upper bound of T; default the hardest difficulty.
        num_replicas: DDP world size.
        rank: This process's DDP rank.
        seed: Seed of the tie-breaking order (the same on every rank).
        drop_uneven: Drop the round's tail instead of padding it (see `RoundSampler`).
    """

    def __init__(self, difficulty: Sequence[float], subset_size: int = 256, batch_size: int = 8, *,
                 num_prompts: int | None = None, initial_target: float | None = None,
                 step_size: float | None = None, sensitivity: float = 2.0, target_reward: float = 0.5,
                 min_difficulty: float | None = None, max_difficulty: float | None = None, num_replicas: int = 1,
                 rank: int = 0, seed: int = 0, drop_uneven: bool = False) -> None:
        d = np.asarray(difficulty, dtype=np.float64)
        if d.ndim != 1 or d.size == 0:
            raise ValueError(f"difficulty must be one number per prompt, got shape {d.shape}")
        bad = np.flatnonzero(~np.isfinite(d))
        if bad.size:
            raise ValueError(f"difficulty[{int(bad[0])}]={d[bad[0]]} is not finite")
        if num_prompts is not None and num_prompts != d.size:
            raise ValueError(f"num_prompts={num_prompts} but difficulty has {d.size} values")
        super().__init__(d.size, subset_size, batch_size, num_replicas=num_replicas, rank=rank, seed=seed,
                         drop_uneven=drop_uneven)
        self.difficulty = d
        self.min_difficulty = float(d.min() if min_difficulty is None else min_difficulty)
        self.max_difficulty = float(d.max() if max_difficulty is None else max_difficulty)
        if self.min_difficulty > self.max_difficulty:
            raise ValueError(f"min_difficulty={self.min_difficulty} must be <= max_difficulty={self.max_difficulty}")
        self.step_size = 0.5 * (self.max_difficulty - self.min_difficulty) if step_size is None else float(step_size)
        if not (math.isfinite(self.step_size) and self.step_size >= 0):
            raise ValueError(f"step_size={step_size} (eta) must be >= 0, in difficulty units")
        self.sensitivity, self.target_reward = float(sensitivity), float(target_reward)
        start = self.min_difficulty if initial_target is None else float(initial_target)
        self.target = min(max(start, self.min_difficulty), self.max_difficulty)
        """T, the current target difficulty."""

    def indices_for_round(self) -> list[int]:
        """The subset_size prompts closest to T, in ascending difficulty (seeded random tie order)."""
        tie = self._rng.random(self.num_prompts)
        closest = np.lexsort((tie, np.abs(self.difficulty - self.target)))[: self.subset_size]
        return [int(i) for i in closest[np.lexsort((tie[closest], self.difficulty[closest]))]]

    def update(self, prompt_indices: Sequence[int], per_prompt_accuracy: Sequence[float],
               per_prompt_signal: Sequence[float]) -> dict[str, float]:
        """Move T by eta tanh(alpha (mean reward - beta)); returns {"target_difficulty", "mean_reward", "shift"}."""
        if len(prompt_indices) != len(per_prompt_accuracy):
            raise ValueError(f"update: {len(prompt_indices)} indices but {len(per_prompt_accuracy)} accuracies")
        if len(prompt_indices) == 0:
            return {}
        reward = finite_mean("per_prompt_accuracy", per_prompt_accuracy)
        old = self.target
        step = self.step_size * math.tanh(self.sensitivity * (reward - self.target_reward))
        self.target = min(max(old + step, self.min_difficulty), self.max_difficulty)
        return {"target_difficulty": self.target, "mean_reward": reward, "shift": self.target - old}

    def _extra_state(self) -> dict[str, Any]:
        return {"target": self.target}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.target = float(state["target"])


PASS_RATE_WEIGHTINGS = ("variance", "failure")
PASS_RATE_ESTIMATORS = ("ema", "mean")


class PassRatePrioritySampler(RoundSampler):
    """Prompts drawn (distinct, without replacement) with weight from their tracked pass rate p.

    `weighting="variance"`: w = p (1 - p), largest at p = 0.5, where a GRPO group most likely has unequal
    rewards and so a non-zero advantage; `"failure"`: w = 1 - p, favours prompts the model still fails. A
    `min_weight` floor keeps solved and hopeless prompts drawable, so their estimates can change.

    Args:
        num_prompts: N, the number of prompts.
        subset_size: Prompts per round over all ranks.
        batch_size: Prompts per batch on each rank.
        weighting: `variance` (p (1 - p)) or `failure` (1 - p).
        estimator: `ema` (p <- p + ema_rate (acc - p); the first observation replaces the prior) or `mean`
            (running mean of every observation).
        ema_rate: Weight of a new observation in the EMA, in (0, 1].
        prior: Pass rate assumed for prompts never seen, in [0, 1].
        min_weight: Floor of every weight, > 0 (p (1 - p) is at most 0.25).
        num_replicas: DDP world size.
        rank: This process's DDP rank.
        seed: Seed of the draws (the same on every rank).
        drop_uneven: Drop the round's tail instead of padding it (see `RoundSampler`).
    """

    def __init__(self, num_prompts: int, subset_size: int = 256, batch_size: int = 8, *,
                 weighting: str = "variance", estimator: str = "ema", ema_rate: float = 0.5, prior: float = 0.5,
                 min_weight: float = 0.01, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 drop_uneven: bool = False) -> None:
        super().__init__(num_prompts, subset_size, batch_size, num_replicas=num_replicas, rank=rank, seed=seed,
                         drop_uneven=drop_uneven)
        if weighting not in PASS_RATE_WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r}: allowed values are {', '.join(PASS_RATE_WEIGHTINGS)}")
        if estimator not in PASS_RATE_ESTIMATORS:
            raise ValueError(f"estimator={estimator!r}: allowed values are {', '.join(PASS_RATE_ESTIMATORS)}")
        if not 0 < ema_rate <= 1:
            raise ValueError(f"ema_rate={ema_rate} must be in (0, 1]")
        if not 0 <= prior <= 1:
            raise ValueError(f"prior={prior} must be in [0, 1]")
        if not (math.isfinite(min_weight) and min_weight > 0):
            raise ValueError(f"min_weight={min_weight} must be > 0 (a floor so no prompt starves)")
        self.weighting, self.estimator = weighting, estimator
        self.ema_rate, self.prior, self.min_weight = float(ema_rate), float(prior), float(min_weight)
        self.pass_rate = np.full(self.num_prompts, self.prior)
        """Tracked pass rate per prompt (the prior where unseen)."""
        self.observations = np.zeros(self.num_prompts, dtype=np.int64)
        """How many rollout results each prompt has had."""

    def weights(self) -> np.ndarray:
        """Unnormalized sampling weight per prompt from the tracked pass rates."""
        p = self.pass_rate
        w = p * (1.0 - p) if self.weighting == "variance" else 1.0 - p
        return np.maximum(w, self.min_weight)

    def indices_for_round(self) -> list[int]:
        """subset_size distinct prompts, drawn with probability proportional to `weights()` (draw order)."""
        return [int(i) for i in top_k_without_replacement(np.log(self.weights()), self.subset_size, self._rng)]

    def update(self, prompt_indices: Sequence[int], per_prompt_accuracy: Sequence[float],
               per_prompt_signal: Sequence[float]) -> dict[str, float]:
        """Fold the round's accuracies into the pass rates; returns {"mean_pass_rate", "seen_fraction"}."""
        if len(prompt_indices) != len(per_prompt_accuracy):
            raise ValueError(f"update: {len(prompt_indices)} indices but {len(per_prompt_accuracy)} accuracies")
        for index, acc in zip(prompt_indices, per_prompt_accuracy, strict=True):
            i, acc = int(index), float(acc)
            if not 0 <= i < self.num_prompts:
                raise ValueError(f"update: prompt index {i} outside 0..{self.num_prompts - 1}")
            if not 0.0 <= acc <= 1.0:
                raise ValueError(f"update: accuracy {acc} of prompt {i} must be in [0, 1]")
            self.observations[i] += 1
            if self.estimator == "mean":
                rate = 1.0 / self.observations[i]
            else:
                rate = 1.0 if self.observations[i] == 1 else self.ema_rate
            self.pass_rate[i] += rate * (acc - self.pass_rate[i])
        seen = self.observations > 0
        return {"mean_pass_rate": float(self.pass_rate[seen].mean()) if seen.any() else self.prior,
                "seen_fraction": float(seen.mean())}

    def _extra_state(self) -> dict[str, Any]:
        return {"pass_rate": self.pass_rate.tolist(), "observations": self.observations.tolist()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.pass_rate = np.asarray(state["pass_rate"], dtype=np.float64)
        self.observations = np.asarray(state["observations"], dtype=np.int64)
