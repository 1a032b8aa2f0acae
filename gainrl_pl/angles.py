"""Angle concentration of token hidden states (spec section 2): pure tensor math, no model.

With u_i = x_i / |x_i| (cosine space), s = sum of u_i over the question tokens Q and t = sum over the
prefix tokens P:

    C_intra = |s|^2 / n_Q^2                           (paper: mean over all pairs, diagonal included)
    C_intra = (|s|^2 - n_Q) / (n_Q (n_Q - 1))         (intra_diagonal=False: mean over i != j)
    C_inter = (s . t) / (n_Q n_P)                     (mean cosine between question and prefix tokens)

Everything is O(L * d): no L x L cosine matrix is ever built, and it runs in float32 whatever the
hidden states' dtype (last-layer cosines differ between prompts by only ~0.03, so bf16 rounding would
decide the ranking).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

_EPS = 1e-12  # norm floor: an all-zero hidden vector becomes u = 0 (cosine 0 with everything), not NaN


class AngleConcentration(NamedTuple):
    """Per-sequence angle concentration; all float32 tensors of shape [B]."""

    intra: Tensor
    """C_intra: mean cosine between question tokens."""
    inter: Tensor
    """C_inter: mean cosine between question tokens and prefix tokens."""
    n_question: Tensor
    """Number of question tokens n_Q."""
    n_prefix: Tensor
    """Number of prefix tokens n_P."""


def unit_vectors(hidden: Tensor) -> Tensor:
    """x / |x| along the last dim, in float32; zero vectors map to zero vectors (never NaN)."""
    x = hidden.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def _masked_sum(u: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of u over masked tokens ([B, d]) and of |u|^2 (the diagonal, [B]).

    `where` rather than multiply-by-mask: a NaN/inf at a padded position (0 * NaN = NaN) must not leak.
    """
    u = torch.where(mask.unsqueeze(-1), u, torch.zeros((), dtype=u.dtype, device=u.device))
    return u.sum(dim=1), (u * u).sum(dim=(1, 2))


def _check(hidden: Tensor, *masks: Tensor) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [batch, length, dim], got shape {tuple(hidden.shape)}")
    for mask in masks:
        if mask.shape != hidden.shape[:2]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match hidden [batch, length] "
                             f"{tuple(hidden.shape[:2])}")
        if mask.dtype != torch.bool:
            raise TypeError(f"masks must be torch.bool, got {mask.dtype}")


def angle_concentration(hidden: Tensor, question_mask: Tensor, prefix_mask: Tensor, *,
                        intra_diagonal: bool = True) -> AngleConcentration:
    """C_intra and C_inter of each sequence from its hidden states and segment masks (spec section 2).

    Args:
        hidden: Hidden states [B, L, d], any float dtype (computed in float32).
        question_mask: Bool [B, L], True on the question's tokens.
        prefix_mask: Bool [B, L], True on the prefix's (system prompt + few-shot) tokens; must not
            overlap `question_mask`. Padding is simply False in both masks.
        intra_diagonal: Include cos(x_i, x_i) = 1 in C_intra (the paper's 1/n_Q^2 form, the default);
            False averages over i != j only.

    The diagonal that `intra_diagonal=False` removes is sum_i |u_i|^2, which is n_Q for non-zero
    vectors; using the exact sum keeps an all-zero vector (u = 0) consistent with the pairwise form.

    Degenerate segments get 0.0 for every term that is undefined, with a warning naming the case:
    an empty question (C_intra = C_inter = 0), an empty prefix (C_inter = 0), a one-token question with
    `intra_diagonal=False` (C_intra = 0). Never NaN.
    """
    _check(hidden, question_mask, prefix_mask)
    if (question_mask & prefix_mask).any():
        raise ValueError("question_mask and prefix_mask overlap: a token belongs to one segment only")
    u = unit_vectors(hidden)
    s, s_diag = _masked_sum(u, question_mask)
    t, _ = _masked_sum(u, prefix_mask)
    n_q = question_mask.sum(dim=1).float()
    n_p = prefix_mask.sum(dim=1).float()
    s_sq = (s * s).sum(dim=-1)
    zero = torch.zeros_like(s_sq)

    if intra_diagonal:
        intra_defined = n_q >= 1
        intra = torch.where(intra_defined, s_sq / n_q.clamp_min(1) ** 2, zero)
    else:
        intra_defined = n_q >= 2
        pairs = (n_q * (n_q - 1)).clamp_min(1)
        intra = torch.where(intra_defined, (s_sq - s_diag) / pairs, zero)
    inter_defined = (n_q >= 1) & (n_p >= 1)
    inter = torch.where(inter_defined, (s * t).sum(dim=-1) / (n_q * n_p).clamp_min(1), zero)

    _warn_degenerate(n_q, n_p, intra_diagonal)
    return AngleConcentration(intra, inter, n_q, n_p)


def _warn_degenerate(n_q: Tensor, n_p: Tensor, intra_diagonal: bool) -> None:
    """One warning per kind of degenerate segment in the batch, naming the rows."""
    def rows(flag: Tensor) -> str:
        idx = flag.nonzero().flatten().tolist()
        return ", ".join(map(str, idx[:8])) + (" ..." if len(idx) > 8 else "")

    empty_q = n_q == 0
    if empty_q.any():
        warnings.warn(f"angle_concentration: empty question segment in batch rows [{rows(empty_q)}]; "
                      "C_intra and C_inter set to 0.0", stacklevel=3)
    empty_p = (n_p == 0) & ~empty_q
    if empty_p.any():
        warnings.warn(f"angle_concentration: empty prefix segment in batch rows [{rows(empty_p)}]; "
                      "C_inter set to 0.0", stacklevel=3)
    if not intra_diagonal:
        single = n_q == 1
        if single.any():
            warnings.warn(f"angle_concentration: one-token question with intra_diagonal=False in batch rows "
                          f"[{rows(single)}] (no i != j pairs); C_intra set to 0.0", stacklevel=3)


def weighted_score(intra, inter, w_intra: float = 1.0, w_inter: float = 1.0):
    """score = w_intra * C_intra + w_inter * C_inter (paper: 1, 1; reference script: 1, 8).

    Works on floats and tensors alike.
    """
    return w_intra * intra + w_inter * inter


def mean_pairwise_cosine(hidden: Tensor, mask: Tensor) -> Tensor:
    """The angle signal of a sequence (spec section 5): mean cos(x_i, x_j) over masked tokens, i != j.

    Args:
        hidden: Hidden states [B, L, d] (e.g. prompt + completion at the scoring layer), any float dtype.
        mask: Bool [B, L], True on the tokens to include (e.g. the attention mask).

    Returns float32 [B]; a sequence with fewer than 2 masked tokens gets 0.0 (no pairs, no warning:
    this runs every training step). O(L * d), like `angle_concentration`.
    """
    _check(hidden, mask)
    u = unit_vectors(hidden)
    s, s_diag = _masked_sum(u, mask)
    n = mask.sum(dim=1).float()
    value = ((s * s).sum(dim=-1) - s_diag) / (n * (n - 1)).clamp_min(1)
    return torch.where(n >= 2, value, torch.zeros_like(value))
