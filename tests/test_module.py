"""GRPOModule end to end on a tiny random Llama: real generate, real peft, real Trainer.fit."""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from gainrl_pl.callbacks import GainRLScheduler
from gainrl_pl.datamodules import GainRLDataModule, ScheduleSettings

from gainrl_pl.grpo import token_entropy
from gainrl_pl.models import LoraSettings, QuantizationSettings
from gainrl_pl.module import GRPOModule


def digit_reward(prompts, completions, **columns):
    """Toy reward a random tiny model can learn fast: the share of characters that are digits.

    Its byte-level vocabulary has many digit tokens, so groups almost never tie (every tensor gets a
    gradient) and the reward can rise within a few dozen steps.
    """
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "train.jsonl"
    with open(path, "w") as fh:
        for i in range(32):
            fh.write(json.dumps({"question": f"What is {i} + {i % 7}?", "answer": str(i + i % 7)}) + "\n")
    return path


def make_datamodule(tiny_model_dir, toy_data, schedule="uniform", **kw):
    return GainRLDataModule(train_data=str(toy_data), val_data=str(toy_data), preset="generic", prompt="none",
                            tokenizer=str(tiny_model_dir), prompts_per_step=kw.pop("prompts_per_step", 4),
                            val_batch_size=8, val_limit=8,
                            schedule=ScheduleSettings(name=schedule, subset_size=kw.pop("subset_size", 8),
                                                      sigma=0.5, step_size=0.2, max_shift=0.3), **kw)


def make_module(tiny_model_dir, **kw):
    defaults = dict(model_name_or_path=str(tiny_model_dir), num_generations=4, max_completion_length=8,
                    rewards=[digit_reward], learning_rate=1e-3, temperature=1.0)
    defaults.update(kw)
    return GRPOModule(**defaults)


def fit(module, dm, tmp_path, max_steps=2, callbacks=None, ckpt_path=None, **trainer_kw):
    pl.seed_everything(0)
    trainer = pl.Trainer(**{**dict(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, logger=False,
                                   enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                                   use_distributed_sampler=False, limit_val_batches=0, default_root_dir=tmp_path,
                                   callbacks=callbacks if callbacks is not None
                                   else [GainRLScheduler(use_cache=False)]), **trainer_kw})
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def record_calls(monkeypatch, name: str, record) -> list:
    """Wrap `gainrl_pl.module.<name>`: each call appends `record(args, kwargs, result)` to the returned list."""
    import gainrl_pl.module as module_lib

    calls = []
    real = getattr(module_lib, name)

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(record(args, kwargs, out))
        return out

    monkeypatch.setattr(module_lib, name, spy)
    return calls


def trainable_snapshot(module):
    return {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}


def assert_changed(before, module):
    after = {n: p.detach() for n, p in module.policy.named_parameters() if p.requires_grad}
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed, "no trainable parameter moved"
    return changed


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
def test_fit_full_finetune_each_loss_type(tiny_model_dir, toy_data, tmp_path, loss_type):
    # cispo, sapo and luspo with two passes per rollout, where their weights differ from the clip's
    extra = {"cispo": dict(epsilon_high=5.0, num_iterations=2), "sapo": dict(num_iterations=2),
             "luspo": dict(importance_sampling_level="sequence", num_iterations=2),
             "vespo": dict(num_iterations=2)}.get(loss_type, {})
    module = make_module(tiny_model_dir, loss_type=loss_type, **extra)
    before = trainable_snapshot(module)
    trainer = fit(module, make_datamodule(tiny_model_dir, toy_data), tmp_path)
    assert trainer.global_step == 2
    changed = assert_changed(before, module)
    assert len(changed) == len(before)  # full fine-tune: every tensor gets a gradient
    assert "train/loss" in trainer.callback_metrics and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_fit_lora_with_kl_num_iterations_and_angle_schedule(tiny_model_dir, toy_data, tmp_path):
    module = make_module(tiny_model_dir, lora=LoraSettings(r=4, alpha=8), beta=0.05, num_iterations=2,
                         steps_per_rollout=2, micro_batch_size=4)
    assert module.ref_model is None  # LoRA: the reference is the base with adapters off, not a copy
    base = {n: p.detach().clone() for n, p in module.policy.named_parameters() if not p.requires_grad}
    before = trainable_snapshot(module)
    dm = make_datamodule(tiny_model_dir, toy_data, schedule="angle")
    scheduler = GainRLScheduler(use_cache=False)
    trainer = fit(module, dm, tmp_path, max_steps=8, callbacks=[scheduler])
    # 2 iterations x 2 mini-batches = 4 optimizer steps per rollout
    assert trainer.global_step == 8
    assert all("lora_" in n for n in assert_changed(before, module))
    for n, p in module.policy.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base[n]), f"frozen base weight {n} moved"
    # k3 is >= 0 by construction; > 0 says the reference really is the base (adapters off), not the moved policy
    assert trainer.callback_metrics["train/kl"] > 1e-6
    assert scheduler.history and "mu" in scheduler.history[0]
    assert dm.ranking is not None and sorted(dm.ranking) == list(range(len(dm.train_set)))


