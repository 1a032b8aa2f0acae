"""Data schedules: which prompts each sampling round draws (spec sections 4, 5, 8, 9).

- `base`: the `RoundSampler` contract every schedule implements (DDP shards, resume position, refills).
- `gaussian`: GAIN-RL's Gaussian over ranks and `update_mean`; with another ranking also `length` and
  `accuracy_curriculum`.
- `peers`: uniform (vanilla GRPO), AdaRFT, pass-rate priority; `selective`: GRESO and MoPPS.
- `rankings`: the angle ranking (sharded scoring, score cache) and the schedule plot; `angles_cli` is
  `gainrl-pl angles`.
- `group_filter` and `dynamic_sampling`: DAPO's dynamic sampling (which groups a step keeps, and the refills).

`build_sampler(name, **kwargs)`, below, maps every `data.schedule.name` to its class.
"""

from __future__ import annotations

import inspect
from typing import Any

from gainrl_pl.schedules.base import RoundSampler, finite_mean, top_k_without_replacement
from gainrl_pl.schedules.gaussian import (
    GaussianRankSampler,
    MeanUpdate,
    check_sigma,
    gaussian_rank_probabilities,
    resolve_rank_quantity,
    update_mean,
)
from gainrl_pl.schedules.peers import (
    PASS_RATE_ESTIMATORS,
    PASS_RATE_WEIGHTINGS,
    AdaRFTSampler,
    PassRatePrioritySampler,
    UniformSampler,
)
from gainrl_pl.schedules.rankings import rank_scores, ranking_from_values
from gainrl_pl.schedules.selective import GRESOSampler, MoPPSSampler

SAMPLERS: dict[str, type[RoundSampler]] = {
    "angle": GaussianRankSampler,  # ranking: angle concentration, most concentrated first (GAIN-RL)
    "length": GaussianRankSampler,  # ranking: question length in tokens, shortest first
    "accuracy_curriculum": GaussianRankSampler,  # ranking: base-model pass rate, easiest first
    "uniform": UniformSampler,
    "adarft": AdaRFTSampler,
    "pass_rate_priority": PassRatePrioritySampler,
    "greso": GRESOSampler,  # skips prompts whose recent groups had zero reward variance (gainrl_pl.schedules.selective)
    "mopps": MoPPSSampler,  # Beta posterior per prompt, Thompson sampling toward a target pass rate
}
SAMPLER_NAMES = tuple(SAMPLERS)


def build_sampler(name: str, **kwargs: Any) -> RoundSampler:
    """The sampler for a schedule name (`angle`, `length`, `accuracy_curriculum`, `uniform`, `adarft`,
    `pass_rate_priority`, `greso`, `mopps`), built from keyword arguments of its class.

    The three Gaussian schedules differ only in the ranking installed with `set_ranking`.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLER_NAMES)}")
    cls = SAMPLERS[name]
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"sampler {name!r} ({cls.__name__}) does not take {', '.join(unknown)}; "
                         f"accepted: {', '.join(accepted)}")
    return cls(**kwargs)


__all__ = [
    "PASS_RATE_ESTIMATORS", "PASS_RATE_WEIGHTINGS", "SAMPLERS", "SAMPLER_NAMES", "AdaRFTSampler",
    "GRESOSampler", "GaussianRankSampler", "MeanUpdate", "MoPPSSampler", "PassRatePrioritySampler", "RoundSampler", "UniformSampler",
    "build_sampler", "check_sigma", "finite_mean", "gaussian_rank_probabilities", "rank_scores", "ranking_from_values", "resolve_rank_quantity",
    "top_k_without_replacement", "update_mean",
]
