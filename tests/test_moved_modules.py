"""Imports users wrote before the package had folders (issue 16) still work, with a warning naming the new path."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from gainrl_pl.moved_modules import MOVED_MODULES
from gainrl_pl.rewards import get_reward_function


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_each_old_module_path_is_the_new_module_and_says_where_it_went(old):
    new = importlib.import_module(f"gainrl_pl.{MOVED_MODULES[old]}")
    sys.modules.pop(f"gainrl_pl.{old}", None)  # import afresh, so the warning is raised here
    with pytest.warns(FutureWarning, match=rf"gainrl_pl\.{old} moved to gainrl_pl\.{MOVED_MODULES[old]}"):
        module = importlib.import_module(f"gainrl_pl.{old}")
    assert module is new  # an alias, not a copy: a patch through either path reaches the code


def test_names_of_the_old_flat_modules_import_from_their_packages():
    """`rewards`, `data` and `schedules` were modules; their packages export what those modules exported."""
    from gainrl_pl.data import DATASET_PRESETS, build_examples, load_rows  # noqa: F401
    from gainrl_pl.rewards import RewardComputer, accuracy_reward, extract_prediction  # noqa: F401
    from gainrl_pl.schedules import (  # noqa: F401  (the old schedules.py's names and the factory)
        PassRatePrioritySampler,
        UniformSampler,
        build_sampler,
    )

    with pytest.warns(FutureWarning, match="moved to gainrl_pl.schedules"):
        sys.modules.pop("gainrl_pl.sampling", None)
        from gainrl_pl.sampling import GaussianRankSampler  # noqa: F401
        from gainrl_pl.sampling import build_sampler as old_build_sampler
    assert old_build_sampler is build_sampler


def test_reward_dotted_paths_of_old_configs_resolve():
    with pytest.warns(FutureWarning, match="gainrl_pl.code_reward moved to gainrl_pl.rewards.code"):
        sys.modules.pop("gainrl_pl.code_reward", None)
        old = get_reward_function("gainrl_pl.code_reward.code_execution_reward")
    assert old is get_reward_function("gainrl_pl.rewards.code.code_execution_reward")
    assert get_reward_function("gainrl_pl.reward_functions.format_reward") is get_reward_function("format")


def test_a_name_that_never_existed_still_fails_plainly():
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("gainrl_pl.no_such_module")


def test_old_paths_work_in_a_fresh_interpreter():
    """The finder is installed by `import gainrl_pl` itself: a user's first line may be the old import."""
    code = "from gainrl_pl.reward_functions import accuracy_reward; print(accuracy_reward.__module__)"
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "gainrl_pl.rewards.functions"
    assert "gainrl_pl.reward_functions moved to gainrl_pl.rewards.functions" in out.stderr
