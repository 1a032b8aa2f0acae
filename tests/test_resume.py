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
from cli_probe import console_problems

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


# ----------------------------------------------------------------------------------------------- the CLI path
REPO = HERE.parent
DEMO = REPO / "configs" / "demo.yaml"
GAINRL_PL = Path(sys.executable).with_name("gainrl-pl")
# The shipped demo config with its loggers (CSV + TensorBoard) and checkpoint settings; swapped in: the tiny
# model, a reward its random completions do not tie on (so every step changes the weights), shorter
# completions and 4 validation prompts (seconds instead of minutes).
TINY_DEMO = ["--model.reward_funcs", "[cli_probe.digit_reward]", "--model.max_completion_length", "6",
             "--model.val_max_completion_length", "4", "--data.val_limit", "4", "--data.val_batch_size", "2",
             "--trainer.enable_progress_bar", "false", "--trainer.callbacks+=cli_probe.StepRecord"]


def start_fit(cwd: Path, model: Path, *args: str, record: str = "record.jsonl") -> subprocess.Popen:
    """`gainrl-pl fit --config configs/demo.yaml ...` run from `cwd` (its `runs/demo/...` logs land there)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GAINRL_PL_CACHE": str(cwd / "cache"),
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "GAINRL_STEP_RECORD": str(cwd / record)}
    command = [str(GAINRL_PL), "fit", "--config", str(DEMO), "--model.model_name_or_path", str(model), *TINY_DEMO,
               *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    """Wait for a run; its console, stdout then stderr (the test fails with its stderr if it failed)."""
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    return out + err


def gainrl_pl(cwd: Path, model: Path, *args: str, record: str = "record.jsonl") -> str:
    return finish(start_fit(cwd, model, *args, record=record))


def records(path: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, path.read_text().splitlines())}


def metrics_rows(run_dir: Path) -> list[tuple]:
    """metrics.csv as (step, epoch, loss, reward, mu, val accuracy) rows, timing columns left out."""
    import csv

    with open(run_dir / "metrics.csv", newline="") as fh:
        return [(r["step"], r.get("epoch"), r.get("train/loss"), r.get("reward/total"), r.get("gainrl/mu"),
                 r.get("val/accuracy")) for r in csv.DictReader(fh)]


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def assert_same_steps(straight: dict[int, dict], resumed: dict[int, dict], steps) -> None:
    for step in steps:
        a, b = straight[step], resumed[step]
        assert a["indices"] == b["indices"], f"step {step}: the resumed run drew other prompts"
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-9) and a["lr"] == b["lr"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-9), f"step {step}: the resumed run diverged"
        assert a["weights"] == pytest.approx(b["weights"], rel=1e-9) and a["mu"] == pytest.approx(b["mu"])


@pytest.fixture(scope="module")
def straight_cli(tiny_model_dir, tmp_path_factory) -> Path:
    """The uninterrupted CLI run the resumed ones are compared with: 5 steps, validation at step 4 (a round)."""
    straight_dir = tmp_path_factory.mktemp("straight_cli")
    gainrl_pl(straight_dir, tiny_model_dir, "--trainer.max_steps", "5")
    return straight_dir


def test_cli_resume_continues_the_run_and_its_logs(tiny_model_dir, tmp_path, straight_cli):
    """The README's commands: fit, stop, the same command + `--ckpt_path last` (or a checkpoint file)."""
    straight_dir, run_dir = straight_cli, tmp_path / "run"
    run_dir.mkdir()
    # a run that stops after 2 of the 5 steps. It asks for last_or_fresh with nothing to resume yet, so it starts
    # a new run (the opt-in).
    first = gainrl_pl(run_dir, tiny_model_dir, "--trainer.max_steps", "2", "--ckpt_path", "last_or_fresh")
    straight = records(straight_dir / "record.jsonl")
    assert sorted(straight) == [1, 2, 3, 4, 5]
    assert "no checkpoint of this config yet; starting a new run" in first
    csv_dir, tb_dir = run_dir / "runs/demo/csv/version_0", run_dir / "runs/demo/tensorboard/version_0"
    assert (csv_dir / "checkpoints/last.ckpt").is_file()

    resumed = gainrl_pl(run_dir, tiny_model_dir, "--trainer.max_steps", "5", "--ckpt_path", "last",
                        record="resumed.jsonl")
    assert "resuming from runs/demo/csv/version_0/checkpoints/last.ckpt" in resumed
    assert console_problems(resumed) == [], resumed  # e.g. no "checkpoint directory is not empty" on purpose
    assert sorted(records(run_dir / "resumed.jsonl")) == [3, 4, 5]  # the next step of THAT run, not step 1
    assert_same_steps(straight, records(run_dir / "resumed.jsonl"), [3, 4, 5])
    # the logs continue in the same version directories: no version_1, no lost or repeated rows
    assert sorted(p.name for p in (run_dir / "runs/demo/csv").iterdir()) == ["version_0"]
    assert sorted(p.name for p in (run_dir / "runs/demo/tensorboard").iterdir()) == ["version_0"]
    straight_csv = straight_dir / "runs/demo/csv/version_0"
    assert metrics_rows(csv_dir) == metrics_rows(straight_csv)
    straight_tb = straight_dir / "runs/demo/tensorboard/version_0"
    for tag in ("train/loss", "reward/total"):
        got, want = tensorboard_scalars(tb_dir, tag), tensorboard_scalars(straight_tb, tag)
        assert [s for s, _ in got] == [s for s, _ in want] == [0, 1, 2, 3, 4]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5, abs=1e-9)
    assert (csv_dir / "checkpoints/step000004.ckpt").is_file()

    # --ckpt_path FILE: back to step 4's checkpoint; step 5 again, the logs after step 4 replaced, not doubled
    again = gainrl_pl(run_dir, tiny_model_dir, "--trainer.max_steps", "5", "--ckpt_path",
                      str(csv_dir / "checkpoints/step000004.ckpt"), record="from_file.jsonl")
    assert "resuming from" in again
    assert sorted(records(run_dir / "from_file.jsonl")) == [5]
    assert_same_steps(straight, records(run_dir / "from_file.jsonl"), [5])
    assert metrics_rows(csv_dir) == metrics_rows(straight_csv)
    assert sorted(p.name for p in (run_dir / "runs/demo/csv").iterdir()) == ["version_0"]


