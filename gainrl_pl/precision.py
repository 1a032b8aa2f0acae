"""Will the optimizer's updates change the weights? A check for low-precision trainable parameters.

An AdamW update moves each weight by about the learning rate. A bfloat16 number carries 8 significant bits,
so a weight w changes only if the update reaches half the spacing between bf16 numbers around w, about
|w| / 512: at lr 1e-6 every weight above ~5e-4 in magnitude stays exactly where it is (a 1000 x 1000 bf16
matrix of std 0.02 changed in 1.9 % of its entries after 10 steps). Keeping fp32 master weights (Lightning's
`bf16-mixed`: fp32 weights and optimizer state, bf16 matmuls) avoids it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
_SAMPLE = 1 << 18  # entries looked at per tensor: enough for a fraction, cheap for a 7B model


def half_ulp(values: torch.Tensor) -> torch.Tensor:
    """Half the spacing between adjacent numbers of `values.dtype` at each value (an update smaller than
    this rounds back to the same number). Zeros get the smallest normal spacing."""
    eps = torch.finfo(values.dtype).eps  # spacing at 1.0 = 2**-(significand bits)
    tiny = torch.finfo(values.dtype).tiny
    _, exponent = torch.frexp(values.detach().float().abs().clamp_min(tiny))  # |v| = m * 2**e, m in [0.5, 1)
    return eps * torch.pow(2.0, (exponent - 2).float())


def lost_update_fraction(params: Iterable[torch.Tensor], learning_rate: float) -> tuple[float, torch.dtype | None]:
    """Share of the low-precision (bf16/fp16) entries of `params` that an update of `learning_rate` leaves
    unchanged, and their dtype (None when no parameter is low precision: nothing is lost)."""
    lost = total = 0
    dtype = None
    for p in params:
        if p.dtype not in LOW_PRECISION or p.numel() == 0:
            continue
        dtype = p.dtype
        flat = p.detach().reshape(-1)
        if flat.numel() > _SAMPLE:
            flat = flat[:: flat.numel() // _SAMPLE]
        lost += int((learning_rate < half_ulp(flat)).sum())
        total += flat.numel()
    return (lost / total if total else 0.0), dtype


def vanishing_update_warning(params: Iterable[torch.Tensor], learning_rate: float, *,
                             threshold: float = 0.1) -> str | None:
    """A warning for the user when more than `threshold` of the trainable entries would never move, else None."""
    fraction, dtype = lost_update_fraction(params, learning_rate)
    if dtype is None or fraction <= threshold:
        return None
    name = str(dtype).removeprefix("torch.")
    return (f"{fraction:.0%} of the trainable weights are {name} values that an update of learning_rate="
            f"{learning_rate:g} cannot change: AdamW moves a weight by about the learning rate, which is below "
            f"half a {name} step for them, so they stay as loaded. Keep fp32 master weights: model.dtype: float32 "
            "with trainer.precision: bf16-mixed (bf16 compute, fp32 weights and optimizer state; with LoRA the "
            "base model may stay in bfloat16, only trainer.precision: bf16-true casts the adapters too), "
            "or raise the learning rate.")
