"""Faults inside a step: non-finite updates are skipped and counted, then stop the run; OOM says what to lower."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from gainrl_pl.callbacks import GainRLScheduler
from gainrl_pl.datamodules import GainRLDataModule, ScheduleSettings

from gainrl_pl.module import GRPOModule


def varied_reward(prompts, completions, **columns):
    return [float(len(c) % 3) for c in completions]


def build(tiny_model_dir, tmp_path, max_steps=6, **module_kw):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"q {i}?", "answer": str(i)}) + "\n" for i in range(8)))
    module = GRPOModule(model_name_or_path=str(tiny_model_dir), num_generations=4, max_completion_length=5,
                        rewards=[varied_reward], learning_rate=1e-3, **{"max_consecutive_nonfinite": 2, **module_kw})
    dm = GainRLDataModule(train_data=str(data), preset="generic", prompt="none", tokenizer=str(tiny_model_dir),
                          prompts_per_step=2, schedule=ScheduleSettings(name="uniform", subset_size=4))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, callbacks=[GainRLScheduler(use_cache=False)])
    return module, dm, trainer


@pytest.fixture()
def setup(tiny_model_dir, tmp_path):
    return build(tiny_model_dir, tmp_path)


def poison_training_forwards(module, which):
    """NaN logits on the training forwards (those with grad) whose 1-based count is in `which`."""
    calls = {"n": 0}

    def hook(mod, args, output):
        if not torch.is_grad_enabled():  # generation, old/reference log-probs
            return None
        calls["n"] += 1
        return output * float("nan") if calls["n"] in which else None

    module.policy.get_output_embeddings().register_forward_hook(hook)
    return calls


def test_nonfinite_gradients_skip_the_update_then_stop(setup, monkeypatch):
    module, dm, trainer = setup
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    real_backward = module.manual_backward

    def poisoned_backward(loss, *args, **kwargs):
        real_backward(loss * float("nan"), *args, **kwargs)

    monkeypatch.setattr(module, "manual_backward", poisoned_backward)
    with pytest.raises(FloatingPointError, match="2 rollouts in a row had an optimizer step with a non-finite"):
        trainer.fit(module, datamodule=dm)
    assert module.nonfinite_total == 2
    for n, p in module.policy.named_parameters():  # the skipped updates left the weights untouched
        assert torch.equal(p, before[n]), n


def test_one_nonfinite_update_is_skipped_and_training_goes_on(setup, monkeypatch):
    module, dm, trainer = setup
    real_backward = module.manual_backward
    calls = {"n": 0}

    def poison_once(loss, *args, **kwargs):
        calls["n"] += 1
        real_backward(loss * float("inf") if calls["n"] == 2 else loss, *args, **kwargs)

    monkeypatch.setattr(module, "manual_backward", poison_once)
    trainer.fit(module, datamodule=dm)
    # max_steps counts optimizer steps that happened: the skipped one costs one extra batch
    assert trainer.global_step == 6 and calls["n"] == 7
    assert module.nonfinite_total == 1 and module.nonfinite_in_a_row == 0
    assert trainer.callback_metrics["train/nonfinite_updates"] == 1


def test_a_skipped_step_leaves_the_adaptive_entropy_controller_alone(tiny_model_dir, tmp_path):
    # NaN logits in the 2nd training forward: that step is skipped, and its NaN entropy must not move the coefficient
    # (3 real steps below a target of 100 nats: 0.1 + 3 x 0.05)
    module, dm, trainer = build(tiny_model_dir, tmp_path, max_steps=3, use_adaptive_entropy=True, entropy_coef=0.1,
                                entropy_coef_delta=0.05, entropy_target=100.0)
    poison_training_forwards(module, {2})
    trainer.fit(module, datamodule=dm)
    assert module.nonfinite_total == 1 and trainer.global_step == 3
    assert module.entropy_coef_now == pytest.approx(0.25)
    assert 0 < module.last_step_entropy < 100


def test_nan_in_one_mini_batch_skips_that_step_only(tiny_model_dir, tmp_path):
    """Three optimizer steps per rollout: a NaN loss in the first mini-batch skips that step, the rollout's other
    two go on; a rollout whose every step is NaN is skipped whole, and a clean rollout after it resets the count."""
    module, dm, trainer = build(tiny_model_dir, tmp_path, max_steps=8, steps_per_rollout=3)
    # rollout 1: mini-batch 1 of 3; rollout 3: all three (rollouts 2 and 4 are clean)
    calls = poison_training_forwards(module, {1, 7, 8, 9})
    steps_per_rollout = []

    class Steps(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps_per_rollout.append(trainer.global_step)

    trainer.callbacks.append(Steps())
    trainer.fit(module, datamodule=dm)
    assert steps_per_rollout == [2, 5, 5, 8] and calls["n"] == 12
    assert module.nonfinite_total == 4 and module.nonfinite_in_a_row == 0
    assert trainer.callback_metrics["train/nonfinite_updates"] == 4


def test_diverged_run_stops_after_max_consecutive_nonfinite_rollouts(tiny_model_dir, tmp_path):
    module, dm, trainer = build(tiny_model_dir, tmp_path, steps_per_rollout=3, max_consecutive_nonfinite=2)
    poison_training_forwards(module, set(range(1, 100)))
    with pytest.raises(FloatingPointError, match="2 rollouts in a row.*6 steps skipped"):
        trainer.fit(module, datamodule=dm)
    assert module.nonfinite_total == 6 and trainer.global_step == 0


def test_out_of_memory_in_generation_names_the_knobs(setup, monkeypatch):
    module, dm, trainer = setup

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(module.policy, "generate", oom)
    with pytest.raises(torch.OutOfMemoryError, match="generation_batch_size.*max_completion_length.*num_generations"):
        trainer.fit(module, datamodule=dm)
