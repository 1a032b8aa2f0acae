"""Selective data schedules of 2025 on the `RoundSampler` contract: GRESO and MoPPS.

Both keep a per-prompt memory of past rollout outcomes and use it to choose *before* generating:

- `GRESOSampler` (`data.schedule.name: greso`): walks the data in seeded passes like uniform sampling, but
  skips, with a probability that grows with the streak, prompts whose recent groups were all right or all
  wrong (zero reward variance, so zero GRPO advantage); the exploration probabilities that set how much is
  skipped adapt so that a target share of the trained groups is still zero-variance.
- `MoPPSSampler` (`data.schedule.name: mopps`): a Beta posterior per prompt over its success rate, updated
  from each round's per-prompt accuracy with temporal discounting; each round draws a success rate from every
  candidate's posterior (Thompson sampling) and keeps the prompts whose draw is closest to a target rate.

Neither needs a ranking; both resume exactly (state includes every RNG) and shard under DDP like the others
(`gainrl_pl.schedules.base`). Import them from `gainrl_pl.schedules.gaussian`, whose `build_sampler` names them.
No Lightning and no model here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gainrl_pl.schedules.base import RoundSampler

# A group is zero-variance when its accuracy is 0 or 1; accuracies are means of G binary values, so any
# tolerance below 1/G separates them (GRESO's code uses 0.98 and 0.11 on mean rewards with G = 8).
_ZERO_VARIANCE_TOL = 1e-6


def _check_round_results(prompt_indices: Sequence[int], per_prompt_accuracy: Sequence[float],
                         num_prompts: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and accuracies as arrays; ValueError naming the bad entry otherwise."""
    if len(prompt_indices) != len(per_prompt_accuracy):
        raise ValueError(f"update: {len(prompt_indices)} indices but {len(per_prompt_accuracy)} accuracies")
    idx = np.asarray(prompt_indices, dtype=np.int64).reshape(-1)
    acc = np.asarray(per_prompt_accuracy, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero((idx < 0) | (idx >= num_prompts))
    if bad.size:
        raise ValueError(f"update: prompt index {int(idx[bad[0]])} outside 0..{num_prompts - 1}")
    bad = np.flatnonzero(~np.isfinite(acc) | (acc < 0) | (acc > 1))
    if bad.size:
        raise ValueError(f"update: accuracy {acc[bad[0]]} of prompt {int(idx[bad[0]])} must be in [0, 1]")
    return idx, acc


def _check_probability(name: str, value: float, *, open_low: bool = False) -> float:
    value = float(value)
    if not (math.isfinite(value) and (0 < value if open_low else 0 <= value) and value <= 1):
        raise ValueError(f"{name}={value} must be in {'(0' if open_low else '[0'}, 1]")
    return value


class _PermutationWalk:
    """Seeded passes over all N prompts (what `UniformSampler` does), shared by the two samplers below.

    `next()` returns the next prompt of the current pass, starting a new permutation when the pass runs out;
    prompts listed in `defer` (those the round already used) go to the end of the new pass, so a round never
    meets a prompt twice while others of the new pass are unvisited.
    """

    def __init__(self, num_prompts: int) -> None:
        self.num_prompts = num_prompts
        self.permutation: list[int] = []
        self.position = 0
        self.passes = 0

    def next(self, rng: np.random.Generator, defer: set[int] | Sequence[int] = ()) -> int:
        if not self.permutation or self.position >= self.num_prompts:
            perm = rng.permutation(self.num_prompts).tolist()
            deferred = set(defer) if self.permutation else set()
            self.permutation = [i for i in perm if i not in deferred] + [i for i in perm if i in deferred]
            self.position, self.passes = 0, self.passes + 1
        self.position += 1
        return self.permutation[self.position - 1]

    def state(self) -> dict[str, Any]:
        return {"permutation": list(self.permutation), "position": self.position, "passes": self.passes}

    def load(self, state: dict[str, Any]) -> None:
        self.permutation = [int(i) for i in state["permutation"]]
        self.position, self.passes = int(state["position"]), int(state["passes"])


# ------------------------------------------------------------------------------------------------- GRESO


def zero_variance_skip_probability(streak: int, exploration: float, min_keep: float = 0.01) -> float:
    """GRESO's probability of skipping a prompt whose last `streak` groups were all zero-variance.

    skip = 1 - max(exploration ** streak, min_keep): 0 for a prompt with no such streak, growing with every
    further zero-variance group, never above 1 - min_keep (so every prompt can come back).
    """
    if streak < 0:
        raise ValueError(f"streak={streak} must be >= 0")
    if streak == 0:
        return 0.0
    return 1.0 - max(exploration ** streak, min_keep)


def adapt_exploration(exploration: float, zero_variance_fraction: float, target_fraction: float, *,
                      step: float, low: float, high: float) -> float:
    """GRESO's controller: skip more (lower the exploration probability by `step`) while the share of
    zero-variance groups is at or above its target, skip less (raise it) otherwise; clamped to [low, high]."""
    if zero_variance_fraction >= target_fraction:
        return max(exploration - step, low)
    return min(exploration + step, high)


class GRESOSampler(RoundSampler):
    """GRESO (Zheng et al. 2025, arXiv 2506.02177): skip prompts whose recent groups had zero reward variance.

    Rounds walk through seeded permutations of all N prompts, as `UniformSampler` does (with the same seed
    and nothing to skip, the rounds are identical to uniform sampling's). Each prompt met on the walk is
    skipped with probability 1 - max(p ** z, min_keep_probability), where z counts its consecutive most recent
    groups that were all correct ("easy", p = p_easy) or all wrong ("hard", p = p_hard), and the walk goes on
    until the round has `subset_size` prompts. After each round's update, each exploration probability moves
    by `exploration_step`: down (skip more) while that kind's share of the round's groups is at or above its
    target, up otherwise. The targets split `target_zero_variance` a third to easy and two thirds to hard
    groups (`easy_share`), as the reference code does, since hard prompts are likelier to become solvable.

    What differs from the paper (verl, `dynamic_filtering_strategy=all_probabilistic`):
    - Zero variance is judged from per-prompt *accuracy* (0 or 1), the signal the sampler contract carries.
      With the accuracy as the only reward (the study's setup) that is the reward's variance; with shaping
      rewards added, a group can be all-wrong yet have unequal rewards, and this sampler would skip it.
    - The paper filters each sampled batch before rollout, then rolls out and (with its dynamic sampling)
      drops the zero-variance groups that remain until the train batch is full, and adapts p after every
      training step. Here the sampler fills a whole round with kept prompts and adapts once per round; the
      post-rollout filter is the separate `model.dynamic_sampling` option (compose them for the paper's
      full method).
    - The paper adapts from the second epoch on; so does this (from the second pass over the data). In a
      run that never starts a second pass, no prompt has a streak to skip on and this is uniform sampling.
    - A round examines each prompt at most once; if a whole pass's worth were skipped before the round is
      full, the round is completed with the skipped prompts, in walk order (the paper's loop would keep
      sampling; with min_keep_probability 0.01 that can take hundreds of passes).

    Args:
        num_prompts: N, the number of prompts.
        subset_size: Prompts per round over all ranks.
        batch_size: Prompts per batch on each rank.
        initial_easy_exploration: p_easy at the start (paper: 0.5).
        initial_hard_exploration: p_hard at the start (paper: 0.5).
        target_zero_variance: Share of zero-variance groups the controller aims for (paper: 0.25).
        easy_share: Part of that target given to all-correct groups; the rest goes to all-wrong ones
            (reference code: 1/3).
        exploration_step: Change of p_easy / p_hard per update (paper: 0.01 per training step).
        min_exploration: Lower clamp of p_easy / p_hard (paper: 0.05).
        max_exploration: Upper clamp of p_easy / p_hard (paper: 0.95).
        min_keep_probability: Floor of the keep probability p ** z (paper: 0.01).
        num_replicas: DDP world size.
        rank: This process's DDP rank.
        seed: Seed of the permutations and of the skip draws (the same on every rank).
        drop_uneven: Drop the round's tail instead of padding it (see `RoundSampler`).
    """

    def __init__(self, num_prompts: int, subset_size: int = 256, batch_size: int = 8, *,
                 initial_easy_exploration: float = 0.5, initial_hard_exploration: float = 0.5,
                 target_zero_variance: float = 0.25, easy_share: float = 1.0 / 3.0, exploration_step: float = 0.01,
                 min_exploration: float = 0.05, max_exploration: float = 0.95, min_keep_probability: float = 0.01,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0, drop_uneven: bool = False) -> None:
        super().__init__(num_prompts, subset_size, batch_size, num_replicas=num_replicas, rank=rank, seed=seed,
                         drop_uneven=drop_uneven)
        self.min_exploration = _check_probability("min_exploration", min_exploration)
        self.max_exploration = _check_probability("max_exploration", max_exploration)
        if self.min_exploration > self.max_exploration:
            raise ValueError(f"min_exploration={min_exploration} must be <= max_exploration={max_exploration}")
        self.p_easy = _check_probability("initial_easy_exploration", initial_easy_exploration)
        self.p_hard = _check_probability("initial_hard_exploration", initial_hard_exploration)
        """Exploration probabilities: the keep probability after z zero-variance groups is p ** z."""
        self.target_zero_variance = _check_probability("target_zero_variance", target_zero_variance)
        self.easy_share = _check_probability("easy_share", easy_share)
        self.exploration_step = float(exploration_step)
        if not (math.isfinite(self.exploration_step) and self.exploration_step >= 0):
            raise ValueError(f"exploration_step={exploration_step} must be >= 0")
        self.min_keep_probability = _check_probability("min_keep_probability", min_keep_probability, open_low=True)
        self._walk = _PermutationWalk(self.num_prompts)
        # Its own stream: skip draws never shift the permutations, so with nothing to skip the rounds are
        # exactly uniform sampling's with the same seed (a paired comparison then differs only by skipping).
        self._skip_rng = np.random.default_rng([self.seed, 1])
        self.easy_streak = np.zeros(self.num_prompts, dtype=np.int64)
        """Consecutive most recent groups of each prompt that were all correct."""
        self.hard_streak = np.zeros(self.num_prompts, dtype=np.int64)
        """Consecutive most recent groups of each prompt that were all wrong."""
        self.skipped = {"easy": 0, "hard": 0, "forced": 0}
        """Skips of the last round drawn (forced = skipped prompts taken back to complete the round)."""
        self.skipped_total = {"easy": 0, "hard": 0}

    @property
    def passes(self) -> int:
        """Permutations drawn so far (passes over the data started)."""
        return self._walk.passes

    def skip_probability(self, index: int) -> tuple[float, str | None]:
        """(probability, kind) that prompt `index` is skipped now; kind is `easy`, `hard` or None."""
        if self.easy_streak[index] > 0:  # the reference checks the easy streak first; the two never overlap
            return zero_variance_skip_probability(int(self.easy_streak[index]), self.p_easy,
                                                  self.min_keep_probability), "easy"
        if self.hard_streak[index] > 0:
            return zero_variance_skip_probability(int(self.hard_streak[index]), self.p_hard,
                                                  self.min_keep_probability), "hard"
        return 0.0, None

    def indices_for_round(self) -> list[int]:
        """The next `subset_size` prompts of the walk that are not skipped (walk order)."""
        taken: list[int] = []
        examined: dict[int, None] = {}  # insertion-ordered set
        skipped: list[int] = []
        counts = {"easy": 0, "hard": 0, "forced": 0}
        while len(taken) < self.subset_size:
            if len(examined) >= self.num_prompts:  # every prompt met once in this round: take skipped ones back
                back = skipped[: self.subset_size - len(taken)]
                taken += back
                counts["forced"] = len(back)
                break
            index = self._walk.next(self._rng, defer=examined)
            if index in examined:
                continue
            examined[index] = None
            probability, kind = self.skip_probability(index)
            # draw only when a skip is possible: the skip stream then advances only on prompts with a streak
            if kind is not None and self._skip_rng.random() < probability:
                skipped.append(index)
                counts[kind] += 1
                continue
            taken.append(index)
        self.skipped = counts
        self.skipped_total["easy"] += counts["easy"]
        self.skipped_total["hard"] += counts["hard"]
        return taken

    def update(self, prompt_indices: Sequence[int], per_prompt_accuracy: Sequence[float],
               per_prompt_signal: Sequence[float]) -> dict[str, float]:
        """Extend each prompt's zero-variance streaks and adapt p_easy / p_hard (from the second pass on).

        Returns {"p_easy", "p_hard", "easy_fraction", "hard_fraction", "skipped_easy", "skipped_hard",
        "skipped_forced"}, the skips counted over the round just trained; an empty round changes nothing.
        """
        idx, acc = _check_round_results(prompt_indices, per_prompt_accuracy, self.num_prompts)
        if idx.size == 0:
            return {}
        easy = acc >= 1.0 - _ZERO_VARIANCE_TOL
        hard = acc <= _ZERO_VARIANCE_TOL
        for i, e, h in zip(idx.tolist(), easy.tolist(), hard.tolist(), strict=True):  # in order: repeats chain
            self.easy_streak[i] = self.easy_streak[i] + 1 if e else 0
            self.hard_streak[i] = self.hard_streak[i] + 1 if h else 0
        easy_fraction, hard_fraction = float(easy.mean()), float(hard.mean())
        if self.passes >= 2:
            bounds = dict(step=self.exploration_step, low=self.min_exploration, high=self.max_exploration)
            self.p_easy = adapt_exploration(self.p_easy, easy_fraction,
                                            self.target_zero_variance * self.easy_share, **bounds)
            self.p_hard = adapt_exploration(self.p_hard, hard_fraction,
                                            self.target_zero_variance * (1.0 - self.easy_share), **bounds)
        return {"p_easy": self.p_easy, "p_hard": self.p_hard, "easy_fraction": easy_fraction,
                "hard_fraction": hard_fraction, "skipped_easy": float(self.skipped["easy"]),
                "skipped_hard": float(self.skipped["hard"]), "skipped_forced": float(self.skipped["forced"])}

    def _extra_state(self) -> dict[str, Any]:
        return {**self._walk.state(), "skip_rng": self._skip_rng.bit_generator.state, "p_easy": self.p_easy,
                "p_hard": self.p_hard, "easy_streak": self.easy_streak.tolist(),
                "hard_streak": self.hard_streak.tolist(), "skipped": dict(self.skipped),
                "skipped_total": dict(self.skipped_total)}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if len(state["easy_streak"]) != self.num_prompts:
            raise ValueError(f"the saved GRESO state tracks {len(state['easy_streak'])} prompts, this dataset has "
                             f"{self.num_prompts}: resume with the training data the checkpoint was trained on")
        self._walk.load(state)
        self._skip_rng.bit_generator.state = state["skip_rng"]
        self.p_easy, self.p_hard = float(state["p_easy"]), float(state["p_hard"])
        self.easy_streak = np.asarray(state["easy_streak"], dtype=np.int64)
        self.hard_streak = np.asarray(state["hard_streak"], dtype=np.int64)
        self.skipped = {k: int(v) for k, v in state["skipped"].items()}
        self.skipped_total = {k: int(v) for k, v in state["skipped_total"].items()}


# ------------------------------------------------------------------------------------------------- MoPPS


def discounted_beta_update(alpha: float, beta: float, accuracy: float, rollouts: int, *, decay: float,
                           prior_alpha: float, prior_beta: float) -> tuple[float, float]:
    """MoPPS's recursive Bayesian update with temporal discounting, for one prompt and one group.

    alpha' = decay alpha + (1 - decay) alpha_0 + s G,  beta' = decay beta + (1 - decay) beta_0 + (1 - s) G,
    with s the group's accuracy and G its rollouts: decay = 1 is the exact Beta-Bernoulli posterior; smaller
    values forget old outcomes toward the prior (the policy, and so the success rate, changes).
    """
    successes = accuracy * rollouts
    return (decay * alpha + (1.0 - decay) * prior_alpha + successes,
            decay * beta + (1.0 - decay) * prior_beta + (rollouts - successes))


def thompson_closest(alpha: np.ndarray, beta: np.ndarray, k: int, target: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """MoPPS's selection: draw a success rate per candidate from Beta(alpha, beta) and keep the k whose draw
    is closest to `target` (squared distance, ties by position). Returns (positions closest first, draws)."""
    draws = rng.beta(alpha, beta)
    order = np.argsort((draws - target) ** 2, kind="stable")[:k]
    return order, draws


class MoPPSSampler(RoundSampler):
    """MoPPS (Qu et al. 2025, arXiv 2507.04632): Beta posteriors over prompt success rates, Thompson sampling.

    Every prompt starts at Beta(prior_alpha, prior_beta). Each round takes `candidate_ratio * subset_size`
    candidates from seeded passes over the data (the paper's `ts_ratio` times the batch, drawn by its data
    loader), draws one success rate per candidate from its posterior, and keeps the `subset_size` whose draw
    is closest to `target_pass_rate` (closest first). After the round each trained prompt's posterior takes its
    group's outcome with temporal discounting (`discounted_beta_update`); prompts not trained keep theirs.
    Prompts that are always solved or never solved get posteriors far from the target and are rarely kept;
    prompts with mixed groups get posteriors around it and are kept more often.

    What differs from the paper's code: its candidates are a data-loader batch, and the unselected ones are
    gone for that epoch; here too (candidates are consumed from the pass). `candidate_ratio: 0` makes every
    prompt a candidate every round (a variant, not the paper's setting). The paper's "threshold" selection and
    its offline prior initialisation are not implemented (the default and the `noinit` scripts use neither).

    Args:
        num_prompts: N, the number of prompts.
        subset_size: Prompts per round over all ranks.
        batch_size: Prompts per batch on each rank.
        rollouts_per_prompt: G, completions per prompt (set it to `model.num_generations`): an accuracy s
            counts as s G successes and (1 - s) G failures.
        target_pass_rate: gamma*, the success rate to select for (paper: 0.5).
        decay: lambda, the discount of the old posterior per update, in (0, 1] (paper: 1.0 on MATH, 0.5 on
            Countdown).
        prior_alpha: alpha_0 of the Beta prior (paper: 1).
        prior_beta: beta_0 of the Beta prior (paper: 1).
        candidate_ratio: Candidates per round as a multiple of `subset_size` (paper's `ts_ratio`: 8 or 16);
            0 = all N prompts every round.
        num_replicas: DDP world size.
        rank: This process's DDP rank.
        seed: Seed of the candidate passes and the posterior draws (the same on every rank).
        drop_uneven: Drop the round's tail instead of padding it (see `RoundSampler`).
    """

    def __init__(self, num_prompts: int, subset_size: int = 256, batch_size: int = 8, *,
                 rollouts_per_prompt: int = 8, target_pass_rate: float = 0.5, decay: float = 1.0,
                 prior_alpha: float = 1.0, prior_beta: float = 1.0, candidate_ratio: float = 16.0,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0, drop_uneven: bool = False) -> None:
        super().__init__(num_prompts, subset_size, batch_size, num_replicas=num_replicas, rank=rank, seed=seed,
                         drop_uneven=drop_uneven)
        if isinstance(rollouts_per_prompt, bool) or int(rollouts_per_prompt) != rollouts_per_prompt \
                or rollouts_per_prompt < 1:
            raise ValueError(f"rollouts_per_prompt={rollouts_per_prompt!r} must be an integer >= 1 "
                             "(model.num_generations)")
        self.rollouts_per_prompt = int(rollouts_per_prompt)
        self.target_pass_rate = _check_probability("target_pass_rate", target_pass_rate)
        self.decay = _check_probability("decay", decay, open_low=True)
        for name, value in (("prior_alpha", prior_alpha), ("prior_beta", prior_beta)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value} must be > 0")
        self.prior_alpha, self.prior_beta = float(prior_alpha), float(prior_beta)
        if not (math.isfinite(candidate_ratio) and (candidate_ratio == 0 or candidate_ratio >= 1)):
            raise ValueError(f"candidate_ratio={candidate_ratio} must be 0 (all prompts) or >= 1")
        self.candidate_ratio = float(candidate_ratio)
        self.alpha = np.full(self.num_prompts, self.prior_alpha)
        """alpha of each prompt's Beta posterior."""
        self.beta = np.full(self.num_prompts, self.prior_beta)
        """beta of each prompt's Beta posterior."""
        self.observations = np.zeros(self.num_prompts, dtype=np.int64)
        self._walk = _PermutationWalk(self.num_prompts)

    @property
    def num_candidates(self) -> int:
        """Candidates per round: ceil(candidate_ratio * subset_size), at most N (0 ratio = N)."""
        if self.candidate_ratio == 0:
            return self.num_prompts
        return min(self.num_prompts, math.ceil(self.candidate_ratio * self.subset_size))

    def posterior_mean(self) -> np.ndarray:
        """E[success rate] of every prompt under its posterior."""
        return self.alpha / (self.alpha + self.beta)

    def indices_for_round(self) -> list[int]:
        """The subset_size candidates whose Thompson draw is closest to the target (closest first)."""
        if self.num_candidates >= self.num_prompts:
            candidates = np.arange(self.num_prompts)
        else:
            picked: dict[int, None] = {}
            while len(picked) < self.num_candidates:  # distinct: a pass boundary defers what the round has
                picked[self._walk.next(self._rng, defer=picked)] = None
            candidates = np.fromiter(picked, dtype=np.int64)
        order, _ = thompson_closest(self.alpha[candidates], self.beta[candidates], self.subset_size,
                                    self.target_pass_rate, self._rng)
        return [int(i) for i in candidates[order]]

    def update(self, prompt_indices: Sequence[int], per_prompt_accuracy: Sequence[float],
               per_prompt_signal: Sequence[float]) -> dict[str, float]:
        """Fold each trained group into its prompt's posterior; returns {"mean_posterior_rate",
        "posterior_distance_to_target", "seen_fraction"} over the round's prompts (distance = |E[p] - target|)."""
        idx, acc = _check_round_results(prompt_indices, per_prompt_accuracy, self.num_prompts)
        if idx.size == 0:
            return {}
        for i, s in zip(idx.tolist(), acc.tolist(), strict=True):
            self.alpha[i], self.beta[i] = discounted_beta_update(
                self.alpha[i], self.beta[i], s, self.rollouts_per_prompt, decay=self.decay,
                prior_alpha=self.prior_alpha, prior_beta=self.prior_beta)
            self.observations[i] += 1
        mean = self.posterior_mean()[idx]
        return {"mean_posterior_rate": float(mean.mean()),
                "posterior_distance_to_target": float(np.abs(mean - self.target_pass_rate).mean()),
                "seen_fraction": float((self.observations > 0).mean())}

    def _extra_state(self) -> dict[str, Any]:
        return {**self._walk.state(), "alpha": self.alpha.tolist(), "beta": self.beta.tolist(),
                "observations": self.observations.tolist()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if len(state["alpha"]) != self.num_prompts:
            raise ValueError(f"the saved MoPPS state tracks {len(state['alpha'])} prompts, this dataset has "
                             f"{self.num_prompts}: resume with the training data the checkpoint was trained on")
        self._walk.load(state)
        self.alpha = np.asarray(state["alpha"], dtype=np.float64)
        self.beta = np.asarray(state["beta"], dtype=np.float64)
        self.observations = np.asarray(state["observations"], dtype=np.int64)


__all__ = ["GRESOSampler", "MoPPSSampler", "adapt_exploration", "discounted_beta_update", "thompson_closest",
           "zero_variance_skip_probability"]
