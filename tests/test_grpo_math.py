"""GRPO math on hand-made tensors: advantages, chunked log-probs, the clipped loss and its aggregations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gainrl_pl.grpo import (
    LOSS_TYPES,
    adaptive_entropy_coef,
    batch_normalize,
    compute_advantages,
    high_entropy_mask,
    normalized_reward_sum,
    off_policy_sequence_mask,
    policy_loss,
    sapo_gate,
    selective_log_softmax,
    token_entropy,
    token_logprobs,
    token_logprobs_and_entropy,
    vespo_weights,
)

EPS = 1e-4  # TRL's std epsilon, the default of compute_advantages


# ----------------------------------------------------------------------------------------------- advantages
def test_group_advantages_by_hand():
    # r = [1, 0, 0, 0]: mean 0.25; deviations 0.75, -0.25 x3; sum of squares 0.5625 + 3 * 0.0625 = 0.75;
    # unbiased var 0.75 / 3 = 0.25 -> std 0.5; A = dev / (0.5 + 1e-4)
    adv = compute_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    expected = torch.tensor([[0.75, -0.25, -0.25, -0.25]]) / (0.5 + EPS)
    torch.testing.assert_close(adv, expected)


def test_batch_and_none_scaling_by_hand():
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # centred per group: [[0.5, -0.5], [0, 0]]; batch std of [1, 0, 1, 1]: mean 0.75, squares of
    # 0.25, -0.75, 0.25, 0.25 sum to 0.75, / 3 = 0.25 -> std 0.5
    torch.testing.assert_close(
        compute_advantages(rewards, "batch"), torch.tensor([[0.5, -0.5], [0.0, 0.0]]) / (0.5 + EPS)
    )
    # Dr. GRPO: only centred. [[1, 0], [3, 1]] -> means 0.5, 2 -> [[0.5, -0.5], [1, -1]]
    torch.testing.assert_close(
        compute_advantages(torch.tensor([[1.0, 0.0], [3.0, 1.0]]), "none"),
        torch.tensor([[0.5, -0.5], [1.0, -1.0]]),
    )


def test_batch_scaling_with_a_global_std_splits_like_the_whole_batch():
    """Under DDP each rank holds part of the batch: with the global std, the parts' advantages are the whole's."""
    whole = torch.tensor([[1.0, 0.0], [4.0, 1.0], [2.0, 2.0], [0.0, 3.0]])
    parts = whole[:2], whole[2:]
    local = [compute_advantages(p, "batch") for p in parts]
    assert not torch.allclose(torch.cat(local), compute_advantages(whole, "batch"))  # local stds differ
    shared = [compute_advantages(p, "batch", batch_std=whole.std()) for p in parts]
    torch.testing.assert_close(torch.cat(shared), compute_advantages(whole, "batch"))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_groups_give_exact_zero_and_single_completion_groups_too(scale):
    # 0.1 is not exact in binary: the mean of three 0.1s is off by an ulp, yet the advantage must be 0
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 0.0, 0.5], [7.0, 7.0, 7.0]])
    adv = compute_advantages(rewards, scale)
    assert torch.equal(adv[0], torch.zeros(3)) and torch.equal(adv[2], torch.zeros(3))
    assert adv[1].abs().sum() > 0
    single = compute_advantages(torch.tensor([[3.0], [0.0]]), scale)  # G = 1: undefined std -> 0, not NaN
    assert torch.equal(single, torch.zeros(2, 1))


def test_advantage_errors():
    with pytest.raises(ValueError, match="scale_rewards='std'.*group, batch, none"):
        compute_advantages(torch.zeros(2, 2), "std")
    with pytest.raises(ValueError, match="NaN"):
        compute_advantages(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="num_prompts, G"):
        compute_advantages(torch.zeros(4))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.floats(-10, 10), min_size=3, max_size=3), min_size=1, max_size=5),
    st.sampled_from(["group", "batch", "none"]),
)
def test_advantages_are_centred_and_finite(rows, scale):
    adv = compute_advantages(torch.tensor(rows, dtype=torch.float64), scale)
    assert torch.isfinite(adv).all()
    assert torch.allclose(adv.sum(dim=1), torch.zeros(len(rows), dtype=torch.float64), atol=1e-6)


# ------------------------------------------------------------------- GDPO: normalise each reward, then sum
def test_normalize_then_sum_by_hand():
    """G = 2, accuracy (weight 1) and a format bonus (weight 0.2).

    group 0: accuracy [1, 0] -> mean 0.5, unbiased std 0.5 sqrt(2) = 0.70711 -> +-0.5 / (0.70711 + 1e-4);
             format [0.5, 0.5] constant -> 0.
    group 1: accuracy [1, 1] -> 0; format [1, 0] -> +-0.5 / (0.70711 + 1e-4), x 0.2.
    Summing first (GRPO) would give both groups the same +-0.707: the bonus would weigh as much as accuracy.
    """
    per_function = torch.tensor([[1.0, 0.5], [0.0, 0.5], [1.0, 1.0], [1.0, 0.0]])
    unit = 0.5 / (0.5 * math.sqrt(2) + EPS)
    summed = normalized_reward_sum(per_function, torch.tensor([1.0, 0.2]), num_generations=2)
    torch.testing.assert_close(summed, torch.tensor([unit, -unit, 0.2 * unit, -0.2 * unit]))
    grpo = compute_advantages((per_function * torch.tensor([1.0, 0.2])).sum(1).view(2, 2)).reshape(-1)
    small = 0.1 / (0.1 * math.sqrt(2) + EPS)  # group 1 totals [1.2, 1.0]: +-0.1 over their std, also ~0.707
    torch.testing.assert_close(grpo, torch.tensor([unit, -unit, small, -small]))


def test_normalize_then_sum_skips_not_applicable_rewards():
    # G = 3, one function; None (NaN) on the middle completion: normalised over the other two, the middle gets 0.
    # A group of one applicable value or of all-equal values contributes exactly 0, never NaN.
    per_function = torch.tensor([[1.0], [float("nan")], [0.0], [0.3], [float("nan")], [float("nan")],
                                 [0.7], [0.7], [0.7]])
    summed = normalized_reward_sum(per_function, torch.ones(1), num_generations=3)
    unit = 0.5 / (0.5 * math.sqrt(2) + EPS)
    torch.testing.assert_close(summed, torch.tensor([unit, 0.0, -unit, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="groups x G"):
        normalized_reward_sum(per_function[:4], torch.ones(1), num_generations=3)
    with pytest.raises(ValueError, match="weights for 1 reward functions"):
        normalized_reward_sum(per_function, torch.ones(2), num_generations=3)


def test_batch_normalize():
    # [1, 2, 3]: mean 2, unbiased std 1; given global statistics (DDP) replace the local ones
    torch.testing.assert_close(batch_normalize(torch.tensor([1.0, 2.0, 3.0])),
                               torch.tensor([-1.0, 0.0, 1.0]) / (1 + EPS))
    torch.testing.assert_close(batch_normalize(torch.tensor([1.0, 3.0]), mean=0.0, std=2.0),
                               torch.tensor([1.0, 3.0]) / (2 + EPS))
    assert batch_normalize(torch.tensor([5.0])).item() == 0.0  # one value: its own mean, std 0


# ----------------------------------------------------------------------------------------------- log-probs
def reference_logprobs(logits, ids, temperature=1.0):
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [1, 3, 100, None])
def test_token_logprobs_equal_log_softmax_gather(temperature, chunk_size):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    ids = torch.randint(0, 11, (3, 5), generator=g)
    out = token_logprobs(logits, ids, temperature=temperature, chunk_size=chunk_size)
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    torch.testing.assert_close(out, reference_logprobs(logits, ids, temperature))


def test_bf16_logits_and_non_contiguous_view():
    g = torch.Generator().manual_seed(1)
    full = (torch.randn(2, 7, 50, generator=g) * 4).bfloat16()
    logits = full[:, :-1]  # what the module passes: not contiguous, must not be copied or mis-indexed
    ids = torch.randint(0, 50, (2, 6), generator=g)
    out = token_logprobs(logits, ids, temperature=0.9, chunk_size=4)
    assert out.dtype == torch.float32  # computed in float32 from the bf16 logits
    torch.testing.assert_close(out, reference_logprobs(logits, ids, 0.9), atol=1e-5, rtol=1e-5)
    # 2-D (N, V) input works too
    torch.testing.assert_close(
        selective_log_softmax(logits[0], ids[0], chunk_size=2),
        reference_logprobs(logits[0], ids[0]),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_gradient_matches_autograd_reference(dtype):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(2, 4, 9, generator=g).to(dtype)
    ids = torch.randint(0, 9, (2, 4), generator=g)
    weights = torch.randn(2, 4, generator=g)
    a = base.clone().requires_grad_()
    (token_logprobs(a, ids, temperature=0.8, chunk_size=3) * weights).sum().backward()
    b = base.clone().requires_grad_()
    (reference_logprobs(b, ids, 0.8) * weights).sum().backward()
    assert a.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=tol, rtol=tol)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.randint(0, 5, (2, 3), generator=g)
    assert torch.autograd.gradcheck(
        lambda x: selective_log_softmax(x, ids, chunk_size=2, temperature=1.3), (logits,)
    )


def test_chunked_path_allocates_no_full_vocab_copy():
    """One chunk (here 1 row) of float32 at a time: neither saved for backward nor allocated in forward."""
    B, T, V = 2, 16, 512
    logits = torch.randn(B, T, V).bfloat16().requires_grad_()
    ids = torch.randint(0, V, (B, T))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = token_logprobs(logits, ids, chunk_size=1)
    torch.testing.assert_close(out, reference_logprobs(logits.detach(), ids), atol=1e-5, rtol=1e-5)
    # saved for backward: the bf16 logits themselves, the ids, one logsumexp per token; no float32 copy
    assert not [t for t in saved if t.dtype == torch.float32 and t.numel() >= B * T * V]

    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        token_logprobs(logits, ids, chunk_size=1)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert biggest < B * T * V * 4 // 4, (
        f"an op allocated {biggest} bytes; a full float32 copy is {B * T * V * 4}"
    )


def test_token_entropy_chunked():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 13, generator=g).bfloat16()
    x = logits.float() / 0.7
    expected = -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)
    for chunk in (1, 4, None):
        torch.testing.assert_close(token_entropy(logits, temperature=0.7, chunk_size=chunk), expected)
    # uniform logits: entropy log V; a -inf (masked) logit adds nothing instead of NaN
    assert torch.allclose(token_entropy(torch.zeros(1, 2, 8)), torch.full((1, 2), math.log(8)))
    masked = torch.zeros(1, 1, 4)
    masked[..., 0] = float("-inf")
    assert torch.allclose(token_entropy(masked), torch.full((1, 1), math.log(3)))


def test_entropy_gradient_matches_autograd_and_survives_a_masked_logit():
    # entropy_coef trains on the entropy the chunked pass returns: its gradient (alone and beside the log-probs')
    # must be the plain softmax entropy's
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2, 4, 11, generator=g)
    base[0, 1, 3] = float("-inf")  # a masked vocabulary entry: p = 0 there, gradient 0, never NaN
    ids = torch.randint(4, 11, (2, 4), generator=g)
    w_logp, w_h = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    for use_logp in (True, False):
        a = base.clone().requires_grad_()
        logp, entropy = token_logprobs_and_entropy(a, ids, temperature=0.8, chunk_size=3)
        ((logp * w_logp).sum() * use_logp + (entropy * w_h).sum()).backward()
        b = base.clone().requires_grad_()
        x = torch.where(torch.isinf(b), -1e9, b) / 0.8  # autograd through a -inf gives NaN: a finite "masked"
        plain_h = -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)
        ((reference_logprobs(b, ids, 0.8) * w_logp).sum() * use_logp + (plain_h * w_h).sum()).backward()
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)
    g64 = torch.randn(2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    ids64 = torch.randint(0, 5, (2, 3), generator=g)
    assert torch.autograd.gradcheck(lambda x: token_logprobs_and_entropy(x, ids64, temperature=1.3, chunk_size=2),
                                    (g64,))


# ----------------------------------------------------------------------------------------------- the loss
def two_sequences():
    """Ratios chosen to hit each clip case. Sequence 0 (A = +1) has 2 tokens, sequence 1 (A = -0.5) has 3.

    eps = 0.2:
      seq 0, r = 1.5: min(1.5 * 1, 1.2 * 1) = 1.2 -> loss -1.2   (clipped high)
      seq 0, r = 0.9: min(0.9, 0.9) = 0.9        -> loss -0.9
      seq 1, r = 1.1: min(-0.55, -0.55)          -> loss 0.55
      seq 1, r = 0.7: min(-0.35, 0.8 * -0.5 = -0.4) = -0.4 -> loss 0.4  (clipped low)
      seq 1, r = 1.0:                             -> loss 0.5
    sums: seq 0 = -2.1, seq 1 = 1.45, all = -0.65 over 5 tokens.
    """
    ratios = torch.tensor([[1.5, 0.9, 1.0], [1.1, 0.7, 1.0]])
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.5, -2.5]])
    logp = (old + ratios.log()).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    advantages = torch.tensor([1.0, -0.5])
    return logp, old, advantages, mask


@pytest.mark.parametrize(
    "loss_type, kwargs, expected",
    [
        ("grpo", {}, (-2.1 / 2 + 1.45 / 3) / 2),  # per-sequence means, then their mean = -0.283333
        ("bnpo", {}, -0.65 / 5),  # all tokens of the batch = -0.13
        ("dr_grpo", {"max_completion_length": 4}, -0.65 / (2 * 4)),  # constant denominator = -0.08125
        ("luspo", {}, (-2.1 + 1.45) / 2),  # per-sequence sums, then their mean = -0.325
        ("dapo", {"num_items_in_batch": 10}, -0.65 / 10),  # the global batch's 10 tokens = -0.065
        ("dapo", {}, -0.65 / 5),  # no global count: local tokens, same as bnpo
    ],
)
def test_each_loss_type_by_hand(loss_type, kwargs, expected):
    logp, old, adv, mask = two_sequences()
    loss, metrics = policy_loss(logp, old, None, adv, mask, loss_type=loss_type, epsilon=0.2, **kwargs)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["clip_fraction_high"].item() == pytest.approx(1 / 5)  # seq 0, r = 1.5 > 1.2 with A > 0
    assert metrics["clip_fraction_low"].item() == pytest.approx(1 / 5)  # seq 1, r = 0.7 < 0.8 with A < 0
    assert metrics["clip_fraction"].item() == pytest.approx(2 / 5)
    assert metrics["ratio_mean"].item() == pytest.approx((1.5 + 0.9 + 1.1 + 0.7 + 1.0) / 5)
    assert "kl" not in metrics and all(not v.requires_grad for v in metrics.values())


def test_cispo_by_hand():
    # weight w = min(r, 1.2), no gradient; loss_t = -w * A * logp_t, summed and divided by the global token count
    logp, old, adv, mask = two_sequences()
    loss, metrics = policy_loss(logp, old, None, adv, mask, loss_type="cispo", epsilon_high=1.2, num_items_in_batch=10)
    rows = [(1.2, 1.0, -1.0 + math.log(1.5)), (0.9, 1.0, -2.0 + math.log(0.9)),  # r = 1.5 capped at 1.2
            (1.1, -0.5, -0.5 + math.log(1.1)), (0.7, -0.5, -1.5 + math.log(0.7)), (1.0, -0.5, -2.5)]
    assert loss.item() == pytest.approx(sum(-w * a * lp for w, a, lp in rows) / 10, abs=1e-6)
    loss.backward()
    # d/d logp_t = -w * A / 10: the capped token keeps a gradient, the clip would have zeroed it
    expected = torch.tensor([[-1.2, -0.9, 0.0], [0.55, 0.35, 0.5]]) / 10
    torch.testing.assert_close(logp.grad, expected)
    assert metrics["clip_fraction_high"].item() == pytest.approx(1 / 5) and metrics["clip_fraction_low"].item() == 0


def test_sapo_by_hand():
    # gate(r, tau) = sigmoid(tau * (r - 1)) * 4 / tau, tau 1.0 for A > 0 and 1.05 otherwise; loss_t = -gate * A,
    # aggregated as grpo (per-sequence means, then their mean)
    logp, old, adv, mask = two_sequences()
    loss, _ = policy_loss(logp, old, None, adv, mask, loss_type="sapo")

    def gate(r, tau):
        return 4 / tau / (1 + math.exp(-tau * (r - 1)))

    seq0 = (-gate(1.5, 1.0) - gate(0.9, 1.0)) / 2
    seq1 = 0.5 * (gate(1.1, 1.05) + gate(0.7, 1.05) + gate(1.0, 1.05)) / 3
    assert loss.item() == pytest.approx((seq0 + seq1) / 2, abs=1e-6)
    # the gate's slope at r = 1 is 1 for any tau: on-policy SAPO is GRPO
    r = torch.tensor([1.0, 1.0], requires_grad=True)
    sapo_gate(r, torch.tensor([0.5, 3.0])).sum().backward()
    torch.testing.assert_close(r.grad, torch.ones(2))
    # far off-policy the gate fades where a clip would cut: r = 3 with A = 1 keeps r * 4 * sigmoid'(2) = 1.26 of
    # the unclipped ratio's 3 (the clip's: 0)
    logp2 = torch.tensor([[math.log(3.0)]], requires_grad=True)
    policy_loss(logp2, torch.zeros(1, 1), None, torch.ones(1), torch.ones(1, 1), loss_type="sapo")[0].backward()
    sig = 1 / (1 + math.exp(-2.0))
    assert -logp2.grad.item() == pytest.approx(3 * 4 * sig * (1 - sig), rel=1e-5)


@pytest.mark.parametrize("loss_type, same_as", [("cispo", "dapo"), ("sapo", "grpo"), ("vespo", "dapo")])
def test_cispo_and_sapo_have_the_grpo_gradient_on_policy(loss_type, same_as):
    gen = torch.Generator().manual_seed(1)
    base = -torch.rand(3, 4, generator=gen) * 3
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    adv = torch.tensor([0.7, -1.3, 0.4])
    grads = []
    for kind in (loss_type, same_as):
        logp = base.clone().requires_grad_()
        policy_loss(logp, None, None, adv, mask, loss_type=kind, epsilon_high=5.0 if kind == "cispo" else None,
                    num_items_in_batch=9)[0].backward()
        grads.append(logp.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_vespo_weights_by_hand():
    # phi(w) = e^lambda * w^k * e^(-lambda w): A >= 0 uses (k, lambda) = (2, 3), A < 0 uses (3, 2); w is the product
    # of the completion's token ratios (the padding's 9.0 never counts)
    log_ratio = torch.tensor([[math.log(2) / 2, math.log(2) / 2, 9.0], [0.3, -0.3, 0.0], [math.log(0.5), 0.0, 0.0],
                              [60.0, 60.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.0, 0.0, -1.0, 1.0])
    phi = vespo_weights(log_ratio, mask, adv)
    expected = [4 * math.exp(-3), 1.0, math.exp(2) * 0.125 * math.exp(-1), 0.0]  # w = 2, 1, 0.5, e^120 -> 0
    assert phi.shape == (4, 1) and phi.squeeze(1).tolist() == pytest.approx(expected, abs=1e-6)
    # the engine's token weights fold into w: ratio 1 times engine weights (2, 1) is w = 2
    folded = vespo_weights(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1), engine_weights=torch.tensor([[2.0, 1.0]]))
    assert folded.item() == pytest.approx(4 * math.exp(-3))
    assert vespo_weights(torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1),
                         engine_weights=torch.tensor([[2.0]])).item() == pytest.approx(4 * math.exp(-3))  # sequence level


def test_vespo_loss_by_hand_with_engine_weights_folded_not_multiplied():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]], requires_grad=True)
    old = logp.detach() - torch.tensor([[math.log(2), 0.0], [0.0, 0.0]])  # seq 0: w = 2; seq 1: w = 1
    adv = torch.tensor([1.0, -0.5])
    mask = torch.ones(2, 2)
    engine = torch.tensor([[1.0, 1.0], [1.0, 3.0]])  # seq 1 becomes w = 3 (phi from the A < 0 pair), never x 3 per token
    loss, metrics = policy_loss(logp, old, None, adv, mask, loss_type="vespo", num_items_in_batch=4,
                                sampling_weights=engine)
    phi0, phi1 = 4 * math.exp(-3), math.exp(2) * 27 * math.exp(-6)
    assert loss.item() == pytest.approx((phi0 * 3.0 - phi1 * 0.5 * 2.0) / 4, abs=1e-6)  # -phi * A * logp summed
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-phi0, -phi0], [0.5 * phi1, 0.5 * phi1]]) / 4)
    assert metrics["vespo_phi_mean"].item() == pytest.approx((phi0 + phi1) / 2)
    # loss weights (the entropy and off-policy masks) still multiply: dropping seq 1 leaves seq 0's term
    dropped, _ = policy_loss(logp, old, None, adv, mask, loss_type="vespo", num_items_in_batch=4,
                             sampling_weights=engine, loss_weights=torch.tensor([[1.0], [0.0]]))
    assert dropped.item() == pytest.approx(phi0 * 3.0 / 4, abs=1e-6)


def test_asymmetric_epsilon_high():
    # epsilon_high = 0.6: r = 1.5 < 1.6 is no longer clipped: seq 0 token 0 loss -1.5, total -0.95 / 5
    logp, old, adv, mask = two_sequences()
    loss, metrics = policy_loss(logp, old, None, adv, mask, loss_type="bnpo", epsilon=0.2, epsilon_high=0.6)
    assert loss.item() == pytest.approx(-0.95 / 5, abs=1e-6)
    assert metrics["clip_fraction_high"].item() == 0.0
    assert metrics["clip_fraction_low"].item() == pytest.approx(1 / 5)  # the low side still uses epsilon


@pytest.mark.parametrize(
    "ratio, advantage, delta, expected_loss, expected_grad",
    [
        (
            1.5,
            -1.0,
            None,
            1.5,
            1.5,
        ),  # A < 0, ratio high: min picks the unclipped -1.5 (pessimistic), grad flows
        (1.5, -1.0, 1.3, 1.3, 0.0),  # two-sided clip: the ratio is capped at delta = 1.3, gradient stops
        (0.5, 1.0, None, -0.5, -0.5),  # A > 0, ratio low: unclipped 0.5 < 0.8, gradient flows
        (1.5, 1.0, None, -1.2, 0.0),  # A > 0, ratio high: clipped at 1.2, no gradient
        (0.5, -1.0, None, 0.8, 0.0),  # A < 0, ratio low: clipped at 0.8, no gradient
    ],
)
def test_single_token_clipping_and_gradient(ratio, advantage, delta, expected_loss, expected_grad):
    # one token: loss = -min(r A, clip(r) A); d loss / d logp = -A r when the unclipped term is active
    old = torch.tensor([[-1.0]])
    logp = (old + math.log(ratio)).requires_grad_()
    loss, _ = policy_loss(
        logp,
        old,
        None,
        torch.tensor([advantage]),
        torch.ones(1, 1),
        loss_type="bnpo",
        epsilon=0.2,
        delta=delta,
    )
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    assert logp.grad.item() == pytest.approx(expected_grad, abs=1e-6)


def test_ratio_one_without_old_logp_still_has_gradient():
    # old_logp None -> logp.detach(): ratio exactly 1, and d(-r A)/d logp = -A = -2 per token, / 2 tokens
    logp = torch.tensor([[-0.3, -1.2, -5.0]], requires_grad=True)
    loss, metrics = policy_loss(
        logp, None, None, torch.tensor([2.0]), torch.tensor([[1, 1, 0]]), loss_type="bnpo"
    )
    loss.backward()
    assert loss.item() == pytest.approx(-2.0)
    assert metrics["ratio_mean"].item() == 1.0
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, -1.0, 0.0]]))  # padding gets no gradient


def test_kl_k3_values_and_gradient():
    # d = ref - logp: k3 = e^d - d - 1. d = 0 -> 0; d = ln 2 -> 2 - ln 2 - 1 = 0.306853;
    # d = -ln 2 -> 0.5 + ln 2 - 1 = 0.193147. The two non-zero terms sum to exactly 0.5.
    logp = torch.tensor([[-1.0, -1.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0 + math.log(2), -1.0 - math.log(2)]])
    loss, metrics = policy_loss(logp, None, ref, torch.zeros(1), torch.ones(1, 3), loss_type="bnpo", beta=0.1)
    assert metrics["kl"].item() == pytest.approx(0.5 / 3, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * 0.5 / 3, abs=1e-6)  # A = 0: the loss is beta * mean KL
    loss.backward()
    # d/d logp [beta (e^d - d - 1)] = beta (1 - e^d), / 3 tokens: 0, 0.1 * (1 - 2) / 3, 0.1 * (1 - 0.5) / 3
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.1 / 3, 0.05 / 3]]))
    # with beta = 0 a given reference is still measured, but does not enter the loss
    loss0, metrics0 = policy_loss(
        logp, None, ref, torch.zeros(1), torch.ones(1, 3), loss_type="bnpo", beta=0.0
    )
    assert loss0.item() == 0.0 and metrics0["kl"].item() == pytest.approx(0.5 / 3, abs=1e-6)


def test_bias_corrected_kl_adds_the_ratio_gradient():
    # beta * k3 * r with r = 1 on-policy: the same value, gradient beta * ((1 - e^d) + k3) per token
    logp = torch.tensor([[-1.0, -1.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0 + math.log(2), -1.0 - math.log(2)]])
    loss, metrics = policy_loss(logp, None, ref, torch.zeros(1), torch.ones(1, 3), loss_type="bnpo", beta=0.1,
                                use_bias_correction_kl=True)
    assert loss.item() == pytest.approx(0.1 * 0.5 / 3, abs=1e-6) and metrics["kl"].item() == pytest.approx(0.5 / 3)
    loss.backward()
    k3 = [0.0, 2 - math.log(2) - 1, 0.5 + math.log(2) - 1]
    expected = [0.1 * (1 - e + k) / 3 for e, k in zip([1.0, 2.0, 0.5], k3, strict=True)]
    torch.testing.assert_close(logp.grad, torch.tensor([expected]))
    # off-policy the value is weighted too: r = 2 doubles the KL term
    old = logp.detach() - math.log(2)
    loss2, _ = policy_loss(logp, old, ref, torch.zeros(1), torch.ones(1, 3), loss_type="bnpo", beta=0.1,
                           use_bias_correction_kl=True)
    assert loss2.item() == pytest.approx(2 * 0.1 * 0.5 / 3, abs=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_empty_mask_and_garbage_padding_never_nan(loss_type):
    logp = torch.tensor([[80.0, -3.0], [-90.0, 60.0]], requires_grad=True)  # exp(+-) overflows if unmasked
    old = torch.tensor([[-80.0, -3.0], [90.0, -60.0]])
    ref = torch.tensor([[90.0, -3.0], [-90.0, -60.0]])
    for mask in (torch.zeros(2, 2), torch.tensor([[0, 1], [0, 0]])):
        logp.grad = None
        loss, metrics = policy_loss(
            logp,
            old,
            ref,
            torch.tensor([1.0, -1.0]),
            mask,
            loss_type=loss_type,
            beta=0.1,
            epsilon_high=5.0 if loss_type == "cispo" else None,
            max_completion_length=2,
            num_items_in_batch=0 if mask.sum() == 0 else None,
        )
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
        assert all(torch.isfinite(v) for v in metrics.values())
        if mask.sum() == 0:
            assert loss.item() == 0.0 and metrics["clip_fraction"].item() == 0.0


def test_dapo_micro_batches_sum_to_the_whole_batch():
    # dapo divides every micro-batch by the global token count, so summing micro-batch losses equals
    # the loss of the whole batch (here == bnpo, whose denominator is the whole batch's token count)
    logp, old, adv, mask = two_sequences()
    whole, _ = policy_loss(logp, old, None, adv, mask, loss_type="bnpo")
    parts = [
        policy_loss(
            logp[i : i + 1],
            old[i : i + 1],
            None,
            adv[i : i + 1],
            mask[i : i + 1],
            loss_type="dapo",
            num_items_in_batch=int(mask.sum()),
        )[0]
        for i in range(2)
    ]
    assert sum(parts).item() == pytest.approx(whole.item(), abs=1e-6)


# ------------------------------------------------------------------------------ GSPO: the sequence-level ratio
def test_sequence_level_ratio_by_hand():
    """GSPO: s_i = exp(mean of the completion's token log-ratios), on every one of its tokens.

    seq 0: ratios 1.5, 0.9 -> s0 = (1.35)^(1/2) = 1.161895, A = 1: inside [0.8, 1.2], loss -s0 per token.
    seq 1: ratios 1.1, 0.7, 1.0 -> s1 = (0.77)^(1/3) = 0.916566, A = -0.5: loss 0.5 s1 per token.
    The token level clips seq 0's first token (1.5) and seq 1's second (0.7); the sequence level neither.
    """
    logp, old, adv, mask = two_sequences()
    s0, s1 = 1.35 ** 0.5, 0.77 ** (1 / 3)
    loss, metrics = policy_loss(logp, old, None, adv, mask, loss_type="bnpo", epsilon=0.2,
                                importance_sampling_level="sequence")
    assert loss.item() == pytest.approx((2 * -s0 + 3 * 0.5 * s1) / 5, abs=1e-6)
    assert metrics["clip_fraction"].item() == 0.0
    assert metrics["ratio_mean"].item() == pytest.approx((2 * s0 + 3 * s1) / 5, abs=1e-6)
    # grpo: mean over sequences of each one's token mean; d s_i / d logp_t = s_i / |y_i|
    loss, _ = policy_loss(logp, old, None, adv, mask, loss_type="grpo", epsilon=0.2,
                          importance_sampling_level="sequence")
    assert loss.item() == pytest.approx((-s0 + 0.5 * s1) / 2, abs=1e-6)
    loss.backward()
    expected = torch.tensor([[-s0 / 2 / 2] * 2 + [0.0], [0.5 * s1 / 3 / 2] * 3])
    torch.testing.assert_close(logp.grad, expected)


def test_sequence_level_clips_a_completion_as_a_whole():
    # epsilon 0.1: s0 = 1.162 > 1.1 with A > 0, so both of seq 0's tokens lose their gradient. The token level
    # clips only its first token (1.5); its second (0.9, below 1 with A > 0) keeps a gradient.
    grads = {}
    for level in ("token", "sequence"):
        logp, old, adv, mask = two_sequences()
        loss, metrics = policy_loss(logp, old, None, adv, mask, loss_type="bnpo", epsilon=0.1,
                                    importance_sampling_level=level)
        loss.backward()
        grads[level] = logp.grad
        if level == "sequence":
            assert metrics["clip_fraction_high"].item() == pytest.approx(2 / 5)  # both tokens of seq 0
    assert torch.equal(grads["sequence"][0], torch.zeros(3))
    assert grads["token"][0, 0] == 0 and grads["token"][0, 1] != 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_sequence_level_equals_token_level_on_policy(loss_type):
    # ratio 1 (old_logp None): d s_i / d logp_t = 1 / |y_i| and each of the |y_i| tokens carries s_i, so every
    # token's gradient is the token level's, whatever the aggregation (and with a KL term)
    gen = torch.Generator().manual_seed(0)
    base = -torch.rand(3, 5, generator=gen) * 3
    ref = base - torch.rand(3, 5, generator=gen) * 0.1
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    adv = torch.tensor([0.7, -1.3, 0.4])
    out = {}
    for level in ("token", "sequence"):
        logp = base.clone().requires_grad_()
        loss, _ = policy_loss(logp, None, ref, adv, mask, loss_type=loss_type, beta=0.04, max_completion_length=5,
                              num_items_in_batch=20, importance_sampling_level=level,
                              epsilon_high=5.0 if loss_type == "cispo" else None)
        loss.backward()
        out[level] = (loss.detach(), logp.grad)
    torch.testing.assert_close(out["sequence"][0], out["token"][0])
    torch.testing.assert_close(out["sequence"][1], out["token"][1])


# ---------------------------------------------------------------------- top_entropy_quantile: high-entropy tokens
def test_high_entropy_mask_by_hand():
    # completion entropies 1..5 (the padding's 9.0 must not count): the 0.6 quantile of [1, 2, 3, 4, 5] is
    # 1 + 0.6 * 4 = 3.4, so top 0.4 keeps 4 and 5
    entropy = torch.tensor([[1.0, 5.0, 9.0], [3.0, 2.0, 4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    kept = high_entropy_mask(entropy, mask, 0.4)
    assert kept.dtype == torch.bool
    assert kept.tolist() == [[False, True, False], [False, False, True]]
    assert high_entropy_mask(entropy, mask, 1.0).tolist() == mask.bool().tolist()  # 1.0: every completion token
    assert high_entropy_mask(torch.ones(2, 3), mask, 0.2).tolist() == mask.bool().tolist()  # ties all kept
    assert not high_entropy_mask(entropy, torch.zeros(2, 3), 0.2).any()  # no completion token, nothing kept
    with pytest.raises(ValueError, match=r"top_entropy_quantile=0 must be in \(0, 1\]"):
        high_entropy_mask(entropy, mask, 0)
    with pytest.raises(ValueError, match="entropy shape"):
        high_entropy_mask(entropy[:, :2], mask, 0.5)


def test_entropy_mask_as_weights_zeroes_the_policy_gradient_but_keeps_kl_and_denominator():
    # the module passes the mask as loss weights: the dropped tokens lose the policy term (zero gradient without
    # a KL), the kept ones keep exactly their gradient, and the denominator (dapo: the global token count) is unchanged
    logp, old, adv, mask = two_sequences()
    kept = torch.tensor([[1, 0, 0], [0, 1, 1]]).float()
    loss_all, _ = policy_loss(logp, old, None, adv, mask, loss_type="dapo", num_items_in_batch=5)
    loss_all.backward()
    full = logp.grad.clone()
    logp.grad = None
    loss, _ = policy_loss(logp, old, None, adv, mask, loss_type="dapo", num_items_in_batch=5, loss_weights=kept)
    loss.backward()
    torch.testing.assert_close(logp.grad, full * kept)


def test_off_policy_sequence_mask_by_hand():
    # mean log-ratio sampling / current over completion tokens: seq 0 = (0.9 + 0.3) / 2 = 0.6, seq 1 = 0.6 too, seq 2
    # = 0.1; the padding's 50 never counts and seq 3's NaN (an unscored token) counts as 0: (0 + 0.2) / 2 = 0.1
    current = torch.zeros(4, 3)
    sampled = torch.tensor([[0.9, 0.3, 50.0], [0.6, 0.6, 0.6], [0.1, 0.1, 0.1], [float("nan"), 0.2, 50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([-1.0, 0.5, -0.3, -2.0])
    keep = off_policy_sequence_mask(adv, current, sampled, mask, threshold=0.5)
    # seq 0: negative advantage, 0.6 > 0.5: dropped; seq 1: 0.6 but a positive advantage: kept; seqs 2, 3: 0.1
    assert keep.shape == (4, 1) and keep.squeeze(1).tolist() == [0.0, 1.0, 1.0, 1.0]
    assert off_policy_sequence_mask(adv, current, sampled, mask, threshold=0.7).all()
    with pytest.raises(ValueError, match="off_policy_mask_threshold=0 must be > 0"):
        off_policy_sequence_mask(adv, current, sampled, mask, threshold=0)


def test_adaptive_entropy_coef_by_hand():
    bounds = dict(target=1.0, delta=0.1, minimum=0.0, maximum=0.25)
    assert adaptive_entropy_coef(0.1, 0.5, **bounds) == pytest.approx(0.2)  # at or below the target: up
    assert adaptive_entropy_coef(0.1, 1.0, **bounds) == pytest.approx(0.2)
    assert adaptive_entropy_coef(0.2, 0.5, **bounds) == 0.25  # capped at the maximum
    assert adaptive_entropy_coef(0.1, 1.5, **bounds) == pytest.approx(0.0)  # above: down
    assert adaptive_entropy_coef(0.05, 1.5, **bounds) == 0.0  # floored at the minimum


def test_loss_argument_errors():
    logp, old, adv, mask = two_sequences()
    with pytest.raises(ValueError, match="loss_type='ppo'.*grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo"):
        policy_loss(logp, old, None, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match=r"'cispo' caps the importance weight itself at epsilon_high .*"
                                         r"epsilon_high=0.28 would scale down even on-policy tokens"):
        policy_loss(logp, old, None, adv, mask, loss_type="cispo", epsilon_high=0.28)
    with pytest.raises(ValueError, match="epsilon_high=None"):
        policy_loss(logp, old, None, adv, mask, loss_type="cispo")
    with pytest.raises(ValueError, match="delta=2.0 caps the ratio of the clipped losses .* loss_type='sapo'"):
        policy_loss(logp, old, None, adv, mask, loss_type="sapo", delta=2.0)
    with pytest.raises(ValueError, match="sapo_temperature_pos=0.0 .* must be > 0"):
        policy_loss(logp, old, None, adv, mask, loss_type="sapo", sapo_temperature_pos=0.0)
    with pytest.raises(ValueError, match="beta=0.1 > 0 needs ref_logp"):
        policy_loss(logp, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="dr_grpo.*max_completion_length"):
        policy_loss(logp, old, None, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="old_logp shape"):
        policy_loss(logp, old[:, :2], None, adv, mask)
    with pytest.raises(ValueError, match="one value per sequence"):
        policy_loss(logp, old, None, adv[:1], mask)
    with pytest.raises(ValueError, match="importance_sampling_level='seq'.*token, sequence"):
        policy_loss(logp, old, None, adv, mask, importance_sampling_level="seq")
