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
BLANK_BATCH = 2  # tests/ddp_run.py: rank 1's rewards are all equal on this batch (with --dynamic-sampling)


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "train.jsonl"
    # lengths vary a lot, so ranks get prompts (and completions) of different lengths
    path.write_text("".join(json.dumps({"question": "What is " + " plus ".join(["1"] * (1 + i % 6)) + "?",
                                        "answer": str(1 + i % 6)}) + "\n" for i in range(14)))
    return path


def launch(tiny_model_dir, data, out, *extra, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29500 + os.getpid() % 2000)}
    return subprocess.run([sys.executable, str(HERE / "ddp_run.py"), "--model", str(tiny_model_dir), "--data",
                           str(data), "--out", str(out), *extra], capture_output=True, text=True, timeout=timeout,
                          env=env)


def run_ddp(tiny_model_dir, data, out, *extra, timeout=300):
    proc = launch(tiny_model_dir, data, out, *extra, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    return ranks


MODES = {"full": [], "lora": ["--lora"], "dynamic_sampling": ["--dynamic-sampling"]}


@pytest.mark.parametrize("mode", list(MODES))
def test_two_rank_ddp_grpo(tiny_model_dir, ddp_data, tmp_path, mode):
    r0, r1 = run_ddp(tiny_model_dir, ddp_data, tmp_path, "--steps", "5", *MODES[mode])
    assert r0["global_step"] == r1["global_step"] == 5
    # identical weights after N steps (gradients all-reduced every backward)
    assert r0["weights_sha256"] == r1["weights_sha256"]
    # the angle ranking was scored in shards and gathered: every rank has the same full ranking
    assert r0["ranking"] == r1["ranking"] and sorted(r0["ranking"]) == list(range(14))
    # the GAIN-RL mean and the schedule history are identical on every rank
    assert r0["mu"] == pytest.approx(r1["mu"]) and r0["history"] == r1["history"]
    assert len(r0["history"]) >= 2  # 7 prompts/round over 2 ranks x 2 per step: 2 steps per round
    for s0, s1 in zip(r0["steps"], r1["steps"], strict=True):
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
    if mode == "dynamic_sampling":
        assert_dynamic_sampling_agreed(r0, r1)


def assert_dynamic_sampling_agreed(r0, r1):
    """The ranks' filters dropped different numbers of groups, yet trained on as many and skipped together."""
    # (identical weights above: every backward was matched by the other rank's)
    local = [[s["local_filter"] for s in r["steps"]] for r in (r0, r1)]
    differ = [i for i, (a, b) in enumerate(zip(*local, strict=True)) if a["dropped"] != b["dropped"]]
    assert set(differ) - {BLANK_BATCH}, local  # not only on the batch blanked on purpose
    # a step is skipped on both ranks when either kept no group (rank 1 on BLANK_BATCH, and by chance: one
    # extra round only); max_steps counts updates, so the run takes one batch more per skipped step
    skipped = r0["skipped_steps"]
    assert skipped == r1["skipped_steps"] >= 1
    assert len(r0["steps"]) == len(r1["steps"]) == 5 + skipped
    trained = [s["metrics"]["dynamic_sampling/trained_groups"] for s in r0["steps"]]
    assert trained[BLANK_BATCH] == 0 and trained.count(0) == skipped
    for s0, s1, a, b, n0, n1 in zip(r0["steps"], r1["steps"], *local, r0["report_sizes"], r1["report_sizes"],
                                    strict=True):
        m = {k: v for k, v in s0["metrics"].items() if k.startswith("dynamic_sampling/")}
        assert m == {k: v for k, v in s1["metrics"].items() if k.startswith("dynamic_sampling/")}
        assert m["dynamic_sampling/dropped_groups"] == a["dropped"] + b["dropped"]
        assert m["dynamic_sampling/extra_rounds"] == max(a["extra_rounds"], b["extra_rounds"])
        assert m["dynamic_sampling/trained_groups"] == 2 * min(a["kept"], b["kept"])
        assert m["dynamic_sampling/zero_variance_fraction"] == pytest.approx(
            (a["dropped"] + b["dropped"]) / (a["generated"] + b["generated"]))
        # the scheduler's report holds every generated group of both ranks, dropped ones included
        assert n0 == n1 == a["generated"] + b["generated"]


def test_two_rank_dynamic_sampling_cap_raises_on_every_rank(tiny_model_dir, ddp_data, tmp_path):
    # rank 1 keeps no group on BLANK_BATCH (earlier, by chance); rank 0 may be full, yet it raises too instead
    # of waiting forever for rank 1's gradients
    proc = launch(tiny_model_dir, ddp_data, tmp_path, "--steps", "5", "--dynamic-sampling", "--no-partial",
                  timeout=120)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"[rank{rank}]: RuntimeError: dynamic sampling: after max_extra_generation_rounds=1" in proc.stderr
