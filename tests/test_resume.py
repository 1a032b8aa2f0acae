"""Resume and faults: SIGKILL / SIGTERM mid-run then `ckpt_path=last` continue exactly; nothing is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "train.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} times {i % 4 + 2}?", "answer": str(i * (i % 4 + 2))})
                            + "\n" for i in range(12)))
    return path


def run(tiny_model_dir, data, out, *extra, expect_rc=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    proc = subprocess.run([sys.executable, str(HERE / "resume_run.py"), "--model", str(tiny_model_dir), "--data",
                           str(data), "--out", str(out), *extra], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == expect_rc, (proc.returncode, proc.stderr[-3000:])
    return [json.loads(line) for line in (out / "record0.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tiny_model_dir, resume_data, tmp_path_factory):
    return run(tiny_model_dir, resume_data, tmp_path_factory.mktemp("straight"), "--steps", "6")


@pytest.mark.parametrize("how", ["kill", "term"])
def test_interrupted_and_resumed_run_continues_exactly(tiny_model_dir, resume_data, tmp_path, straight, how):
    rc = -signal.SIGKILL if how == "kill" else 0  # SIGTERM: checkpoint, then a clean exit
    first = run(tiny_model_dir, resume_data, tmp_path, "--steps", "6", "--die-after", "3", "--signal", how,
                expect_rc=rc)
    assert [r["step"] for r in first] == [1, 2, 3]
    assert not (tmp_path / "done0.json").exists()
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    both = run(tiny_model_dir, resume_data, tmp_path, "--steps", "6", "--resume")
    resumed = both[len(first):]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(straight[3:], resumed, strict=True):
        assert a["indices"] == b["indices"], "the resumed run drew other prompts"
        assert a["mu"] == pytest.approx(b["mu"], abs=1e-9)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-9), "the resumed run diverged"
        # the same rollouts (RNG restored) and the same updates (optimizer + LR scheduler restored)
        assert a["reward"] == b["reward"] and a["lr"] == b["lr"]
        assert a["weights"] == pytest.approx(b["weights"], rel=1e-9)
    # keep-last-k: 2 step checkpoints, each with its Hugging Face model beside it, plus last
    ckpts = sorted(p.name for p in (tmp_path / "ckpt").glob("step*.ckpt"))
    assert ckpts == ["step000005.ckpt", "step000006.ckpt"]
    assert all((tmp_path / "ckpt" / c.replace(".ckpt", ".hf") / "config.json").exists() for c in ckpts)


def test_checkpoint_loads_weights_only(tiny_model_dir, resume_data, tmp_path):
    run(tiny_model_dir, resume_data, tmp_path, "--steps", "2", "--lora")
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_" in k for k in keys), "LoRA checkpoints hold the adapters only"
    assert (tmp_path / "ckpt" / "last.hf" / "adapter_config.json").exists()


def test_crash_while_saving_leaves_previous_checkpoint_loadable(tiny_model_dir, tmp_path, monkeypatch):
    """Lightning writes through an fsspec transaction (temp file + rename): a crash mid-write keeps the old file."""
    from lightning.fabric.utilities.cloud_io import _atomic_save

    path = tmp_path / "last.ckpt"
    _atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def exploding_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        _atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
