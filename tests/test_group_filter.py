"""DAPO dynamic sampling bookkeeping (spec section 9): zero-variance groups, refill arithmetic, the cap."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gainrl_pl.schedules.group_filter import GroupFilter, zero_variance_groups


def groups(pattern: str, g: int = 4) -> torch.Tensor:
    """'z' = all-equal rewards (zero variance), 's' = mixed rewards (signal); one row per letter."""
    rows = [[1.0] * g if c == "z" else [1.0] + [0.0] * (g - 1) for c in pattern]
    return torch.tensor(rows)


def test_zero_variance_groups():
    nan = math.nan
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5 + 1e-7, 0.5],
                            [nan, 1.0, 1.0], [nan, 0.0, 1.0], [nan, nan, nan]])
    assert zero_variance_groups(rewards).tolist() == [True, True, False, True, True, False, True]
    assert zero_variance_groups(rewards, atol=0.0).tolist()[3] is False
    with pytest.raises(ValueError, match="num_prompts, G"):
        zero_variance_groups(torch.zeros(4))


def test_refill_with_half_the_groups_zeroed():
    f = GroupFilter(max_extra_rounds=3)
    f.begin(target=8)
    keep = f.add(groups("zszszszs"))
    assert keep.tolist() == [False, True] * 4 and f.needed == 4
    assert f.next_draw_size() == 8  # 4 missing at a survival of 1/2
    assert f.add(groups("szszzzzz")).sum() == 2 and f.needed == 2
    # survival so far 6 of 16: 2 missing -> ceil(2 * 16 / 6) = 6
    assert f.next_draw_size() == 6
    keep = f.add(groups("ssssss"))
    assert keep.tolist() == [True, True, False, False, False, False]  # the surplus is not kept
    assert f.done and f.kept == 8 and f.next_draw_size() == 0
    assert (f.step_seen, f.step_dropped, f.step_extra_rounds) == (22, 10, 2)
    f.begin(target=2)  # a new step resets the step's counts
    assert (f.kept, f.step_seen, f.step_dropped, f.step_extra_rounds) == (0, 0, 0, 0)


def test_draw_size_is_one_batch_at_most():
    f = GroupFilter(max_extra_rounds=2)
    f.begin(target=4)
    f.add(groups("zzzz"))  # survival 0: one full batch
    assert f.next_draw_size() == 4
    f.add(groups("zzzs"))  # 1 of 8 survived: ceil(3 * 8) = 24, capped at the batch
    assert f.next_draw_size() == 4


def test_cap_stops_the_step_with_what_was_kept():
    f = GroupFilter(max_extra_rounds=1)
    f.begin(target=4)
    f.add(groups("zzzs"))
    assert f.next_draw_size() == 4 and f.step_extra_rounds == 1
    f.add(groups("zzzz"))
    assert f.next_draw_size() == 0 and f.done and f.kept == 1  # the module decides, with every rank, to raise or not
    f0 = GroupFilter(max_extra_rounds=0)
    f0.begin(2)
    f0.add(groups("zs"))
    assert f0.next_draw_size() == 0 and f0.kept == 1 and f0.step_extra_rounds == 0
    with pytest.raises(ValueError, match="max_extra_rounds"):
        GroupFilter(max_extra_rounds=-1)


@given(target=st.integers(0, 12), rollouts=st.lists(st.text("zs", min_size=0, max_size=10), max_size=6))
@settings(max_examples=80, deadline=None)
def test_never_keeps_more_than_target(target, rollouts):
    f = GroupFilter(max_extra_rounds=len(rollouts))
    f.begin(target)
    total = 0
    for pattern in rollouts:
        keep = f.add(groups(pattern)) if pattern else f.add(torch.zeros(0, 4))
        total += int(keep.sum())
        assert not keep[zero_variance_groups(groups(pattern))].any() if pattern else True
        if f.needed:
            assert f.needed <= f.next_draw_size() <= max(target, f.needed)
    assert total == f.kept <= target
    assert f.kept == min(target, sum(p.count("s") for p in rollouts))