def test_gspo_sequence_level_reaches_the_loss_and_trains(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    seen = record_calls(monkeypatch, "policy_loss",
                        lambda args, kwargs, out: (kwargs["importance_sampling_level"], out[1]["ratio_mean"].item()))
    module = make_module(tiny_model_dir, lora=LoraSettings(r=4, alpha=8), num_iterations=2,
                         importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4)
    before = trainable_snapshot(module)
    trainer = fit(module, make_datamodule(tiny_model_dir, toy_data), tmp_path, max_steps=2)
    assert trainer.global_step == 2 and assert_changed(before, module)
    assert seen and {level for level, _ in seen} == {"sequence"}
    assert seen[0][1] == 1.0 and seen[-1][1] != 1.0  # the second pass over the rollout is off-policy
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_top_entropy_quantile_trains_on_the_high_entropy_tokens(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    weights = record_calls(monkeypatch, "policy_loss",
                           lambda args, kwargs, out: (kwargs["loss_weights"], args[4]))  # (weights, completion mask)
    module = make_module(tiny_model_dir, top_entropy_quantile=0.25, micro_batch_size=8)
    before = trainable_snapshot(module)
    trainer = fit(module, make_datamodule(tiny_model_dir, toy_data), tmp_path, max_steps=1)
    assert assert_changed(before, module)
    assert len(weights) == 2  # 4 prompts x G=4 = 16 completions in micro-batches of 8
    for w, mask in weights:
        mask = mask.bool()
        assert w is not None and set(w.unique().tolist()) <= {0.0, 1.0} and not w[~mask].any()
        share = float(w[mask].mean())
        assert 0.2 <= share <= 0.4, share  # the top quarter of this micro-batch's completion tokens (ties kept)
    assert 0.2 <= float(trainer.callback_metrics["train/entropy_kept_fraction"]) <= 0.4


def test_bias_corrected_kl_reaches_the_loss(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    seen = record_calls(monkeypatch, "policy_loss",
                        lambda args, kwargs, out: (kwargs["use_bias_correction_kl"], kwargs["beta"]))
    module = make_module(tiny_model_dir, beta=0.1, use_bias_correction_kl=True)
    before = trainable_snapshot(module)
    fit(module, make_datamodule(tiny_model_dir, toy_data), tmp_path, max_steps=1)
    assert_changed(before, module)
    assert seen and all(flag is True and beta == 0.1 for flag, beta in seen)


def test_off_policy_mask_drops_stale_negative_completions_in_the_second_pass(tiny_model_dir, toy_data, tmp_path,
                                                                           monkeypatch):
    """num_iterations 2 with a large step: the first pass is on-policy (nothing dropped), in the second the policy
    has moved, and only negative-advantage completions are dropped from the policy term."""
    calls = record_calls(monkeypatch, "policy_loss",
                         lambda args, kwargs, out: (kwargs["loss_weights"], args[3]))  # (weights, advantages)
    module = make_module(tiny_model_dir, off_policy_mask_threshold=1e-3, num_iterations=2, learning_rate=5e-2)
    trainer = fit(module, make_datamodule(tiny_model_dir, toy_data), tmp_path, max_steps=2)
    first, second = calls[0], calls[1]  # one micro-batch per pass
    assert first[0].squeeze(1).tolist() == [1.0] * 16
    dropped = second[0].squeeze(1) == 0
    assert dropped.any() and (second[1][dropped] < 0).all()
    assert float(trainer.callback_metrics["train/off_policy_masked_fraction"]) > 0


def constant_reward(prompts, completions, **columns):
    return [1.0] * len(completions)


class GradientsBeforeStep(pl.Callback):
    def __init__(self):
        self.grads = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in module.policy.named_parameters()
                           if p.grad is not None})


def test_entropy_coef_is_a_token_mean_over_the_step_and_its_sign_moves_entropy(tiny_model_dir, toy_data, tmp_path):
    """A constant reward gives zero advantages: the entropy bonus is the only gradient. It is the same however the
    step is micro-batched (a mean over the step's tokens), absent at entropy_coef 0, and a negative coefficient
    (a penalty) lowers the policy's entropy."""
    def step_gradients(**kw):
        spy = GradientsBeforeStep()
        module = make_module(tiny_model_dir, rewards=[constant_reward], max_grad_norm=0.0, **kw)
        fit(module, make_datamodule(tiny_model_dir, toy_data), tmp_path, max_steps=1,
            callbacks=[GainRLScheduler(use_cache=False), spy])
        return spy.grads[0]

    whole = step_gradients(entropy_coef=0.5)
    assert whole and any(g.abs().max() > 0 for g in whole.values())
    split = step_gradients(entropy_coef=0.5, micro_batch_size=4)  # 16 completions in 4 micro-batches
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, atol=1e-6, rtol=1e-4)
    assert all(not g.any() for g in step_gradients(entropy_coef=0.0).values())

    def mean_entropy(module):
        ids = torch.arange(3, 43).reshape(2, 20)
        with torch.no_grad():
            logits = module.policy(input_ids=ids).logits
        return float(token_entropy(logits).mean())

    module = make_module(tiny_model_dir, rewards=[constant_reward], entropy_coef=-1.0, learning_rate=1e-3)
    start = mean_entropy(module)
    fit(module, make_datamodule(tiny_model_dir, toy_data), tmp_path, max_steps=3)
    assert mean_entropy(module) < start - 1e-3


