"""Round samplers: which prompts each sampling round (the paper's "epoch") trains on (spec sections 4, 5, 8, 9).

One contract for every data schedule, `RoundSampler`, used as a DataLoader `batch_sampler`:

- `indices_for_round()` draws the *global* round: `subset_size` dataset indices, identical on every DDP rank
  (same seed, same state); `__iter__` takes this rank's shard and yields batches of `batch_size` prompts;
- `update(prompt_indices, per_prompt_accuracy, per_prompt_signal)` after the round's rollouts;
- `state_dict()` / `load_state_dict()`: everything the next round depends on, RNG and position in the round
  included, in plain Python types (`torch.load(weights_only=True)` and JSON both work).

Schedules: `GaussianRankSampler` (GAIN-RL `angle`; with another ranking `length` and `accuracy_curriculum`),
`UniformSampler` (vanilla GRPO), `AdaRFTSampler` (arXiv 2504.05520) and `PassRatePrioritySampler`.
`build_sampler(name, **kwargs)` maps the config names to classes. DAPO's group filter lives in `group_filter`.

No Lightning and no model here: numpy for the draws, torch only for the `Sampler` base class.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
from torch.utils.data import Sampler

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


def _top_k_without_replacement(log_weights: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k distinct positions drawn without replacement with probability proportional to exp(log_weights).

    Gumbel-top-k: adding Gumbel noise to the log weights and keeping the k largest is the same distribution as
    drawing one at a time and renormalizing (what `Generator.choice(replace=False, p=...)` does). Working in log
    space means a weight too small for float64 still orders the tail by its log weight, so a round larger than
    the number of ranks with non-negligible probability falls back to the nearest ranks instead of raising.
    Returns positions in draw order (largest key first).
    """
    keys = log_weights + rng.gumbel(size=log_weights.shape[0])
    top = np.argpartition(-keys, k - 1)[:k] if k < keys.shape[0] else np.arange(keys.shape[0])
    return top[np.argsort(-keys[top], kind="stable")]


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1")
    return int(value)


