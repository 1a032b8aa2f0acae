"""Curve metrics, the paired bootstrap and the power analysis of the schedule study (gainrl_pl.evaluation.study_stats)."""

from __future__ import annotations

import numpy as np
import pytest

from gainrl_pl.evaluation.study_stats import (
    curve_area,
    final_accuracy,
    label_shares_by_phase,
    minimum_detectable_difference,
    paired_bootstrap,
    paired_sd_from_arm_sd,
    sd_interval,
    seed_t_interval,
    seeds_needed,
    steps_to_reach,
    variance_components,
)


def test_curve_metrics_hand_computed():
    steps = [0, 10, 30]
    acc = [0.2, 0.6, 0.6]
    assert final_accuracy(steps, acc) == 0.6
    # trapezoids: 10 * 0.4 + 20 * 0.6 = 16 over a span of 30
    assert curve_area(steps, acc) == pytest.approx(16 / 30)
    assert curve_area([5], [0.7]) == 0.7
    assert steps_to_reach(steps, acc, 0.6) == 10
    assert steps_to_reach(steps, acc, 0.2) == 0
    assert steps_to_reach(steps, acc, 0.61) == 50  # never: last step + one interval
    assert steps_to_reach(steps, acc, 0.61, censored=99) == 99
    # batches of curves, one target per curve
    batch = np.array([[0.1, 0.5, 0.9], [0.3, 0.3, 0.3]])
    assert steps_to_reach(steps, batch, np.array([0.5, 0.5])).tolist() == [10, 50]
    assert curve_area(steps, batch).tolist() == pytest.approx([(10 * 0.3 + 20 * 0.7) / 30, 0.3])


def test_curve_metrics_reject_bad_steps():
    with pytest.raises(ValueError, match="strictly increasing"):
        curve_area([0, 5, 5], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="one accuracy per validated step"):
        final_accuracy([0, 5], [0.1, 0.2, 0.3])


def test_paired_bootstrap_recovers_a_known_shift():
    """Arm = baseline + 0.1 on every seed and prompt: the interval is that shift, tight, and excludes zero."""
    rng = np.random.default_rng(0)
    steps = [0, 10, 20]
    base = rng.random((5, 3, 64)) * 0.5
    arm = base + 0.1
    r = paired_bootstrap(steps, arm, base, "final_accuracy", replicates=500)
    assert r.difference == pytest.approx(0.1) and r.low == pytest.approx(0.1) and r.high == pytest.approx(0.1)
    assert r.excludes_zero and r.seeds == 5 and len(r.per_seed) == 5
    r = paired_bootstrap(steps, arm, base, "curve_area", replicates=500)
    assert r.difference == pytest.approx(0.1)


def test_paired_bootstrap_interval_covers_zero_when_arms_are_exchangeable():
    """Two arms drawn from the same distribution: the 95 % interval contains 0 in about 95 % of studies."""
    rng = np.random.default_rng(1)
    covered = 0
    studies = 200
    for k in range(studies):
        p_seed = rng.uniform(0.3, 0.7, size=(8, 1, 1))  # seed effect shared by nothing: arms independent
        arm = (rng.random((8, 2, 40)) < p_seed).astype(float)
        base = (rng.random((8, 2, 40)) < rng.uniform(0.3, 0.7, size=(8, 1, 1))).astype(float)
        r = paired_bootstrap([0, 10], arm, base, "final_accuracy", replicates=400, seed=k)
        covered += r.low <= 0 <= r.high
    assert 0.85 <= covered / studies <= 0.99  # percentile bootstrap with 8 seeds slightly under-covers