@pytest.mark.parametrize("target, expected_coefs", [(100.0, [0.0, 0.15, 0.2]), (1e-6, [0.0, 0.0, 0.0])])
def test_adaptive_entropy_moves_the_coefficient_and_resumes_it(tiny_model_dir, toy_data, tmp_path, target,
                                                             expected_coefs):
    """Entropy always below a target of 100 nats: the coefficient rises by delta each step (0.1 -> 0.15 -> 0.2 ->
    0.25) and applies from step 2 (step 1 has no measurement yet); always above a target of 1e-6: it falls to the
    minimum and never applies. A resume after step 2 continues the controller where it was."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class AppliedCoefs(pl.Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, module, *args):
            self.values.append(float(trainer.callback_metrics["train/entropy_coef"]))

    settings = dict(use_adaptive_entropy=True, entropy_coef=0.1, entropy_coef_delta=0.05, entropy_coef_max=0.25,
                    entropy_target=target)
    module = make_module(tiny_model_dir, **settings)
    applied = AppliedCoefs()
    ckpt_dir = tmp_path / "ckpt"
    fit(module, make_datamodule(tiny_model_dir, toy_data), tmp_path, max_steps=3, enable_checkpointing=True,
        callbacks=[GainRLScheduler(use_cache=False), applied,
                   ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1)])
    assert applied.values == pytest.approx(expected_coefs)
    assert module.entropy_coef_now == pytest.approx(0.25 if target > 1 else 0.0)
    assert math.isfinite(module.last_step_entropy) and module.last_step_entropy > 0

    (step2,) = ckpt_dir.glob("*step=2.ckpt")
    resumed = make_module(tiny_model_dir, **settings)
    applied_after = AppliedCoefs()
    fit(resumed, make_datamodule(tiny_model_dir, toy_data), tmp_path / "resumed", max_steps=3, ckpt_path=str(step2),
        callbacks=[GainRLScheduler(use_cache=False), applied_after])
    assert applied_after.values == pytest.approx(expected_coefs[2:])
    assert resumed.entropy_coef_now == pytest.approx(module.entropy_coef_now)


def test_entropy_controller_state_continues_only_between_adaptive_runs(tiny_model_dir):
    saved = {"coef": 0.9, "last_entropy": 1.5}
    plain = make_module(tiny_model_dir, entropy_coef=0.05)
    plain.on_load_checkpoint({"state_dict": plain.state_dict(), "gainrl_entropy_control": saved})
    assert plain.entropy_coef_now == 0.05 and plain.last_step_entropy == float("inf")
    adaptive = make_module(tiny_model_dir, use_adaptive_entropy=True, entropy_coef=0.05, entropy_coef_max=0.5)
    adaptive.on_load_checkpoint({"state_dict": adaptive.state_dict()})  # a checkpoint of a run without control
    assert adaptive.entropy_coef_now == 0.05
    adaptive.on_load_checkpoint({"state_dict": adaptive.state_dict(), "gainrl_entropy_control": saved})
    assert adaptive.entropy_coef_now == 0.5 and adaptive.last_step_entropy == 1.5  # clamped to this run's bounds


def length_reward(prompts, completions, **columns):
    """A second objective on another scale: completion length in characters."""
    return [float(len(c)) for c in completions]


def test_normalize_then_sum_gives_batch_normalised_advantages(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    advantages = record_calls(monkeypatch, "policy_loss", lambda args, kwargs, out: args[3].detach().clone())
    module = make_module(tiny_model_dir, rewards=[digit_reward, length_reward], reward_weights=[1.0, 0.01],
                         multi_objective_aggregation="normalize_then_sum")
    trainer = fit(module, make_datamodule(tiny_model_dir, toy_data), tmp_path, max_steps=1)
    assert trainer.global_step == 1 and len(advantages) == 1
    a = advantages[0]  # 4 prompts x G=4, one micro-batch
    # Every function is centred within its group, so each group's advantages still sum to 0; GDPO's last step then
    # scales the batch to unbiased std 1 (up to eps). GRPO's group scaling gives a batch std of at most
    # sqrt(12/15) = 0.89 here (each group std 1 over 3 degrees of freedom of 15), so the std tells them apart.
    assert torch.allclose(a.view(4, 4).mean(dim=1), torch.zeros(4), atol=1e-5)
    assert float(a.std()) == pytest.approx(1.0, abs=1e-3)


def test_generation_kwargs_reach_the_training_rollouts_only(tiny_model_dir, toy_data, tmp_path, monkeypatch):
    calls = record_calls(monkeypatch, "generate_completions",
                         lambda args, kwargs, out: (kwargs["do_sample"], kwargs["generation_kwargs"]))
    module = make_module(tiny_model_dir, generation_kwargs={"no_repeat_ngram_size": 2})
    fit(module, make_datamodule(tiny_model_dir, toy_data), tmp_path, max_steps=1, limit_val_batches=1,
        val_check_interval=1)
    training = [g for sampled, g in calls if sampled]
    validation = [g for sampled, g in calls if not sampled]  # greedy, as model.val_temperature says
    assert training == [{"no_repeat_ngram_size": 2}] and validation and all(g is None for g in validation)


def test_beta_zero_loads_no_reference_and_full_ft_beta_copies(tiny_model_dir):
    assert make_module(tiny_model_dir, beta=0.0).ref_model is None
    module = make_module(tiny_model_dir, beta=0.1)
    assert module.ref_model is not None
    assert not any(p.requires_grad for p in module.ref_model.parameters())


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, alpha=8)])
def test_reference_is_the_starting_policy_and_stays_there(tiny_model_dir, toy_data, lora):
    """At step 0 the reference equals the policy; once the policy moves (adapters made non-zero, or every weight
    perturbed) the reference keeps the starting log-probs: the base with adapters off, or a frozen copy."""
    module = make_module(tiny_model_dir, beta=0.1, lora=lora)
    dm = make_datamodule(tiny_model_dir, toy_data)
    dm.setup("fit")
    batch = dm.collate(dm._with_positions(dm.train_set[:3]))
    from gainrl_pl.rollout import generate_completions

    rollout = generate_completions(module.policy, batch["input_ids"], batch["attention_mask"], num_generations=2,
                                   max_new_tokens=6, pad_token_id=module.tokenizer.pad_token_id,
                                   eos_ids=module.eos_ids)
    ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], 1)
    att = torch.cat([rollout.prompt_mask, rollout.completion_mask], 1)
    module.policy.eval()
    with torch.no_grad():
        start = module._logprobs_batched(module.policy, ids, att, rollout)
        torch.testing.assert_close(module._reference_logprobs(ids, att, rollout), start)
        torch.manual_seed(1)
        for p in module.policy.parameters():
            if p.requires_grad:  # LoRA: A and B (B starts at 0); full fine-tune: every weight
                p.add_(torch.randn_like(p) * 0.05)
        moved = module._logprobs_batched(module.policy, ids, att, rollout)
        ref = module._reference_logprobs(ids, att, rollout)
    assert (moved - start).abs().max() > 1e-2, "the policy did not move"
    torch.testing.assert_close(ref, start)


def test_sync_ref_model_mixes_on_its_steps_and_a_resume_restores_the_moved_reference(tiny_model_dir, toy_data,
                                                                                       tmp_path):
    """TR-DPO's update every 2nd optimizer step: after 3 steps the reference is 0.5 * (policy after step 2) +
    0.5 * start, untouched by step 3; checkpoints hold it, and a resume loads it instead of a fresh copy."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class PolicyAfterEachStep(pl.Callback):
        def __init__(self):
            self.states = []

        def on_train_batch_end(self, trainer, module, *args):
            self.states.append({n: p.detach().clone() for n, p in module.policy.named_parameters()})

    module = make_module(tiny_model_dir, beta=0.1, sync_ref_model=True, ref_model_mixup_alpha=0.5,
                         ref_model_sync_steps=2)
    start = {n: p.detach().clone() for n, p in module.ref_model.named_parameters()}
    snapshots = PolicyAfterEachStep()
    ckpt_dir = tmp_path / "ckpt"
    fit(module, make_datamodule(tiny_model_dir, toy_data), tmp_path, max_steps=3, enable_checkpointing=True,
        callbacks=[GainRLScheduler(use_cache=False), snapshots,
                   ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1, save_last=True)])
    after_step2, after_step3 = snapshots.states[1], snapshots.states[2]
    ref = dict(module.ref_model.named_parameters())
    for name, weight in start.items():
        torch.testing.assert_close(ref[name], 0.5 * after_step2[name] + 0.5 * weight)
    assert any(not torch.equal(after_step2[n], after_step3[n]) for n in ref), "step 3 did not move the policy"
    assert any(not torch.equal(ref[n], start[n]) for n in ref), "the reference never moved"

    # resumed after step 2, step 3 runs again: a reference rebuilt from the source model would stay at `start`
    (step2_ckpt,) = ckpt_dir.glob("*step=2.ckpt")
    assert any(k.startswith("ref_model.") for k in torch.load(step2_ckpt, weights_only=False)["state_dict"])
    resumed = make_module(tiny_model_dir, beta=0.1, sync_ref_model=True, ref_model_mixup_alpha=0.5,
                          ref_model_sync_steps=2)
    fit(resumed, make_datamodule(tiny_model_dir, toy_data), tmp_path / "resumed", max_steps=3,
        ckpt_path=str(step2_ckpt))
    for name, weight in resumed.ref_model.named_parameters():
        torch.testing.assert_close(weight, ref[name])


