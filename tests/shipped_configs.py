"""The shipped configs (configs/*.yaml) made runnable on a CPU test machine: what is swapped, and why.

`cpu_swaps(config, model_dir, tmp)` returns the command-line overrides that `tests/test_configs.py` and
`tests/test_precision.py` add to `gainrl-pl fit --config CONFIG`:

- the model: the tiny random Llama of `tests/conftest.py` (no download);
- training data given as a hub id (`openai/gsm8k:main:train`, MATH-lighteval): a local file with the same
  columns (tests never touch the network). Shipped files (`data/...`) are kept;
- `accelerator: gpu` -> `cpu`, `devices: 8` -> `1`, `strategy: ddp` -> `auto` (real multi-process DDP has
  its own tests, tests/test_ddp.py);
- sizes: one step (`max_steps`), 2 prompts per step, 8 new tokens, 2 validation prompts, no progress bar;
- everything else as shipped: precision, dtype, LoRA, 4-bit, the loss, rewards, schedule, loggers, checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from gainrl_pl.data.loading import looks_like_hub_id, resolve_data_path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def local_rows(preset: str, n: int = 16) -> list[dict]:
    """Rows in the layout of the hub set a preset reads (GSM8K: question / `#### n`; MATH: worked solutions)."""
    if preset == "gsm8k":
        return [{"question": f"Tom has {i} apples and buys {i % 5 + 1} more. How many apples does he have?",
                 "answer": f"He has {i} + {i % 5 + 1} = {2 * i % 5 + i} apples.\n#### {i + i % 5 + 1}"} for i in range(n)]
    if preset == "math_solution":
        return [{"problem": f"What is ${i} + {i % 3}$?", "solution": f"We add: ${i} + {i % 3} = \\boxed{{{i + i % 3}}}$.",
                 "level": f"Level {i % 5 + 1}", "type": "Prealgebra"} for i in range(n)]
    raise ValueError(f"no local stand-in for hub data with preset {preset!r}")


def cpu_swaps(config: Path, model_dir: Path, tmp: Path, *, max_steps: int = 1) -> list[str]:
    """Overrides that run `config` for `max_steps` optimizer steps on this CPU with the tiny model."""
    cfg = yaml.safe_load(config.read_text())
    trainer, data = cfg.get("trainer", {}), cfg.get("data", {})
    args = ["--model.model_name_or_path", str(model_dir), "--trainer.max_steps", str(max_steps),
            "--trainer.enable_progress_bar", "false", "--model.max_completion_length", "8",
            "--model.val_max_completion_length", "8", "--data.prompts_per_step", "2", "--data.val_limit", "2"]
    if trainer.get("accelerator") not in (None, "cpu", "auto"):
        args += ["--trainer.accelerator", "cpu"]
    if trainer.get("devices") not in (None, 1, "1"):
        args += ["--trainer.devices", "1"]
    if trainer.get("strategy") not in (None, "auto"):
        args += ["--trainer.strategy", "auto"]
    for key in ("train_data", "val_data"):
        source = data.get(key)
        if source is None:
            continue
        if looks_like_hub_id(source) and not Path(resolve_data_path(source)).exists():  # not a shipped file
            path = tmp / f"{key}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in local_rows(data.get("preset", "gsm8k"))))
            args += [f"--data.{key}", str(path)]
    return args
