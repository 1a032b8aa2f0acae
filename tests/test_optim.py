"""Learning-rate schedule and optimizer construction, without a model."""

from __future__ import annotations

import math

import pytest

from gainrl_pl.optim import lr_multiplier


def test_warmup_then_each_schedule():
    kw = dict(warmup_steps=4, total_steps=14)
    assert [lr_multiplier(s, schedule="constant", **kw) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # after warm-up, progress = (step - 4) / 10
    assert lr_multiplier(9, schedule="linear", **kw) == pytest.approx(0.5)
    assert lr_multiplier(14, schedule="linear", **kw) == 0.0
    assert lr_multiplier(99, schedule="linear", **kw) == 0.0  # past the end: stays at 0, never negative
    assert lr_multiplier(9, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_multiplier(6, schedule="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_multiplier(4, schedule="cosine", **kw) == 1.0


def test_unknown_total_keeps_decay_schedules_flat_and_bad_names_fail():
    assert lr_multiplier(50, schedule="cosine", warmup_steps=0, total_steps=None) == 1.0
    with pytest.raises(ValueError, match="lr_schedule='step'.*constant, linear, cosine"):
        lr_multiplier(0, schedule="step", warmup_steps=0, total_steps=10)
