"""DAPO's dynamic sampling as a composable group filter (spec section 9).

A GRPO group whose G rewards are all equal has zero advantage everywhere: it costs a backward and teaches
nothing. The filter drops such groups after rollout and asks for more prompts until the batch holds
`target` groups with a signal, giving up after `max_extra_rounds` extra generation rounds.

Pure bookkeeping (torch tensors in, counts out); the module does the rollouts. Typical use in a step:

    filt.begin(target=len(batch))
    keep = filt.add(rewards)                    # [P, G] -> which groups to train on
    while filt.needed:
        count = filt.next_draw_size()           # raises RuntimeError at the cap
        keep_more = filt.add(rollout(sampler.extra_indices(count, step=..., attempt=...)))
    metrics = filt.step_metrics()               # log zero_variance_fraction every step

DDP: every rank must call backward the same number of times. When each rank fills to `target`, all agree.
When they may not (`allow_partial=True`), the ranks must agree on the number of groups to train on before
the backward: all-reduce the local counts with MIN (that is `common_group_count` of all ranks' counts) and
train each rank on that many of its groups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def zero_variance_groups(rewards: Tensor, atol: float = 1e-6) -> Tensor:
    """Which groups have all-equal rewards (max - min <= atol), i.e. no GRPO signal.

    NaN rewards (a reward function that abstained) are ignored; a group with fewer than two real rewards
    counts as zero-variance.

    Args:
        rewards: [num_prompts, G] rewards, one row per prompt's group.
        atol: Largest spread still counted as "all equal".

    Returns:
        Bool tensor [num_prompts], True where the group carries no signal.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_prompts, G], got shape {tuple(rewards.shape)}")
    if atol < 0:
        raise ValueError(f"atol={atol} must be >= 0")
    r = rewards.detach().double()
    missing = torch.isnan(r)
    high = torch.where(missing, torch.full_like(r, -math.inf), r).amax(dim=1)
    low = torch.where(missing, torch.full_like(r, math.inf), r).amin(dim=1)
    # All-NaN rows give -inf - inf = -inf, i.e. zero-variance, as a group with no usable reward should.
    return (high - low) <= atol


def common_group_count(local_counts: Sequence[int]) -> int:
    """The number of groups every DDP rank trains on: the minimum of the ranks' surviving counts.

    Under DDP each rank's count is all-reduced with MIN before the backward; this is the same rule as a pure
    function (for tests and single-process use).
    """
    counts = [int(c) for c in local_counts]
    if not counts:
        raise ValueError("common_group_count needs at least one rank's count")
    if min(counts) < 0:
        raise ValueError(f"group counts must be >= 0, got {counts}")
    return min(counts)


