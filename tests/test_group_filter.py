"""DAPO dynamic sampling bookkeeping (spec section 9): zero-variance groups, refill arithmetic, the cap."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gainrl_pl.group_filter import GroupFilter, common_group_count, zero_variance_groups


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
    assert f.next_draw_size() == 4
    assert f.add(groups("szsz")).sum() == 2 and f.needed == 2
    assert f.next_draw_size() == 2
    f.add(groups("ss"))
    assert f.done and f.kept == 8 and f.next_draw_size() == 0
    m = f.step_metrics()
    assert m["zero_variance_fraction"] == pytest.approx(6 / 14)
    assert (m["dropped_groups"], m["extra_rounds"], m["kept_groups"]) == (6, 2, 8)
    assert (f.dropped_groups, f.extra_rounds) == (6, 2)
    f.begin(target=2)  # a new step resets the step counts, not the run totals
    f.add(groups("zs"))
    f.next_draw_size()
    assert f.step_metrics()["extra_rounds"] == 1 and f.extra_rounds == 3 and f.dropped_groups == 7


def test_oversample_scales_by_survival_and_counts_surplus():
    f = GroupFilter(max_extra_rounds=2, oversample=True)
    f.begin(target=8)
    f.add(groups("zszszszs"))  # survival 1/2, 4 missing -> draw 8
    assert f.next_draw_size() == 8
    keep = f.add(groups("ssssssss"))
    assert int(keep.sum()) == 4 and f.done and f.step_metrics()["surplus_groups"] == 4
    f.begin(target=4)
    f.add(groups("zzzz"))  # survival 0: one full batch
    assert f.next_draw_size() == 4


def test_cap_raises_a_clear_error():
    f = GroupFilter(max_extra_rounds=1)
    f.begin(target=4)
    f.add(groups("zzzz"))
    assert f.next_draw_size() == 4
    f.add(groups("zzzs"))
    with pytest.raises(RuntimeError, match=r"max_extra_rounds=1\) only 1 of 4") as err:
        f.next_draw_size()
    assert "Raise max_extra_rounds" in str(err.value) and "allow_partial" in str(err.value)
    f0 = GroupFilter(max_extra_rounds=0)
    f0.begin(2)
    f0.add(groups("zs"))
    with pytest.raises(RuntimeError, match="max_extra_rounds=0"):
        f0.next_draw_size()


def test_allow_partial_and_ranks_agree():
    counts = []
    for pattern in ("zzss", "zsss"):  # two ranks drop different numbers of groups
        f = GroupFilter(max_extra_rounds=0, allow_partial=True)
        f.begin(4)
        f.add(groups(pattern))
        assert f.next_draw_size() == 0 and f.done
        counts.append(f.kept)
    assert counts == [2, 3] and common_group_count(counts) == 2
    with pytest.raises(ValueError):
        common_group_count([])
    with pytest.raises(ValueError, match="max_extra_rounds"):
        GroupFilter(max_extra_rounds=-1)


def test_state_roundtrip():
    f = GroupFilter()
    f.begin(2)
    f.add(groups("zzs"))
    f.next_draw_size()
    g = GroupFilter()
    g.load_state_dict(f.state_dict())
    assert (g.dropped_groups, g.extra_rounds, g.seen_groups) == (2, 1, 3)


@given(target=st.integers(0, 12), rollouts=st.lists(st.text("zs", min_size=0, max_size=10), max_size=6),
       oversample=st.booleans())
@settings(max_examples=80, deadline=None)
def test_never_keeps_more_than_target(target, rollouts, oversample):
    f = GroupFilter(max_extra_rounds=len(rollouts), oversample=oversample)
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