def test_paired_bootstrap_pairs_seeds_and_prompts():
    """A shared seed effect cancels in the pairing: with it, the interval is far tighter than unpaired."""
    rng = np.random.default_rng(2)
    seed_effect = rng.normal(0, 0.2, size=(6, 1, 1))
    prompt_effect = rng.normal(0, 0.2, size=(1, 1, 100))
    base = 0.5 + seed_effect + prompt_effect + rng.normal(0, 0.01, size=(6, 2, 100))
    arm = base + 0.02
    paired = paired_bootstrap([0, 5], arm, base, "final_accuracy", replicates=1000)
    shuffled = paired_bootstrap([0, 5], arm[::-1], base, "final_accuracy", replicates=1000)  # pairing broken
    assert paired.excludes_zero and paired.high - paired.low < 0.01
    assert not shuffled.excludes_zero and shuffled.high - shuffled.low > 0.1


def test_steps_to_reach_uses_each_seeds_own_baseline_final():
    steps = [0, 10, 20, 30]
    base = np.array([[0.2, 0.3, 0.4, 0.5], [0.2, 0.6, 0.6, 0.6]])   # finals 0.5 and 0.6
    arm = np.array([[0.2, 0.5, 0.5, 0.5], [0.2, 0.3, 0.4, 0.5]])    # reaches 0.5 at 10; never reaches 0.6
    r = paired_bootstrap(steps, arm, base, "steps_to_reach", replicates=200, resample_prompts=False)
    # seed 0: arm 10 vs base 30 -> -20; seed 1: arm censored 40 vs base 10 -> +30
    assert r.per_seed == (-20.0, 30.0) and r.difference == 5.0
    assert r.arm_mean == 25.0 and r.base_mean == 20.0


def test_paired_bootstrap_rejects_unpaired_shapes():
    with pytest.raises(ValueError, match="same seeds"):
        paired_bootstrap([0, 1], np.zeros((3, 2, 5)), np.zeros((4, 2, 5)), "final_accuracy")
    with pytest.raises(ValueError, match="3 validated steps"):
        paired_bootstrap([0, 1], np.zeros((3, 3, 5)), np.zeros((3, 3, 5)), "final_accuracy")
    with pytest.raises(ValueError, match="metric='auc'"):
        paired_bootstrap([0, 1], np.zeros((3, 2, 5)), np.zeros((3, 2, 5)), "auc")


def test_minimum_detectable_difference():
    # large n: the normal approximation (1.96 + 0.84) sd / sqrt(n)
    assert minimum_detectable_difference(1.0, 10_000) == pytest.approx(2.8016 / 100, rel=1e-3)
    # 5 seeds: t quantiles with 4 degrees of freedom, 2.776 + 0.941
    assert minimum_detectable_difference(0.05, 5) == pytest.approx((2.7764 + 0.9410) * 0.05 / np.sqrt(5), rel=1e-3)
    assert minimum_detectable_difference(0.05, 10) < minimum_detectable_difference(0.05, 5)
    with pytest.raises(ValueError, match="seeds=1"):
        minimum_detectable_difference(0.05, 1)
    # a fixed part (the shared validation prompts) is not averaged away by seeds
    with_fixed = minimum_detectable_difference(0.05, 1000, fixed_se=0.01)
    assert with_fixed == pytest.approx((1.9623 + 0.8420) * np.sqrt(0.05**2 / 1000 + 0.01**2), rel=1e-3)
    assert with_fixed > 2.8 * 0.01


def test_seeds_needed_matches_the_mdd():
    n = seeds_needed(0.05, 0.05)
    assert minimum_detectable_difference(0.05, n) <= 0.05 < minimum_detectable_difference(0.05, n - 1)
    assert seeds_needed(1.0, 0.001, max_seeds=50) is None
    assert seeds_needed(0.0, 0.02, fixed_se=0.01) is None  # the fixed part alone needs a 0.028+ gap


