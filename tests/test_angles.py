"""angles.py: the O(L*d) angle concentration against the naive L x L definition, and its edge cases."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gainrl_pl.angles import AngleConcentration, angle_concentration, mean_pairwise_cosine, weighted_score


def naive(hidden, qmask, pmask, intra_diagonal=True):
    """The definition, spelled out: full cosine matrix in float64, means over the pairs."""
    intra, inter = [], []
    for x, q, p in zip(hidden.double(), qmask, pmask, strict=True):
        u = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        cos = u @ u.T
        qi, pi = q.nonzero().flatten(), p.nonzero().flatten()
        block = cos[qi][:, qi]
        if not intra_diagonal:
            off = ~torch.eye(len(qi), dtype=torch.bool)
            block = block[off]
        intra.append(block.mean().item() if block.numel() else 0.0)
        cross = cos[qi][:, pi]
        inter.append(cross.mean().item() if cross.numel() else 0.0)
    return torch.tensor(intra, dtype=torch.float64), torch.tensor(inter, dtype=torch.float64)


def naive_mean_cos(hidden, mask):
    out = []
    for x, m in zip(hidden.double(), mask, strict=True):
        u = x[m] / x[m].norm(dim=-1, keepdim=True).clamp_min(1e-12)
        n = len(u)
        out.append(((u @ u.T).sum() - (u * u).sum()).item() / (n * (n - 1)) if n >= 2 else 0.0)
    return torch.tensor(out, dtype=torch.float64)


@st.composite
def batches(draw, min_question=2, min_prefix=1):
    """Hidden states [B, L, d] with per-token labels: 0 = neither (padding/suffix), 1 = prefix, 2 = question."""
    b = draw(st.integers(1, 3))
    d = draw(st.integers(1, 8))
    rows = []
    for _ in range(b):
        n_p, n_q, n_o = draw(st.integers(min_prefix, 6)), draw(st.integers(min_question, 6)), draw(st.integers(0, 4))
        labels = [1] * n_p + [2] * n_q + [0] * n_o
        rows.append(draw(st.permutations(labels)) if draw(st.booleans()) else labels)
    length = max(len(r) for r in rows)
    labels = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # An offset shared by all tokens makes them anisotropic, like real last-layer states.
    hidden = torch.randn(b, length, d, generator=gen) + draw(st.floats(0, 3)) * torch.randn(1, 1, d, generator=gen)
    return hidden, labels == 2, labels == 1


@settings(max_examples=60, deadline=None)
@given(batches(), st.booleans())
def test_matches_naive_pairwise(batch, diagonal):
    hidden, q, p = batch
    got = angle_concentration(hidden, q, p, intra_diagonal=diagonal)
    intra, inter = naive(hidden, q, p, diagonal)
    assert got.intra.dtype == torch.float32 and got.inter.dtype == torch.float32
    torch.testing.assert_close(got.intra.double(), intra, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.inter.double(), inter, atol=1e-5, rtol=0)
    assert got.n_question.tolist() == q.sum(1).tolist() and got.n_prefix.tolist() == p.sum(1).tolist()


@settings(max_examples=30, deadline=None)
@given(batches(), st.booleans(), st.integers(0, 2**31 - 1))
def test_permutation_invariant(batch, diagonal, seed):
    """Reordering tokens (inside a segment or across the sequence) changes nothing."""
    hidden, q, p = batch
    perm = torch.randperm(hidden.shape[1], generator=torch.Generator().manual_seed(seed))
    a = angle_concentration(hidden, q, p, intra_diagonal=diagonal)
    b = angle_concentration(hidden[:, perm], q[:, perm], p[:, perm], intra_diagonal=diagonal)
    torch.testing.assert_close(a.intra, b.intra, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.inter, b.inter, atol=1e-5, rtol=0)


@settings(max_examples=20, deadline=None)
@given(batches())
def test_deterministic(batch):
    hidden, q, p = batch
    a, b = angle_concentration(hidden, q, p), angle_concentration(hidden, q, p)
    assert torch.equal(a.intra, b.intra) and torch.equal(a.inter, b.inter)


@settings(max_examples=40, deadline=None)
@given(batches(min_question=0, min_prefix=0), st.booleans())
def test_degenerate_segments_are_finite(batch, diagonal):
    hidden, q, p = batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = angle_concentration(hidden, q, p, intra_diagonal=diagonal)
    assert torch.isfinite(got.intra).all() and torch.isfinite(got.inter).all()
    intra, inter = naive(hidden, q, p, diagonal)  # naive gives 0.0 for empty means too
    torch.testing.assert_close(got.intra.double(), intra, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.inter.double(), inter, atol=1e-5, rtol=0)


def _masks(labels):
    labels = torch.tensor([labels])
    return labels == 2, labels == 1


def test_empty_question_warns_and_is_zero():
    q, p = _masks([1, 1, 0])
    with pytest.warns(UserWarning, match="empty question"):
        got = angle_concentration(torch.randn(1, 3, 4), q, p)
    assert got.intra.item() == 0.0 and got.inter.item() == 0.0


def test_empty_prefix_warns_inter_zero():
    q, p = _masks([2, 2, 0])
    with pytest.warns(UserWarning, match="empty prefix"):
        got = angle_concentration(torch.randn(1, 3, 4), q, p)
    assert got.inter.item() == 0.0 and 0 < got.intra.item() <= 1 + 1e-6


def test_single_token_question():
    q, p = _masks([1, 2])
    hidden = torch.randn(1, 2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with the diagonal, one token is well defined: cos(x, x) = 1
        assert angle_concentration(hidden, q, p).intra.item() == pytest.approx(1.0, abs=1e-6)
    with pytest.warns(UserWarning, match="one-token question"):
        assert angle_concentration(hidden, q, p, intra_diagonal=False).intra.item() == 0.0


def test_zero_vectors_and_masked_nan_do_not_give_nan():
    hidden = torch.randn(1, 5, 4)
    hidden[0, 1] = 0.0  # a zero hidden vector inside the question
    hidden[0, 4] = float("nan")  # garbage at a padded position must not leak through the masks
    q, p = _masks([1, 2, 2, 2, 0])
    got = angle_concentration(hidden, q, p, intra_diagonal=False)
    assert torch.isfinite(got.intra).all() and torch.isfinite(got.inter).all()
    ref = naive(hidden[:, :4], q[:, :4], p[:, :4], intra_diagonal=False)
    torch.testing.assert_close(got.intra.double(), ref[0], atol=1e-6, rtol=0)
    assert torch.isfinite(mean_pairwise_cosine(hidden, q | p)).all()


def test_bf16_input_computed_in_float32():
    hidden = torch.randn(2, 6, 16)
    q, p = _masks([1, 1, 2, 2, 2, 0])
    q, p = q.expand(2, -1), p.expand(2, -1)
    got = angle_concentration(hidden.bfloat16(), q, p)
    assert got.intra.dtype == torch.float32
    ref = angle_concentration(hidden.bfloat16().float(), q, p)
    assert torch.equal(got.intra, ref.intra)


def test_bad_inputs():
    hidden = torch.randn(1, 3, 4)
    q, p = _masks([1, 2, 2])
    with pytest.raises(ValueError, match="overlap"):
        angle_concentration(hidden, q, q)
    with pytest.raises(ValueError, match="does not match"):
        angle_concentration(hidden, q[:, :2], p[:, :2])
    with pytest.raises(TypeError, match="bool"):
        angle_concentration(hidden, q.long(), p)
    with pytest.raises(ValueError, match="batch, length, dim"):
        angle_concentration(hidden[0], q, p)


@settings(max_examples=30, deadline=None)
@given(batches(min_question=0, min_prefix=0))
def test_mean_pairwise_cosine_matches_naive(batch):
    hidden, q, p = batch
    mask = q | p
    got = mean_pairwise_cosine(hidden, mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive_mean_cos(hidden, mask), atol=1e-5, rtol=0)


def test_weighted_score():
    result = AngleConcentration(torch.tensor([0.5]), torch.tensor([0.25]), torch.tensor([3.0]), torch.tensor([2.0]))
    assert weighted_score(result.intra, result.inter).item() == pytest.approx(0.75)
    assert weighted_score(result.intra, result.inter, 1.0, 8.0).item() == pytest.approx(2.5)
    assert weighted_score(0.5, 0.25, 2.0, 0.0) == 1.0
