"""GRESO and MoPPS on the round-sampler contract: their math, skipping/selection, DDP shards, exact resume."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import beta as beta_dist

from gainrl_pl.schedules import SAMPLER_NAMES, RoundSampler, UniformSampler, build_sampler
from gainrl_pl.schedules.selective import (
    GRESOSampler,
    MoPPSSampler,
    adapt_exploration,
    discounted_beta_update,
    thompson_closest,
    zero_variance_skip_probability,
)

pytestmark = pytest.mark.filterwarnings("ignore:subset_size=.*not a multiple")

KINDS = ["greso", "mopps"]


def make(kind: str, n: int = 40, subset: int = 12, batch: int = 2, **kw) -> RoundSampler:
    if kind == "greso":
        return GRESOSampler(n, subset, batch, **kw)
    return MoPPSSampler(n, subset, batch, rollouts_per_prompt=4, candidate_ratio=2.0, **kw)


def consume_round(sampler: RoundSampler) -> list[list[int]]:
    batches = []
    for batch in sampler:
        batches.append(batch)
        sampler.mark_batch_consumed()
    return batches


def feed(sampler: RoundSampler, indices: list[int], seed: int) -> dict[str, float]:
    """Accuracies in {0, 1/4, ..., 1} with many 0s and 1s, so GRESO streaks build up."""
    rng = np.random.default_rng(seed)
    acc = rng.choice([0.0, 0.0, 0.25, 0.5, 1.0, 1.0], size=len(indices))
    return sampler.update(indices, acc.tolist(), [0.5] * len(indices))


# ------------------------------------------------------------------------------------------------- GRESO math


def test_skip_probability_formula():
    assert zero_variance_skip_probability(0, 0.5) == 0.0
    assert zero_variance_skip_probability(1, 0.5) == pytest.approx(0.5)
    assert zero_variance_skip_probability(3, 0.5) == pytest.approx(1 - 0.125)
    # the keep probability never falls under min_keep
    assert zero_variance_skip_probability(20, 0.5) == pytest.approx(0.99)
    assert zero_variance_skip_probability(2, 0.9, min_keep=0.5) == pytest.approx(1 - 0.81)
    with pytest.raises(ValueError, match="streak"):
        zero_variance_skip_probability(-1, 0.5)


def test_adapt_exploration_moves_toward_the_target_and_clamps():
    kw = dict(step=0.01, low=0.05, high=0.95)
    assert adapt_exploration(0.5, 0.30, 0.25, **kw) == pytest.approx(0.49)  # too many zero-variance: skip more
    assert adapt_exploration(0.5, 0.25, 0.25, **kw) == pytest.approx(0.49)  # at the target counts as above
    assert adapt_exploration(0.5, 0.10, 0.25, **kw) == pytest.approx(0.51)
    assert adapt_exploration(0.055, 1.0, 0.25, **kw) == 0.05
    assert adapt_exploration(0.945, 0.0, 0.25, **kw) == 0.95


def test_greso_streaks_follow_the_outcomes():
    s = GRESOSampler(5, 2, 1)
    s.update([0, 1, 2, 0], [1.0, 0.0, 0.5, 1.0], [0.0] * 4)  # repeats chain in order
    assert s.easy_streak.tolist() == [2, 0, 0, 0, 0] and s.hard_streak.tolist() == [0, 1, 0, 0, 0]
    s.update([0, 1], [0.75, 0.0], [0.0, 0.0])
    assert s.easy_streak.tolist() == [0, 0, 0, 0, 0] and s.hard_streak.tolist() == [0, 2, 0, 0, 0]
    s.update([1], [1.0], [0.0])  # all wrong then all right: the hard streak ends, an easy one starts
    assert s.easy_streak[1] == 1 and s.hard_streak[1] == 0
    assert s.skip_probability(1) == (pytest.approx(0.5), "easy") and s.skip_probability(2) == (0.0, None)


def test_greso_without_streaks_is_uniform_sampling():
    """Nothing to skip (no prompt ever all-right or all-wrong): the same rounds as UniformSampler, pass
    boundaries included, so a paired comparison with uniform differs only where GRESO skips."""
    greso, uniform = GRESOSampler(30, 7, 1, seed=4), UniformSampler(30, 7, 1, seed=4)
    for _ in range(12):  # 84 prompts: crosses two pass boundaries mid-round
        a, b = greso.start_round(), uniform.start_round()
        assert a == b
        greso.update(a, [0.5] * len(a), [0.0] * len(a))
        greso.end_round()
        uniform.end_round()
    # from the second pass on it adapts: no zero-variance groups at all, so both move up (skip less)
    assert greso.p_easy == greso.p_hard == pytest.approx(0.58) and greso.skipped_total == {"easy": 0, "hard": 0}


def test_greso_skips_zero_variance_prompts_at_the_predicted_rate():
    """Prompts with streak z are kept with probability p ** z: measured over many rounds."""
    n, subset = 400, 40
    s = GRESOSampler(n, subset, 1, seed=0, exploration_step=0.0)  # p fixed at 0.5
    s.easy_streak[:100] = 1   # kept with probability 0.5
    s.hard_streak[100:200] = 2  # kept with probability 0.25
    kept = {"easy": 0, "hard": 0, "plain": 0}
    met = {"easy": 0, "hard": 0, "plain": 0}
    for _ in range(300):
        taken = s.start_round()
        s.end_round()
        assert len(set(taken)) == subset and s.skipped["forced"] == 0
        for i in taken:
            kept["easy" if i < 100 else "hard" if i < 200 else "plain"] += 1
        met["easy"] += s.skipped["easy"]
        met["hard"] += s.skipped["hard"]
    met["easy"] += kept["easy"]
    met["hard"] += kept["hard"]
    assert kept["easy"] / met["easy"] == pytest.approx(0.5, abs=0.03)
    assert kept["hard"] / met["hard"] == pytest.approx(0.25, abs=0.03)


def test_greso_completes_a_round_when_almost_everything_is_skipped():
    s = GRESOSampler(10, 6, 1, seed=1, min_keep_probability=0.01, initial_hard_exploration=0.05)
    s.hard_streak[:] = 50  # keep probability 0.01 each
    taken = s.start_round()
    assert len(taken) == 6 and len(set(taken)) == 6
    assert s.skipped["forced"] >= 1 and s.skipped["hard"] + 6 - s.skipped["forced"] == 10


def test_greso_adapts_only_from_the_second_pass():
    s = GRESOSampler(10, 5, 1, seed=0)
    r = s.start_round()
    m = s.update(r, [1.0] * 5, [0.0] * 5)  # first pass: measured but not adapted
    assert (m["p_easy"], m["p_hard"], m["easy_fraction"]) == (0.5, 0.5, 1.0)
    s.end_round()
    s.start_round()
    s.end_round()
    s.start_round()  # third round starts the second pass
    assert s.passes == 2
    m = s.update([0, 1, 2, 3], [1.0, 0.0, 0.0, 0.5], [0.0] * 4)
    # easy 1/4 >= 0.25/3 -> skip more easy; hard 2/4 >= 0.25*2/3 -> skip more hard
    assert m["p_easy"] == pytest.approx(0.49) and m["p_hard"] == pytest.approx(0.49)
    m = s.update([5, 6, 7], [0.5, 0.25, 0.75], [0.0] * 3)
    assert m["p_easy"] == pytest.approx(0.50) and m["p_hard"] == pytest.approx(0.50)


# ------------------------------------------------------------------------------------------------- MoPPS math


def test_discounted_beta_update_hand_computed():
    # decay 1: the exact Beta-Bernoulli posterior with s G successes
    assert discounted_beta_update(1.0, 1.0, 0.75, 4, decay=1.0, prior_alpha=1.0, prior_beta=1.0) == (4.0, 2.0)
    # decay 0.5 toward the prior: 0.5*9 + 0.5*1 + 2 = 7, 0.5*3 + 0.5*1 + 6 = 8
    assert discounted_beta_update(9.0, 3.0, 0.25, 8, decay=0.5, prior_alpha=1.0, prior_beta=1.0) == (7.0, 8.0)


def test_discounting_forgets_old_outcomes():
    a, b = 1.0, 1.0
    for _ in range(30):
        a, b = discounted_beta_update(a, b, 1.0, 8, decay=0.5, prior_alpha=1.0, prior_beta=1.0)
    for _ in range(30):
        a, b = discounted_beta_update(a, b, 0.0, 8, decay=0.5, prior_alpha=1.0, prior_beta=1.0)
    assert a / (a + b) < 0.1  # after 30 all-wrong groups the 30 all-right ones are forgotten
    a2, b2 = 1.0, 1.0
    for s in [1.0] * 30 + [0.0] * 30:
        a2, b2 = discounted_beta_update(a2, b2, s, 8, decay=1.0, prior_alpha=1.0, prior_beta=1.0)
    assert a2 / (a2 + b2) == pytest.approx(0.5)  # without decay they count forever


def test_thompson_closest_picks_by_sampled_distance():
    rng = np.random.default_rng(0)
    alpha = np.array([1000.0, 500.0, 1.0, 300.0])
    beta = np.array([1.0, 500.0, 1000.0, 700.0])  # means ~1, 0.5, ~0, 0.3
    order, draws = thompson_closest(alpha, beta, 2, 0.5, rng)
    assert order.tolist() == [1, 3] and draws.shape == (4,)
    # the draws follow the posterior: a Kolmogorov-Smirnov check on one Beta(3, 5)
    samples = [thompson_closest(np.array([3.0]), np.array([5.0]), 1, 0.5, rng)[1][0] for _ in range(2000)]
    assert np.mean(samples) == pytest.approx(3 / 8, abs=0.02)
    from scipy.stats import kstest

    assert kstest(samples, beta_dist(3, 5).cdf).pvalue > 0.01


def test_mopps_prefers_prompts_with_mixed_outcomes():
    s = MoPPSSampler(60, 10, 1, rollouts_per_prompt=8, candidate_ratio=0, seed=3)
    s.update(list(range(0, 20)), [1.0] * 20, [0.0] * 20)   # always solved
    s.update(list(range(20, 40)), [0.0] * 20, [0.0] * 20)  # never solved
    s.update(list(range(40, 60)), [0.5] * 20, [0.0] * 20)  # mixed: posterior Beta(5, 5)
    counts = np.zeros(60)
    for _ in range(200):
        for i in s.start_round():
            counts[i] += 1
        s.end_round()
    assert counts[40:].sum() > 0.9 * counts.sum()  # ~95 % here; uniform would give 33 %
    assert s.alpha[0] == 9.0 and s.beta[0] == 1.0 and s.observations[45] == 1


def test_mopps_candidates_come_from_the_walk():
    s = MoPPSSampler(50, 5, 1, candidate_ratio=2.0, seed=0)
    assert s.num_candidates == 10
    seen = set()
    for _ in range(5):  # 5 rounds x 10 candidates = exactly one pass over the 50 prompts
        walk_start = s._walk.position
        round_ = s.start_round()
        s.end_round()
        candidates = s._walk.permutation[walk_start:s._walk.position]
        assert set(round_) <= set(candidates) and len(set(round_)) == 5
        seen |= set(candidates)
    assert seen == set(range(50)) and s._walk.passes == 1


def test_mopps_update_metrics_and_errors():
    s = MoPPSSampler(4, 2, 1, rollouts_per_prompt=4, candidate_ratio=0)
    m = s.update([0, 1], [1.0, 0.5], [0.0, 0.0])
    assert m["mean_posterior_rate"] == pytest.approx((5 / 6 + 3 / 6) / 2)
    assert m["seen_fraction"] == 0.5
    assert s.update([], [], []) == {}
    with pytest.raises(ValueError, match="accuracy 1.5 of prompt 2"):
        s.update([2], [1.5], [0.0])
    with pytest.raises(ValueError, match="prompt index 9 outside"):
        s.update([9], [0.5], [0.0])
    with pytest.raises(ValueError, match="2 indices but 1 accuracies"):
        s.update([0, 1], [0.5], [0.0])


@pytest.mark.parametrize("kwargs, match", [
    (dict(rollouts_per_prompt=0), "rollouts_per_prompt"),
    (dict(decay=0.0), "decay"),
    (dict(target_pass_rate=1.5), "target_pass_rate"),
    (dict(prior_alpha=0.0), "prior_alpha"),
    (dict(candidate_ratio=0.5), "candidate_ratio"),
])
def test_mopps_bad_options_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoPPSSampler(10, 4, 2, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(initial_easy_exploration=1.5), "initial_easy_exploration"),
    (dict(min_exploration=0.9, max_exploration=0.1), "min_exploration"),
    (dict(exploration_step=-0.1), "exploration_step"),
    (dict(min_keep_probability=0.0), "min_keep_probability"),
    (dict(target_zero_variance=2.0), "target_zero_variance"),
])
def test_greso_bad_options_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRESOSampler(10, 4, 2, **kwargs)


# ------------------------------------------------------------------------------------------------- contract


def test_factory_builds_both_by_name():
    assert {"greso", "mopps"} <= set(SAMPLER_NAMES)
    common = dict(num_prompts=10, subset_size=4, batch_size=2, seed=1, num_replicas=1, rank=0)
    assert isinstance(build_sampler("greso", target_zero_variance=0.3, **common), GRESOSampler)
    assert isinstance(build_sampler("mopps", rollouts_per_prompt=4, **common), MoPPSSampler)
    with pytest.raises(ValueError, match="does not take sigma"):
        build_sampler("mopps", sigma=3.0, **common)


@given(world=st.integers(1, 4), batch=st.integers(1, 5), subset=st.integers(1, 40), kind=st.sampled_from(KINDS),
       rounds=st.integers(0, 3))
@settings(max_examples=60, deadline=None)
def test_ddp_ranks_draw_the_same_round_and_shard_it(world, batch, subset, kind, rounds):
    """Every rank (fed the same all-gathered results) draws the same round; the strided shards rebuild it."""
    samplers = [make(kind, subset=subset, batch=batch, num_replicas=world, rank=r, seed=5) for r in range(world)]
    for k in range(rounds):
        for s in samplers:
            consume_round(s)
        for s in samplers:
            feed(s, samplers[0].round_indices, k)
    per_rank = [list(s) for s in samplers]
    round_ = samplers[0].round_indices
    assert all(s.round_indices == round_ for s in samplers) and len(set(round_)) == subset
    total = len(per_rank[0]) * batch * world
    rebuilt = [None] * total
    for r, batches in enumerate(per_rank):
        for k, b in enumerate(batches):
            for j, idx in enumerate(b):
                rebuilt[world * (k * batch + j) + r] = idx
    assert rebuilt == [round_[i % subset] for i in range(total)]


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

    kwargs = dict(n=20, subset=13, batch=2, seed=7)  # small N: passes, skips and posteriors all in play
    original = [make(kind, num_replicas=world, rank=r, **kwargs) for r in range(world)]
    run_rounds(original, 4, 0)
    for s in original:  # two batches into the next round, one more prefetched, then checkpoint
        it = iter(s)
        next(it), next(it), next(it)
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
    assert run_rounds(original, 4, 10) == run_rounds(resumed, 4, 10)
    assert original[0].state_dict() == resumed[0].state_dict()
    if kind == "greso":
        assert original[0].skipped_total["easy"] + original[0].skipped_total["hard"] > 0  # skipping was exercised


def test_state_of_another_dataset_size_is_refused():
    for kind in KINDS:
        state = make(kind, n=20).state_dict()
        with pytest.raises(ValueError, match="tracks 20 prompts, this dataset has 40"):
            make(kind, n=40).load_state_dict(state)