@pytest.mark.parametrize("val_batch", ["train", "0", "1"], ids=["before_it", "first_batch", "last_batch"])
def test_sigterm_during_validation_saves_the_step_and_resume_validates_it_again(tiny_model_dir, tmp_path,
                                                                               straight_cli, val_batch):
    """A preemption in the middle of a long validation (2 batches here): the run stops after the current
    validation batch (not after the validation and one more step), `last.ckpt` holds the step the validation
    followed, and `--ckpt_path last` validates that step again and continues as if nothing happened. At the
    last batch the validation finishes and is kept: the resume does not repeat it. SIGTERM during the training step
    before the validation (`before_it`) was saved at that batch end, and the resume skipped the validation."""
    import os

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # read by cli_probe in the child (its environment is a copy of this one)
    os.environ.update(GAINRL_SIGTERM_VAL_STEP="4", GAINRL_SIGTERM_VAL_BATCH=val_batch)
    try:
        cut = gainrl_pl(run_dir, tiny_model_dir, "--trainer.max_steps", "5",
                        "--trainer.callbacks+=cli_probe.SigtermDuringValidation")
    finally:
        del os.environ["GAINRL_SIGTERM_VAL_STEP"], os.environ["GAINRL_SIGTERM_VAL_BATCH"]
    assert "SIGTERM during validation: saved step 4" in cut, cut[-3000:]
    assert sorted(records(run_dir / "record.jsonl")) == [1, 2, 3, 4]  # step 5 never started
    csv_dir = run_dir / "runs/demo/csv/version_0"
    state = torch.load(csv_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 4
    straight_rows = metrics_rows(straight_cli / "runs/demo/csv/version_0")
    assert any(r[0] == "3" and r[5] for r in straight_rows)  # the straight run's validation after step 4
    # cut in the middle: nothing logged; cut at the last batch: the finished validation logged
    assert any(r[0] == "3" and r[5] for r in metrics_rows(csv_dir)) == (val_batch == "1")

    resumed = gainrl_pl(run_dir, tiny_model_dir, "--trainer.max_steps", "5", "--ckpt_path", "last",
                        record="resumed.jsonl")
    assert console_problems(resumed) == [], resumed
    assert sorted(records(run_dir / "resumed.jsonl")) == [5]
    assert_same_steps(records(straight_cli / "record.jsonl"), records(run_dir / "resumed.jsonl"), [5])
    # step 4's validation included, nothing doubled, and the round's `gainrl/` values (logged with step 4's batch;
    # at the epoch end before, which a run stopped during the validation never reached)
    assert [r[0] for r in straight_rows if r[4]] == ["3"]
    assert metrics_rows(csv_dir) == straight_rows
    assert [r[0] for r in metrics_rows(csv_dir) if r[5]] == ["0", "3"]  # the baseline and step 4's validation


def test_sigkill_around_a_validation_after_a_save_resumes_with_it_validated_once(tiny_model_dir, tmp_path,
                                                                                 straight_cli):
    """No grace: SIGKILL during the validation that follows step 4's save (the demo config saves every 4 steps),
    then, in the resumed run, just after that validation. Step 4's batch-end `last.ckpt` alone would resume past
    that validation, and its metrics would never be logged; the checkpoint rewritten as the validation starts
    validates it again, the one rewritten as it ends does not. (A kill just after the validation of a fresh run
    takes the same path as the second kill here: it was a parametrization of its own, 24 s of suite time.)"""
    import os

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    csv_dir = run_dir / "runs/demo/csv/version_0"

    def killed(where: str, *args: str) -> None:
        os.environ.update(GAINRL_SIGTERM_VAL_STEP="4", GAINRL_SIGTERM_VAL_BATCH=where, GAINRL_SIGTERM_VAL_SIGNAL="KILL")
        try:
            proc = start_fit(run_dir, tiny_model_dir, "--trainer.max_steps", "5",
                             "--trainer.callbacks+=cli_probe.SigtermDuringValidation", *args, record="killed.jsonl")
            proc.communicate(timeout=300)
        finally:
            for name in ("GAINRL_SIGTERM_VAL_STEP", "GAINRL_SIGTERM_VAL_BATCH", "GAINRL_SIGTERM_VAL_SIGNAL"):
                del os.environ[name]
        assert proc.returncode == -signal.SIGKILL
        assert torch.load(csv_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4

    killed("0")
    # killed again, right after the resumed run validated step 4 again: that run rewrote last.ckpt as after the
    # validation, so the next resume does not repeat it
    killed("next", "--ckpt_path", "last")

    resumed = gainrl_pl(run_dir, tiny_model_dir, "--trainer.max_steps", "5", "--ckpt_path", "last",
                        record="resumed.jsonl")
    assert console_problems(resumed) == [], resumed
    assert sorted(records(run_dir / "resumed.jsonl")) == [5]
    assert_same_steps(records(straight_cli / "record.jsonl"), records(run_dir / "resumed.jsonl"), [5])
    rows = metrics_rows(csv_dir)
    val_rows = [r for r in rows if r[5]]
    straight_val = [r for r in metrics_rows(straight_cli / "runs/demo/csv/version_0") if r[5]]
    assert [r[0] for r in val_rows] == ["0", "3"], rows  # step 4's validation logged, once
    assert [r[5] for r in val_rows] == [r[5] for r in straight_val]
    assert rows == metrics_rows(straight_cli / "runs/demo/csv/version_0")  # no row lost or doubled


def test_cli_validate_last_evaluates_the_newest_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    from gainrl_pl.cli import run_lightning_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GAINRL_PL_CACHE", str(tmp_path / "cache"))
    tiny = ["--config", str(DEMO), "--model.model_name_or_path", str(tiny_model_dir), *TINY_DEMO[:-1]]
    run_lightning_cli(["fit", *tiny, "--trainer.max_steps", "1"])
    cli = run_lightning_cli(["validate", *tiny, "--ckpt_path", "last"])
    assert cli.trainer.ckpt_path == "runs/demo/csv/version_0/checkpoints/last.ckpt"


def test_cli_resume_with_nothing_to_resume_says_where_it_looked(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from gainrl_pl.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GAINRL_PL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DEMO), "--model.model_name_or_path", str(tiny_model_dir), "--ckpt_path", "last"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no checkpoint to resume from" in err
    assert str(tmp_path.resolve() / "runs/demo/csv/*/checkpoints/last.ckpt") in err
    assert "last_or_fresh" in err  # how to opt in to a fresh start
    assert not (tmp_path / "runs/demo/csv/version_0/checkpoints").exists()  # nothing trained


def test_cli_resume_from_a_missing_file_is_an_error(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from gainrl_pl.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(DEMO), "--model.model_name_or_path", str(tiny_model_dir),
              "--ckpt_path", "nope/last.ckpt"])
    assert exit_info.value.code == 2
    assert "no such checkpoint file" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- where `last` looks
def _trainer(root: Path, **kwargs):
    import lightning.pytorch as pl
    from gainrl_pl.callbacks import GainRLCheckpoint

    return pl.Trainer(default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[GainRLCheckpoint(**kwargs.pop("checkpoint", {}))], **kwargs)


def _touch(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 1}, path)
    os.utime(path, (mtime, mtime))
    return path