def test_toy_reward_rises_proving_gradients_flow(tiny_model_dir, toy_data, tmp_path):
    torch.manual_seed(0)
    module = make_module(tiny_model_dir, learning_rate=3e-3, num_generations=8, max_completion_length=6,
                         loss_type="dapo")
    rewards = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rewards.append(float(trainer.callback_metrics["reward/total"]))

    dm = make_datamodule(tiny_model_dir, toy_data, prompts_per_step=4, subset_size=8)
    fit(module, dm, tmp_path, max_steps=24, callbacks=[GainRLScheduler(use_cache=False), Record()])
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert last > first + 0.1, f"reward did not rise: first {first:.3f}, last {last:.3f}"


def test_qlora_4bit_trains_after_eval_mode_generate(tiny_model_dir, toy_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    module = make_module(tiny_model_dir, lora=LoraSettings(r=4, alpha=8),
                         quantization=QuantizationSettings(compute_dtype="float32"))
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.policy.modules())
    before = trainable_snapshot(module)
    fit(module, make_datamodule(tiny_model_dir, toy_data), tmp_path, max_steps=2)
    changed = assert_changed(before, module)
    # the CPU repacking trap leaves most LoRA tensors without gradients after an eval-mode generate
    assert len(changed) == len(before), f"only {len(changed)}/{len(before)} LoRA tensors trained"


