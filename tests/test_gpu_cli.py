"""On a GPU: the paper's shipped config (configs/gsm8k_qwen05b_paper.yaml) run as a user runs it, on CUDA.

`gainrl-pl fit --config configs/gsm8k_qwen05b_paper.yaml` in a subprocess with its precision (`bf16-mixed`, fp32
master weights), gradient checkpointing, KL to the reference, micro-batching and angle schedule as shipped. Nothing
can be downloaded on a lent GPU, so the model is a random-weight Qwen2.5-0.5B shape (24 layers, hidden 896) with the
offline test tokenizer's vocabulary (its samples decode to text, so the digit reward of tests/cli_probe.py varies
and every step learns); training rows are local GSM8K-shaped rows; completions are shorter (64 tokens).

The CPU suite runs every shipped config for a step (tests/test_configs.py) and the resume contract on CPU
(tests/test_resume.py); this file is what only CUDA can show: autocast on CUDA, CUDA RNG state saved and restored,
the fp32 greedy validation path on the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_probe import console_problems
from shipped_configs import local_rows

HERE = Path(__file__).parent
REPO = HERE.parent
PAPER = REPO / "configs" / "gsm8k_qwen05b_paper.yaml"


def _model_dir(path: Path) -> Path:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_step
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from gainrl_pl.testing import build_tiny_tokenizer

    return gpu_step.build_model_dir("qwen2.5-0.5b", path, vocab_size=len(build_tiny_tokenizer()))


def _command(cwd: Path, model: Path, data: Path, *args: str, verb: str = "fit") -> subprocess.Popen:
    env = {**os.environ, "GAINRL_PL_CACHE": str(cwd / "cache"), "GAINRL_STEP_RECORD": str(cwd / "record.jsonl"),
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    command = [sys.executable, "-m", "gainrl_pl.cli", verb, "--config", str(PAPER),
               "--model.model_name_or_path", str(model), "--data.train_data", str(data),
               # the shipped evaluation file, named from the checkout (a wheel install does not carry data/)
               "--data.val_data", str(REPO / "data" / "eval" / "gsm8k_test.jsonl"), "--data.val_limit", "8",
               "--data.prompts_per_step", "4", "--model.max_completion_length", "64",
               "--model.val_max_completion_length", "32", "--model.reward_funcs", "[cli_probe.digit_reward]",
               "--trainer.enable_progress_bar", "false", *args]
    if verb == "fit":
        command.append("--trainer.callbacks+=cli_probe.StepRecord")
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    return out + err


def _records(cwd: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (cwd / "record.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def cuda_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_cli")
    model = _model_dir(root / "qwen2.5-0.5b-shape")
    data = root / "gsm8k_rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in local_rows("gsm8k", 32)))
    straight, stopped = root / "straight", root / "stopped"
    straight.mkdir()
    stopped.mkdir()
    # side by side on the one GPU: 3 steps straight, and 2 steps then the same command with --ckpt_path last
    a = _command(straight, model, data, "--trainer.max_steps", "3")
    b = _command(stopped, model, data, "--trainer.max_steps", "2")
    consoles = {"straight": _finish(a), "first": _finish(b)}
    consoles["resumed"] = _finish(_command(stopped, model, data, "--trainer.max_steps", "3", "--ckpt_path", "last"))
    consoles["validate"] = _finish(_command(stopped, model, data, "--ckpt_path", "last", verb="validate"))
    return {"straight": _records(straight), "resumed": _records(stopped), "consoles": consoles}


@pytest.mark.gpu
def test_paper_config_trains_on_cuda_with_fp32_master_weights(cuda_runs):
    rows = cuda_runs["straight"]
    assert sorted(rows) == [1, 2, 3]
    for row in rows.values():
        assert row["device"].startswith("cuda") and row["precision"] == "bf16-mixed", row
        assert row["trained_dtype"] == "torch.float32", row
    assert rows[1]["weights"] != rows[3]["weights"], "three optimizer steps left the weights unchanged"


@pytest.mark.gpu
def test_ckpt_path_last_continues_the_cuda_run(cuda_runs):
    straight, resumed = cuda_runs["straight"], cuda_runs["resumed"]
    assert sorted(resumed) == [1, 2, 3]  # steps 1-2 of the first command, then step 3 of the resumed one
    assert "resuming from" in cuda_runs["consoles"]["resumed"]
    a, b = straight[3], resumed[3]
    assert a["indices"] == b["indices"] and a["mu"] == pytest.approx(b["mu"])  # sampler state restored
    # same CUDA RNG state -> the same samples; bf16 GEMMs on one GPU are deterministic for the same shapes, but
    # the attention backward may use atomics, so the weights may differ in the last bits after 2 steps
    assert a["reward"] == pytest.approx(b["reward"], abs=1e-3), "the resumed run sampled other completions"
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-6)
    assert a["weights"] == pytest.approx(b["weights"], rel=1e-6)
    assert "val/accuracy" in cuda_runs["consoles"]["validate"]


@pytest.mark.gpu
def test_cuda_consoles_carry_no_warnings(cuda_runs):
    problems = {name: console_problems(text) for name, text in cuda_runs["consoles"].items()}
    assert not any(problems.values()), problems