def _mean_of(name: str, values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite values ({int((~np.isfinite(arr)).sum())} of {arr.size})")
    return float(arr.mean())


# ------------------------------------------------------------------------------------------------ contract


class RoundSampler(Sampler[list[int]]):
    """Base of every data schedule: draws a global round, yields this rank's batches, resumes mid-round.

    Rounds and DDP: `indices_for_round()` returns the same `subset_size` dataset indices on every rank. The
    round is padded to a multiple of `batch_size * num_replicas` by repeating it from its start (or, with
    `drop_uneven`, truncated to one), then split *strided*: rank r gets positions r, r + W, r + 2W, ... so that
    global step k trains the contiguous slice [k B W, (k+1) B W) of the round. Rounds are ordered (GAIN-RL puts
    the most concentrated prompts first), and the strided split keeps that order across ranks step by step.
    Every rank yields the same number of batches, `len(sampler)`, so DDP never waits on a missing backward.

    Round lifecycle: `__iter__` starts a round if none is in progress and yields its batches from the first
    one not yet consumed. DataLoaders prefetch, so the sampler cannot know what was trained: a callback calls
    `mark_batch_consumed()` after each trained batch (the GainRLScheduler callback does; without those calls a
    round never ends and every epoch re-serves it). A round closes at the next `__iter__` once all its
    batches are consumed (or explicitly with `end_round()`); iterating again before that resumes the same round,
    which is how a mid-round checkpoint resumes.

    Under DDP every rank must call `update()` with the same, all-gathered round results, or the ranks' states
    (and so their next rounds) diverge.

    Args:
        num_prompts: N, the number of prompts in the dataset the indices point into.
        subset_size: Prompts per round (the paper's epoch), summed over all DDP ranks; <= num_prompts.
        batch_size: Prompts per batch on each rank (each gets G completions).
        num_replicas: DDP world size.
        rank: This process's DDP rank, in [0, num_replicas).
        seed: Seed of the round draws; the same on every rank.
        drop_uneven: When the round is not a multiple of batch_size * num_replicas, drop its tail instead of
            padding it with repeats from the round's start.
    """

    def __init__(self, num_prompts: int, subset_size: int, batch_size: int, *, num_replicas: int = 1,
                 rank: int = 0, seed: int = 0, drop_uneven: bool = False) -> None:
        self.num_prompts = _check_positive_int("num_prompts", num_prompts)
        self.subset_size = _check_positive_int("subset_size", subset_size)
        self.batch_size = _check_positive_int("batch_size", batch_size)
        if self.subset_size > self.num_prompts:
            raise ValueError(f"subset_size={subset_size} is larger than the dataset ({num_prompts} prompts); "
                             f"allowed: 1..{num_prompts}")
        if isinstance(seed, bool) or int(seed) != seed or seed < 0:
            raise ValueError(f"seed={seed!r} must be an integer >= 0")
        self.seed = int(seed)
        # Deliberately not called `drop_last`: Lightning re-instantiates anything with `batch_size` and
        # `drop_last` as if it were a torch BatchSampler, which would lose this sampler's state.
        self.drop_uneven = bool(drop_uneven)
        self._rng = np.random.default_rng(self.seed)
        self.rounds_completed = 0
        """Rounds closed so far."""
        self.round_indices: list[int] | None = None
        """The global round in progress (dataset indices, before padding), or None between rounds."""
        self.consumed_batches = 0
        """Batches of the round in progress that this rank has trained (the same count on every rank)."""
        self.num_replicas, self.rank = 0, 0  # "not set yet": set_distributed validates and warns once
        self.set_distributed(num_replicas, rank)

    # --------------------------------------------------------------------------- to implement
    def indices_for_round(self) -> list[int]:
        """Draw the next global round: `subset_size` dataset indices, identical on every rank.

        Advances the sampler's RNG; `__iter__` calls it once per round, so call it directly only to inspect.
        """
        raise NotImplementedError

    def update(self, prompt_indices: Sequence[int], per_prompt_accuracy: Sequence[float],
               per_prompt_signal: Sequence[float]) -> dict[str, float]:
        """Feed back the round's rollouts (all ranks' results); returns metrics to log. Default: no-op, {}.

        Args:
            prompt_indices: Dataset index of each trained prompt (repeats allowed).
            per_prompt_accuracy: Mean correctness of each prompt's G completions, in [0, 1].
            per_prompt_signal: Per-prompt signal (GAIN-RL: angle concentration).
        """
        return {}

    def set_ranking(self, order: Sequence[int]) -> None:
        """Install a ranking (dataset indices, best first). Ignored by samplers that need none."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # --------------------------------------------------------------------------- DDP
    def set_distributed(self, num_replicas: int, rank: int) -> None:
        """Set the DDP world size and this process's rank (before iterating, or to resume on another world size).

        A round in progress keeps its position: the prompts consumed so far are converted to batches of the new
        layout (rounded down, so a few prompts may repeat rather than be skipped).
        """
        num_replicas = _check_positive_int("num_replicas", num_replicas)
        if isinstance(rank, bool) or int(rank) != rank or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank!r} must be an integer in [0, num_replicas={num_replicas})")
        if self.drop_uneven and self.subset_size < self.batch_size * num_replicas:
            raise ValueError(
                f"subset_size={self.subset_size} is smaller than batch_size * num_replicas = {self.batch_size} * "
                f"{num_replicas}; with drop_uneven=True every rank would get 0 batches. Use subset_size >= "
                f"{self.batch_size * num_replicas}, a smaller batch_size, or drop_uneven=False (pads with repeats)")
        step = self.batch_size * num_replicas
        if self.subset_size % step and num_replicas != self.num_replicas:
            # Not an error (small datasets clamp subset_size), but a round then trains some prompts twice
            # or never: say so once, with the numbers.
            tail, extra = self.subset_size % step, -self.subset_size % step
            what = (f"drops its last {tail} prompts" if self.drop_uneven else
                    f"repeats {extra} prompts from its start (drop_uneven=True drops {tail} instead)")
            warnings.warn(f"subset_size={self.subset_size} is not a multiple of batch_size * num_replicas = "
                          f"{self.batch_size} * {num_replicas}: each round {what}; a multiple of {step} avoids it",
                          stacklevel=3)
        consumed_prompts = self.consumed_batches * self.batch_size * self.num_replicas
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        if consumed_prompts:
            self.consumed_batches = consumed_prompts // (self.batch_size * self.num_replicas)

    # --------------------------------------------------------------------------- rounds
    @property
    def round_in_progress(self) -> bool:
        """True between the start of a round and its close."""
        return self.round_indices is not None

    def _round_length(self, n: int) -> int:
        step = self.batch_size * self.num_replicas
        return (n // step) * step if self.drop_uneven else -(-n // step) * step

    def __len__(self) -> int:
        """Batches per rank per round (the whole round, also when resuming mid-round)."""
        return self._round_length(self.subset_size) // (self.batch_size * self.num_replicas)

    @property
    def padded_prompts(self) -> int:
        """Prompts repeated per round to make the round a multiple of batch_size * num_replicas (0 if dropping)."""
        return max(0, self._round_length(self.subset_size) - self.subset_size)

    def rank_batches(self, round_indices: Sequence[int]) -> list[list[int]]:
        """This rank's batches of a global round: pad (or drop), strided shard, chunks of batch_size."""
        n = len(round_indices)
        total = self._round_length(n)
        padded = [int(round_indices[i % n]) for i in range(total)]
        shard = padded[self.rank::self.num_replicas]
        return [shard[i:i + self.batch_size] for i in range(0, len(shard), self.batch_size)]

    def start_round(self) -> list[int]:
        """Draw a round and make it the round in progress; returns its global indices."""
        if self.round_in_progress:
            raise RuntimeError("a round is already in progress: call end_round() first")
        indices = [int(i) for i in self.indices_for_round()]
        if len(indices) != self.subset_size:
            raise RuntimeError(f"{type(self).__name__}.indices_for_round returned {len(indices)} indices, "
                               f"expected subset_size={self.subset_size}")
        self.round_indices, self.consumed_batches = indices, 0
        return indices

    def end_round(self) -> None:
        """Close the round in progress (a no-op between rounds); the next `__iter__` draws a new one."""
        if self.round_in_progress:
            self.round_indices, self.consumed_batches = None, 0
            self.rounds_completed += 1

    def mark_batch_consumed(self) -> None:
        """Record that this rank trained one more batch of the round (call after each trained batch)."""
        if not self.round_in_progress:
            raise RuntimeError("mark_batch_consumed() without a round in progress: iterate the sampler first")
        if self.consumed_batches >= len(self):
            raise RuntimeError(f"mark_batch_consumed() called more often than the round has batches ({len(self)})")
        self.consumed_batches += 1

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's batches of the round in progress from the first unconsumed one (a new round if none)."""
        # Decide the round eagerly (not in a generator body) so `iter(sampler)` alone starts it.
        if self.round_in_progress and self.consumed_batches >= len(self):
            self.end_round()
        if not self.round_in_progress:
            self.start_round()
        return iter(self.rank_batches(self.round_indices)[self.consumed_batches:])

    def extra_indices(self, count: int, *, step: int, attempt: int = 0, exclude: Sequence[int] = ()) -> list[int]:
        """`count` more prompts from the round in progress, e.g. to refill a batch after a group filter.

        Drawn uniformly from the global round, distinct while the round (less `exclude`) has enough prompts, by
        an RNG seeded from (seed, rank, round, step, attempt): it leaves the sampler's state untouched, so resume
        and the other ranks' rounds are unaffected, and ranks draw different prompts.

        Args:
            count: How many prompts.
            step: The training step (global), so each step refills differently.
            attempt: Which refill within the step.
            exclude: Dataset indices to avoid (those already in the batch), when the round allows.
        """
        if not self.round_in_progress:
            raise RuntimeError("extra_indices() needs a round in progress: iterate the sampler first")
        if count < 0:
            raise ValueError(f"count={count} must be >= 0")
        rng = np.random.default_rng([self.seed, self.rank, self.rounds_completed, int(step), int(attempt)])
        excluded = set(int(i) for i in exclude)
        pool = np.array(sorted(set(self.round_indices) - excluded) or sorted(set(self.round_indices)))
        distinct = rng.permutation(pool)[:count].tolist()
        return distinct + rng.choice(pool, size=count - len(distinct)).tolist()

    # --------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything the next round depends on, in plain Python types (RNG state included)."""
        return {"sampler": type(self).__name__, "seed": self.seed, "rng": self._rng.bit_generator.state,
                "rounds_completed": self.rounds_completed,
                "round_indices": None if self.round_indices is None else list(self.round_indices),
                "consumed_batches": self.consumed_batches, "batch_size": self.batch_size,
                "num_replicas": self.num_replicas, **self._extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; a round in progress resumes at its first unconsumed batch.

        A state saved with another batch_size or world size resumes at the same position in the round, counted
        in prompts (rounded down to whole batches).
        """
        if state.get("sampler") != type(self).__name__:
            raise ValueError(f"sampler state is for {state.get('sampler')!r}, this sampler is "
                             f"{type(self).__name__!r}: resume with the schedule the checkpoint was trained with")
        indices = state["round_indices"]
        if indices is not None and len(indices) != self.subset_size:
            raise ValueError(f"the saved round has {len(indices)} prompts but subset_size={self.subset_size}: "
                             "resume with the subset_size the checkpoint was trained with")
        self._rng.bit_generator.state = state["rng"]
        self.seed = int(state["seed"])
        self.rounds_completed = int(state["rounds_completed"])
        self.round_indices = None if indices is None else [int(i) for i in indices]
        consumed_prompts = int(state["consumed_batches"]) * int(state["batch_size"]) * int(state["num_replicas"])
        self.consumed_batches = min(consumed_prompts // (self.batch_size * self.num_replicas), len(self))
        self._load_extra_state(state)


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
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma={sigma} must be > 0: ranks if > 1, a fraction of N if in (0, 1]")
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
        return sorted(int(r) for r in _top_k_without_replacement(log_w, self.subset_size, self._rng))

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
        result = update_mean(self._mu, _mean_of("per_prompt_accuracy", per_prompt_accuracy),
                             _mean_of("per_prompt_signal", per_prompt_signal), step_size=self.step_size,
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
        reward = _mean_of("per_prompt_accuracy", per_prompt_accuracy)
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
        return [int(i) for i in _top_k_without_replacement(np.log(self.weights()), self.subset_size, self._rng)]

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


# ------------------------------------------------------------------------------------------------- factory

SAMPLERS: dict[str, type[RoundSampler]] = {
    "angle": GaussianRankSampler,  # ranking: angle concentration, most concentrated first (GAIN-RL)
    "length": GaussianRankSampler,  # ranking: question length in tokens, shortest first
    "accuracy_curriculum": GaussianRankSampler,  # ranking: base-model pass rate, easiest first
    "uniform": UniformSampler,
    "adarft": AdaRFTSampler,
    "pass_rate_priority": PassRatePrioritySampler,
}
SAMPLER_NAMES = tuple(SAMPLERS)


def build_sampler(name: str, **kwargs: Any) -> RoundSampler:
    """The sampler for a schedule name (`angle`, `length`, `accuracy_curriculum`, `uniform`, `adarft`,
    `pass_rate_priority`), built from keyword arguments of its class.

    The three Gaussian schedules differ only in the ranking installed with `set_ranking`.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLER_NAMES)}")
    cls = SAMPLERS[name]
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"sampler {name!r} ({cls.__name__}) does not take {', '.join(unknown)}; "
                         f"accepted: {', '.join(accepted)}")
    return cls(**kwargs)


__all__ = [
    "SAMPLER_NAMES", "AdaRFTSampler", "GaussianRankSampler", "MeanUpdate", "PassRatePrioritySampler",
    "RoundSampler", "UniformSampler", "build_sampler", "gaussian_rank_probabilities", "ranking_from_values",
    "resolve_rank_quantity", "update_mean",
]
