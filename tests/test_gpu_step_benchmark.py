"""benchmarks/gpu_step.py (issue 7 section 4): the CPU smoke run here, the real-size run on a GPU."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"


def _run(tmp_path, *args: str, timeout: int) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--workdir", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _rows(out: str) -> dict[str, tuple[float, float]]:
    return {m[1]: (float(m[2]), float(m[3])) for m in re.finditer(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+) \|", out, re.M)}


def test_every_config_trains_on_a_tiny_random_qwen2_on_cpu(tmp_path):
    out = _run(tmp_path, "--shape", "tiny", "--device", "cpu", "--steps", "1", "--prompt-tokens", "48",
               "--new-tokens", "6", timeout=600)
    rows = _rows(out)
    assert set(rows) == {"bf16_full", "bf16_lora", "qlora"}
    assert all(s > 0 and peak > 0 for s, peak in rows.values())
    assert "G=8" in out and "6 new tokens" in out


@pytest.mark.gpu
def test_qlora_on_a_qwen25_15b_shape_fits_a_12_gib_consumer_gpu(tmp_path):
    rows = _rows(_run(tmp_path, "--configs", "qlora", "--steps", "1", timeout=3000))
    assert rows["qlora"][1] < 12.0, rows
