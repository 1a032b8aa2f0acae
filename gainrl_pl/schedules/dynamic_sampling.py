"""The groups one GRPO step generated, merged across refill rounds and cut down to those it trains on.

DAPO's dynamic sampling (spec section 9) generates in rounds: the step's own prompts, then refills drawn from
the sampler, each round a batch of its own width. `GroupBatch` holds one round (or several merged) with its
prompts, rollout, decoded completions and rewards, row `i` of the rollout belonging to group `i // G`, so the
module can merge the rounds, report every generated group to the scheduler and train on the kept ones;
`filter_and_refill` runs one step's rounds. The counting and the cap live in
`gainrl_pl.schedules.group_filter`; no Lightning here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from gainrl_pl.rewards import RewardOutput
from gainrl_pl.rollout import Rollout
from gainrl_pl.schedules.group_filter import GroupFilter


@dataclass
class GroupBatch:
    """Prompts and their G completions each, with rewards: what one or more generation rounds produced.

    Attributes:
        batch: The collated prompts (`GainRLDataModule.collate`): `input_ids`/`attention_mask` left-padded,
            `index` (position in the training set), `prompt`, `columns`, ...
        rollout: Their sampled completions, `num_groups * G` rows.
        completions: The decoded completions, one per rollout row.
        rewards: The completions' rewards.
    """

    batch: dict[str, Any]
    rollout: Rollout
    completions: list[str]
    rewards: RewardOutput

    @property
    def num_groups(self) -> int:
        """Number of prompts (groups of G completions)."""
        return len(self.batch["prompt"])

    def select(self, groups: torch.Tensor, num_generations: int) -> GroupBatch:
        """The given groups (indices, in that order) with their G completions each."""
        groups = groups.long().cpu()
        rows = completion_rows(groups, num_generations)
        return GroupBatch(select_batch(self.batch, groups), select_rollout(self.rollout, rows),
                          [self.completions[i] for i in rows.tolist()], select_rewards(self.rewards, rows))

    @staticmethod
    def concat(parts: list[GroupBatch], pad_token_id: int) -> GroupBatch:
        """One GroupBatch with the groups of `parts` in order (rounds of different widths are re-padded)."""
        if len(parts) == 1:
            return parts[0]
        return GroupBatch(concat_batches([p.batch for p in parts], pad_token_id),
                          concat_rollouts([p.rollout for p in parts], pad_token_id),
                          [c for p in parts for c in p.completions], concat_rewards([p.rewards for p in parts]))


def completion_rows(groups: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Rollout rows of the given groups: group g owns rows g*G .. g*G + G - 1."""
    offsets = torch.arange(num_generations, device=groups.device)
    return (groups.long().unsqueeze(1) * num_generations + offsets).reshape(-1)


