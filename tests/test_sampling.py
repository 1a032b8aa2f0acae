"""Round samplers (spec sections 4, 5, 9): Gaussian draws, mean update, DDP shards, resume, the peers."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2_contingency, chisquare
from torch.utils.data import DataLoader

from gainrl_pl.schedules import (
    SAMPLER_NAMES,
    AdaRFTSampler,
    GaussianRankSampler,
    PassRatePrioritySampler,
    RoundSampler,
    UniformSampler,
    build_sampler,
    gaussian_rank_probabilities,
    ranking_from_values,
    resolve_rank_quantity,
    update_mean,
)

# Uneven rounds (padding) are exercised on purpose; their warning has its own test.
pytestmark = pytest.mark.filterwarnings("ignore:subset_size=.*not a multiple")


def consume_round(sampler: RoundSampler) -> list[list[int]]:
    """Iterate one full round as the trainer would: each batch is trained, then marked consumed."""
    batches = []
    for batch in sampler:
        batches.append(batch)
        sampler.mark_batch_consumed()
    return batches


def make(kind: str, n: int = 40, subset: int = 12, batch: int = 2, **kw) -> RoundSampler:
    """One sampler of each kind on fixed inputs (identity ranking, difficulty = index mod 7)."""
    if kind == "gaussian":
        return GaussianRankSampler(list(range(n))[::-1], subset, batch, sigma=8.0, mu=3.0, **kw)
    if kind == "uniform":
        return UniformSampler(n, subset, batch, **kw)
    if kind == "adarft":
        return AdaRFTSampler([i % 7 for i in range(n)], subset, batch, **kw)
    return PassRatePrioritySampler(n, subset, batch, **kw)


KINDS = ["gaussian", "uniform", "adarft", "pass_rate"]


def feed(sampler: RoundSampler, round_indices: list[int], seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return sampler.update(round_indices, rng.random(len(round_indices)).tolist(),
                          (0.5 + 0.1 * rng.random(len(round_indices))).tolist())


# ----------------------------------------------------------------------------------------- Gaussian math


def test_probabilities_match_formula():
    p = gaussian_rank_probabilities(50, mu=12.3, sigma=7.0)
    r = np.arange(50)
    expected = np.exp(-((r - 12.3) ** 2) / (2 * 49.0))
    np.testing.assert_allclose(p, expected / expected.sum(), rtol=1e-12)


@given(n=st.integers(1, 300), mu=st.floats(-1e9, 1e9), sigma=st.floats(1e-3, 1e5))
@settings(max_examples=60, deadline=None)
def test_probabilities_never_underflow(n, mu, sigma):
    p = gaussian_rank_probabilities(n, mu, sigma)
    assert np.all(np.isfinite(p)) and abs(p.sum() - 1) < 1e-9
    assert p.argmax() == min(max(round(mu), 0), n - 1) or math.isclose(p.max(), p[min(max(round(mu), 0), n - 1)])


def test_probabilities_far_past_the_end_pile_on_the_last_rank():
    p = gaussian_rank_probabilities(7473, mu=7473 + 200 * 1000, sigma=1000)
    assert p.sum() == pytest.approx(1.0) and p[-1] == p.max()


@pytest.mark.parametrize("bad", [dict(n=0, mu=0, sigma=1), dict(n=5, mu=0, sigma=0), dict(n=5, mu=math.nan, sigma=1)])
def test_probabilities_reject_bad_input(bad):
    with pytest.raises(ValueError):
        gaussian_rank_probabilities(**bad)


def test_resolve_rank_quantity():
    assert resolve_rank_quantity(0.1, 200) == pytest.approx(20.0)
    assert resolve_rank_quantity(1.0, 200) == 200.0
    assert resolve_rank_quantity(1000, 200) == 1000.0
    assert resolve_rank_quantity(-0.05, 200) == pytest.approx(-10.0)
    assert resolve_rank_quantity(0.0, 200) == 0.0


# ----------------------------------------------------------------------------------------- Gaussian draws


def test_single_draws_follow_the_gaussian():
    n, mu, sigma, draws = 20, 6.3, 4.0, 20000
    s = GaussianRankSampler(list(range(n)), subset_size=1, batch_size=1, sigma=sigma, mu=mu, seed=1)
    counts = np.bincount([s.indices_for_round()[0] for _ in range(draws)], minlength=n)
    expected = gaussian_rank_probabilities(n, mu, sigma) * draws
    assert chisquare(counts, expected).pvalue > 1e-3


def test_subset_draws_match_sequential_sampling_without_replacement():
    # Gumbel-top-k must give the same inclusion frequencies as numpy's choice(replace=False, p=...).
    n, subset, rounds = 30, 8, 3000
    s = GaussianRankSampler(list(range(n)), subset, 1, sigma=5.0, mu=10.0, seed=2)
    ours = np.zeros(n)
    theirs = np.zeros(n)
    p = gaussian_rank_probabilities(n, 10.0, 5.0)
    rng = np.random.default_rng(3)
    for _ in range(rounds):
        drawn = s.indices_for_round()
        assert len(set(drawn)) == subset and drawn == sorted(drawn)
        ours[drawn] += 1
        theirs[rng.choice(n, subset, replace=False, p=p)] += 1
    keep = (ours + theirs) > 20
    assert chi2_contingency(np.stack([ours[keep], theirs[keep]])).pvalue > 1e-3


@given(n=st.integers(1, 80), data=st.data())
@settings(max_examples=40, deadline=None)
def test_drawn_ranks_distinct_sorted_and_mapped(n, data):
    subset = data.draw(st.integers(1, n))
    ranking = data.draw(st.permutations(list(range(n))))
    sigma = data.draw(st.floats(1.01, 1e4))
    mu = data.draw(st.floats(0, 3 * n))
    s = GaussianRankSampler(ranking, subset, 1, sigma=sigma, mu=mu, seed=data.draw(st.integers(0, 99)))
    ranks = s.drawn_ranks()
    assert len(set(ranks)) == subset and ranks == sorted(ranks) and all(0 <= r < n for r in ranks)
    s.end_round()
    indices = s.start_round()
    assert len(set(indices)) == subset and set(indices) <= set(range(n))


def test_end_of_ranking_still_draws():
    n = 50
    at_end = GaussianRankSampler(list(range(n)), 10, 1, sigma=2.0, mu=n - 1)
    assert at_end.mu == n - 1 and len(set(at_end.indices_for_round())) == 10
    past = GaussianRankSampler(list(range(n)), 10, 1, sigma=2.0, mu=10**9)  # clamped to N - 1
    assert past.mu == n - 1
    # mu pushed by many updates: the reference code's failure mode (never bounded).
    s = GaussianRankSampler(list(range(n)), 10, 1, sigma=1.5, step_size=1000, max_shift=5000)
    for _ in range(30):
        s.update(list(range(10)), [1.0] * 10, [0.9] * 10)
    assert s.mu == n - 1
    drawn = s.drawn_ranks()
    assert len(set(drawn)) == 10 and max(drawn) == n - 1


def test_narrow_gaussian_falls_back_to_nearest_ranks():
    # sigma far below the round: almost every rank has probability ~0 in float64, the draw must not raise.
    s = GaussianRankSampler(list(range(100)), 30, 1, sigma=0.001, mu=60.3)  # sigma = 0.1 ranks
    assert gaussian_rank_probabilities(100, 60.3, 0.1)[50] == 0.0  # underflows in float64
    assert s.drawn_ranks() == list(range(46, 76))


def test_fractional_sigma_and_step():
    s = GaussianRankSampler(num_prompts=200, subset_size=10, batch_size=1, sigma=0.1, step_size=0.5, max_shift=0.25)
    assert (s.sigma, s.step_size, s.max_shift) == pytest.approx((20.0, 100.0, 50.0))
    assert GaussianRankSampler(num_prompts=200, subset_size=1, batch_size=1, mu=0.25).mu == pytest.approx(50.0)


def test_ranking_must_be_set_before_drawing():
    s = GaussianRankSampler(num_prompts=10, subset_size=4, batch_size=2)
    with pytest.raises(RuntimeError, match="set_ranking"):
        iter(s)
    with pytest.raises(ValueError, match="permutation"):
        s.set_ranking([0, 1, 2])
    s.set_ranking(list(range(10))[::-1])
    assert set(next(iter(s))) <= set(range(10))


# ----------------------------------------------------------------------------------------- mean update


def test_update_mean_defaults_hand_computed():
    u = update_mean(100.0, 0.5, 0.7)
    assert u.accuracy_term == 0.0
    assert u.angle_term == pytest.approx(500 * math.tanh(1.4))
    assert u.shift == pytest.approx(500 * math.tanh(1.4)) and u.new_mu == pytest.approx(100 + 500 * math.tanh(1.4))
    u = update_mean(0.0, 1.0, 0.7)  # 500 tanh(1) + 500 tanh(1.4) = 823.5: below adj_max at the defaults
    assert u.shift == pytest.approx(500 * math.tanh(1.0) + 500 * math.tanh(1.4))


def test_update_mean_clamps():
    assert update_mean(0.0, 1.0, 0.7, step_size=1000).shift == 1000.0  # adj_max
    low = update_mean(40.0, 0.0, 0.0)  # 500 tanh(-1) = -380.8 -> adj_min = 0
    assert low.accuracy_term == pytest.approx(-500 * math.tanh(1.0)) and low.shift == 0.0 and low.new_mu == 40.0
    back = update_mean(40.0, 0.0, 0.0, min_shift=-100)
    assert back.shift == -100 and back.new_mu == -60.0
    assert update_mean(40.0, 0.0, 0.0, min_shift=-100, num_prompts=10).new_mu == 0.0
    assert update_mean(5.0, 1.0, 1.0, num_prompts=10).new_mu == 9.0


@pytest.mark.parametrize("acc", [-0.1, 1.5, math.nan])
def test_update_mean_rejects_bad_accuracy(acc):
    with pytest.raises(ValueError, match="accuracy"):
        update_mean(0.0, acc, 0.7)


def test_update_mean_rejects_inverted_bounds():
    with pytest.raises(ValueError, match="min_shift"):
        update_mean(0.0, 0.5, 0.7, min_shift=10, max_shift=5)


@given(mu=st.floats(0, 1e4), acc=st.floats(0, 1), ang=st.floats(-1, 1), lo=st.floats(-500, 0), hi=st.floats(0, 2000))
@settings(max_examples=60, deadline=None)
def test_update_mean_shift_within_bounds(mu, acc, ang, lo, hi):
    u = update_mean(mu, acc, ang, min_shift=lo, max_shift=hi, num_prompts=5000)
    assert lo <= u.shift <= hi and 0 <= u.new_mu <= 4999


def test_sampler_update_metrics_and_lag():
    s = GaussianRankSampler(list(range(5000)), 8, 2, sigma=100)
    metrics = s.update([1, 2], [0.5, 0.5], [0.7, 0.7])
    assert set(metrics) == {"mu", "accuracy_term", "angle_term", "shift"}
    assert s.mu == s.draw_mu == pytest.approx(500 * math.tanh(1.4))
    lag = GaussianRankSampler(list(range(5000)), 8, 2, sigma=100, reference_lag=True)
    lag.update([1], [0.5], [0.7])
    first = lag.mu
    assert lag.draw_mu == 0.0
    lag.update([1], [0.5], [0.7])
    assert lag.draw_mu == pytest.approx(first) and lag.mu == pytest.approx(2 * first)
    assert s.update([], [], []) == {}
    with pytest.raises(ValueError, match="same length"):
        s.update([1, 2], [0.5], [0.7, 0.7])


# ----------------------------------------------------------------------------------------- DDP and batches


@given(world=st.integers(1, 4), batch=st.integers(1, 5), subset=st.integers(1, 40), drop=st.booleans(),
       kind=st.sampled_from(KINDS))
@settings(max_examples=80, deadline=None)
def test_ddp_shards_disjoint_and_cover_the_round(world, batch, subset, drop, kind):
    if drop and subset < batch * world:
        with pytest.raises(ValueError, match="drop_uneven"):
            make(kind, subset=subset, batch=batch, num_replicas=world, rank=0, seed=5, drop_uneven=drop)
        return
    samplers = [make(kind, subset=subset, batch=batch, num_replicas=world, rank=r, seed=5, drop_uneven=drop)
                for r in range(world)]
    per_rank = [list(s) for s in samplers]
    rounds = [s.round_indices for s in samplers]
    assert all(r == rounds[0] for r in rounds)  # the same global round on every rank
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(samplers[0])  # same batch count
    assert all(len(b) == batch for batches in per_rank for b in batches)
    # Rebuild the (padded or truncated) round from the shards: position W (k B + j) + r is rank r's item j of
    # batch k. Equal to the round's prefix/cyclic padding <=> shards are disjoint positions that cover it.
    total = len(per_rank[0]) * batch * world
    rebuilt = [None] * total
    for r, batches in enumerate(per_rank):
        for k, b in enumerate(batches):
            for j, idx in enumerate(b):
                rebuilt[world * (k * batch + j) + r] = idx
    round_ = rounds[0]
    assert rebuilt == [round_[i % subset] for i in range(total)]
    if drop:
        assert total == (subset // (batch * world)) * batch * world
    else:
        assert total >= subset and set(rebuilt) == set(round_)
    if subset % (batch * world) == 0:
        shards = [set(i for b in batches for i in b) for batches in per_rank]
        assert sum(len(s) for s in shards) == subset and set().union(*shards) == set(round_)


def test_dataloader_batch_sampler():
    s = UniformSampler(10, 6, 3, seed=0)
    loader = DataLoader([f"p{i}" for i in range(10)], batch_sampler=s, collate_fn=list)
    batches = list(loader)
    assert len(batches) == len(s) == 2 and len({p for b in batches for p in b}) == 6


def test_uneven_round_warns_with_the_numbers():
    with pytest.warns(UserWarning, match="repeats 12 prompts.*drops 4 instead.*multiple of 16"):
        UniformSampler(20, 20, 8, num_replicas=2, rank=1)
    with pytest.warns(UserWarning, match="drops its last 4 prompts"):
        UniformSampler(20, 20, 8, num_replicas=2, rank=1, drop_uneven=True)


def test_round_lifecycle():
    s = make("uniform", subset=8, batch=2)
    first = list(s)
    assert list(s) == first  # nothing consumed yet (prefetch only): the same round again
    s.mark_batch_consumed()
    assert list(s) == first[1:]
    for _ in range(3):
        s.mark_batch_consumed()
    with pytest.raises(RuntimeError, match="more often"):
        s.mark_batch_consumed()
    second = list(s)  # all consumed: the next iteration closes the round and draws a new one
    assert s.rounds_completed == 1 and second != first
    s.end_round()
    assert not s.round_in_progress and s.rounds_completed == 2
    with pytest.raises(RuntimeError, match="without a round"):
        s.mark_batch_consumed()


# ----------------------------------------------------------------------------------------- resume


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert json.loads(json.dumps(loaded)) == loaded  # plain types only
    return loaded


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world", [1, 3])
def test_state_roundtrip_mid_round_continues_identically(kind, world):
    def run_rounds(samplers, n_rounds, start_seed):
        out = []
        for k in range(n_rounds):
            out.append([consume_round(s) for s in samplers])
            for s in samplers:
                feed(s, samplers[0].round_indices, start_seed + k)
        return out

    kwargs = dict(subset=13, batch=2, seed=7)
    original = [make(kind, num_replicas=world, rank=r, **kwargs) for r in range(world)]
    run_rounds(original, 2, 0)
    for s in original:  # two batches into round 3, then checkpoint
        it = iter(s)
        next(it), next(it), next(it)  # prefetched one further than trained
        s.mark_batch_consumed()
        s.mark_batch_consumed()
    states = [roundtrip(s.state_dict()) for s in original]
    resumed = [make(kind, num_replicas=world, rank=r, **{**kwargs, "seed": 99}) for r in range(world)]
    for s, state in zip(resumed, states, strict=True):
        s.load_state_dict(state)
    for a, b in zip(original, resumed, strict=True):
        assert list(a) == list(b) and len(list(b)) == len(b) - 2
    for group in (original, resumed):
        for s in group:
            for _ in range(len(s) - 2):
                s.mark_batch_consumed()
        for s in group:
            feed(s, group[0].round_indices, 2)
    assert run_rounds(original, 3, 10) == run_rounds(resumed, 3, 10)
    if kind == "gaussian":
        assert original[0].mu == resumed[0].mu


def test_resume_on_another_world_size_keeps_the_position():
    two = [make("uniform", subset=16, batch=2, num_replicas=2, rank=r) for r in range(2)]
    for s in two:
        list(s)
        s.mark_batch_consumed()  # 1 batch x 2 prompts x 2 ranks = 4 prompts of the round trained
    one = make("uniform", subset=16, batch=2)
    one.load_state_dict(two[0].state_dict())
    assert one.consumed_batches == 2 and one.round_indices == two[0].round_indices


def test_load_state_of_another_sampler_fails():
    with pytest.raises(ValueError, match="UniformSampler"):
        make("gaussian").load_state_dict(make("uniform").state_dict())


def test_extra_indices_leave_state_untouched():
    s = make("gaussian", subset=12, batch=2)
    round_ = s.start_round()
    before = s.state_dict()
    extra = s.extra_indices(5, step=3, exclude=round_[:4])
    assert extra == s.extra_indices(5, step=3, exclude=round_[:4]) and len(set(extra)) == 5
    assert set(extra) <= set(round_[4:]) and s.state_dict() == before
    assert extra != s.extra_indices(5, step=3, attempt=1, exclude=round_[:4])
    assert len(s.extra_indices(20, step=0)) == 20  # more than the round: repeats allowed


# ----------------------------------------------------------------------------------------- peers


def test_uniform_passes_visit_each_prompt_once():
    s = UniformSampler(10, 4, 1, seed=3)
    rounds = []
    for _ in range(5):
        rounds.append(consume_round(s))
    flat = [b[0] for r in rounds for b in r]
    assert all(len({b[0] for b in r}) == 4 for r in rounds)  # no repeats within a round
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))


def test_adarft_selects_closest_and_moves_target():
    d = [1, 5, 3, 8, 2, 9, 4, 7, 6, 0]
    s = AdaRFTSampler(d, subset_size=3, batch_size=1)
    assert s.target == 0 and s.step_size == 4.5
    assert s.indices_for_round() == [9, 0, 4]  # difficulties 0, 1, 2 in ascending order
    metrics = s.update([9, 0, 4], [1.0, 1.0, 1.0], [0, 0, 0])
    assert s.target == pytest.approx(4.5 * math.tanh(1.0)) and metrics["target_difficulty"] == s.target
    assert s.indices_for_round() == [4, 2, 6]  # T = 3.43: difficulties 2, 3, 4
    for _ in range(10):
        s.update([0], [1.0], [0])
    assert s.target == 9.0  # clamped at d_max
    s.update([0], [0.0], [0])
    assert s.target == pytest.approx(9.0 - 4.5 * math.tanh(1.0))


def test_adarft_ties_are_seeded():
    d = [1.0] * 10
    picks = {tuple(AdaRFTSampler(d, 3, 1, seed=k).indices_for_round()) for k in range(5)}
    assert len(picks) > 1
    assert AdaRFTSampler(d, 3, 1, seed=4).indices_for_round() == AdaRFTSampler(d, 3, 1, seed=4).indices_for_round()
    with pytest.raises(ValueError, match="difficulty\\[1\\]"):
        AdaRFTSampler([1.0, math.nan], 1, 1)


def test_pass_rate_weights_on_fixed_inputs():
    s = PassRatePrioritySampler(5, 2, 1)
    s.update([0, 1, 2, 2, 2], [1.0, 0.0, 1.0, 0.0, 0.0], [0] * 5)
    np.testing.assert_allclose(s.pass_rate, [1.0, 0.0, 0.25, 0.5, 0.5])  # EMA 1 -> 0.5 -> 0.25
    np.testing.assert_allclose(s.weights(), [0.01, 0.01, 0.1875, 0.25, 0.25])
    mean = PassRatePrioritySampler(5, 2, 1, estimator="mean", weighting="failure", prior=0.3)
    metrics = mean.update([0, 1, 2, 2, 2], [1.0, 0.0, 1.0, 0.0, 0.0], [0] * 5)
    np.testing.assert_allclose(mean.pass_rate, [1.0, 0.0, 1 / 3, 0.3, 0.3])
    np.testing.assert_allclose(mean.weights(), [0.01, 1.0, 2 / 3, 0.7, 0.7])
    assert metrics["seen_fraction"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        mean.update([0], [2.0], [0])


def test_pass_rate_draws_follow_the_weights():
    s = PassRatePrioritySampler(4, 1, 1, seed=0)
    s.update([0, 1, 2], [1.0, 0.0, 0.8], [0] * 3)
    counts = np.bincount([s.indices_for_round()[0] for _ in range(8000)], minlength=4)
    w = s.weights()
    assert chisquare(counts, w / w.sum() * 8000).pvalue > 1e-3
    big = PassRatePrioritySampler(30, 25, 1)
    assert len(set(big.indices_for_round())) == 25


# ----------------------------------------------------------------------------------------- config errors


def test_factory_names_and_errors():
    assert set(SAMPLER_NAMES) == {"angle", "length", "accuracy_curriculum", "uniform", "adarft", "pass_rate_priority",
                                  "greso", "mopps"}
    common = dict(num_prompts=10, subset_size=4, batch_size=2, seed=1, num_replicas=1, rank=0)
    for name in ("angle", "length", "accuracy_curriculum"):
        assert isinstance(build_sampler(name, sigma=0.5, **common), GaussianRankSampler)
    assert isinstance(build_sampler("uniform", **common), UniformSampler)
    assert isinstance(build_sampler("adarft", difficulty=list(range(10)), **common), AdaRFTSampler)
    assert isinstance(build_sampler("pass_rate_priority", weighting="failure", **common), PassRatePrioritySampler)
    with pytest.raises(ValueError, match="allowed: angle, length"):
        build_sampler("gainrl", **common)
    with pytest.raises(ValueError, match="does not take sigma"):
        build_sampler("uniform", sigma=3.0, **common)


@pytest.mark.parametrize("kwargs, match", [
    (dict(subset_size=0), "subset_size"),
    (dict(subset_size=-3), "subset_size"),
    (dict(subset_size=11), "subset_size=11 is larger"),
    (dict(batch_size=0), "batch_size"),
    (dict(sigma=0.0), "sigma"),
    (dict(sigma=-5.0), "sigma"),
    (dict(mu=-1.0), "mu"),
    (dict(num_replicas=0), "num_replicas"),
    (dict(num_replicas=2, rank=2), "rank"),
    (dict(subset_size=4, num_replicas=3, drop_uneven=True), "drop_uneven"),
    (dict(min_shift=10.0, max_shift=5.0), "min_shift"),
])
def test_bad_configuration_names_the_option(kwargs, match):
    base = dict(num_prompts=10, subset_size=4, batch_size=2)
    with pytest.raises(ValueError, match=match):
        GaussianRankSampler(**{**base, **kwargs})


def test_peer_option_errors():
    with pytest.raises(ValueError, match="weighting='p'"):
        PassRatePrioritySampler(5, 2, 1, weighting="p")
    with pytest.raises(ValueError, match="min_weight"):
        PassRatePrioritySampler(5, 2, 1, min_weight=0.0)
    with pytest.raises(ValueError, match="num_prompts=4"):
        AdaRFTSampler([1, 2, 3], 1, 1, num_prompts=4)


def test_ranking_from_values():
    assert ranking_from_values([3, 1, 2, 1]) == [1, 3, 2, 0]
    assert ranking_from_values([0.2, 0.9, 0.9, 0.1], descending=True) == [1, 2, 0, 3]
    with pytest.raises(ValueError, match="values\\[1\\]"):
        ranking_from_values([1.0, math.inf])


def test_sigma_is_checked_in_one_place_for_the_config_and_the_sampler():
    from gainrl_pl.datamodules import ScheduleSettings

    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"schedule\.sigma=.* must be > 0: ranks if > 1, a fraction of N"):
            ScheduleSettings(name="angle", sigma=bad)
        with pytest.raises(ValueError, match=r"^sigma=.* must be > 0: ranks if > 1, a fraction of N"):
            GaussianRankSampler(num_prompts=10, subset_size=4, batch_size=2, sigma=bad)
