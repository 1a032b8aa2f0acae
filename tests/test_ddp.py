"""Real 2-process DDP over gloo: disjoint shards, identical weights and mu, global metrics, no deadlock; per-rank
RNG streams, SIGTERM agreed across ranks, exact resume, a score cache found on one rank only."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


MODES = {"full": ["--kl-and-entropy-control"], "lora": ["--lora"], "dynamic_sampling": ["--dynamic-sampling"]}


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
    if mode == "full":  # sync_ref_model moved the reference the same way on both ranks; the entropy controller saw
        # the same all-rank entropy each step, so its coefficient rose by delta on every one of the 5 steps
        assert r0["reference_sha256"] == r1["reference_sha256"]
        assert r0["last_step_entropy"] == r1["last_step_entropy"] > 0
        assert r0["entropy_coef_now"] == r1["entropy_coef_now"] == pytest.approx(0.01 + 5 * 0.005)


def test_two_rank_ddp_each_rank_samples_on_its_own_vllm_engine(tmp_path_factory, ddp_data, tmp_path):
    """Each rank runs its own in-process vLLM engine on its shard and gets the all-reduced weights every step."""
    pytest.importorskip("vllm")
    from gainrl_pl.testing import build_tiny_model_dir

    model = build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-vllm-ddp"), hidden_size=128)  # head size 32
    r0, r1 = run_ddp(model, ddp_data, tmp_path, "--steps", "3", "--vllm", timeout=420)
    assert r0["global_step"] == r1["global_step"] == 3
    assert r0["weights_sha256"] == r1["weights_sha256"]
    for s0, s1 in zip(r0["steps"], r1["steps"], strict=True):
        assert set(s0["indices"]).isdisjoint(s1["indices"])
        # fp32 engine and trainer: trainer/engine ratios of every sampled token on both ranks (gathered) stay at 1;
        # an engine left with the weights of a step ago would be far off
        for key in ("train/is_ratio_max", "train/is_ratio_min"):
            assert s0["metrics"][key] == pytest.approx(1.0, abs=1e-3), (key, s0["metrics"][key])
            assert s1["metrics"][key] == pytest.approx(s0["metrics"][key], abs=1e-6)
    # the first rollout, then one push per changed policy before each later rollout and the validation
    assert r0["engine_pushes"] == r1["engine_pushes"] >= 3
    union = r0["val_local"] + r1["val_local"]
    assert len(union) == 9


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


# ----------------------------------------------------------------------------------------- resume, SIGTERM
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_resume_script(tiny_model_dir, data, out, *extra, timeout=300):
    """tests/resume_run.py on 2 ranks, `scale_rewards: batch`; returns each rank's step records."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(HERE / "resume_run.py"), "--model", str(tiny_model_dir), "--data",
                           str(data), "--out", str(out), "--devices", "2", "--scale-rewards", "batch", *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [[json.loads(line) for line in (out / f"record{r}.jsonl").read_text().splitlines()] for r in (0, 1)]


@pytest.fixture(scope="module")
def one_prompt_data(tmp_path_factory):
    # one question, repeated: at every step both ranks sample completions of the very same prompt
    path = tmp_path_factory.mktemp("one_prompt") / "train.jsonl"
    path.write_text("".join(json.dumps({"question": "What is 6 times 7?", "answer": "42"}) + "\n" for _ in range(12)))
    return path


def test_two_rank_sigterm_on_one_rank_then_exact_resume(tiny_model_dir, one_prompt_data, tmp_path):
    """An uninterrupted 2-rank run, then one where rank 1 alone gets SIGTERM after step 2 and rank 0 alone has the
    angle scores in its node-local cache, then its resume: steps 3-4 equal the uninterrupted run's on each rank.
    Each run validates after each round of 2 steps, where a save falls too: the checkpoint's writes around a
    validation are collectives every rank must join (a rank left out hangs the run), and the SIGTERM reaches
    rank 1 in the training step before one."""
    straight = run_resume_script(tiny_model_dir, one_prompt_data, tmp_path / "straight", "--steps", "4",
                                 "--score-cache", str(tmp_path / "cache_straight"), "--val", "2")
    loops = torch.load(tmp_path / "straight" / "ckpt" / "last.ckpt", weights_only=False)["loops"]["fit_loop"]
    # its last.ckpt is the one rewritten after step 4's validation (counts are per epoch, one batch per rank)
    assert loops["epoch_loop.val_loop.batch_progress"]["total"]["completed"] == 1, "written before the validation"
    for s0, s1 in zip(*straight, strict=True):
        # the same prompt on both ranks, yet each rank draws its own completions (its own RNG streams)
        assert s0["prompts"] == s1["prompts"] and s0["completions"] != s1["completions"]
        # scale_rewards: batch divides by the std of both ranks' rewards (TRL's global std), not each rank's
        both = torch.tensor([s["advantages"][0]["rewards"] for s in (s0, s1)])
        for s in (s0, s1):
            rewards = torch.tensor(s["advantages"][0]["rewards"])
            expected = (rewards - rewards.mean(dim=1, keepdim=True)) / (both.std() + 1e-4)
            torch.testing.assert_close(torch.tensor(s["advantages"][0]["advantages"]), expected)

    # node-local caches: rank 0 has the straight run's scores (one field changed, to see them used), rank 1 none
    cache = tmp_path / "cache_cut"
    shutil.copytree(tmp_path / "cache_straight" / "rank0", cache / "rank0")
    (scores,) = (cache / "rank0").glob("*.jsonl")
    rows = [{**json.loads(line), "intra": 0.125} for line in scores.read_text().splitlines()]
    scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cut"
    first = run_resume_script(tiny_model_dir, one_prompt_data, out, "--steps", "4", "--die-after", "2",
                              "--signal", "term", "--signal-rank", "1", "--score-cache", str(cache), "--val", "2")
    for rank in (0, 1):
        assert [r["step"] for r in first[rank]] == [1, 2], "every rank stops after the agreed SIGTERM save"
        assert first[rank][0]["ranking_summary"]["intra_mean"] == 0.125, "rank 0's cached scores reach every rank"
        assert not (out / f"done{rank}.json").exists()
    ckpt = torch.load(out / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    states = ckpt["gainrl_rng_states"]  # one per rank, and they differ
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])

    resumed = run_resume_script(tiny_model_dir, one_prompt_data, out, "--steps", "4", "--resume", "--val", "2")
    for rank in (0, 1):
        assert [r["step"] for r in resumed[rank]] == [1, 2, 3, 4]
        for a, b in zip(straight[rank], resumed[rank], strict=True):
            assert a["indices"] == b["indices"] and a["completions"] == b["completions"], f"rank {rank} step {a['step']}"
            assert a["reward"] == b["reward"] and a["lr"] == b["lr"] and a["mu"] == pytest.approx(b["mu"], abs=1e-9)
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-9)
            assert a["weights"] == pytest.approx(b["weights"], rel=1e-9)
