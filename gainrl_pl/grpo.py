"""GRPO math as pure torch functions: group advantages, token log-probs, the clipped policy loss.

No model, no Lightning: everything here is testable on small hand-made tensors. Names and meanings follow
TRL's `GRPOTrainer` (trl 1.x) so its users find the knobs they know:

- `compute_advantages`: A_i = (r_i - mean(group)) / (std + eps), GRPO (Shao et al. 2024, DeepSeekMath,
  eq. 3), with Dr. GRPO's option to skip the std division (Liu et al. 2025, "Understanding R1-Zero-Like
  Training") and TRL's `batch` scaling.
- `token_logprobs` / `selective_log_softmax` / `token_entropy`: chunked over rows so the float32 copy of a
  big-vocabulary logits tensor exists one chunk at a time, never whole.
- `policy_loss`: the PPO clipped surrogate per token with DAPO's asymmetric clip (`epsilon_high`, Yu et al.
  2025), optional two-sided clipping (`delta`), the k3 KL estimator to a reference (Schulman 2020), and the
  aggregations `grpo`, `bnpo`, `dr_grpo`, `dapo` and `luspo` (per-completion sums); or instead of the clip,
  CISPO's capped, detached importance weight (MiniMax 2025), SAPO's soft gate (Gao et al. 2025) or VESPO's
  sequence weight (2026), as TRL's loss types of those names.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# Loss types whose loss divides by the token count of the whole optimizer step (all micro-batches, all ranks)
GLOBAL_TOKEN_LOSS_TYPES = ("dapo", "cispo", "vespo")
IS_LEVELS = ("token", "sequence")  # the policy ratio (GRPO / GSPO) and the engine correction
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def check_scale_rewards(scale_rewards: str) -> str:
    """`scale_rewards` if it is one of `SCALE_REWARDS`; ValueError naming them otherwise."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r} is not one of {', '.join(SCALE_REWARDS)}")
    return scale_rewards


def check_loss_type(loss_type: str) -> str:
    """`loss_type` if it is one of `LOSS_TYPES`; ValueError naming them otherwise."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    return loss_type


def check_loss_options(loss_type: str, epsilon_high: float | None, delta: float | None,
                       sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05) -> None:
    """ValueError for settings a loss type cannot use: `cispo` caps the ratio itself at `epsilon_high` (so it must
    be set, >= 1), `delta` applies to the clipped losses only, and SAPO's temperatures must be positive."""
    check_loss_type(loss_type)
    if sapo_temperature_pos <= 0 or sapo_temperature_neg <= 0:
        raise ValueError(f"sapo_temperature_pos={sapo_temperature_pos} and sapo_temperature_neg="
                         f"{sapo_temperature_neg} must be > 0")
    if loss_type == "cispo" and (epsilon_high is None or epsilon_high < 1):
        raise ValueError(f"loss_type='cispo' caps the importance weight itself at epsilon_high (TRL's and ScaleRL's "
                         f"epsilon_max; 5.0 is recommended), so epsilon_high={epsilon_high} would scale down even "
                         "on-policy tokens: set epsilon_high >= 1")
    if delta is not None and loss_type in ("cispo", "sapo", "vespo"):
        raise ValueError(f"delta={delta} caps the ratio of the clipped losses (grpo, bnpo, dr_grpo, dapo, luspo); "
                         f"loss_type={loss_type!r} has no such term: unset delta")


def sapo_gate(ratio: Tensor, temperature: Tensor | float) -> Tensor:
    """SAPO's soft gate (Gao et al. 2025, "Soft Adaptive Policy Optimization"): sigmoid(tau * (r - 1)) * 4 / tau.

    Its slope at r = 1 is 1, so on-policy the gradient is GRPO's; off-policy it fades smoothly where the clip
    would cut the gradient off at once. A larger tau fades faster.
    """
    return torch.sigmoid(temperature * (ratio - 1)) * 4 / temperature


@torch.no_grad()
def vespo_weights(log_ratio: Tensor, completion_mask: Tensor, advantages: Tensor, *, k_pos: float = 2.0,
                  lambda_pos: float = 3.0, k_neg: float = 3.0, lambda_neg: float = 2.0,
                  engine_weights: Tensor | None = None) -> Tensor:
    """VESPO's `(B, 1)` sequence weights (TRL's `loss_type="vespo"`): phi(w) = exp(lambda) * w^k * exp(-lambda * w),
    so phi(1) = 1, with w = exp(sum over the completion's tokens of log pi / pi_old), the sequence's ratio (a sum,
    not GSPO's mean), times the product of the rollout engine's importance weights when given (`engine_weights`,
    `(B, T)` or `(B, 1)`: folded into w instead of multiplying each token). k and lambda are the `_pos` pair for
    A >= 0 and the `_neg` pair otherwise. Computed in log space, each log clamped to [log 1e-8, 20] as TRL does;
    a weight that overflows counts 0. No gradient: phi only scales the score-function gradient A * grad log pi.
    """
    mask = completion_mask.bool()
    lower = math.log(1e-8)
    seq = torch.where(mask, log_ratio.float().clamp(-20.0, 20.0), 0.0).sum(dim=1, keepdim=True)
    if engine_weights is not None:
        log_engine = torch.log(engine_weights.float()).clamp(lower, 20.0)
        if log_engine.shape[1] != 1:  # token weights: their product over the completion
            log_engine = torch.where(mask, log_engine, 0.0).sum(dim=1, keepdim=True)
        seq = seq + log_engine
    log_w = seq.clamp(lower, 20.0)
    nonneg = advantages.reshape(-1, 1) >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def check_importance_sampling_level(level: str) -> str:
    """`level` if it is one of `IS_LEVELS` (`token`: GRPO's ratio, `sequence`: GSPO's); ValueError otherwise."""
    if level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level={level!r}: allowed values are {', '.join(IS_LEVELS)} "
                         "(token: GRPO's per-token ratio; sequence: GSPO's per-completion ratio)")
    return level


