"""DAPO dynamic sampling in GRPOModule: refills to a full batch, the cap, partial batches, merged rollouts.

The 2-process DDP case (ranks dropping different numbers of groups) is `test_ddp.py::...[dynamic_sampling]`.
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from gainrl_pl.callbacks import GainRLScheduler
from gainrl_pl.datamodules import GainRLDataModule, ScheduleSettings

import gainrl_pl.module as module_code
from gainrl_pl.module import GRPOModule
from gainrl_pl.rewards import RewardOutput
from gainrl_pl.rollout import Rollout
from gainrl_pl.schedules.dynamic_sampling import (
    agree_on_group_count,
    concat_batches,
    concat_rewards,
    concat_rollouts,
    first_kept,
    select_rollout,
)

G = 4
PROMPTS_PER_STEP = 4


def half_constant_reward(prompts, completions, answer, **columns):
    """All-equal rewards for even answers (= training-set positions), 1 for each group's first completion else 0
    for odd ones: half the groups carry no signal, the others always do."""
    return [0.5 if int(a) % 2 == 0 else float(i % G == 0) for i, a in enumerate(answer)]


def constant_reward(prompts, completions, **columns):
    return [1.0] * len(completions)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("dynamic") / "train.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} plus {i % 3}?", "answer": str(i)}) + "\n"
                            for i in range(16)))
    return path


def make(tiny_model_dir, data, reward, schedule="uniform", **module_kw):
    module = GRPOModule(model_name_or_path=str(tiny_model_dir), num_generations=G, max_completion_length=6,
                        rewards=[reward], learning_rate=1e-3, dynamic_sampling=True, **module_kw)
    dm = GainRLDataModule(train_data=str(data), preset="generic", prompt="none", tokenizer=str(tiny_model_dir),
                          prompts_per_step=PROMPTS_PER_STEP,
                          schedule=ScheduleSettings(name=schedule, subset_size=16, sigma=0.5, step_size=0.2))
    return module, dm


class Watch(pl.Callback):
    """Per step: the logged dynamic-sampling numbers and the scheduler's report (read before it is consumed)."""

    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []
        self.reports: list[dict[str, list]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()
                             if k.startswith(("dynamic_sampling/", "reward/zero_std"))})
        self.reports.append({k: v.tolist() for k, v in pl_module.last_rollout_report.items()})


def fit(module, dm, tmp_path, watch, **trainer_kw):
    pl.seed_everything(0)
    kw = dict(max_steps=3, max_epochs=-1) | trainer_kw
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         use_distributed_sampler=False, default_root_dir=tmp_path,
                         callbacks=[watch, GainRLScheduler(use_cache=False)], **kw)
    trainer.fit(module, datamodule=dm)
    return trainer


@pytest.fixture()
def loss_inputs(monkeypatch):
    """Completions and their training-set positions that reached the loss, per optimizer step."""
    seen: list[int] = []
    real = module_code.policy_loss

    def counting(logp, old, ref, advantages, mask, **kw):
        seen.append(advantages.shape[0])
        return real(logp, old, ref, advantages, mask, **kw)

    monkeypatch.setattr(module_code, "policy_loss", counting)
    return seen


# ------------------------------------------------------------------------------------------- in a real fit


def test_refills_to_a_full_batch_when_half_the_groups_are_all_equal(tiny_model_dir, data, tmp_path, loss_inputs):
    module, dm = make(tiny_model_dir, data, half_constant_reward, schedule="angle", max_extra_generation_rounds=8)
    trained_positions: list[list[int]] = []
    real_train_on = module._train_on

    def train_on(groups, step_metrics):
        trained_positions.append(groups.batch["index"].tolist())
        return real_train_on(groups, step_metrics)

    module._train_on = train_on
    watch = Watch()
    trainer = fit(module, dm, tmp_path, watch)
    assert trainer.global_step == 3
    # every step trained a full batch: prompts_per_step groups of G completions reached the loss
    assert loss_inputs == [PROMPTS_PER_STEP * G] * 3
    assert all(len(p) == PROMPTS_PER_STEP and all(i % 2 == 1 for i in p) for p in trained_positions)
    for m, report in zip(watch.metrics, watch.reports, strict=True):
        generated = len(report["index"])
        # the report holds every generated group; the even (all-equal) ones are the dropped ones
        dropped = sum(1 for i in report["index"] if i % 2 == 0)
        assert m["dynamic_sampling/dropped_groups"] == dropped > 0
        assert m["dynamic_sampling/zero_variance_fraction"] == pytest.approx(dropped / generated)
        assert m["reward/zero_std_groups"] == pytest.approx(dropped / generated)
        assert m["dynamic_sampling/extra_rounds"] >= 1 and m["dynamic_sampling/trained_groups"] == PROMPTS_PER_STEP
        assert m["dynamic_sampling/skipped_steps"] == 0
        # dropped groups carry their (real) accuracy, and a finite angle signal for GAIN-RL's update
        assert all(torch.isfinite(torch.tensor(report["signal"])))


def test_cap_raises_a_clear_error(tiny_model_dir, data, tmp_path):
    module, dm = make(tiny_model_dir, data, constant_reward, max_extra_generation_rounds=1)
    with pytest.raises(RuntimeError, match=r"max_extra_generation_rounds=1 .*only 0 of the 4 prompt groups.*"
                                           r"dynamic_sampling_allow_partial"):
        fit(module, dm, tmp_path, Watch())