def test_last_means_the_newest_last_ckpt_of_this_configs_runs(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from gainrl_pl.resume import checkpoint_search_places, find_last_checkpoint

    loggers = [CSVLogger(tmp_path / "logs", name="csv"), TensorBoardLogger(tmp_path / "logs", name="tb")]
    trainer = _trainer(tmp_path, logger=loggers)
    assert checkpoint_search_places(trainer) == [str(tmp_path.resolve() / "logs/csv/*/checkpoints/last.ckpt")]
    assert find_last_checkpoint(trainer) is None
    v0 = _touch(tmp_path / "logs/csv/version_0/checkpoints/last.ckpt", 1_000)
    v1 = _touch(tmp_path / "logs/csv/version_1/checkpoints/last.ckpt", 2_000)
    _touch(tmp_path / "logs/tb/version_7/checkpoints/last.ckpt", 3_000)  # not where this config checkpoints
    assert find_last_checkpoint(trainer) == v1
    os.utime(v0, (4_000, 4_000))  # the most recently written wins, whatever its version number
    assert find_last_checkpoint(trainer) == v0
    fixed = _trainer(tmp_path, logger=loggers, checkpoint={"dirpath": str(tmp_path / "ckpt")})
    assert checkpoint_search_places(fixed) == [str(tmp_path.resolve() / "ckpt/last.ckpt")]
    assert find_last_checkpoint(fixed) is None
    unlogged = _trainer(tmp_path, logger=False)
    assert find_last_checkpoint(unlogged) is None
    assert find_last_checkpoint(unlogged) is None and checkpoint_search_places(unlogged) == [
        str(tmp_path.resolve() / "checkpoints/last.ckpt")]


def test_resume_plan_continues_only_this_configs_logs(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from gainrl_pl.resume import RUN_RECORD_KEY, plan_resume

    def checkpoint(name: str, record: list[dict] | None) -> str:
        path = tmp_path / name
        torch.save({"global_step": 3, **({RUN_RECORD_KEY: {"loggers": record}} if record else {})}, path)
        return str(path)

    def fresh():
        return _trainer(tmp_path, logger=[CSVLogger(tmp_path / "logs", name="csv"),
                                          TensorBoardLogger(tmp_path / "logs", name="tb")])

    ours = [{"type": "CSVLogger", "version": 3, "log_dir": os.path.realpath(tmp_path / "logs/csv/version_3")},
            {"type": "TensorBoardLogger", "version": 5, "log_dir": os.path.realpath(tmp_path / "logs/tb/version_5")}]
    plan = plan_resume(fresh(), checkpoint("ours.ckpt", ours))
    assert plan.versions == {0: 3, 1: 5} and plan.notes == ()
    elsewhere = [{**r, "log_dir": "/somewhere/else/version_3"} for r in ours]
    plan = plan_resume(fresh(), checkpoint("theirs.ckpt", elsewhere))
    assert plan.versions == {} and len(plan.notes) == 2 and "new version" in plan.notes[0]
    # an older checkpoint without the record: its place in the version layout decides
    (tmp_path / "logs/tb/version_2").mkdir(parents=True)
    old = tmp_path / "logs/csv/version_2/checkpoints"
    old.mkdir(parents=True)
    torch.save({"global_step": 3}, old / "last.ckpt")
    assert plan_resume(fresh(), str(old / "last.ckpt")).versions == {0: 2, 1: 2}
    with pytest.raises(ValueError, match="cannot be read as a Lightning checkpoint"):
        (tmp_path / "junk.ckpt").write_text("not a checkpoint")
        plan_resume(fresh(), str(tmp_path / "junk.ckpt"))
