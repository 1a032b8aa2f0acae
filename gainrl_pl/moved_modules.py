"""Module paths from before the package had folders (issue 16), kept importable with a warning naming the new one.

`import gainrl_pl.reward_functions` (or a config's `gainrl_pl.code_reward.code_execution_reward`) finds the
module at its new path, `gainrl_pl.rewards.functions`, and warns once that the old path will go away. The old
module name is an alias of the new module, not a copy: patching either patches both.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

#: old module (under `gainrl_pl.`) -> where its names live now. `rewards`, `data` and `schedules` became
#: packages whose own namespace carries what the old modules of those names exported.
MOVED_MODULES: dict[str, str] = {
    "round_sampler": "schedules.base",
    "sampling": "schedules",
    "selective_schedules": "schedules.selective",
    "scheduling": "schedules.rankings",
    "group_filter": "schedules.group_filter",
    "dynamic_sampling": "schedules.dynamic_sampling",
    "angles_cli": "schedules.angles_cli",
    "answer_check": "rewards.answers",
    "reward_functions": "rewards.functions",
    "code_reward": "rewards.code",
    "sandbox": "rewards.sandbox",
    "sandbox_child": "rewards.sandbox_child",
    "evaluate": "evaluation.evaluate",
    "eval_backends": "evaluation.backends",
    "eval_sets": "evaluation.sets",
    "eval_results": "evaluation.results",
    "export": "evaluation.export",
    "metrics": "evaluation.metrics",
    "study_stats": "evaluation.study_stats",
    "data_loading": "data.loading",
    "prompts": "data.prompts",
    "arithmetic": "data.arithmetic",
    "code_data": "data.code",
    "model_setup": "models",
}


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def create_module(self, spec):
        warnings.warn(f"{self.old} moved to {self.new}; import it from there (the old path will be removed)",
                      FutureWarning, stacklevel=2)
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:  # the new module is already executed
        return None


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds `gainrl_pl.<old>` for every old name in `MOVED_MODULES` and returns the module at its new path."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package != "gainrl_pl" or name not in MOVED_MODULES:
            return None
        new = f"gainrl_pl.{MOVED_MODULES[name]}"
        return importlib.machinery.ModuleSpec(fullname, _MovedModuleLoader(fullname, new))


def install() -> None:
    """Put the finder on `sys.meta_path` once (after the path finder: a module at an old path still wins)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
