"""The angle scorer and the Gaussian scheduler work unchanged on code prompts."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from gainrl_pl.callbacks import GainRLScheduler
from gainrl_pl.datamodules import GainRLDataModule, ScheduleSettings

from gainrl_pl.module import GRPOModule
from gainrl_pl.rewards.code import CodeExecutionReward


class RecordedReward(CodeExecutionReward):
    """The execution reward, keeping the values of its last call."""

    def __call__(self, prompts, completions, **columns):
        self.last = super().__call__(prompts, completions, **columns)
        return self.last


def test_gainrl_schedule_on_code_prompts(tiny_model_dir, tmp_path):
    dm = GainRLDataModule(train_data="data/code/problems.jsonl", preset="code", prompt="code",
                          tokenizer=str(tiny_model_dir), prompts_per_step=2,
                          schedule=ScheduleSettings(name="angle", subset_size=4, sigma=0.3, step_size=0.2,
                                                    max_shift=0.3))
    module = GRPOModule(model_name_or_path=str(tiny_model_dir), num_generations=2, max_completion_length=8,
                        rewards=[reward := RecordedReward(timeout_s=2, max_workers=2)],
                        accuracy_reward="code_execution_reward", learning_rate=1e-3)
    scheduler = GainRLScheduler(use_cache=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=4, max_epochs=-1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, default_root_dir=tmp_path, callbacks=[scheduler])
    trainer.fit(module, datamodule=dm)
    n = len(dm.train_set)
    assert n == 23 and sorted(dm.ranking) == list(range(n))
    # the question segment of a code prompt is the task text, found inside the code template
    seg = dm.train_set[0]["segments"]
    assert seg.num_question_tokens > 0 and seg.prefix[1] <= seg.question[0] < seg.question[1] <= seg.suffix[0]
    assert len(scheduler.scores) == n and len(set(scheduler.scores)) > 1
    assert len(scheduler.history) == 2 and all("mu" in h for h in scheduler.history)
    # the logged mean is the mean of what the reward returned on the last step
    values = [v for v in reward.last if v is not None]
    assert len(reward.last) == 2 * 2 and values
    assert float(trainer.callback_metrics["reward/code_execution_reward/mean"]) == pytest.approx(sum(values) / len(values))