def test_cap_with_allow_partial_skips_steps_and_counts_them(tiny_model_dir, data, tmp_path, loss_inputs):
    module, dm = make(tiny_model_dir, data, constant_reward, max_extra_generation_rounds=1,
                      dynamic_sampling_allow_partial=True)
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    watch = Watch()
    trainer = fit(module, dm, tmp_path, watch, max_steps=-1, max_epochs=1)  # one round: 4 batches
    assert trainer.global_step == 0 and loss_inputs == []
    assert module.dynamic_sampling_skipped_steps == 4
    assert [m["dynamic_sampling/skipped_steps"] for m in watch.metrics] == [1, 2, 3, 4]
    assert all(m["dynamic_sampling/zero_variance_fraction"] == 1.0 for m in watch.metrics)
    assert all(torch.equal(p, before[n]) for n, p in module.policy.named_parameters())


def test_allow_partial_trains_on_the_groups_that_survived(tiny_model_dir, data, tmp_path, loss_inputs):
    # no refills at all: each step trains on the odd prompts of its own batch only
    module, dm = make(tiny_model_dir, data, half_constant_reward, max_extra_generation_rounds=0,
                      dynamic_sampling_allow_partial=True)
    watch = Watch()
    fit(module, dm, tmp_path, watch, max_steps=-1, max_epochs=1)
    odd = [sum(i % 2 for i in r["index"]) for r in watch.reports]
    assert [n // G for n in loss_inputs] == [n for n in odd if n]
    assert all(m["dynamic_sampling/extra_rounds"] == 0 for m in watch.metrics)


def test_needs_a_datamodule_with_a_sampler(tiny_model_dir, data, tmp_path):
    module, dm = make(tiny_model_dir, data, constant_reward)
    loader = torch.utils.data.DataLoader([{"x": 1}])
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="dynamic_sampling=True draws refill prompts"):
        trainer.fit(module, train_dataloaders=loader)
    with pytest.raises(ValueError, match="max_extra_generation_rounds=-1"):
        make(tiny_model_dir, data, constant_reward, max_extra_generation_rounds=-1)


# ------------------------------------------------------------------------------------------- pure helpers


def test_rollouts_of_different_widths_merge_padded_left_and_right():
    pad = 9
    a = Rollout(torch.tensor([[1, 2]]), torch.tensor([[1, 1]]), torch.tensor([[5, 6, 7]]), torch.tensor([[1, 1, 1]]),
                torch.tensor([True]), 1.0)
    b = Rollout(torch.tensor([[pad, 3, 4, 5]]), torch.tensor([[0, 1, 1, 1]]), torch.tensor([[8]]),
                torch.tensor([[1]]), torch.tensor([False]), 2.0)
    merged = concat_rollouts([a, b], pad)
    assert merged.prompt_ids.tolist() == [[pad, pad, 1, 2], [pad, 3, 4, 5]]
    assert merged.prompt_mask.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    assert merged.completion_ids.tolist() == [[5, 6, 7], [8, pad, pad]]
    assert merged.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert merged.truncated.tolist() == [True, False] and merged.seconds == 3.0
    # selecting a row trims the columns only the other row needed: back to that round's own tensors
    only_b = select_rollout(merged, torch.tensor([1]))
    assert only_b.prompt_ids.tolist() == [[3, 4, 5]] and only_b.completion_ids.tolist() == [[8]]
    only_a = select_rollout(merged, torch.tensor([0]))
    assert torch.equal(only_a.prompt_ids, a.prompt_ids) and torch.equal(only_a.completion_ids, a.completion_ids)


def test_batches_and_rewards_merge_in_order():
    one = {"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.tensor([[1, 1]]), "index": torch.tensor([3]),
           "prompt": ["p3"], "columns": {"answer": ["3"]}}
    two = {"input_ids": torch.tensor([[4]]), "attention_mask": torch.tensor([[1]]), "index": torch.tensor([5]),
           "prompt": ["p5"], "columns": {"answer": ["5"]}}
    merged = concat_batches([one, two], pad_token_id=0)
    assert merged["input_ids"].tolist() == [[1, 2], [0, 4]] and merged["attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert merged["index"].tolist() == [3, 5] and merged["prompt"] == ["p3", "p5"]
    assert merged["columns"] == {"answer": ["3", "5"]}
    r = concat_rewards([RewardOutput(torch.ones(2, 1), torch.ones(2), ["f"], {"f": 1}),
                        RewardOutput(torch.zeros(1, 1), torch.zeros(1), ["f"], {"f": 2})])
    assert r.total.tolist() == [1, 1, 0] and r.errors == {"f": 3}


def test_ranks_agree_on_the_minimum_or_all_raise():
    # [kept, dropped, generated, extra rounds] per rank
    counts = torch.tensor([[4, 2, 6, 1], [3, 5, 8, 3]])
    assert agree_on_group_count(counts, 4, max_extra_generation_rounds=3, allow_partial=True) == 3
    with pytest.raises(RuntimeError, match=r"max_extra_generation_rounds=3 .* on rank\(s\) \[1\] \(7 of 14"):
        agree_on_group_count(counts, 4, max_extra_generation_rounds=3, allow_partial=False)
    assert agree_on_group_count(torch.tensor([[4, 0, 4, 0]] * 2), 4, max_extra_generation_rounds=0,
                                allow_partial=False) == 4
    assert first_kept(torch.tensor([False, True, True, False, True]), 2).tolist() == [1, 2]
