"""Every shipped config, instantiated for real and trained one step on CPU (swaps: tests/shipped_configs.py).

`--print_config` (tests/test_cli.py) proves a config parses; here the real classes are built from it (the
model with its LoRA / 4-bit settings, the datamodule with its preset and files, the loggers, the checkpoint
callback, the trainer with the config's precision) and take one optimizer step.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import yaml
from shipped_configs import CONFIGS, REPO, cpu_swaps

from gainrl_pl.cli import run_lightning_cli
from gainrl_pl.data.loading import looks_like_hub_id


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_config_trains_one_step_on_cpu(config, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's relative runs/... directories land here
    monkeypatch.setenv("GAINRL_PL_CACHE", str(tmp_path / "cache"))
    shipped = yaml.safe_load(config.read_text())
    cli = run_lightning_cli(["fit", "--config", str(config), *cpu_swaps(config, tiny_model_dir, tmp_path)])
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    assert trainer.global_step == 1
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    # kept as shipped: precision, dtype of the trained weights, LoRA / 4-bit, the data preset and schedule
    assert str(trainer.precision) == str(shipped["trainer"].get("precision", "32-true"))
    trainable = [p for p in model.policy.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable), "trained weights must stay fp32"
    assert (model.hparams.lora is None) == (shipped["model"].get("lora") is None)
    assert (model.hparams.quantization is None) == (shipped["model"].get("quantization") is None)
    assert dm.hparams.preset == shipped["data"]["preset"] and dm.schedule.name == shipped["data"]["schedule"]["name"]
    assert dm.val_set is None or len(dm.val_set) == 2
    last = list(tmp_path.glob("**/checkpoints/last.ckpt")) + list(tmp_path.glob("**/last.ckpt"))
    assert last, "no checkpoint written"
    if dm.val_set is not None:  # the validation path too (outside autocast, on the shipped evaluation file)
        metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
        assert "val/accuracy" in metrics and metrics["val/mean_completion_length"] > 0


def test_no_shipped_config_or_user_document_names_the_development_folder():
    """`../shared` exists only in the developers' layout; a user's clone has none."""
    readable = [*CONFIGS, REPO / "README.md", REPO / "Makefile", *sorted((REPO / "docs").glob("*.md")),
                *sorted((REPO / "benchmarks").glob("*.py")), *sorted((REPO / "gainrl_pl").rglob("*.py")),
                REPO / "datamodules" / "gainrl.py"]
    offenders = [str(p.relative_to(REPO)) for p in readable if "../shared" in p.read_text() or
                 re.search(r"parent\s*/\s*\"shared\"", p.read_text())]
    assert not offenders, f"these name the development-only ../shared folder: {offenders}"


def test_training_sets_are_hub_ids_and_evaluation_sets_ship():
    for config in CONFIGS:
        data = yaml.safe_load(config.read_text())["data"]
        for key in ("train_data", "val_data"):
            source = data.get(key)
            if source is None:
                continue
            shipped_file = (REPO / source).is_file()
            assert shipped_file or looks_like_hub_id(source), f"{config.name}: {key}={source!r}"
            if key == "val_data":
                assert shipped_file, f"{config.name}: validation set {source!r} does not ship"
