"""gainrl_pl: GAIN-RL data scheduling + GRPO fine-tuning of LLMs on PyTorch Lightning.

The layout (docs/ARCHITECTURE.md): the pure core flat here (`angles`, `scoring`, `grpo`, `rollout`, `optim`,
`models`), `module.GRPOModule` orchestrating a step, and one folder a concept: `schedules/`, `rewards/`,
`evaluation/`, `data/`. Module paths from before the folders still import, with a warning naming the new path.
"""

from gainrl_pl import moved_modules as _moved_modules

__version__ = "0.1.0"

_moved_modules.install()
