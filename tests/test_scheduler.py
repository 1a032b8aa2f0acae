"""GainRLScheduler's knobs at work through a real Trainer: accuracy from validation, re-scoring every K rounds,
the curriculum's direction."""

from __future__ import annotations

import json
import math

import gainrl_pl.callbacks.scheduler as scheduler_module
import lightning.pytorch as pl
import pytest
from gainrl_pl.callbacks import GainRLScheduler
from gainrl_pl.datamodules import GainRLDataModule, ScheduleSettings

from gainrl_pl.module import GRPOModule

SCHEDULE = dict(sigma=0.5, step_size=0.2, max_shift=0.3, min_shift=0.0)


def answer_is_yes(prompts, completions, answer, **columns):
    """Correct exactly when the row's answer is "yes": the accuracy is set by the data, not the model."""
    return [float(a == "yes") for a in answer]


def digit_reward(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fit(module, dm, tmp_path, scheduler, max_steps, **trainer_kw):
    pl.seed_everything(0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                         callbacks=[scheduler], **trainer_kw)
    trainer.fit(module, datamodule=dm)
    return trainer


def test_accuracy_source_val_moves_mu_with_the_latest_validation_accuracy(tiny_model_dir, tmp_path):
    # every training rollout is wrong (accuracy 0), every validation answer right (accuracy 1)
    train = write_rows(tmp_path / "train.jsonl", [{"question": f"Is {i} odd?", "answer": "no"} for i in range(8)])
    val = write_rows(tmp_path / "val.jsonl", [{"question": f"Is {i} even?", "answer": "yes"} for i in range(4)])
    module = GRPOModule(model_name_or_path=str(tiny_model_dir), num_generations=2, max_completion_length=4,
                        rewards=[answer_is_yes])
    dm = GainRLDataModule(train_data=str(train), val_data=str(val), preset="generic", prompt="none",
                          tokenizer=str(tiny_model_dir), prompts_per_step=2, val_batch_size=4,
                          schedule=ScheduleSettings(name="angle", subset_size=4, **SCHEDULE))
    scheduler = GainRLScheduler(use_cache=False, accuracy_source="val")
    fit(module, dm, tmp_path, scheduler, max_steps=6, check_val_every_n_epoch=1)  # 3 rounds of 2 steps
    # round 0 ends before any validation: the rollouts' accuracy; later rounds: the validation after the round before
    assert [h["accuracy"] for h in scheduler.history] == [0.0, 1.0, 1.0]
    n = len(dm.train_set)
    expected_terms = [0.2 * n * math.tanh(2.0 * (acc - 0.5)) for acc in (0.0, 1.0, 1.0)]
    assert [h["accuracy_term"] for h in scheduler.history] == pytest.approx(expected_terms)


def test_rescore_every_n_rounds_reranks_with_the_current_policy(tiny_model_dir, tmp_path, monkeypatch):
    train = write_rows(tmp_path / "train.jsonl",
                       [{"question": "What is " + " plus ".join(["3"] * (1 + i % 4)) + f" and {i}?", "answer": "1"}
                        for i in range(8)])
    calls = []
    real = scheduler_module.angle_ranking

    def counting(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(scheduler_module, "angle_ranking", counting)
    module = GRPOModule(model_name_or_path=str(tiny_model_dir), num_generations=4, max_completion_length=6,
                        rewards=[digit_reward], learning_rate=1e-2)
    dm = GainRLDataModule(train_data=str(train), preset="generic", prompt="none", tokenizer=str(tiny_model_dir),
                          prompts_per_step=2, schedule=ScheduleSettings(name="angle", subset_size=4, **SCHEDULE))
    scheduler = GainRLScheduler(use_cache=False, rescore_every_n_rounds=2)
    fit(module, dm, tmp_path, scheduler, max_steps=8)  # 4 rounds: re-scored after rounds 2 and 4
    assert len(scheduler.history) == 4 and len(calls) == 3
    first_scores = [r.score for r in calls[0][1]]
    # the last re-score came after the last update: the installed ranking is the final policy's
    order, results, _ = real(module.policy, dm.tokenizer, dm.train_set, use_cache=False)
    assert dm.ranking == order and scheduler.scores == [r.score for r in results]
    assert scheduler.scores != first_scores  # the policy moved, and so did its scores


@pytest.mark.parametrize(("column", "values", "expected"), [
    ("difficulty_field", [3, 1, 2, 1], [1, 3, 2, 0]),  # a difficulty: ascending, easiest first
    ("pass_rate_field", [0.2, 0.9, 0.5, 0.9], [1, 3, 2, 0]),  # a pass rate: descending, easiest first
])
def test_accuracy_curriculum_ranks_easiest_first_in_the_direction_its_column_names(tiny_model_dir, tmp_path, column,
                                                                                  values, expected):
    train = write_rows(tmp_path / "train.jsonl", [{"question": f"q{i}?", "answer": "1", "score": v}
                                                  for i, v in enumerate(values)])
    module = GRPOModule(model_name_or_path=str(tiny_model_dir), num_generations=2, max_completion_length=4,
                        rewards=[digit_reward])
    dm = GainRLDataModule(train_data=str(train), preset="generic", prompt="none", tokenizer=str(tiny_model_dir),
                          prompts_per_step=2, schedule=ScheduleSettings(name="accuracy_curriculum", subset_size=2,
                                                                        **{column: "score"}, **SCHEDULE))
    fit(module, dm, tmp_path, GainRLScheduler(use_cache=False), max_steps=1)
    assert dm.ranking == expected  # ties by position


def test_accuracy_curriculum_rejects_a_nan_value_naming_the_row(tiny_model_dir, tmp_path):
    train = write_rows(tmp_path / "train.jsonl", [{"question": f"q{i}?", "answer": "1", "level": v}
                                                  for i, v in enumerate([1, 2, "nan", 3])])
    module = GRPOModule(model_name_or_path=str(tiny_model_dir), num_generations=2, max_completion_length=4,
                        rewards=[digit_reward])
    dm = GainRLDataModule(train_data=str(train), preset="generic", prompt="none", tokenizer=str(tiny_model_dir),
                          prompts_per_step=2, schedule=ScheduleSettings(name="accuracy_curriculum", subset_size=2,
                                                                        difficulty_field="level", **SCHEDULE))
    with pytest.raises(ValueError, match=r"row 2: level='nan' is not a finite number"):
        fit(module, dm, tmp_path, GainRLScheduler(use_cache=False), max_steps=1)


def test_accuracy_curriculum_needs_exactly_one_column():
    with pytest.raises(ValueError, match="difficulty_field.*pass_rate_field"):
        ScheduleSettings(name="accuracy_curriculum")
    with pytest.raises(ValueError, match="either"):
        ScheduleSettings(name="accuracy_curriculum", difficulty_field="level", pass_rate_field="p")


def test_every_round_is_logged_whatever_log_every_n_steps(tiny_model_dir, tmp_path):
    """One metrics row per round with mu and its terms, also at rounds that end at a step `log_every_n_steps`
    skips (3 rounds of 2 steps, logging every 4th step: a `self.log(on_step=True)` row would exist for none)."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    train = write_rows(tmp_path / "train.jsonl", [{"question": f"What is {i} plus 1?", "answer": str(i + 1)}
                                                  for i in range(8)])
    module = GRPOModule(model_name_or_path=str(tiny_model_dir), num_generations=2, max_completion_length=4,
                        rewards=[digit_reward])
    dm = GainRLDataModule(train_data=str(train), preset="generic", prompt="none", tokenizer=str(tiny_model_dir),
                          prompts_per_step=2, schedule=ScheduleSettings(name="angle", subset_size=4, **SCHEDULE))
    scheduler = GainRLScheduler(use_cache=False, plot=False)
    pl.seed_everything(0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=6, max_epochs=-1, log_every_n_steps=4,
                         logger=CSVLogger(tmp_path, name="csv"), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         default_root_dir=tmp_path, callbacks=[scheduler])
    trainer.fit(module, datamodule=dm)
    with open(tmp_path / "csv/version_0/metrics.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("gainrl/mu")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]  # the last batch of each round (0-based logging steps)
    assert [float(r["gainrl/mu"]) for r in rows] == pytest.approx([h["mu"] for h in scheduler.history])
    assert [float(r["gainrl/round_angle_signal"]) for r in rows] == pytest.approx(
        [h["angle_signal"] for h in scheduler.history])
    assert all(r["gainrl/angle_term"] and r["gainrl/round_accuracy"] for r in rows)
