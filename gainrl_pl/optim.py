"""The optimizer and learning-rate schedule of `GRPOModule`, as small functions (no Lightning)."""

from __future__ import annotations

import math

import torch
from lightning.pytorch.utilities import rank_zero_warn

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_multiplier(step: int, *, schedule: str, warmup_steps: int, total_steps: int | None) -> float:
    """Factor on the base learning rate at optimizer step `step` (0-based), as TRL/HF schedules define it.

    Linear warm-up over `warmup_steps` ((step + 1) / warmup_steps, so step 0 already trains), then
    `constant` (1), `linear` decay to 0 at `total_steps`, or `cosine` (half a cosine to 0 at `total_steps`).
    Without a known `total_steps` (an infinite loader and no `max_steps`) the decay schedules stay at 1.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r} is not supported; allowed values: {', '.join(LR_SCHEDULES)}")
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or not total_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))


def build_adamw(params: list[torch.nn.Parameter], *, fused: bool, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel (one launch for all tensors: measurably faster on CPU too)."""
    if fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError) as err:  # e.g. a device or dtype without a fused kernel
            rank_zero_warn(f"fused AdamW unavailable ({err}); using the default implementation")
    return torch.optim.AdamW(params, **kwargs)
