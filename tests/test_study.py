"""The schedule study's harness (experiments/study.py, run_ab.py): a pilot end to end as a user runs it, with a
tiny model swapped in; fp32 validation around bf16 training; the resumable, seed-major run order."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "experiments" / "study.py"
sys.path.insert(0, str(REPO / "experiments"))

import run_ab  # noqa: E402
import study  # noqa: E402


def test_pilot_end_to_end_with_the_new_schedules(tiny_model_dir, tmp_path, capsys):
    """`study.py pilot` (the README command) with the tiny model: baseline once, three arms (GRESO and MoPPS
    through `data.schedule.name`), per-prompt validation saved, the report and the power analysis printed;
    a rerun skips every finished run."""
    out, logs = tmp_path / "pilot", tmp_path / "runs"
    overrides = ["--model.model_name_or_path", str(tiny_model_dir), "--model.dtype", "bfloat16",
                 "--model.max_completion_length", "4", "--model.val_max_completion_length", "4",
                 "--data.train_limit", "64", "--scheduler.use_cache", "false",
                 "--model.rollout_engine", "transformers"]  # the study's vLLM engine: test_run_ab_on_the_vllm_engine
    cmd = [sys.executable, str(STUDY), "pilot", "--arms", "uniform", "greso", "mopps", "--seeds", "0", "--steps", "2",
           "--val-limit", "6", "--out-dir", str(out), "--run-root", str(logs), "--", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    baseline = json.loads((out / "baseline.json").read_text())
    assert baseline["num_val_prompts"] == 6 and len(baseline["per_prompt"]) == 6 and baseline["step"] == 0
    assert "fp32" in baseline["val_decoding"]
    runs = {arm: json.loads((out / f"{arm}_seed0.json").read_text()) for arm in ("uniform", "greso", "mopps")}
    for arm, r in runs.items():
        assert r["global_step"] == 2 and [v["step"] for v in r["val"]] == [2]
        assert len(r["val"][0]["per_prompt"]) == 6 and r["val_digest"] == baseline["val_digest"]
        assert [t["generated_groups"] for t in r["train"]] == [4, 4]
        assert [t["trained_groups"] for t in r["train"]] == [4, 4]  # no filter: every drawn group is trained
        assert any("--data.schedule.name" in a for a in r["cli_args"]) and arm in r["cli_args"]
        assert r["rollout_engine"] == "transformers"
    assert {"p_easy", "p_hard", "skipped_easy"} <= set(runs["greso"]["schedule_history"][0])
    assert {"mean_posterior_rate", "seen_fraction"} <= set(runs["mopps"]["schedule_history"][0])
    # GRESO with nothing seen twice draws uniform's prompts (the plan says so; here it is measured)
    assert runs["greso"]["train"][0]["indices"] == runs["uniform"]["train"][0]["indices"]

    summary = json.loads((out / "summary.json").read_text())
    assert [a["arm"] for a in summary["arms"]] == ["uniform", "mopps", "greso"]  # the plan's order
    assert {"difference", "low", "high"} <= set(summary["arms"][2]["final_accuracy"])
    for row in summary["arms"]:  # 2 steps x 4 groups, each all wrong, all right or mixed
        assert 0.0 <= row["groups_all_wrong"] + row["groups_all_right"] <= 1.0
        assert (row["groups_all_wrong"] * 8).is_integer()
    assert set(summary["family_differences"]) == {"greso", "mopps"}  # every compared arm, never uniform itself
    # GRESO with nothing to skip is uniform's run, and the report says so (MoPPS draws other prompts)
    identical = {a["arm"]: a["identical_seeds"] for a in summary["arms"]}
    assert identical == {"uniform": [], "mopps": [], "greso": [0]}
    assert "**greso is uniform's run** on seed(s) 0" in (out / "summary.md").read_text()
    assert "arm - uniform (paired 95 %)" in (out / "summary.md").read_text()
    assert (out / "val_accuracy.png").stat().st_size > 0 and (out / "differences.png").stat().st_size > 0
    assert "Power of the planned design" in proc.stdout and "only 1 seed per arm" in proc.stdout
    assert "Estimated study" in proc.stdout

    # a rerun launches nothing for finished runs (in-process: no subprocess would start)
    study.run(study.planned_specs(["uniform", "greso", "mopps"], [0]), "power", out, overrides, logs)
    assert capsys.readouterr().out.count("done already, skipped") == 3


def _fake_run(arm: str, seed: int, per_prompt: list[int], drawn: list[int], digest: str = "d") -> dict:
    """A saved run as run_ab.py writes it, reduced to what the report reads."""
    return {"kind": "run", "arm": arm, "seed": seed, "val_digest": digest, "val_decoding": "fp32",
            "val": [{"step": 2, "accuracy": float(np.mean(per_prompt)), "per_prompt": per_prompt}],
            "train": [{"step": 1, "indices": drawn[:2]}, {"step": 2, "indices": drawn[2:]}],
            "prompts": [{"position": i, "family": "easy" if i < 2 else "hard"} for i in range(4)]}


def test_family_differences_pair_seeds_and_count_what_was_drawn():
    """Per family: the arm's final accuracy minus uniform's on the same seeds, beside the share of that family
    the arm drew. Here the arm only trains the hard family and gains on it on every seed, loses the easy one."""
    val_prompts = [{"family": "easy", "level": 1}] * 4 + [{"family": "hard", "level": 3}] * 4
    baseline = {"val_digest": "d", "val_decoding": "fp32", "per_prompt": [1, 1, 0, 0, 0, 0, 0, 0],
                "val_prompts": val_prompts}
    runs = {"uniform": {s: _fake_run("uniform", s, [1, 1, 1, 1, 0, 0, 0, 0], [0, 2, 1, 3]) for s in range(4)},
            "focus": {s: _fake_run("focus", s, [0, 0, 0, 0, 1, 1, 1, 1], [2, 3, 2, 3]) for s in range(3)}}
    out = study.family_differences(runs, baseline, replicates=300)
    assert set(out) == {"focus"}  # uniform is the reference, not an arm compared with itself
    hard, easy = out["focus"]["hard"], out["focus"]["easy"]
    assert hard["difference"] == pytest.approx(1.0) and hard["resolved"]
    assert easy["difference"] == pytest.approx(-1.0) and easy["resolved"]
    assert hard["drawn_share"] == 1.0 and easy["drawn_share"] == 0.0
    assert hard["uniform_drawn_share"] == easy["uniform_drawn_share"] == 0.5
    runs["focus"][0]["val_digest"] = "other"  # validated on other prompts: refused, not compared
    with pytest.raises(ValueError, match="other prompts than the baseline"):
        study.family_differences(runs, baseline, replicates=50)


def test_groups_trained_count_what_dynamic_sampling_kept():
    """A DAPO-filtered arm trains on the groups its filter kept (recorded per step), not on every generated
    group; an unfiltered run trains on all it drew; a filtered run saved before the count existed is taken
    as a full batch a step. The arm refills for 8 rounds and trains on a short batch rather than stopping."""
    plain = _fake_run("uniform", 0, [1, 0, 0, 0], [0, 1, 2, 3])
    kept = _fake_run("uniform_filter", 0, [1, 0, 0, 0], [0, 1, 2, 3])
    for t, n in zip(kept["train"], (1, 2), strict=True):
        t.update(generated_groups=len(t["indices"]), trained_groups=n)
    old = _fake_run("uniform_filter", 1, [1, 0, 0, 0], [0, 1, 2, 3])
    assert [study.trained_groups(r) for r in (plain, kept, old)] == [4, 3, 2 * study.PLANNED_PROMPTS_PER_STEP]
    assert study.generated_groups(kept) == 4
    args = run_ab.ARMS["uniform_filter"]
    assert args[args.index("--model.max_extra_generation_rounds") + 1] == "8"
    assert args[args.index("--model.dynamic_sampling_allow_partial") + 1] == "true"


def test_fp32_validation_casts_and_restores_exactly(tiny_model_dir):
    """Around validation every bf16 tensor is fp32; afterwards dtypes and values are exactly as before, and the
    Parameter objects (which the optimizer holds) are the same objects."""
    from gainrl_pl.models import LoraSettings, build_policy

    policy = build_policy(str(tiny_model_dir), dtype="bfloat16", lora=LoraSettings(r=4, alpha=8))
    before = {n: (p, p.dtype, p.detach().clone()) for n, p in policy.named_parameters()}
    assert {d for _, d, _ in before.values()} == {torch.bfloat16, torch.float32}  # base bf16, LoRA fp32 (peft)
    (fp32,), _ = run_ab.make_callbacks(True)

    class Module:
        pass

    module = Module()
    module.policy = policy
    fp32.on_validation_start(None, module)
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    fp32.on_validation_end(None, module)
    for name, p in policy.named_parameters():
        obj, dtype, value = before[name]
        assert p is obj and p.dtype == dtype and torch.equal(p, value)


def test_validation_precision_prefers_a_module_option():
    class WithOption:
        def __init__(self, val_dtype: str = "bfloat16") -> None: ...

    class Without:
        def __init__(self, dtype: str = "bfloat16") -> None: ...

    assert run_ab.validation_precision_args(WithOption) == (["--model.val_dtype", "float32"],
                                                            "fp32 greedy via model.val_dtype")
    args, how = run_ab.validation_precision_args(Without)
    assert args == [] and "FP32Validation" in how


def test_mopps_arm_gets_the_runs_group_size():
    cfg = run_ab.configure_arm(run_ab.power_config(Path("/tmp/x")), "mopps")
    assert cfg["data"]["schedule"]["extra"]["rollouts_per_prompt"] == cfg["model"]["num_generations"] == 4
    assert "extra" not in run_ab.configure_arm(run_ab.power_config(Path("/tmp/x")), "uniform")["data"]["schedule"]


def test_run_order_is_seed_major_and_specs_parse():
    assert study.planned_specs(["a", "b"], [0, 1]) == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert study.parse_specs(["gainrl:3"]) == [("gainrl", 3)]
    with pytest.raises(SystemExit, match="arm:seed"):
        study.parse_specs(["gainrl"])
    assert set(study.PLANNED_ARMS) <= set(run_ab.ARMS)
    specs = study.planned_study_specs()  # stage 1 (3 arms x 10 seeds) before stage 2, seed-major in each
    assert specs[:4] == [("uniform", 0), ("gainrl", 0), ("length", 0), ("uniform", 1)]
    assert len(specs) == len(set(specs)) == 3 * 10 + 4 * 5 + 1 and specs[30] == ("accuracy_curriculum", 0)
    assert specs[-1] == ("greso", 0) and set(study.PLANNED_ARMS) >= {"greso", "uniform_filter", "mopps"}


def test_wall_time_estimate_from_unit_costs():
    model = {"train_step_s": {"uniform": 10.0}, "groups_per_step": {"uniform": 4.0}, "val_s_per_prompt": 0.5,
             "baseline_s_per_prompt": 0.5, "per_run_overhead_s": 60.0}
    est = study.estimate_study_hours(model, arms=["uniform", "uniform_filter"], seeds=2, steps=30, validations=5,
                                     val_prompts=256)
    assert est["per_run_s"]["uniform"] == 29 * 10 + 5 * 256 * 0.5 + 60  # the overhead holds step 1
    assert est["per_run_s"]["uniform_filter"] == pytest.approx(29 * 10 * 2.1 + 5 * 256 * 0.5 + 60)
    assert est["total_hours"] == pytest.approx((2 * (est["per_run_s"]["uniform"] + est["per_run_s"]["uniform_filter"])
                                                + 128) / 3600)


def _saved_run(out: Path, arm: str, seed: int, steps: list[int], per_prompt: list[list[int]]) -> None:
    run = {"kind": "run", "arm": arm, "seed": seed, "val_digest": "d",
           "val": [{"step": s, "per_prompt": p} for s, p in zip(steps, per_prompt, strict=True)]}
    (out / f"{arm}_seed{seed}.json").write_text(json.dumps(run))


def test_noise_command_reads_one_arms_saved_runs(tmp_path, capsys):
    """`study.py noise` (the command experiments/README.md shows) on saved runs: per-seed curves, the sd of final
    accuracy and curve area, and the gap a paired design resolves with sd_diff = sqrt(2) sd."""
    (tmp_path / "baseline.json").write_text(json.dumps({"kind": "baseline", "val_digest": "d",
                                                        "per_prompt": [0, 0, 1, 1]}))
    finals = {0: [1, 1, 0, 1], 1: [1, 0, 0, 1], 2: [1, 1, 1, 1]}  # 0.75, 0.5, 1.0
    for seed, final in finals.items():
        _saved_run(tmp_path, "uniform", seed, [6, 12], [[0, 1, 1, 1], final])
    _saved_run(tmp_path, "gainrl", 0, [6, 12], [[0, 0, 0, 0], [0, 0, 0, 0]])  # another arm: ignored
    study.main(["noise", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "3 seeds: [0, 1, 2]" in out and "seed 1  0.500   0.750   0.500" in out
    noise = study.single_arm_noise(tmp_path)
    final = noise["metrics"]["final_accuracy"]
    assert final["sd"] == pytest.approx(0.25) and final["sd_difference"] == pytest.approx(0.25 * 2 ** 0.5)
    areas = [(0.5 * (0.5 + 0.75) * 6 + 0.5 * (0.75 + f) * 6) / 12 for f in (0.75, 0.5, 1.0)]
    assert noise["metrics"]["curve_area"]["values"] == pytest.approx(areas)
    assert final["mdd"]["10"] < final["mdd"]["5"]
    with pytest.raises(SystemExit, match="1 seed"):
        study.single_arm_noise(tmp_path, "gainrl")


def test_run_ab_validates_on_the_vllm_engine_in_fp32(tmp_path):
    """The powered design's decoding (2026-12-05): rollouts and greedy validation on the vLLM engine in fp32, said
    in each result; an engine in another dtype is refused before anything runs."""
    pytest.importorskip("vllm")
    from gainrl_pl.testing import build_tiny_model_dir

    model = build_tiny_model_dir(tmp_path / "tiny-vllm", hidden_size=128)  # a head size vLLM's CPU kernels take
    out, logs = tmp_path / "out", tmp_path / "runs"
    base = [sys.executable, str(REPO / "experiments" / "run_ab.py"), "--baseline", "--out-dir", str(out),
            "--run-root", str(logs), "--", "--model.model_name_or_path", str(model), "--data.val_limit", "4",
            "--model.val_max_completion_length", "4", "--model.max_completion_length", "4",
            "--scheduler.use_cache", "false"]
    refused = subprocess.run([*base, "--model.vllm.dtype", "bfloat16"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode != 0 and "model.vllm.dtype is 'bfloat16', set it to float32" in refused.stderr
    assert not (out / "baseline.json").exists()

    proc = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    baseline = json.loads((out / "baseline.json").read_text())
    assert baseline["val_decoding"] == "fp32 greedy on the vLLM engine (model.vllm.dtype float32)"
    assert baseline["rollout_engine"] == "vllm" and len(baseline["per_prompt"]) == 4