# Elements per float32 chunk when `chunk_size` is not given: 2**24 floats = 64 MiB, e.g. 512 tokens of a
# 32k vocabulary. Big enough that the Python loop is cheap, small next to the logits themselves.
_CHUNK_ELEMENTS = 2**24


# --------------------------------------------------------------------------------------------- advantages
def compute_advantages(rewards: Tensor, scale_rewards: str = "group", eps: float = 1e-4,
                       batch_std: Tensor | float | None = None) -> Tensor:
    """Group-relative advantages for GRPO.

    Each reward is centred on the mean of its group (the G completions of one prompt) and, depending on
    `scale_rewards`, divided by a standard deviation plus `eps` (TRL: `(r - mean) / (std + 1e-4)`).

    Args:
        rewards: Total rewards shaped `(num_prompts, G)`; row i holds the G completions of prompt i.
            Must be finite.
        scale_rewards: `group`: divide by the unbiased std of the group (GRPO, TRL's default);
            `batch`: divide by the unbiased std of the whole batch (TRL's `batch`): `batch_std` when
            given, else the std of all rewards in `rewards`;
            `none`: no division (Dr. GRPO, which argues the std term biases towards easy/hard prompts).
        eps: Added to the std so near-constant groups do not explode.
        batch_std: With `scale_rewards='batch'`, the std of the global batch when `rewards` is only part of
            it (under DDP: the unbiased std of every rank's rewards, as TRL computes it after its gather).

    Returns:
        Advantages shaped like `rewards`, in float32 (or the rewards' dtype when it is float64).
        A group whose rewards are all equal gets exactly 0 (it carries no learning signal), never NaN.
        With G = 1 every advantage is 0: a single completion is its own group mean, and the unbiased std of
        one value is undefined, so it is treated as 0 rather than NaN.

    Raises:
        ValueError: `rewards` is not 2-D or not finite, or `scale_rewards` is not an allowed value.
    """
    check_scale_rewards(scale_rewards)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be shaped (num_prompts, G), got {tuple(rewards.shape)}")
    r = rewards.double() if rewards.dtype == torch.float64 else rewards.float()
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards contain NaN or inf; validate reward functions before computing advantages")
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        # unbiased (n - 1) std, as TRL; undefined for G = 1, where `centred` is 0 anyway
        std = r.std(dim=1, keepdim=True) if r.shape[1] > 1 else torch.zeros_like(r[:, :1])
        advantages = centred / (std + eps)
    elif scale_rewards == "batch":
        if batch_std is not None:
            std = torch.as_tensor(batch_std, dtype=r.dtype, device=r.device)
        else:
            std = r.std() if r.numel() > 1 else r.new_zeros(())
        advantages = centred / (std + eps)
    else:
        advantages = centred
    # The mean of equal floats can differ from them by one ulp; force those groups to an exact 0.
    constant = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)).expand_as(r)
    return torch.where(constant, torch.zeros_like(advantages), advantages)