def test_bad_config_values_fail_at_start(tiny_model_dir):
    with pytest.raises(ValueError, match="loss_type='ppo'.*grpo, bnpo, dr_grpo, dapo"):
        make_module(tiny_model_dir, loss_type="ppo")
    with pytest.raises(ValueError, match="num_generations=-2"):
        make_module(tiny_model_dir, num_generations=-2)
    with pytest.raises(ValueError, match="importance_sampling_level='seq'.*token, sequence"):
        make_module(tiny_model_dir, importance_sampling_level="seq")
    with pytest.raises(ValueError, match=r"top_entropy_quantile=0.0 must be in \(0, 1\]"):
        make_module(tiny_model_dir, top_entropy_quantile=0.0)
    with pytest.raises(ValueError, match="multi_objective_aggregation='gdpo'.*normalize_then_sum"):
        make_module(tiny_model_dir, multi_objective_aggregation="gdpo")
    with pytest.raises(ValueError, match="generation_kwargs sets 'top_p', which is set by model.top_p"):
        make_module(tiny_model_dir, generation_kwargs={"top_p": 0.9})
    with pytest.raises(ValueError, match="num_generations=1 gives every group zero advantage"):
        make_module(tiny_model_dir, num_generations=1, scale_rewards="none",
                    multi_objective_aggregation="normalize_then_sum")
    with pytest.warns(UserWarning, match="scale_rewards='batch' does not apply"):
        make_module(tiny_model_dir, scale_rewards="batch", multi_objective_aggregation="normalize_then_sum")
    with pytest.raises(ValueError, match=r"sync_ref_model needs a reference copy to move: set beta > 0 \(now 0.0\)"):
        make_module(tiny_model_dir, sync_ref_model=True)
    with pytest.raises(ValueError, match="sync_ref_model needs .* without lora"):
        make_module(tiny_model_dir, sync_ref_model=True, beta=0.1, lora=LoraSettings(r=4, alpha=8))
    with pytest.raises(ValueError, match=r"ref_model_mixup_alpha=1.2 must be in \[0, 1\]"):
        make_module(tiny_model_dir, ref_model_mixup_alpha=1.2)
    with pytest.raises(ValueError, match="ref_model_sync_steps=0 >= 1"):
        make_module(tiny_model_dir, ref_model_sync_steps=0)
    with pytest.raises(ValueError, match="'cispo' caps the importance weight itself at epsilon_high"):
        make_module(tiny_model_dir, loss_type="cispo")
    with pytest.raises(ValueError, match="delta=1.5 caps the ratio of the clipped losses"):
        make_module(tiny_model_dir, loss_type="sapo", delta=1.5)
    with pytest.raises(ValueError, match="sapo_temperature_pos=1.0 and sapo_temperature_neg=-1.0 must be > 0"):
        make_module(tiny_model_dir, sapo_temperature_neg=-1.0)
    with pytest.warns(UserWarning, match="loss_type='luspo' is meant for importance_sampling_level='sequence'"):
        make_module(tiny_model_dir, loss_type="luspo")
    with pytest.raises(ValueError, match="off_policy_mask_threshold=0.0 must be > 0"):
        make_module(tiny_model_dir, off_policy_mask_threshold=0.0)
    with pytest.raises(ValueError, match=r"use_adaptive_entropy needs .* entropy_coef_min <= entropy_coef <= "
                                         r"entropy_coef_max \(now 0.0 <= 2.0 <= 1.0\)"):
        make_module(tiny_model_dir, use_adaptive_entropy=True, entropy_coef=2.0)
    with pytest.raises(ValueError, match=r"VESPO needs vespo_k_pos/neg >= 0 and vespo_lambda_pos/neg > 0"):
        make_module(tiny_model_dir, vespo_lambda_neg=0.0)
    with pytest.warns(UserWarning, match="importance_sampling_level='sequence' does not apply"):
        make_module(tiny_model_dir, loss_type="vespo", importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="entropy_coef=nan must be a finite number"):
        make_module(tiny_model_dir, entropy_coef=float("nan"))
    with pytest.raises(ValueError, match="lora.target_modules"):
        make_module(tiny_model_dir, lora=LoraSettings(target_modules=["nonexistent_proj"]))
    with pytest.raises(ValueError, match="quantization .* needs lora"):
        make_module(tiny_model_dir, quantization=QuantizationSettings())


