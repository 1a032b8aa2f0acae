"""DAPO's dynamic sampling as a group filter (spec section 9): which groups to keep, how many prompts to draw next.

A GRPO group whose G rewards are all equal has zero advantage everywhere: it costs a backward and teaches
nothing. The filter drops such groups after rollout and says how many more prompts to generate until the
batch holds `target` groups with a signal, stopping after `max_extra_rounds` extra generation rounds.

Pure bookkeeping (torch tensors in, counts out); the module does the rollouts. In a step:

    filt.begin(target=len(batch))
    keep = filt.add(rewards)                    # [P, G] -> which groups to train on
    while not filt.done:
        count = filt.next_draw_size()           # 0 at the cap: stop with what was kept
        if count == 0:
            break
        keep_more = filt.add(rollout(sampler.extra_indices(count, step=..., attempt=...)))

Whether a batch still short at the cap is an error, and how many groups each DDP rank trains on, is decided
with all ranks' counts (`dynamic_sampling.agree_on_group_count`), so that no rank raises or trains alone.
"""

from __future__ import annotations

import math

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


class GroupFilter:
    """Bookkeeping of one step's dynamic sampling: keep groups with unequal rewards until the batch is full.

    Args:
        max_extra_rounds: Extra generation rounds allowed per step to refill the batch (verl's
            `max_num_gen_batches` minus one). 0 = drop only, never refill.
    """

    def __init__(self, max_extra_rounds: int = 3) -> None:
        if isinstance(max_extra_rounds, bool) or int(max_extra_rounds) != max_extra_rounds or max_extra_rounds < 0:
            raise ValueError(f"max_extra_rounds={max_extra_rounds!r} must be an integer >= 0")
        self.max_extra_rounds = int(max_extra_rounds)
        self.begin(0)

    def begin(self, target: int) -> None:
        """Start filling a batch of `target` groups (resets the step's counts)."""
        if target < 0:
            raise ValueError(f"target={target} must be >= 0")
        self.target = int(target)
        self.kept = 0
        """Groups kept so far this step (at most `target`)."""
        self.step_seen = 0
        """Groups generated this step."""
        self.step_dropped = 0
        """Groups with all-equal rewards this step."""
        self.step_extra_rounds = 0
        """Extra generation rounds this step."""
        self._capped = False

    @property
    def needed(self) -> int:
        """Groups still missing from the batch (0 once full, or once the cap is reached)."""
        return 0 if self._capped else self.target - self.kept

    @property
    def done(self) -> bool:
        """True when no more prompts should be drawn this step."""
        return self.needed == 0

    def add(self, rewards: Tensor) -> Tensor:
        """Account a rollout's rewards [P, G]; returns a bool mask [P] of the groups to train on.

        Groups with equal rewards are dropped; of the others, only as many as still `needed` are kept (an
        oversampled refill may bring more), so the kept groups of a step add up to at most `target`.
        """
        zero = zero_variance_groups(rewards)
        survivors = (~zero).nonzero().flatten()
        keep = torch.zeros_like(zero)
        take = survivors[: self.needed]
        keep[take] = True
        self.kept += int(take.numel())
        self.step_seen += int(zero.numel())
        self.step_dropped += int(zero.sum())
        return keep

    def next_draw_size(self) -> int:
        """How many prompts to generate in the next extra round (counting the round); 0 when full or at the cap.

        The missing groups scaled up by the step's survival rate so far, so that one extra round usually fills
        the batch, never more than one full batch per round.
        """
        if self.needed == 0:
            return 0
        if self.step_extra_rounds >= self.max_extra_rounds:
            self._capped = True
            return 0
        self.step_extra_rounds += 1
        survival = (self.step_seen - self.step_dropped) / self.step_seen if self.step_seen else 1.0
        want = math.ceil(self.needed / survival) if survival > 0 else self.target
        return max(self.needed, min(want, self.target))


__all__ = ["GroupFilter", "zero_variance_groups"]
