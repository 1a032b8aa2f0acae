"""Real 2-process DDP over gloo: disjoint shards, identical weights and mu, global metrics, no deadlock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ddp
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "train.jsonl"
    # lengths vary a lot, so ranks get prompts (and completions) of different lengths
    path.write_text("".join(json.dumps({"question": "What is " + " plus ".join(["1"] * (1 + i % 6)) + "?",
                                        "answer": str(1 + i % 6)}) + "\n" for i in range(14)))
    return path


def run_ddp(tiny_model_dir, data, out, *extra, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29500 + os.getpid() % 2000)}
    proc = subprocess.run([sys.executable, str(HERE / "ddp_run.py"), "--model", str(tiny_model_dir), "--data",
                           str(data), "--out", str(out), *extra], capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    return ranks


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_rank_ddp_grpo(tiny_model_dir, ddp_data, tmp_path, lora):
    r0, r1 = run_ddp(tiny_model_dir, ddp_data, tmp_path, "--steps", "5", *(["--lora"] if lora else []))
    assert r0["global_step"] == r1["global_step"] == 5
    # identical weights after N steps (gradients all-reduced every backward)
    assert r0["weights_sha256"] == r1["weights_sha256"]
    # the angle ranking was scored in shards and gathered: every rank has the same full ranking
    assert r0["ranking"] == r1["ranking"] and sorted(r0["ranking"]) == list(range(14))
    # the GAIN-RL mean and the schedule history are identical on every rank
    assert r0["mu"] == pytest.approx(r1["mu"]) and r0["history"] == r1["history"]
    assert len(r0["history"]) >= 2  # 7 prompts/round over 2 ranks x 2 per step: 2 steps per round
    for s0, s1 in zip(r0["steps"], r1["steps"]):
        # the same sampling round on both ranks, disjoint prompts within a step
        assert s0["round_indices"] == s1["round_indices"]
        assert s0["round"] == s1["round"]
        assert set(s0["indices"]).isdisjoint(s1["indices"])
        assert set(s0["indices"]) | set(s1["indices"]) <= set(s0["round_indices"])
        # the logged reward is the global mean over both ranks' completions, not the local one
        both = s0["local_rewards"] + s1["local_rewards"]
        assert s0["metrics"]["reward/total"] == pytest.approx(sum(both) / len(both), abs=1e-5)
        assert s1["metrics"]["reward/total"] == pytest.approx(s0["metrics"]["reward/total"], abs=1e-6)
    # validation metrics are synced: both ranks report the mean over the union of their shards
    union = r0["val_local"] + r1["val_local"]
    assert len(union) == 9
    assert r0["val"]["val/accuracy"] == pytest.approx(r1["val"]["val/accuracy"])
    # uneven shards (5 and 4 prompts) are padded for DDP; the padding never counts
    assert r0["val"]["val/accuracy"] == pytest.approx(sum(union) / len(union), abs=1e-6)