def test_paired_sd_from_one_arm_matches_simulated_differences():
    rng = np.random.default_rng(0)
    n = 200_000
    for rho in (0.0, 0.6, -0.4):
        shared = rng.normal(size=n)
        a = 0.1 * (np.sqrt(abs(rho)) * shared + np.sqrt(1 - abs(rho)) * rng.normal(size=n))
        b = 0.1 * (np.sign(rho) * np.sqrt(abs(rho)) * shared + np.sqrt(1 - abs(rho)) * rng.normal(size=n))
        assert paired_sd_from_arm_sd(0.1, correlation=rho) == pytest.approx(np.std(a - b), rel=0.01)
    assert paired_sd_from_arm_sd(0.05) == pytest.approx(0.05 * np.sqrt(2))
    with pytest.raises(ValueError, match="correlation"):
        paired_sd_from_arm_sd(0.05, correlation=1.5)
    with pytest.raises(ValueError, match="sd_arm"):
        paired_sd_from_arm_sd(float("nan"))


def test_sd_interval_covers_the_true_sd_at_its_level():
    rng = np.random.default_rng(1)
    hits = 0
    trials = 4000
    for _ in range(trials):
        x = rng.normal(0.5, 0.07, size=3)
        low, high = sd_interval(float(np.std(x, ddof=1)), 3)
        hits += low <= 0.07 <= high
    assert hits / trials == pytest.approx(0.95, abs=0.015)
    low, high = sd_interval(0.171, 3)  # the pilot's figure: 2 degrees of freedom give a wide interval
    assert low == pytest.approx(0.171 * 0.521, rel=0.01) and high == pytest.approx(0.171 * 6.28, rel=0.01)
    with pytest.raises(ValueError, match="n=1"):
        sd_interval(0.1, 1)


def test_variance_components_recover_known_parts():
    rng = np.random.default_rng(3)
    seeds, prompts = 40, 400
    d = (0.05 + rng.normal(0, 0.03, size=(seeds, 1)) + rng.normal(0, 0.2, size=(1, prompts))
         + rng.normal(0, 0.4, size=(seeds, prompts)))
    c = variance_components(d)
    assert c.seed == pytest.approx(0.03 ** 2, rel=0.5)
    assert c.prompt == pytest.approx(0.2 ** 2, rel=0.2)
    assert c.noise == pytest.approx(0.4 ** 2, rel=0.05)
    per_seed_part, fixed_part = c.standard_error(5, 256)
    assert per_seed_part == pytest.approx(np.sqrt((c.seed + c.noise / 256) / 5))
    assert fixed_part == pytest.approx(np.sqrt(c.prompt / 256))
    one = variance_components(d[:1])  # one seed: the prompt part cannot be separated, only bounded
    assert one.prompt is None and one.prompt_upper == pytest.approx(0.2 ** 2 + 0.4 ** 2, rel=0.2)


def test_label_shares_by_phase_splits_steps_and_counts_each_draw():
    drawn = [["easy", "easy"], ["easy", "hard"], ["hard", "hard"], ["hard", "mid"], ["mid", "mid"]]
    early, late = label_shares_by_phase(drawn, phases=2)  # steps 1-3, 4-5 (the first span gets the extra step)
    assert early == pytest.approx({"easy": 0.5, "hard": 0.5})
    assert late == pytest.approx({"hard": 0.25, "mid": 0.75})
    assert label_shares_by_phase(drawn, phases=1)[0] == pytest.approx({"easy": 0.3, "hard": 0.4, "mid": 0.3})
    assert [sum(s.values()) for s in label_shares_by_phase(drawn, phases=5)] == pytest.approx([1.0] * 5)
    with pytest.raises(ValueError, match="phases=6"):
        label_shares_by_phase(drawn, phases=6)
    with pytest.raises(ValueError, match="steps 2-2"):
        label_shares_by_phase([["a"], [], ["b"]], phases=3)


def test_seed_t_interval_hand_computed():
    """Differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), t(0.975, 2) = 4.303 -> 2 -+ 2.484."""
    low, high = seed_t_interval([1.0, 2.0, 3.0])
    assert low == pytest.approx(2 - 4.302653 / np.sqrt(3), abs=1e-5)
    assert high == pytest.approx(2 + 4.302653 / np.sqrt(3), abs=1e-5)
    assert all(np.isnan(seed_t_interval([0.5])))
    with pytest.raises(ValueError, match="confidence"):
        seed_t_interval([1.0, 2.0], confidence=1.5)