def normalized_reward_sum(per_function: Tensor, weights: Tensor, num_generations: int, eps: float = 1e-4) -> Tensor:
    """GDPO's first step (TRL's `multi_objective_aggregation="normalize_then_sum"`): each reward function's values
    normalised within each group, then the weighted sum.

    Summing first lets the reward with the largest spread decide the advantage; GDPO (NVlabs, 2026) normalises
    each reward within the group first, so that a 0/1 accuracy and a small format bonus each count by their
    weight. Per group and function:
    (r - mean) / (std + eps), over the completions where the function applied (NaN = it returned None), with the
    unbiased std; a function constant in a group (or applying to fewer than 2 of its completions) contributes 0.

    Args:
        per_function: `(N, F)` rewards of N = groups x G completions, row i*G + j the j-th completion of group i;
            NaN where a function returned None.
        weights: `(F,)` the reward weights.
        num_generations: G.
        eps: Added to each std (TRL's 1e-4).

    Returns:
        `(N,)` float32 weighted sum of the normalised rewards; finite.
    """
    if per_function.dim() != 2 or per_function.shape[0] % num_generations:
        raise ValueError(f"per_function must be (groups x G, F) with G = {num_generations}, got "
                         f"{tuple(per_function.shape)}")
    if tuple(weights.shape) != (per_function.shape[1],):
        raise ValueError(f"{tuple(weights.shape)} weights for {per_function.shape[1]} reward functions")
    r = per_function.float().view(-1, num_generations, per_function.shape[1])
    present = ~torch.isnan(r)
    count = present.sum(dim=1, keepdim=True)
    values = torch.where(present, r, 0.0)
    mean = values.sum(dim=1, keepdim=True) / count.clamp(min=1)
    centred = torch.where(present, r - mean, 0.0)
    std = (centred.pow(2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
    normalised = torch.where(present & (count > 1), centred / (std + eps), 0.0)
    # a function constant in the group is exactly 0 there, not a one-ulp residue over eps
    constant = (torch.where(present, r, float("inf")).amin(dim=1, keepdim=True)
                == torch.where(present, r, float("-inf")).amax(dim=1, keepdim=True))
    normalised = torch.where(constant, 0.0, normalised)
    return (normalised * weights.float().to(r.device)).sum(dim=2).reshape(-1)


def batch_normalize(values: Tensor, mean: Tensor | float | None = None, std: Tensor | float | None = None,
                    eps: float = 1e-4) -> Tensor:
    """(values - mean) / (std + eps) over the batch: GDPO's second step. `mean`/`std` are the global batch's under
    DDP (every rank's values); by default those of `values` (unbiased std; 0 for a single value)."""
    v = values.float()
    m = v.mean() if mean is None else torch.as_tensor(mean, dtype=v.dtype, device=v.device)
    s = (v.std() if v.numel() > 1 else v.new_zeros(())) if std is None else torch.as_tensor(
        std, dtype=v.dtype, device=v.device)
    return (v - m) / (s + eps)


# --------------------------------------------------------------------------------------------- log-probs
def _row_blocks(batch: int, length: int, chunk_size: int):
    """Yield (b0, b1, t0, t1) slices covering a (batch, length) grid with about `chunk_size` rows each.

    Several whole sequences go in one block when they fit, else one sequence is cut along time. Slicing
    never flattens the logits, so a non-contiguous view (e.g. `logits[:, :-1]`) is not copied whole.
    """
    if length == 0 or batch == 0:
        return
    if chunk_size >= length:
        per = chunk_size // length
        for b0 in range(0, batch, per):
            yield b0, min(batch, b0 + per), 0, length
    else:
        for b in range(batch):
            for t0 in range(0, length, chunk_size):
                yield b, b + 1, t0, min(length, t0 + chunk_size)


def _auto_chunk(vocab: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        return max(1, _CHUNK_ELEMENTS // max(1, vocab))
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1 (rows of logits per chunk)")
    return int(chunk_size)


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 logits (softmax in half precision loses too much); float64 kept."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _as_3d(logits: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """View logits `(..., T, V)` as `(B, T, V)` (a view for the usual 2-D/3-D inputs) and return the lead shape."""
    if logits.dim() < 2:
        raise ValueError(f"logits must be (..., vocab) with at least 2 dims, got {tuple(logits.shape)}")
    lead = tuple(logits.shape[:-1])
    if logits.dim() == 2:
        return logits.unsqueeze(0), lead
    return logits.reshape(-1, logits.shape[-2], logits.shape[-1]), lead


class _ChunkedSelectiveLogSoftmax(torch.autograd.Function):
    """log_softmax(logits / T)[token] computed chunk by chunk, with a backward that recomputes per chunk.

    Autograd through a plain chunk loop would keep every chunk's float32 copy for backward, which adds up
    to the full extra vocabulary tensor we want to avoid. Here only the logits themselves (already alive)
    and one logsumexp per token are saved; backward rebuilds softmax one chunk at a time:
    d logp / d logits = (onehot(token) - softmax(logits / T)) / T. The entropy output is differentiable too
    (an entropy bonus trains on it): d H / d logits = -p * (log p + H) / T, from the same chunk.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, token_ids: Tensor, temperature: float, chunk_size: int,
                with_entropy: bool) -> tuple[Tensor, Tensor]:
        batch, length, _ = logits.shape
        dtype = _compute_dtype(logits)
        out = torch.empty(batch, length, dtype=dtype, device=logits.device)
        lse = torch.empty_like(out)
        # the entropy metric reuses each chunk while it is in cache, instead of a second pass over the logits
        entropy = torch.empty_like(out) if with_entropy else out.new_empty(0)
        for b0, b1, t0, t1 in _row_blocks(batch, length, chunk_size):
            x = logits[b0:b1, t0:t1].to(dtype)  # float32 for bf16/fp16 logits, one chunk only
            if temperature != 1.0:
                x = x / temperature
            chunk_lse = torch.logsumexp(x, dim=-1)
            picked = x.gather(-1, token_ids[b0:b1, t0:t1].unsqueeze(-1)).squeeze(-1)
            out[b0:b1, t0:t1] = picked - chunk_lse
            lse[b0:b1, t0:t1] = chunk_lse
            if with_entropy:
                entropy[b0:b1, t0:t1] = _entropy_from_chunk(x, chunk_lse.unsqueeze(-1))
        ctx.save_for_backward(logits, token_ids, lse, entropy)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not a tensor of zeros
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor | None, grad_entropy: Tensor | None = None):
        logits, token_ids, lse, entropy = ctx.saved_tensors
        if grad_out is None and grad_entropy is None:
            return torch.zeros_like(logits), None, None, None, None
        temperature = ctx.temperature
        grad = torch.empty_like(logits)
        batch, length, _ = logits.shape
        dtype = _compute_dtype(logits)
        for b0, b1, t0, t1 in _row_blocks(batch, length, ctx.chunk_size):
            x = logits[b0:b1, t0:t1].to(dtype)
            if temperature != 1.0:
                x = x / temperature
            chunk_lse = lse[b0:b1, t0:t1].unsqueeze(-1)
            chunk = torch.exp(x - chunk_lse)  # softmax, turned into the gradient in place below
            if grad_entropy is not None:  # -p * (log p + H) * g_H; 0 where p == 0 (a -inf logit), not NaN
                h = entropy[b0:b1, t0:t1].unsqueeze(-1)
                g_h = grad_entropy[b0:b1, t0:t1].to(dtype).unsqueeze(-1)
                entropy_part = torch.where(chunk > 0, chunk * (x - chunk_lse + h), 0.0).mul_(-g_h)
            if grad_out is not None:
                g = grad_out[b0:b1, t0:t1].to(dtype).unsqueeze(-1)
                chunk.mul_(-g)  # -softmax * g
                chunk.scatter_add_(-1, token_ids[b0:b1, t0:t1].unsqueeze(-1), g)  # + onehot * g
            else:
                chunk.zero_()
            if grad_entropy is not None:
                chunk.add_(entropy_part)
            if temperature != 1.0:
                chunk.div_(temperature)
            grad[b0:b1, t0:t1] = chunk.to(grad.dtype)
        return grad, None, None, None, None


def _entropy_from_chunk(x: Tensor, lse: Tensor) -> Tensor:
    """H = logsumexp(x) - sum_v softmax(x)_v x_v over the last dim, for one float32 chunk."""
    p = torch.exp(x - lse)
    # where p == 0 (a -inf logit, e.g. a masked token) the term is 0, not 0 * -inf = NaN
    return lse.squeeze(-1) - torch.where(p > 0, p * x, 0.0).sum(-1)


def selective_log_softmax(
    logits: Tensor, token_ids: Tensor, chunk_size: int | None = None, temperature: float = 1.0
) -> Tensor:
    """`log_softmax(logits / temperature).gather(-1, token_ids)` without a second full-vocabulary tensor.

    Per chunk of rows: cast to float32, gather the chosen logit, subtract the row's logsumexp. Peak extra
    memory is one chunk (`chunk_size` x vocab floats), in forward and in backward (see
    `_ChunkedSelectiveLogSoftmax`), whatever the logits' dtype; a backward through the entropy as well (an
    entropy bonus) holds about three chunks at once.

    Args:
        logits: `(..., T, V)` (or `(N, V)`) scores, any float dtype; may require grad. Non-contiguous views
            such as `logits[:, :-1]` are fine and are not copied.
        token_ids: Integer ids shaped `logits.shape[:-1]`.
        chunk_size: Rows (tokens) per chunk; `None` sizes chunks to about 2**24 float32 elements.
        temperature: Logits are divided by it before the softmax (> 0).

    Returns:
        Float32 log-probabilities (float64 for float64 logits) shaped `token_ids.shape`, differentiable
        w.r.t. `logits` (first order).
    """
    return _selective_log_softmax(logits, token_ids, chunk_size, temperature, with_entropy=False)[0]


def _selective_log_softmax(logits: Tensor, token_ids: Tensor, chunk_size: int | None, temperature: float,
                           with_entropy: bool) -> tuple[Tensor, Tensor | None]:
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    if tuple(token_ids.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"token_ids shape {tuple(token_ids.shape)} must equal logits.shape[:-1] "
            f"{tuple(logits.shape[:-1])}"
        )
    x, lead = _as_3d(logits)
    ids = token_ids.reshape(x.shape[0], x.shape[1]).long()
    out, entropy = _ChunkedSelectiveLogSoftmax.apply(x, ids, float(temperature),
                                                     _auto_chunk(x.shape[-1], chunk_size), with_entropy)
    return out.reshape(lead), entropy.reshape(lead) if with_entropy else None


def token_logprobs(
    logits: Tensor, token_ids: Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> Tensor:
    """Log-probability of each sampled token under `softmax(logits / temperature)`.

    TRL semantics: the logits are divided by the sampling temperature before the log-softmax, so the
    log-probs are those of the distribution the completions were actually sampled from.

    Args:
        logits: `(B, T, V)` logits aligned with `token_ids` (position t predicts token t: the caller
            has already dropped the last position and the prompt).
        token_ids: `(B, T)` completion token ids.
        temperature: Sampling temperature (> 0).
        chunk_size: Rows per chunk (see `selective_log_softmax`); `None` = automatic.

    Returns:
        `(B, T)` float32 log-probs; padded positions hold finite but meaningless values (mask them).
    """
    return selective_log_softmax(logits, token_ids, chunk_size=chunk_size, temperature=temperature)


def token_logprobs_and_entropy(
    logits: Tensor, token_ids: Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """`token_logprobs` plus the per-position entropy (`token_entropy`) from the same pass.

    The training step logs entropy; computing it while each float32 chunk of logits is already built
    costs one extra exp per chunk instead of a second pass over the whole logits tensor. The entropy is
    differentiable (`entropy_coef` trains on it); its backward costs nothing when nothing uses it.
    """
    return _selective_log_softmax(logits, token_ids, chunk_size, temperature, with_entropy=True)


@torch.no_grad()
def token_entropy(logits: Tensor, temperature: float = 1.0, chunk_size: int | None = None) -> Tensor:
    """Entropy of `softmax(logits / temperature)` per position, chunked like `selective_log_softmax`.

    H = logsumexp(x) - sum_v softmax(x)_v * x_v, with x = logits / temperature, in float32 per chunk.
    Meant for logging (TRL's `entropy` metric): computed without gradient.

    Args:
        logits: `(..., T, V)` logits, any float dtype.
        temperature: Divides the logits first (> 0).
        chunk_size: Rows per chunk; `None` = automatic.

    Returns:
        Float32 (float64 for float64 logits) entropies shaped `logits.shape[:-1]` (detached).
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    x3, lead = _as_3d(logits)
    batch, length, vocab = x3.shape
    dtype = _compute_dtype(logits)
    out = torch.empty(batch, length, dtype=dtype, device=logits.device)
    for b0, b1, t0, t1 in _row_blocks(batch, length, _auto_chunk(vocab, chunk_size)):
        x = x3[b0:b1, t0:t1].to(dtype)
        if temperature != 1.0:
            x = x / temperature
        out[b0:b1, t0:t1] = _entropy_from_chunk(x, torch.logsumexp(x, dim=-1, keepdim=True))
    return out.reshape(lead)


# --------------------------------------------------------------------------------------------- the loss
def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` where `mask` (bool or 0/1), 0 for an empty mask (never NaN)."""
    mask = mask.bool()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def high_entropy_mask(entropy: Tensor, completion_mask: Tensor, top_quantile: float) -> Tensor:
    """The completion tokens whose entropy lies in the top `top_quantile` share (TRL's `top_entropy_quantile`).

    Wang et al. 2025 ("Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective RLVR") train on the
    ~20% of tokens with the highest entropy, the "forking" tokens where the policy chooses between paths, and
    report equal or better results than training on all of them. A token is kept when its entropy is at least the
    (1 - top_quantile) quantile (linear interpolation) of the completion tokens' entropies; ties at the threshold
    are all kept.

    Args:
        entropy: `(B, T)` per-token entropies of the policy's sampling distribution.
        completion_mask: `(B, T)` 1/True for the completion tokens that count; the others are never kept and do
            not enter the quantile.
        top_quantile: Share of the tokens to keep, in (0, 1]; 1 keeps every completion token.

    Returns:
        `(B, T)` bool mask, a subset of `completion_mask`.
    """
    if not 0 < top_quantile <= 1:
        raise ValueError(f"top_entropy_quantile={top_quantile} must be in (0, 1] (0.2 keeps the 20% of completion "
                         "tokens with the highest entropy; 1.0 keeps all)")
    if tuple(entropy.shape) != tuple(completion_mask.shape):
        raise ValueError(f"entropy shape {tuple(entropy.shape)} must equal completion_mask shape "
                         f"{tuple(completion_mask.shape)}")
    mask = completion_mask.bool()
    if top_quantile == 1 or not bool(mask.any()):
        return mask
    entropy = entropy.detach().float()
    threshold = torch.quantile(entropy[mask], 1 - top_quantile)
    return (entropy >= threshold) & mask


@torch.no_grad()
def off_policy_sequence_mask(advantages: Tensor, logp: Tensor, sampling_logp: Tensor, completion_mask: Tensor,
                             threshold: float) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (TRL's `off_policy_mask_threshold`): `(B, 1)` 1.0 = train, 0.0 = drop.

    A completion is dropped when its advantage is negative and its mean token log-ratio sampling / current policy
    (a KL estimate over its completion tokens) exceeds `threshold`: a stale, badly-scored sample would push the
    policy away from text it no longer produces. NaN sampling log-probs (tokens the engine could not score) count
    as 0, so one unscored token cannot drop a completion.
    """
    if threshold <= 0:
        raise ValueError(f"off_policy_mask_threshold={threshold} must be > 0 (DeepSeek-V3.2 / TRL suggest e.g. 0.5)")
    mask = completion_mask.bool()
    log_ratio = torch.nan_to_num(sampling_logp.float() - logp.float(), nan=0.0)
    mean_kl = torch.where(mask, log_ratio, 0.0).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
    keep = (advantages.reshape(-1, 1) >= 0) | (mean_kl <= threshold)
    return keep.float()


def adaptive_entropy_coef(coef: float, entropy: float, *, target: float, delta: float, minimum: float,
                          maximum: float) -> float:
    """Skywork-OR1's entropy controller (TRL's `use_adaptive_entropy`), one optimizer step: raise the coefficient
    by `delta` while the step's mean token entropy is at or below `target`, lower it otherwise, within
    [`minimum`, `maximum`]. The bonus itself applies only while the last measured entropy is at or below `target`."""
    if entropy <= target:
        return min(coef + delta, maximum)
    return max(coef - delta, minimum)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    *,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    max_completion_length: int | None = None,
    num_items_in_batch: float | Tensor | None = None,
    delta: float | None = None,
    sampling_weights: Tensor | None = None,
    importance_sampling_level: str = "token",
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    use_bias_correction_kl: bool = False,
    loss_weights: Tensor | None = None,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's clipped policy-gradient loss (TRL's `GRPOTrainer` semantics).

    Per token: ratio r = exp(logp - old_logp), loss_t = -min(r * A, clip(r, 1 - epsilon, 1 + epsilon_high) * A)
    (+ beta * KL_t), then aggregated over the completion tokens by `loss_type`. With
    `importance_sampling_level="sequence"` (GSPO) r is one ratio per completion instead.

    Args:
        logp: `(B, T)` log-probs of the completion tokens under the current policy (with grad).
        old_logp: `(B, T)` log-probs under the policy that sampled the rollout; `None` means "same policy"
            (num_iterations = 1): `logp.detach()` is used, so the ratio is exactly 1 but still carries
            the gradient of logp (grad of r = grad of logp).
        ref_logp: `(B, T)` reference-model log-probs; required when `beta > 0`.
        advantages: `(B,)` (or `(B, 1)`) one advantage per completion, broadcast over its tokens.
        completion_mask: `(B, T)` 1/True for completion tokens that count, 0 for padding (bool, int or float).
        loss_type: Aggregation over tokens, with S = sum over the masked per-token losses:
            `grpo`: mean over each sequence's tokens, then mean over sequences (DeepSeekMath; long
            sequences get less weight per token); `bnpo`: S / completion tokens in this batch;
            `dr_grpo`: S / (B * max_completion_length) (Dr. GRPO: a constant denominator, no length bias);
            `dapo` (TRL default): S / `num_items_in_batch`, the token count of the whole global batch, so
            every token of the optimizer step weighs the same however it is split into micro-batches.
            Three replace the clipped term, each with TRL's aggregation for it: `cispo` (MiniMax-M1, 2025):
            loss_t = -sg(min(r, epsilon_high)) * A * logp_t, a capped importance weight with no gradient of its
            own, so no token loses its gradient to a clip (aggregated as `dapo`); `sapo` (Gao et al. 2025):
            loss_t = -sapo_gate(r, tau) * A, tau = `sapo_temperature_pos` for A > 0 and `sapo_temperature_neg`
            otherwise (aggregated as `grpo`); and `vespo` below. On-policy all three have GRPO's gradient. `luspo`: the
            clipped term, summed over each completion's tokens and averaged over completions, so a sequence-level
            ratio (`importance_sampling_level="sequence"`, the paper's setup) weighs each completion by its length.
            `vespo` (VESPO, 2026): loss_t = -sg(phi_i) * A * logp_t with `vespo_weights`' smooth sequence weight
            instead of a clip, aggregated as `dapo`; it reads token ratios whatever `importance_sampling_level` says.
        epsilon: Lower clip range: the ratio is clipped below at 1 - epsilon.
        epsilon_high: Upper clip range (DAPO's clip-higher, e.g. 0.28); `None` = `epsilon`. With `cispo`, the cap
            of the importance weight itself (required, >= 1; 5.0 in ScaleRL).
        beta: KL coefficient; 0 disables the KL term.
        max_completion_length: The generation length limit; required for `dr_grpo`.
        num_items_in_batch: `dapo`/`cispo`/`vespo` denominator: completion tokens of the global batch (all gradient-
            accumulation micro-batches and all DDP ranks). Because DDP averages gradients over ranks, pass
            the global count divided by the number of ranks, as TRL does, so the averaged gradient equals
            sum / global count. `None` falls back to this call's token count (then `dapo` == `bnpo`).
            A count <= 0 (an all-empty global batch) divides by 1, giving a 0 loss rather than NaN.
        delta: Two-sided clipping (TRL's `delta`): the unclipped ratio is capped at `delta`, which bounds
            the loss of tokens with negative advantage and a large ratio. `None` = off. TRL recommends
            `delta > 1 + epsilon_high`.
        sampling_weights: `(B, T)` or `(B, 1)` importance weights of the samples (`importance_sampling_weights`:
            the rollout engine's samples are slightly off the trainer's policy); each token's clipped loss is
            multiplied by its weight before aggregation (the KL term is not). `None` = all 1.
        importance_sampling_level: `token` (GRPO): a ratio per token. `sequence` (GSPO, Zheng et al. 2025,
            "Group Sequence Policy Optimization"; TRL's `importance_sampling_level`): every token of a completion
            gets its sequence's ratio s = exp(mean over its tokens of (logp - old_logp)), length-normalised so
            that it stays near 1, and a completion is clipped as a whole. The gradient of s with respect to a
            token's logp is s / |y|: on-policy (s = 1) the gradient equals the token level's for every
            `loss_type`; the two differ only once the policy has moved off the rollout's (`num_iterations` > 1
            or several optimizer steps per rollout). GSPO's clip ranges are far smaller (3e-4 / 4e-4).
        sapo_temperature_pos: SAPO's tau for tokens with a positive advantage (TRL's default 1.0).
        sapo_temperature_neg: SAPO's tau for the others (TRL's default 1.05: negative tokens fade faster).
        loss_weights: `(B, T)` or `(B, 1)` weights that take tokens or completions out of the policy term (the
            high-entropy mask, the off-policy sequence mask): multiplied in like `sampling_weights`, but never
            folded into VESPO's sequence weight.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's shape and decay for A >= 0 and A < 0
            (TRL's defaults 2, 3, 3, 2).
        use_bias_correction_kl: Multiply each token's KL term by the policy ratio r (DeepSeek-V3.2; TRL's name):
            its value is unchanged on-policy (r = 1) but r's own gradient is added, which makes the k3 term's
            gradient the unbiased gradient of KL(pi || ref). Off (the plain k3 term) keeps GRPO's form.

    Returns:
        `(loss, metrics)`: the scalar float32 loss, and detached scalar metrics: `clip_fraction_low`
        (ratio < 1 - epsilon with A < 0), `clip_fraction_high` (ratio > 1 + epsilon_high with A > 0),
        `clip_fraction` (either: the tokens whose gradient the clip removed; for `cispo` the tokens whose weight
        the cap lowered, all under `high`; for `sapo` and `vespo`, which clip nothing, the tokens outside the
        clip range the others would use), `ratio_mean`, `kl` (the masked token mean of the k3 estimate) whenever
        `ref_logp` is given, and for `vespo` `vespo_phi_mean` (over completions). Means are over completion
        tokens; an all-zero mask gives 0 everywhere, never NaN.

    Raises:
        ValueError: unknown `loss_type` or `importance_sampling_level`, `beta > 0` without `ref_logp`, `dr_grpo`
            without `max_completion_length`, negative `epsilon`/`beta`, `check_loss_options`'s cases, non-positive
            SAPO temperatures, or mismatched shapes.
    """
    check_loss_options(loss_type, epsilon_high, delta, sapo_temperature_pos, sapo_temperature_neg)
    check_importance_sampling_level(importance_sampling_level)
    if beta < 0 or epsilon < 0 or (epsilon_high is not None and epsilon_high < 0):
        raise ValueError(f"beta={beta}, epsilon={epsilon}, epsilon_high={epsilon_high} must be >= 0")
    if beta > 0 and ref_logp is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logp (reference-model log-probs) for the KL term")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < 1):
        raise ValueError("loss_type='dr_grpo' needs max_completion_length >= 1 (its constant denominator)")
    if logp.dim() != 2:
        raise ValueError(f"logp must be (B, T), got {tuple(logp.shape)}")
    for name, other in (("old_logp", old_logp), ("ref_logp", ref_logp), ("completion_mask", completion_mask)):
        if other is not None and tuple(other.shape) != tuple(logp.shape):
            raise ValueError(f"{name} shape {tuple(other.shape)} must equal logp shape {tuple(logp.shape)}")
    if advantages.numel() != logp.shape[0]:
        raise ValueError(
            f"advantages must hold one value per sequence ({logp.shape[0]}), got {tuple(advantages.shape)}"
        )
    eps_high = epsilon if epsilon_high is None else epsilon_high

    mask = completion_mask.bool()
    logp = logp.float()
    old = logp.detach() if old_logp is None else old_logp.float()
    adv = advantages.reshape(-1, 1).float()
    # Masked positions are set to a neutral 0 before exp: padding can hold arbitrary log-probs, and
    # exp(large) = inf would turn into NaN (inf * 0) in both the loss and its gradient.
    log_ratio = torch.where(mask, logp - old, 0.0)
    if importance_sampling_level == "sequence":
        # (B, 1), broadcast over the tokens below: one clip decision per completion
        log_ratio = log_ratio.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1)
    ratio = torch.exp(log_ratio)
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=eps_high).detach() * adv * torch.where(mask, logp, 0.0)
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token = -sapo_gate(ratio, tau) * adv
    elif loss_type == "vespo":
        phi = vespo_weights(logp - old, mask, adv, k_pos=vespo_k_pos, lambda_pos=vespo_lambda_pos, k_neg=vespo_k_neg,
                            lambda_neg=vespo_lambda_neg, engine_weights=sampling_weights)
        per_token = -phi * adv * torch.where(mask, logp, 0.0)
    else:
        clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
        unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
        per_token = -torch.minimum(unclipped * adv, clipped * adv)
    if sampling_weights is not None and loss_type != "vespo":  # VESPO folds them into its sequence weight
        per_token = per_token * sampling_weights.float()
    if loss_weights is not None:
        per_token = per_token * loss_weights.float()

    kl = None
    if ref_logp is not None:
        # k3 estimator of KL(pi || ref): exp(d) - d - 1 with d = ref - logp; unbiased, always >= 0.
        d = torch.where(mask, ref_logp.float() - logp, 0.0)
        kl = torch.exp(d) - d - 1
        if beta > 0:
            per_token = per_token + beta * (kl * ratio if use_bias_correction_kl else kl)

    per_token = torch.where(mask, per_token, 0.0)
    total = per_token.sum()
    if loss_type in ("grpo", "sapo"):
        loss = (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = total / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        loss = total / (logp.shape[0] * max_completion_length)
    elif loss_type == "luspo":
        loss = per_token.sum(dim=1).mean()
    else:  # GLOBAL_TOKEN_LOSS_TYPES
        if num_items_in_batch is None:
            denominator = mask.sum().clamp(min=1).float()
        else:
            denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=logp.device)
            denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        loss = total / denominator

    with torch.no_grad():
        ratio = ratio.expand_as(mask)  # sequence level: the metrics count a completion's tokens, as the token level
        if loss_type == "cispo":  # the cap lowers the weight whatever the advantage's sign
            low, high = torch.zeros_like(mask), (ratio > eps_high) & mask
        else:
            low = (ratio < 1 - epsilon) & (adv < 0) & mask
            high = (ratio > 1 + eps_high) & (adv > 0) & mask
        metrics = {
            "clip_fraction_low": masked_mean(low.float(), mask),
            "clip_fraction_high": masked_mean(high.float(), mask),
            "clip_fraction": masked_mean((low | high).float(), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl, mask)
        if loss_type == "vespo":
            rows = mask.any(dim=1, keepdim=True)
            metrics["vespo_phi_mean"] = masked_mean(phi, rows)
    return loss, {k: v.detach() for k, v in metrics.items()}


# ------------------------------------------------------------------ off-policy correction of engine samples
IS_MODES = ("truncate", "mask")


def importance_sampling_weights(
    trainer_logp: Tensor,
    sampler_logp: Tensor,
    completion_mask: Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated (or masked) importance weights pi_trainer / pi_sampler of samples drawn by another engine.

    A rollout engine (vLLM) samples with kernels and a dtype of its own, so its probabilities differ from the
    trainer's for the same weights: the samples are slightly off-policy. Weighting each token's loss by
    rho = exp(trainer_logp - sampler_logp), bounded, corrects for it (truncated importance sampling, Yao et al.
    2025, "Your efficient RL framework secretly brings you off-policy RL training"; TRL's
    `vllm_importance_sampling_correction`).

    Args:
        trainer_logp: `(B, T)` the trainer's log-probs of the sampled tokens under the sampling policy (the
            old-policy log-probs).
        sampler_logp: `(B, T)` the engine's log-probs of the same tokens, as it sampled them.
        completion_mask: `(B, T)` 1 for completion tokens; other positions never count.
        level: `token`: rho per token; `sequence`: rho = exp(sum over the completion of the differences), one
            weight for all of its tokens.
        mode: `truncate`: rho clipped to [clip_min, clip_max]; `mask`: weight 0 where rho lies outside.
        clip_min: Lower bound (`None` = none).
        clip_max: Upper bound (`None` = none).

    Returns:
        `(weights, metrics)`: weights `(B, T)` for `token`, `(B, 1)` for `sequence`; metrics (detached scalars)
        `ratio_mean`, `ratio_max`, `ratio_min` of the raw rho over completion tokens (sequences for `sequence`),
        `corrected_fraction`, the share of them that the bound clipped or masked, and `count`, how many there
        are (to combine micro-batches).
    """
    if level not in IS_LEVELS:
        raise ValueError(f"importance sampling level={level!r}: allowed values are {', '.join(IS_LEVELS)}")
    if mode not in IS_MODES:
        raise ValueError(f"importance sampling mode={mode!r}: allowed values are {', '.join(IS_MODES)}")
    if tuple(trainer_logp.shape) != tuple(sampler_logp.shape) or tuple(completion_mask.shape) != tuple(
            trainer_logp.shape):
        raise ValueError(f"trainer_logp {tuple(trainer_logp.shape)}, sampler_logp {tuple(sampler_logp.shape)} and "
                         f"completion_mask {tuple(completion_mask.shape)} must have one shape (B, T)")
    if clip_min is not None and clip_max is not None and clip_min >= clip_max:
        raise ValueError(f"clip_min={clip_min} must be < clip_max={clip_max}")
    mask = completion_mask.bool()
    # NaN (an engine that reported no log-prob) and padding count as a zero difference: weight exactly 1
    diff = torch.nan_to_num(torch.where(mask, trainer_logp.float() - sampler_logp.float(), 0.0), nan=0.0)
    if level == "sequence":
        diff = diff.sum(dim=1, keepdim=True)
        counted = mask.any(dim=1, keepdim=True)
    else:
        counted = mask
    ratio = torch.exp(diff)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    outside = (ratio < low) | (ratio > high)
    if mode == "mask":
        weights = ratio.masked_fill(outside, 0.0)
    else:
        weights = ratio if clip_min is None and clip_max is None else ratio.clamp(min=clip_min, max=clip_max)
    with torch.no_grad():
        values = ratio[counted]
        empty = values.numel() == 0
        zero = ratio.new_zeros(())
        metrics = {"ratio_mean": zero if empty else values.mean(), "ratio_max": zero if empty else values.max(),
                   "ratio_min": zero if empty else values.min(),
                   "corrected_fraction": zero if empty else outside[counted].float().mean(),
                   "count": ratio.new_tensor(float(values.numel()))}
    return weights.detach(), {k: v.detach() for k, v in metrics.items()}