def even_answer(prompts, completions, answer, **columns):
    """Correct when the row's answer is even: the accuracy is set by the data, not by the random model."""
    return [float(int(a) % 2 == 0) for a in answer]


def test_validation_accuracy_is_the_mean_over_prompts(tiny_model_dir, toy_data, tmp_path):
    # the first 8 answers (i + i % 7) are 0, 2, 4, 6, 8, 10, 12, 7: 7 of 8 even. Batches of 3 (3 + 3 + 2 prompts):
    # a mean of the batches' means would give (1 + 1 + 0.5) / 3 instead of 7 / 8
    module = make_module(tiny_model_dir, rewards=[even_answer])
    dm = GainRLDataModule(train_data=str(toy_data), val_data=str(toy_data), preset="generic", prompt="none",
                          tokenizer=str(tiny_model_dir), val_batch_size=3, val_limit=8)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         use_distributed_sampler=False, default_root_dir=tmp_path)
    metrics = trainer.validate(module, datamodule=dm)
    assert metrics[0]["val/accuracy"] == pytest.approx(7 / 8)


def lora_checkpoint(tiny_model_dir, toy_data, tmp_path, target_modules):
    """A one-step LoRA run's checkpoint, and the module it came from."""
    module = make_module(tiny_model_dir, lora=LoraSettings(r=4, alpha=8, target_modules=target_modules))
    trainer = fit(module, make_datamodule(tiny_model_dir, toy_data), tmp_path, max_steps=1)
    path = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(path)
    return path, module


