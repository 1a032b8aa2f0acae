"""The user's interface: LightningCLI over the shipped configs, a CLI fit, resume of the schedule, bad data."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml

from gainrl_pl.cli import main, run_lightning_cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_parses_and_round_trips(config, tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(out.getvalue())
    original = yaml.safe_load(config.read_text())
    for section in ("model", "data"):
        for key, value in original.get(section, {}).items():
            if not isinstance(value, dict):
                assert printed[section][key] == value, f"{config.name}: {section}.{key} changed in round trip"
    # the printed config is itself a valid config
    again = tmp_path / "again.yaml"
    again.write_text(out.getvalue())
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(again), "--print_config"])
    assert exit_info.value.code in (0, None)


def test_help_shows_docstrings():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = out.getvalue()
    assert "completions sampled per prompt" in text  # GRPOModule.num_generations
    assert "--model.importance_sampling_level" in text and "GSPO" in text
    assert "--model.multi_objective_aggregation" in text and "GDPO" in text
    assert "--data.chat_template_kwargs" in text and "enable_thinking" in text
    assert "--model.generation_kwargs" in text and "--model.disable_dropout" in text
    assert "--model.sync_ref_model" in text and "TR-DPO" in text
    assert "--model.entropy_coef" in text and "`cispo` (MiniMax-M1" in text and "--model.sapo_temperature_neg" in text
    assert "accuracy_source" in text and "--data.schedule.help" in text and "--model.lora.help" in text
    for group, expected in (("--data.schedule.help", "Prompts per sampling round"),
                            ("--model.lora.help", "Rank of the LoRA update matrices")):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            main(["fit", group])
        assert expected in out.getvalue(), group


def cli_args(tiny_model_dir, data_path, root, max_steps=2, extra=()):
    return ["fit", "--seed_everything", "0",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", str(max_steps),
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root), "--trainer.enable_model_summary", "false",
            "--model.model_name_or_path", str(tiny_model_dir), "--model.num_generations", "2",
            "--model.max_completion_length", "4", "--model.learning_rate", "1e-3",
            "--data.train_data", str(data_path), "--data.preset", "generic", "--data.prompt", "none",
            "--data.prompts_per_step", "2", "--data.schedule.subset_size", "4",
            "--data.schedule.sigma", "0.5", "--data.schedule.step_size", "0.25", "--data.schedule.max_shift", "0.5",
            "--scheduler.use_cache", "false", "--checkpoint.every_n_train_steps", "1",
            "--checkpoint.dirpath", str(root / "ckpt"), *extra]


@pytest.fixture()
def toy_jsonl(tmp_path):
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n"
                            for i in range(16)))
    return path


def test_cli_fit_two_steps_writes_checkpoint_and_adapterless_hf_model(tiny_model_dir, toy_jsonl, tmp_path):
    # checkpoints every 5 steps, 2 steps run: the final weights are still saved when training ends
    # (GSPO's sequence-level ratio set from the command line, kept in the checkpoint's hyperparameters)
    cli = run_lightning_cli(cli_args(tiny_model_dir, toy_jsonl, tmp_path, extra=[
        "--checkpoint.every_n_train_steps", "5", "--model.importance_sampling_level", "sequence",
        "--data.chat_template_kwargs", '{"enable_thinking": false}']))
    assert cli.trainer.global_step == 2
    import torch

    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2 and saved["hyper_parameters"]["importance_sampling_level"] == "sequence"
    assert saved["datamodule_hyper_parameters"]["chat_template_kwargs"] == {"enable_thinking": False}
    hf_dirs = list((tmp_path / "ckpt").glob("*.hf"))
    assert hf_dirs and all((d / "config.json").exists() for d in hf_dirs)  # full fine-tune: whole model saved


def test_resume_restores_mu_and_next_round_draws(tiny_model_dir, toy_jsonl, tmp_path):
    """Run 4 steps straight; run 2 steps, resume from last.ckpt to 4: same mu and same drawn prompts."""
    straight = run_lightning_cli(cli_args(tiny_model_dir, toy_jsonl, tmp_path / "a", max_steps=4))
    first = run_lightning_cli(cli_args(tiny_model_dir, toy_jsonl, tmp_path / "b", max_steps=2))
    ckpt = tmp_path / "b" / "ckpt" / "last.ckpt"
    resumed = run_lightning_cli(cli_args(tiny_model_dir, toy_jsonl, tmp_path / "b", max_steps=4,
                                         extra=["--ckpt_path", str(ckpt)]))
    assert first.trainer.global_step == 2 and resumed.trainer.global_step == 4
    s_sampler, r_sampler = straight.datamodule.sampler, resumed.datamodule.sampler
    assert r_sampler.mu == pytest.approx(s_sampler.mu)
    assert r_sampler.state_dict()["rounds_completed"] == s_sampler.state_dict()["rounds_completed"]
    # the next round drawn from either sampler is identical (RNG state restored too)
    assert r_sampler.indices_for_round() == s_sampler.indices_for_round()
    s_hist = _scheduler(straight).history
    r_hist = _scheduler(resumed).history
    assert [h["drawn_ranks"] for h in r_hist] == [h["drawn_ranks"] for h in s_hist]


def _scheduler(cli):
    from gainrl_pl.callbacks import GainRLScheduler

    return next(c for c in cli.trainer.callbacks if isinstance(c, GainRLScheduler))


def test_csv_with_missing_field_names_the_row(tiny_model_dir, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("question,answer\nWhat is 1 + 1?,2\nWhat is 2 + 2?,\n")
    from gainrl_pl.datamodules import GainRLDataModule

    from gainrl_pl.data import DataError

    dm = GainRLDataModule(train_data=str(path), preset="generic", prompt="none", tokenizer=str(tiny_model_dir))
    with pytest.raises(DataError, match=r"row 1.*answer"):
        dm.setup("fit")