def first_kept(keep: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the first `count` True entries of a bool mask (fewer if it has fewer).

    The kept groups in generation order: the step's own prompts come before refills, so truncating to a count
    shared by all DDP ranks drops refills first.
    """
    return keep.nonzero().flatten()[:count]


# ----------------------------------------------------------------------------------------- rollouts


def _pad_width(t: torch.Tensor, width: int, value: float, *, left: bool) -> torch.Tensor:
    missing = width - t.shape[1]
    if missing == 0:
        return t
    return F.pad(t, (missing, 0) if left else (0, missing), value=value)


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """Stack rollouts row-wise: prompts padded on the left and completions on the right, as `generate` pads.

    Padding keeps every row's tokens where attention and the loss expect them: prompts end where completions
    start, and completion masks stay 1 exactly over the real completion tokens. Generation seconds add up.
    """
    p_width = max(r.prompt_ids.shape[1] for r in rollouts)
    c_width = max(r.completion_ids.shape[1] for r in rollouts)
    return Rollout(
        prompt_ids=torch.cat([_pad_width(r.prompt_ids, p_width, pad_token_id, left=True) for r in rollouts]),
        prompt_mask=torch.cat([_pad_width(r.prompt_mask, p_width, 0, left=True) for r in rollouts]),
        completion_ids=torch.cat([_pad_width(r.completion_ids, c_width, pad_token_id, left=False) for r in rollouts]),
        completion_mask=torch.cat([_pad_width(r.completion_mask, c_width, 0, left=False) for r in rollouts]),
        truncated=torch.cat([r.truncated for r in rollouts]),
        seconds=sum(r.seconds for r in rollouts),
        sampling_logprobs=None if any(r.sampling_logprobs is None for r in rollouts) else
        torch.cat([_pad_width(r.sampling_logprobs, c_width, 0.0, left=False) for r in rollouts]),
    )


def select_rollout(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The given rows of a rollout, without the padding columns that only the other rows needed.

    Merged rounds are as wide as their widest prompt and longest completion; trimming the columns that are
    padding in every selected row keeps the training forward as short as a single round's would be.
    """
    rows = rows.to(rollout.prompt_ids.device)
    prompt_mask, completion_mask = rollout.prompt_mask[rows], rollout.completion_mask[rows]
    used = prompt_mask.any(dim=0).nonzero()
    start = int(used[0]) if used.numel() else prompt_mask.shape[1]
    used = completion_mask.any(dim=0).nonzero()
    end = max(int(used[-1]) + 1 if used.numel() else 0, 1)  # at least one column, as `generate_completions` keeps
    sampled = None if rollout.sampling_logprobs is None else rollout.sampling_logprobs[rows, :end]
    return Rollout(rollout.prompt_ids[rows, start:], prompt_mask[:, start:], rollout.completion_ids[rows, :end],
                   completion_mask[:, :end], rollout.truncated[rows], rollout.seconds, sampled)


# ----------------------------------------------------------------------------------------- prompts, rewards

_LEFT_PADDED = ("input_ids", "attention_mask")


def concat_batches(batches: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Merge collated prompt batches: token tensors re-padded on the left, other tensors and lists joined."""
    merged: dict[str, Any] = {}
    for key, first in batches[0].items():
        values = [b[key] for b in batches]
        if key in _LEFT_PADDED:
            width = max(v.shape[1] for v in values)
            pad = pad_token_id if key == "input_ids" else 0
            merged[key] = torch.cat([_pad_width(v, width, pad, left=True) for v in values])
        elif isinstance(first, torch.Tensor):
            merged[key] = torch.cat([v.to(first.device) for v in values])
        elif isinstance(first, dict):  # per-row columns (answers, ...)
            merged[key] = {k: [x for v in values for x in v[k]] for k in first}
        else:
            merged[key] = [x for v in values for x in v]
    return merged


def select_batch(batch: dict[str, Any], groups: torch.Tensor) -> dict[str, Any]:
    """The given rows (prompts) of a collated batch."""
    picked = groups.tolist()
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value[groups.to(value.device)]
        elif isinstance(value, dict):
            out[key] = {k: [v[i] for i in picked] for k, v in value.items()}
        else:
            out[key] = [value[i] for i in picked]
    return out


def concat_rewards(outputs: list[RewardOutput]) -> RewardOutput:
    """Rewards of several rounds, rows in order; error and not-applicable counts add up."""
    errors: dict[str, int] = {}
    not_applicable: dict[str, int] = {}
    for out in outputs:
        for total, counts in ((errors, out.errors), (not_applicable, out.not_applicable)):
            for key, count in counts.items():
                total[key] = total.get(key, 0) + count
    return RewardOutput(torch.cat([o.per_function for o in outputs]), torch.cat([o.total for o in outputs]),
                        outputs[0].names, errors, not_applicable)


def select_rewards(rewards: RewardOutput, rows: torch.Tensor) -> RewardOutput:
    """The given rows' rewards (the step's error counts are kept as they are: they describe the step)."""
    rows = rows.to(rewards.total.device)
    return RewardOutput(rewards.per_function[rows], rewards.total[rows], rewards.names, dict(rewards.errors),
                        dict(rewards.not_applicable))




# ----------------------------------------------------------------------------------------- DDP agreement


@dataclass
class DynamicSamplingOutcome:
    """What dynamic sampling decided in one step: `kept` is this rank's; the rest is the same on every rank.

    Attributes:
        kept: Indices of this rank's generated groups to train on, as many on every rank.
        groups_per_rank: Groups each rank generated this step (reports of different sizes are gathered with it).
        metrics: The step's counts over all ranks, for logging under `dynamic_sampling/`.
    """

    kept: torch.Tensor
    groups_per_rank: list[int]
    metrics: dict[str, float]


def agree_on_group_count(counts: torch.Tensor, target: int, *, max_extra_generation_rounds: int,
                         allow_partial: bool) -> int:
    """How many groups every rank trains on, from all ranks' counts; raises when short and not `allow_partial`.

    Every rank calls this with the same all-gathered `counts`, so every rank returns the same number or every
    rank raises: a rank raising alone would leave the others waiting in their next collective.

    Args:
        counts: [world_size, 4] per rank: groups kept (unequal rewards, at most `target`), groups dropped
            (all-equal rewards), groups generated, extra generation rounds run.
        target: Groups per rank in a full batch (`prompts_per_step`).
        max_extra_generation_rounds: The cap each rank ran under (named in the error).
        allow_partial: Train on fewer than `target` groups instead of raising.

    Returns:
        The minimum kept count over the ranks (0: skip the step).
    """
    counts = counts.reshape(-1, 4).long().cpu()
    common = int(counts[:, 0].min())
    if common < target and not allow_partial:
        short = [r for r in range(counts.shape[0]) if counts[r, 0] < target]
        where = "" if counts.shape[0] == 1 else f" on rank(s) {short}"
        raise RuntimeError(
            f"dynamic sampling: after max_extra_generation_rounds={max_extra_generation_rounds} extra generation "
            f"rounds only {common} of the {target} prompt groups had unequal rewards{where} "
            f"({int(counts[:, 1].sum())} of {int(counts[:, 2].sum())} groups generated this step had all-equal "
            "rewards). Raise `max_extra_generation_rounds`, set `dynamic_sampling_allow_partial: true` to train on "
            "the groups that survived, or set `dynamic_sampling: false`. Groups that are all correct or all wrong "
            "mean the prompts are too easy or too hard for the model (or the reward always returns the same value).")
    return common


# ----------------------------------------------------------------------------------------- one step's rounds
def filter_and_refill(first: GroupBatch, group_filter: GroupFilter, *, num_generations: int, pad_token_id: int,
                      draw: Callable[[int, int, list[int]], GroupBatch],
                      gather_counts: Callable[[torch.Tensor], torch.Tensor], max_extra_generation_rounds: int,
                      allow_partial: bool, skipped_steps: int) -> tuple[GroupBatch, DynamicSamplingOutcome]:
    """Drop groups whose rewards are all equal and refill from the sampler; returns every generated group.

    Generation has no collectives, so each rank refills on its own and ranks may run different numbers of
    extra rounds. Then one all_gather of the counts: every rank trains on the first `common` of its kept
    groups (`common` = the minimum over ranks; the step's own prompts come before refills), so backward
    runs equally often everywhere; when short at the cap, every rank raises or every rank goes on.

    Args:
        first: The step's own groups, rewarded.
        group_filter: Counts kept/dropped groups and says how many prompts to draw next (0 at the cap).
        draw: `draw(count, attempt, exclude)` -> `count` more groups, rewarded, from prompts not in `exclude`.
        gather_counts: All ranks' rows of a `[1, 4]` tensor (a collective; identity on one process).
        skipped_steps: Steps skipped so far (the metric counts this one too when it is skipped).

    Returns:
        Every generated group merged, and the outcome (`kept` is empty when every rank must skip the step).
    """
    G = num_generations
    target = first.num_groups
    f = group_filter
    f.begin(target)
    parts, keeps = [first], [f.add(first.rewards.total.view(-1, G))]
    while not f.done:
        count = f.next_draw_size()  # 0 once the cap is reached
        if count == 0:
            break
        drawn = torch.cat([p.batch["index"] for p in parts]).tolist()
        parts.append(draw(count, f.step_extra_rounds, drawn))
        keeps.append(f.add(parts[-1].rewards.total.view(-1, G)))
    generated = GroupBatch.concat(parts, pad_token_id)
    local = torch.tensor([[f.kept, f.step_dropped, f.step_seen, f.step_extra_rounds]],
                         device=first.rewards.total.device)
    counts = gather_counts(local).reshape(-1, 4).cpu()
    common = agree_on_group_count(counts, target, max_extra_generation_rounds=max_extra_generation_rounds,
                                  allow_partial=allow_partial)
    metrics = {"dropped_groups": float(counts[:, 1].sum()),
               "extra_rounds": float(counts[:, 3].max()),  # the slowest rank's: what the step waited for
               "zero_variance_fraction": float(counts[:, 1].sum() / counts[:, 2].sum().clamp(min=1)),
               "trained_groups": float(common * counts.shape[0]),
               "skipped_steps": float(skipped_steps + (common == 0))}
    return generated, DynamicSamplingOutcome(first_kept(torch.cat(keeps), common), counts[:, 2].tolist(), metrics)
