"""The round-sampler contract every data schedule implements (spec sections 8, 9), and its draw helpers.

`RoundSampler` is used as a DataLoader `batch_sampler`:

- `indices_for_round()` draws the *global* round: `subset_size` dataset indices, identical on every DDP rank
  (same seed, same state); `__iter__` takes this rank's shard and yields batches of `batch_size` prompts;
- `update(prompt_indices, per_prompt_accuracy, per_prompt_signal)` after the round's rollouts;
- `state_dict()` / `load_state_dict()`: everything the next round depends on, RNG and position in the round
  included, in plain Python types (`torch.load(weights_only=True)` and JSON both work).

The schedules are in `gainrl_pl.schedules.gaussian` (GAIN-RL's Gaussian) and `gainrl_pl.schedules.peers` (the baselines);
import any of them from `gainrl_pl.schedules.gaussian`. Its own module so both can subclass it without a cycle.
No Lightning and no model here: numpy for the draws, torch only for the `Sampler` base class.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler


def top_k_without_replacement(log_weights: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
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


def finite_mean(name: str, values: Sequence[float]) -> float:
    """Mean of a round's per-prompt values; ValueError naming `name` if any is NaN/inf (a bad update is
    refused rather than moving the schedule to NaN)."""
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
