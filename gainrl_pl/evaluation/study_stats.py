"""Statistics for comparing data schedules run on the same seeds: curve metrics, paired bootstrap, power.

A schedule comparison trains each arm on seeds 0..S-1 and validates on the same P prompts at the same steps.
Per arm that gives `correct[seed, step, prompt]` (0/1, or a per-prompt mean when several samples were drawn).
Every metric here is a function of one validation *curve* (accuracy at each validated step):

- `final_accuracy`: the last point;
- `curve_area`: the area under the curve divided by the steps it spans (the mean accuracy over training,
  trapezoid rule), so it is on the accuracy scale and counts early gains;
- `steps_to_reach`: the first validated step whose accuracy reaches a target (censored when never).

`paired_bootstrap` compares an arm with a baseline seed by seed: each bootstrap replicate draws seeds with
replacement (the same seeds for both arms: the pairing) and, by default, validation prompts with replacement
(the same prompts for both arms), so the interval covers both training noise and the choice of the
validation prompts. `minimum_detectable_difference` is the power analysis of that paired design.
Pure numpy/scipy: no model, no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

METRICS = ("final_accuracy", "curve_area", "steps_to_reach")


def _as_curve(steps: Sequence[float], accuracy: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(steps, dtype=np.float64)
    a = np.asarray(accuracy, dtype=np.float64)
    if s.ndim != 1 or s.shape != a.shape[-1:] or s.size == 0:
        raise ValueError(f"steps {s.shape} and accuracy {a.shape}: need one accuracy per validated step")
    if np.any(np.diff(s) <= 0):
        raise ValueError(f"steps must be strictly increasing, got {s.tolist()}")
    return s, a


def final_accuracy(steps: Sequence[float], accuracy: Sequence[float] | np.ndarray) -> np.ndarray | float:
    """Accuracy at the last validated step (over the last axis for a batch of curves)."""
    _, a = _as_curve(steps, accuracy)
    return a[..., -1]


def curve_area(steps: Sequence[float], accuracy: Sequence[float] | np.ndarray) -> np.ndarray | float:
    """Area under the validation curve / the steps it spans (trapezoid): the curve's mean accuracy.

    A single validated step has no span: its accuracy is returned.
    """
    s, a = _as_curve(steps, accuracy)
    if s.size == 1:
        return a[..., 0]
    widths = np.diff(s)
    return ((a[..., 1:] + a[..., :-1]) / 2 * widths).sum(-1) / (s[-1] - s[0])


def steps_to_reach(steps: Sequence[float], accuracy: Sequence[float] | np.ndarray,
                   target: float | np.ndarray, *, censored: float | None = None) -> np.ndarray | float:
    """First validated step whose accuracy is >= target (minus 1e-9 for float noise).

    A curve that never reaches it gets `censored` (default: the last step plus one validation interval, a
    lower bound of when it would have). `target` may be one value per curve (batch of curves).
    """
    s, a = _as_curve(steps, accuracy)
    if censored is None:
        censored = s[-1] + (s[-1] - s[-2] if s.size > 1 else 1.0)
    hit = a >= np.asarray(target, dtype=np.float64)[..., None] - 1e-9
    first = np.argmax(hit, axis=-1)
    out = np.where(hit.any(axis=-1), s[first], censored)
    return out if out.ndim else float(out)


@dataclass(frozen=True)
class PairedComparison:
    """An arm against the baseline on the same seeds (and validation prompts).

    Attributes:
        metric: Which metric (`final_accuracy`, `curve_area`, `steps_to_reach`).
        arm_mean: The arm's metric, averaged over seeds (point estimate on all prompts).
        base_mean: The baseline's.
        difference: arm_mean - base_mean (for steps: negative = the arm got there sooner).
        low: Lower end of the bootstrap interval of the difference.
        high: Upper end.
        per_seed: The per-seed differences, in seed order.
        seeds: How many paired seeds.
        replicates: Bootstrap replicates drawn.
    """

    metric: str
    arm_mean: float
    base_mean: float
    difference: float
    low: float
    high: float
    per_seed: tuple[float, ...]
    seeds: int
    replicates: int

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies entirely on one side of 0 (a resolved difference)."""
        return self.low > 0 or self.high < 0


