"""What a GRPO step logs: one pure function from the step's gathered tensors to named metrics.

The names follow the quantities (style: cleanrl): `reward/total` is the mean total reward of every completion
generated this step (all DDP ranks), `train/<key>` the mean over the step's micro-batches of what
`grpo.policy_loss` reported, `dynamic_sampling/<key>` the group filter's counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def rollout_metrics(*, totals: torch.Tensor, per_function: torch.Tensor, reward_names: Sequence[str],
                    reward_errors: Mapping[str, int], accuracy: torch.Tensor, signal: torch.Tensor,
                    lengths: torch.Tensor, truncated: torch.Tensor, zero_std: torch.Tensor,
                    generation_tokens: int, generation_seconds: float, train_tokens: int, train_seconds: float,
                    nonfinite_updates: int, step_metrics: Mapping[str, Sequence[float]],
                    dynamic_metrics: Mapping[str, float] | None = None) -> dict[str, torch.Tensor | float]:
    """The step's metrics by name.

    Args:
        totals: Total reward per completion, `[n]`; `per_function`: each function's value, `[n, F]` (or `[n]`
            for one function), NaN where a function abstained.
        reward_names: The F reward functions' names; `reward_errors`: counts of caught reward errors by key.
        accuracy: Per-prompt accuracy `[P]`; `signal`: per-prompt angle signal `[P]` (spec section 5).
        lengths: Completion lengths in tokens `[n]`; `truncated`: 1.0 where a completion hit the length cap.
        zero_std: 1.0 per group whose G rewards are all equal.
        generation_tokens / generation_seconds, train_tokens / train_seconds: this rank's throughput.
        nonfinite_updates: optimizer steps skipped so far for a NaN/inf loss or gradient.
        step_metrics: per-micro-batch values of the loss terms, averaged into `train/<key>`.
        dynamic_metrics: the dynamic-sampling counts, when it is on.
    """
    log: dict[str, torch.Tensor | float] = {
        "reward/total": totals.mean(), "reward/total_std": totals.std(),
        "reward/accuracy": accuracy.mean(), "reward/zero_std_groups": zero_std.mean(),
        "completions/mean_length": lengths.mean(), "completions/min_length": lengths.min(),
        "completions/max_length": lengths.max(), "completions/truncated_fraction": truncated.mean(),
        "gainrl/angle_signal": signal.mean(),
        "perf/generation_tokens_per_s": generation_tokens / max(generation_seconds, 1e-9),
        "perf/train_tokens_per_s": train_tokens / max(train_seconds, 1e-9),
        "train/nonfinite_updates": float(nonfinite_updates)}
    for j, name in enumerate(reward_names):
        values = per_function[..., j] if per_function.dim() > 1 else per_function
        log[f"reward/{name}/mean"] = values.nanmean()
        log[f"reward/{name}/std"] = values.std()
    for key, count in reward_errors.items():
        log[f"reward/{key}/errors"] = float(count)
    if dynamic_metrics is not None:
        log.update({f"dynamic_sampling/{key}": value for key, value in dynamic_metrics.items()})
    for key, values in step_metrics.items():
        log[f"train/{key}"] = sum(values) / len(values)
    return log