def test_checkpoint_of_other_adapters_fails_naming_the_keys(tiny_model_dir, toy_data, tmp_path):
    path, saved = lora_checkpoint(tiny_model_dir, toy_data, tmp_path, ["q_proj", "v_proj"])

    def validate(module):
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             use_distributed_sampler=False, default_root_dir=tmp_path, limit_val_batches=1)
        trainer.validate(module, datamodule=make_datamodule(tiny_model_dir, toy_data), ckpt_path=path)

    # the same settings load the trained adapters
    same = make_module(tiny_model_dir, lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    validate(same)
    trained = dict(saved.policy.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in same.policy.named_parameters() if p.requires_grad)
    # adapters on q_proj only: the checkpoint's v_proj adapters are unexpected
    with pytest.raises(RuntimeError, match=r"does not match this model: 4 unexpected \(policy\..*v_proj\.lora_A"):
        validate(make_module(tiny_model_dir, lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj"])))
    # adapters on every projection: k_proj's and o_proj's are missing
    with pytest.raises(RuntimeError, match=r"8 missing \(.*k_proj\.lora_A"):
        validate(make_module(tiny_model_dir, lora=LoraSettings(r=4, alpha=8,
                                                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])))
    # a full fine-tune's module: every weight missing, every adapter unexpected
    with pytest.raises(RuntimeError, match=r"missing .* unexpected .*lora_"):
        validate(make_module(tiny_model_dir))


def test_fused_adamw_by_default_with_a_fallback(tiny_model_dir, monkeypatch):
    module = make_module(tiny_model_dir)
    opt = module.configure_optimizers()["optimizer"]
    assert opt.param_groups[0]["fused"] is True
    assert make_module(tiny_model_dir, fused_optimizer=False).configure_optimizers()["optimizer"] \
        .param_groups[0]["fused"] in (None, False)

    real = torch.optim.AdamW

    def no_fused_kernel(params, fused=None, **kw):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused_kernel)  # build_adamw looks it up at call time
    with pytest.warns(UserWarning, match="fused AdamW unavailable"):
        opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, real) and not opt.param_groups[0]["fused"]