class GroupFilter:
    """Bookkeeping for DAPO's dynamic sampling: keep groups with unequal rewards until the batch is full.

    Args:
        max_extra_rounds: Extra generation rounds allowed per step to refill the batch (verl's
            `max_num_gen_batches` minus one). 0 = drop only, never refill.
        atol: Largest reward spread within a group still counted as all-equal.
        oversample: Ask for more prompts than missing groups, scaled by the step's survival rate so far, so
            that one extra round usually fills the batch (never more than one full batch per round).
        allow_partial: At the cap, stop and train on the groups kept (ranks agree with `common_group_count`)
            instead of raising.
    """

    def __init__(self, max_extra_rounds: int = 3, atol: float = 1e-6, oversample: bool = False,
                 allow_partial: bool = False) -> None:
        if isinstance(max_extra_rounds, bool) or int(max_extra_rounds) != max_extra_rounds or max_extra_rounds < 0:
            raise ValueError(f"max_extra_rounds={max_extra_rounds!r} must be an integer >= 0")
        if atol < 0:
            raise ValueError(f"atol={atol} must be >= 0")
        self.max_extra_rounds = int(max_extra_rounds)
        self.atol = float(atol)
        self.oversample = bool(oversample)
        self.allow_partial = bool(allow_partial)
        # Totals over the run (logged, and kept in state_dict so they survive a resume).
        self.seen_groups = 0
        self.dropped_groups = 0
        """Zero-variance groups dropped since the start of training."""
        self.extra_rounds = 0
        """Extra generation rounds since the start of training."""
        self.surplus_groups = 0
        self.begin(0)

    # --------------------------------------------------------------------------- one step
    def begin(self, target: int) -> None:
        """Start filling a batch of `target` groups (resets the step's counts)."""
        if target < 0:
            raise ValueError(f"target={target} must be >= 0")
        self.target = int(target)
        self.kept = 0
        self.step_seen = 0
        self.step_dropped = 0
        self.step_surplus = 0
        self.step_extra_rounds = 0
        self._gave_up = False

    @property
    def needed(self) -> int:
        """Groups still missing from the batch (0 once full, or after giving up with `allow_partial`)."""
        return 0 if self._gave_up else self.target - self.kept

    @property
    def done(self) -> bool:
        """True when no more prompts should be drawn this step."""
        return self.needed == 0

    def add(self, rewards: Tensor) -> Tensor:
        """Account a rollout's rewards [P, G]; returns a bool mask [P] of the groups to train on.

        Groups with equal rewards are dropped; of the others, only as many as still `needed` are kept, the rest
        count as surplus (an oversampled refill), so the kept groups of a step add up to at most `target`.
        """
        zero = zero_variance_groups(rewards, self.atol)
        survivors = (~zero).nonzero().flatten()
        keep = torch.zeros_like(zero)
        take = survivors[: self.needed]
        keep[take] = True
        n_zero = int(zero.sum())
        self.kept += int(take.numel())
        self.step_seen += int(zero.numel())
        self.step_dropped += n_zero
        self.step_surplus += int(survivors.numel() - take.numel())
        self.seen_groups += int(zero.numel())
        self.dropped_groups += n_zero
        self.surplus_groups += int(survivors.numel() - take.numel())
        return keep

    def next_draw_size(self) -> int:
        """How many prompts to generate in the next extra round; counts the round.

        Raises RuntimeError when the batch is still short after `max_extra_rounds` extra rounds (unless
        `allow_partial`, which then returns 0 and stops the step with the groups it has).
        """
        if self.needed == 0:
            return 0
        if self.step_extra_rounds >= self.max_extra_rounds:
            if self.allow_partial:
                self._gave_up = True
                return 0
            raise RuntimeError(
                f"group filter: after {self.step_extra_rounds} extra generation rounds (max_extra_rounds="
                f"{self.max_extra_rounds}) only {self.kept} of {self.target} prompt groups had unequal rewards "
                f"({self.step_dropped} of {self.step_seen} groups this step were all-equal). Raise "
                "max_extra_rounds, set allow_partial=True to train on fewer groups, turn the filter off, or check "
                "the data: groups that are all correct or all wrong mean the prompts are too easy or too hard "
                "for the model (or the reward function always returns the same value).")
        self.step_extra_rounds += 1
        self.extra_rounds += 1
        if not self.oversample:
            return self.needed
        survival = (self.step_seen - self.step_dropped) / self.step_seen if self.step_seen else 1.0
        # Expected survivors of `count` fresh prompts ~ survival * count; cap at one full batch per round.
        want = math.ceil(self.needed / survival) if survival > 0 else self.target
        return max(self.needed, min(want, self.target))

    def step_metrics(self) -> dict[str, float]:
        """This step's counts for logging (the module prefixes them, e.g. `group_filter/`)."""
        return {
            "zero_variance_fraction": self.step_dropped / self.step_seen if self.step_seen else 0.0,
            "dropped_groups": float(self.step_dropped),
            "extra_rounds": float(self.step_extra_rounds),
            "surplus_groups": float(self.step_surplus),
            "kept_groups": float(self.kept),
            "dropped_groups_total": float(self.dropped_groups),
            "extra_rounds_total": float(self.extra_rounds),
        }

    # --------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """The run totals (a step never spans a checkpoint)."""
        return {"seen_groups": self.seen_groups, "dropped_groups": self.dropped_groups,
                "extra_rounds": self.extra_rounds, "surplus_groups": self.surplus_groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        for key in ("seen_groups", "dropped_groups", "extra_rounds", "surplus_groups"):
            setattr(self, key, int(state.get(key, 0)))


__all__ = ["GroupFilter", "common_group_count", "zero_variance_groups"]
