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
    # three of the five configs (~10 s each, a subprocess apiece): pure bf16 full, fp32 LoRA under bf16-mixed, 4-bit;
    # the other two differ from these only in the (dtype, precision) pair checked below
    out = _run(tmp_path, "--shape", "tiny", "--device", "cpu", "--steps", "1", "--prompt-tokens", "48",
               "--new-tokens", "6", "--configs", "bf16_full,mixed_lora,qlora", timeout=600)
    rows = _rows(out)
    assert set(rows) == {"bf16_full", "mixed_lora", "qlora"}
    assert "G=8" in out and "6 new tokens" in out
    trained = {m[1]: tuple(int(g) for g in m.groups()[1:]) for m in re.finditer(
        r"^  (\w+): (\d+) optimizer steps, (\d+) of (\d+) parameters trainable, (\d+) 4-bit layers", out, re.M)}
    precision = {m[1]: (m[2], m[3]) for m in re.finditer(
        r"^  (\w+): .* (\w+) trained weights, precision ([\w-]+)$", out, re.M)}
    # what the shipped configs do (fp32 master weights / adapters under bf16-mixed) beside pure bf16
    assert precision == {"bf16_full": ("bfloat16", "bf16-true"), "mixed_lora": ("float32", "bf16-mixed"),
                         "qlora": ("float32", "bf16-mixed")}
    # one warm-up + one timed step each; every weight trained in full, LoRA adapters only on an fp32 or 4-bit base.
    # The tiny shape has 2 layers of 7 projections (in + out features): q and o 64 + 64, k and v 64 + 32 (2 KV heads
    # of 16), gate and up 64 + 128, down 128 + 64; LoRA r = 16 adds r * (in + out) to each.
    adapters = 2 * 16 * (2 * 128 + 2 * 96 + 3 * 192)
    steps, full_trainable, full_total, full_4bit = trained["bf16_full"]
    assert steps == 2 and full_trainable == full_total and full_4bit == 0
    steps, lora_trainable, lora_total, lora_4bit = trained["mixed_lora"]
    assert steps == 2 and lora_trainable == adapters and lora_total == full_total + adapters and lora_4bit == 0
    steps, qlora_trainable, _, qlora_4bit = trained["qlora"]
    assert steps == 2 and qlora_trainable == lora_trainable and qlora_4bit == 2 * 7


@pytest.mark.gpu
def test_qlora_on_a_qwen25_15b_shape_fits_a_12_gib_consumer_gpu(tmp_path):
    rows = _rows(_run(tmp_path, "--configs", "qlora", "--steps", "1", timeout=3000))
    assert rows["qlora"][1] < 12.0, rows
