"""`rollout_metrics`: the step's logged metrics from its tensors, checked on hand-made values."""

from __future__ import annotations

import math

import pytest
import torch

from gainrl_pl.distributed import gather_rows
from gainrl_pl.rollout_report import rollout_metrics


def report(**overrides):
    kwargs = dict(totals=torch.tensor([1.0, 0.0, 1.0, 1.0]),
                  per_function=torch.tensor([[1.0, 0.0], [0.0, float("nan")], [1.0, 0.0], [1.0, 0.0]]),
                  reward_names=["accuracy", "format"], reward_errors={"format": 1},
                  accuracy=torch.tensor([0.5, 1.0]), signal=torch.tensor([0.2, 0.4]),
                  lengths=torch.tensor([3.0, 5.0, 8.0, 8.0]), truncated=torch.tensor([0.0, 0.0, 1.0, 1.0]),
                  zero_std=torch.tensor([0.0, 1.0]), generation_tokens=24, generation_seconds=2.0,
                  train_tokens=40, train_seconds=4.0, nonfinite_updates=2,
                  step_metrics={"loss": [0.5, 1.5], "kl": [0.1, 0.1, 0.4]})
    kwargs.update(overrides)
    return {k: float(v) for k, v in rollout_metrics(**kwargs).items()}


def test_each_metric_is_the_quantity_it_names():
    log = report()
    assert log["reward/total"] == 0.75 and log["reward/total_std"] == pytest.approx(0.5)
    assert log["reward/accuracy"] == 0.75 and log["gainrl/angle_signal"] == pytest.approx(0.3)
    assert log["reward/zero_std_groups"] == 0.5
    assert (log["completions/mean_length"], log["completions/min_length"], log["completions/max_length"]) == (6, 3, 8)
    assert log["completions/truncated_fraction"] == 0.5
    assert log["perf/generation_tokens_per_s"] == 12 and log["perf/train_tokens_per_s"] == 10
    assert log["train/nonfinite_updates"] == 2
    assert log["reward/accuracy/mean"] == 0.75
    assert log["reward/format/mean"] == 0.0  # the NaN (an abstention) is left out of the mean
    assert math.isnan(log["reward/format/std"])  # ... but not out of the spread, as before the move
    assert log["reward/format/errors"] == 1
    assert log["train/loss"] == 1.0 and log["train/kl"] == pytest.approx(0.2)
    assert not any(k.startswith("dynamic_sampling/") for k in log)


def test_one_reward_function_and_dynamic_sampling_counts():
    log = report(per_function=torch.tensor([1.0, 0.0, 1.0, 1.0]), reward_names=["accuracy"], reward_errors={},
                 dynamic_metrics={"dropped_groups": 3.0, "skipped_steps": 1.0})
    assert log["reward/accuracy/mean"] == 0.75 and log["reward/accuracy/std"] == pytest.approx(0.5)
    assert log["dynamic_sampling/dropped_groups"] == 3 and log["dynamic_sampling/skipped_steps"] == 1


def test_zero_seconds_do_not_divide_by_zero():
    log = report(generation_seconds=0.0, train_seconds=0.0, train_tokens=0)
    assert math.isfinite(log["perf/generation_tokens_per_s"]) and log["perf/train_tokens_per_s"] == 0


def test_gather_rows_cuts_each_ranks_padding():
    """Two ranks with 1 and 3 rows: padded to 3, gathered, and cut back to 1 + 3 rows in rank order."""
    shards = [torch.tensor([[1.0]]), torch.tensor([[2.0], [3.0], [4.0]])]

    def all_gather(padded):  # what Lightning's all_gather returns: one padded tensor per rank, stacked
        stacked = torch.zeros(2, *padded.shape)
        for r, shard in enumerate(shards):
            stacked[r, : shard.shape[0]] = shard
        return stacked

    out = gather_rows(shards[0], all_gather, world_size=2, rows_per_rank=[1, 3])
    assert out.flatten().tolist() == [1.0, 2.0, 3.0, 4.0]
    assert torch.equal(gather_rows(shards[1], all_gather, world_size=1), shards[1])