def _metric_values(metric: str, steps: np.ndarray, arm: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The metric of each arm curve and each base curve; curves on the last axis, paired on the others."""
    if metric == "final_accuracy":
        return final_accuracy(steps, arm), final_accuracy(steps, base)
    if metric == "curve_area":
        return curve_area(steps, arm), curve_area(steps, base)
    if metric == "steps_to_reach":
        target = final_accuracy(steps, base)  # each seed's own baseline final accuracy
        return steps_to_reach(steps, arm, target), steps_to_reach(steps, base, target)
    raise ValueError(f"metric={metric!r}: allowed values are {', '.join(METRICS)}")


def paired_bootstrap(steps: Sequence[float], arm_correct: np.ndarray, base_correct: np.ndarray, metric: str, *,
                     replicates: int = 4000, confidence: float = 0.95, resample_prompts: bool = True,
                     seed: int = 0) -> PairedComparison:
    """Paired bootstrap interval of (arm - baseline) for one metric, over seeds and validation prompts.

    Args:
        steps: The validated steps (the same for both arms), increasing.
        arm_correct: [seeds, steps, prompts] correctness (0/1 or per-prompt mean) of the arm; seed i and
            prompt j must be the same seed and prompt as in `base_correct`. [seeds, steps] curves are taken as
            one "prompt" each (seeds-only bootstrap).
        base_correct: The baseline's, same shape.
        metric: `final_accuracy`, `curve_area` or `steps_to_reach` (target = each seed's baseline final
            accuracy, recomputed in every replicate).
        replicates: Bootstrap replicates.
        confidence: Interval coverage (percentile interval).
        resample_prompts: Also resample the validation prompts (with the same draw for both arms).
        seed: Seed of the resampling.
    """
    arm = np.asarray(arm_correct, dtype=np.float64)
    base = np.asarray(base_correct, dtype=np.float64)
    if arm.ndim == 2:
        arm, base = arm[..., None], base[..., None]
    if arm.shape != base.shape or arm.ndim != 3:
        raise ValueError(f"arm {arm.shape} and baseline {base.shape} must both be [seeds, steps, prompts] "
                         "on the same seeds, steps and prompts")
    s = np.asarray(steps, dtype=np.float64)
    if arm.shape[1] != s.size:
        raise ValueError(f"{arm.shape[1]} validated steps in the data but {s.size} steps given")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    n_seeds, _, n_prompts = arm.shape
    arm_vals, base_vals = _metric_values(metric, s, arm.mean(-1), base.mean(-1))
    per_seed = arm_vals - base_vals
    rng = np.random.default_rng(seed)
    if resample_prompts and n_prompts > 1:
        # prompt resampling as multinomial weights: curves = correct @ weights / P, every replicate at once
        weights = rng.multinomial(n_prompts, np.full(n_prompts, 1.0 / n_prompts), size=replicates).T / n_prompts
        arm_curves = np.moveaxis(arm @ weights, -1, 0)   # [replicates, seeds, steps]
        base_curves = np.moveaxis(base @ weights, -1, 0)
    else:
        arm_curves = np.broadcast_to(arm.mean(-1), (replicates, *arm.shape[:2]))
        base_curves = np.broadcast_to(base.mean(-1), (replicates, *base.shape[:2]))
    pick = rng.integers(0, n_seeds, size=(replicates, n_seeds))
    rows = np.arange(replicates)[:, None]
    a_vals, b_vals = _metric_values(metric, s, arm_curves[rows, pick], base_curves[rows, pick])
    diffs = (a_vals - b_vals).mean(-1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return PairedComparison(metric=metric, arm_mean=float(arm_vals.mean()), base_mean=float(base_vals.mean()),
                            difference=float(per_seed.mean()), low=float(low), high=float(high),
                            per_seed=tuple(float(d) for d in per_seed), seeds=n_seeds, replicates=replicates)


def seed_t_interval(differences: Sequence[float], *, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of per-seed paired differences: the seeds-only check on the bootstrap.

    The percentile bootstrap over 10 seeds runs narrow (it cannot see beyond the seeds drawn); a t interval on
    the same per-seed differences is the classical answer to the same question. (NaN, NaN) under 2 seeds.
    """
    from scipy.stats import t

    d = np.asarray(differences, dtype=np.float64)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    if d.size < 2:
        return float("nan"), float("nan")
    half = float(t.ppf(0.5 + confidence / 2, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size))
    return float(d.mean() - half), float(d.mean() + half)


def minimum_detectable_difference(sd_difference: float, seeds: int, *, fixed_se: float = 0.0, alpha: float = 0.05,
                                  power: float = 0.8) -> float:
    """Smallest true mean difference a paired design of `seeds` seeds detects with probability `power`.

    Two-sided paired t-test at level `alpha`: MDD = (t_{1-alpha/2, n-1} + t_{power, n-1}) * SE, with
    SE = sqrt(sd^2 / n + fixed_se^2): `sd_difference` is the spread of the per-seed differences that more
    seeds average away (training noise), `fixed_se` the standard error that they do not (the validation
    prompts are the same for every seed, so which prompts the set holds is one draw for the whole study).
    With fixed_se = 0 and many seeds this tends to (1.96 + 0.84) sd / sqrt(n) at the defaults.
    """
    from scipy.stats import t

    if seeds < 2:
        raise ValueError(f"seeds={seeds}: a paired design needs >= 2 seeds to estimate its own noise")
    for name, value in (("sd_difference", sd_difference), ("fixed_se", fixed_se)):
        if not (value >= 0 and np.isfinite(value)):
            raise ValueError(f"{name}={value} must be a finite number >= 0")
    df = seeds - 1
    se = np.sqrt(sd_difference ** 2 / seeds + fixed_se ** 2)
    return float((t.ppf(1 - alpha / 2, df) + t.ppf(power, df)) * se)


def seeds_needed(sd_difference: float, gap: float, *, fixed_se: float = 0.0, alpha: float = 0.05,
                 power: float = 0.8, max_seeds: int = 1000) -> int | None:
    """Fewest seeds whose paired design detects a true gap `gap` (None if more than `max_seeds`, or never
    because the fixed part alone is too large)."""
    if gap <= 0:
        raise ValueError(f"gap={gap} must be > 0")
    for n in range(2, max_seeds + 1):
        if minimum_detectable_difference(sd_difference, n, fixed_se=fixed_se, alpha=alpha, power=power) <= gap:
            return n
    return None


def paired_sd_from_arm_sd(sd_arm: float, *, correlation: float = 0.0) -> float:
    """Spread of per-seed differences arm - base implied by one arm's seed-to-seed spread.

    Var(a - b) = 2 sd^2 (1 - rho) when both arms have the same spread `sd_arm` and their outcomes on the same
    seed correlate with `correlation` (rho). Used before a second arm exists: with rho = 0 (sharing a seed
    does not pair the arms' outcomes, what the study's pilot measured) it is sqrt(2) sd_arm.
    """
    if not (sd_arm >= 0 and np.isfinite(sd_arm)):
        raise ValueError(f"sd_arm={sd_arm} must be a finite number >= 0")
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation={correlation} must lie in [-1, 1]")
    return float(sd_arm * np.sqrt(2.0 * (1.0 - correlation)))


def sd_interval(sd: float, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Chi-square confidence interval of a standard deviation estimated from `n` normal observations."""
    from scipy.stats import chi2

    if n < 2:
        raise ValueError(f"n={n}: a standard deviation needs >= 2 observations")
    if not (sd >= 0 and np.isfinite(sd)):
        raise ValueError(f"sd={sd} must be a finite number >= 0")
    df = n - 1
    tail = (1 - confidence) / 2
    return (float(sd * np.sqrt(df / chi2.ppf(1 - tail, df))), float(sd * np.sqrt(df / chi2.ppf(tail, df))))


@dataclass(frozen=True)
class VarianceComponents:
    """Parts of the variance of per-prompt paired differences d[seed, prompt] = mu + b_seed + a_prompt + e.

    Attributes:
        seed: Var(b), a whole run's shift (training noise); averaged away by more seeds.
        prompt: Var(a), a prompt's consistent difference across seeds; with a fixed validation set this part is
            one draw for the whole study, averaged away only by more prompts. None when one seed cannot
            separate it from `noise` (then `prompt_upper` bounds it).
        noise: Var(e), seed-by-prompt noise; averaged away by seeds x prompts.
        prompt_upper: An upper bound of Var(a) (the spread of the seed-averaged per-prompt differences).
        seeds: Seeds the estimate used.
        prompts: Prompts the estimate used.
    """

    seed: float
    prompt: float | None
    noise: float
    prompt_upper: float
    seeds: int
    prompts: int

    def standard_error(self, seeds: int, prompts: int) -> tuple[float, float]:
        """(the seed-averaged part, the fixed part) of the standard error of the mean difference in a design
        of `seeds` seeds on `prompts` validation prompts (the fixed part from `prompt_upper` when `prompt`
        could not be separated)."""
        prompt_var = self.prompt if self.prompt is not None else self.prompt_upper
        return (float(np.sqrt((self.seed + self.noise / prompts) / seeds)), float(np.sqrt(prompt_var / prompts)))


def variance_components(differences: np.ndarray) -> VarianceComponents:
    """Method-of-moments estimate of `VarianceComponents` from per-prompt differences [seeds, prompts].

    noise = mean over prompts of the across-seed variance (with the seed shifts removed); prompt = the
    spread of the seed-averaged per-prompt differences minus noise / seeds; seed = the spread of the
    per-seed means minus noise / prompts. Negative estimates are clipped to 0.
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] < 2:
        raise ValueError(f"differences must be [seeds, prompts] with >= 2 prompts, got {d.shape}")
    n_seeds, n_prompts = d.shape
    by_prompt = d.mean(0)
    upper = float(by_prompt.var(ddof=1))
    if n_seeds < 2:
        return VarianceComponents(seed=0.0, prompt=None, noise=upper, prompt_upper=upper, seeds=1, prompts=n_prompts)
    centred = d - d.mean(1, keepdims=True)  # seed shifts out
    noise = float(centred.var(0, ddof=1).mean())
    prompt = max(upper - noise / n_seeds, 0.0)
    seed = max(float(d.mean(1).var(ddof=1)) - noise / n_prompts, 0.0)
    return VarianceComponents(seed=seed, prompt=prompt, noise=noise, prompt_upper=upper, seeds=n_seeds,
                              prompts=n_prompts)


__all__ = ["METRICS", "PairedComparison", "VarianceComponents", "curve_area", "final_accuracy",
           "minimum_detectable_difference", "paired_bootstrap", "paired_sd_from_arm_sd", "sd_interval", "seeds_needed",
           "steps_to_reach", "variance_components"]


def label_shares_by_phase(drawn: Sequence[Sequence[str]], phases: int = 3) -> list[dict[str, float]]:
    """Share of each label among the prompts drawn in each of `phases` contiguous spans of training steps.

    `drawn[i]` holds the labels (task families, say) of the prompts drawn at step i + 1. The steps are split
    as evenly as possible (the first spans get the extra step); a span's shares sum to 1, and a label not
    drawn in a span is absent from it. What a schedule trained on early versus late, which the final accuracy
    by family alone does not show.
    """
    if phases < 1 or phases > len(drawn):
        raise ValueError(f"phases={phases}: need 1 <= phases <= the {len(drawn)} steps given")
    out = []
    for span in np.array_split(np.arange(len(drawn)), phases):
        labels = [label for i in span for label in drawn[int(i)]]
        if not labels:
            raise ValueError(f"no prompts drawn in steps {int(span[0]) + 1}-{int(span[-1]) + 1}")
        names, counts = np.unique(np.asarray(labels, dtype=object), return_counts=True)
        out.append({str(n): float(c) / len(labels) for n, c in zip(names, counts, strict=True)})
    return out
