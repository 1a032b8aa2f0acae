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
