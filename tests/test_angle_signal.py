"""The rollouts' angle signal (spec section 5), most of every mu shift: its value, its order, one knob for its site."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from gainrl_pl.callbacks import GainRLScheduler
from gainrl_pl.datamodules import GainRLDataModule, ScheduleSettings

from gainrl_pl.angles import mean_pairwise_cosine
from gainrl_pl.module import GRPOModule
from gainrl_pl.scoring import find_decoder_layers

G = 4


def digit_reward(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


@pytest.fixture(scope="module")
def varied_data(tmp_path_factory):
    # questions of very different lengths: left padding differs from row to row
    path = tmp_path_factory.mktemp("signal") / "train.jsonl"
    path.write_text("".join(json.dumps({"question": "What is " + " plus ".join(["2"] * (1 + i % 5)) + "?",
                                        "answer": str(2 * (1 + i % 5))}) + "\n" for i in range(10)))
    return path


class Capture(pl.Callback):
    """Before the scheduler consumes it: the module's per-prompt report of each step, and the trained rollout."""

    def __init__(self, module: GRPOModule) -> None:
        self.reports, self.rollouts, self.mlp_calls = [], [], 0
        real = module._train_on

        def train_on(groups, step_metrics):
            self.rollouts.append(groups.rollout)
            return real(groups, step_metrics)

        module._train_on = train_on
        find_decoder_layers(module.policy)[-1].mlp.register_forward_pre_hook(self._count)

    def _count(self, mod, args):
        self.mlp_calls += torch.is_grad_enabled()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.reports.append({k: v.clone() for k, v in pl_module.last_rollout_report.items()})
        assert batch["index"].tolist() == self.reports[-1]["index"].tolist()  # prompts in the batch's order


def hidden_at(policy, input_ids, attention, layer: int, site: str) -> torch.Tensor:
    """The hidden states at (layer, site) of a plain forward, captured independently of the probe."""
    block = find_decoder_layers(policy)[layer]
    captured = []
    if site == "mlp_input":
        handle = block.mlp.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    else:
        handle = block.register_forward_hook(
            lambda m, args, out: captured.append((out[0] if isinstance(out, tuple) else out).detach()))
    try:
        with torch.no_grad():
            policy(input_ids=input_ids, attention_mask=attention, use_cache=False)
    finally:
        handle.remove()
    assert len(captured) == 1
    return captured[0]


@pytest.mark.parametrize(("layer", "site"), [(-1, "mlp_input"), (0, "layer_output")])
def test_signal_is_the_mean_pairwise_cosine_of_each_rollout_in_prompt_order(tiny_model_dir, varied_data, tmp_path,
                                                                          layer, site):
    """Gradient checkpointing on (the hooked layer runs twice per training forward), 2 mini-batches x 2
    micro-batches, 2 passes over the rollout: the report holds, per prompt in batch order, the mean over its G
    completions of mean_pairwise_cosine of the real hidden states at the scheduler's (layer, site)."""
    module = GRPOModule(model_name_or_path=str(tiny_model_dir), num_generations=G, max_completion_length=6,
                        rewards=[digit_reward], learning_rate=0.0, gradient_checkpointing=True, num_iterations=2,
                        steps_per_rollout=2, micro_batch_size=2)
    dm = GainRLDataModule(train_data=str(varied_data), preset="generic", prompt="none", tokenizer=str(tiny_model_dir),
                          prompts_per_step=2, schedule=ScheduleSettings(name="uniform", subset_size=4))
    capture = Capture(module)
    pl.seed_everything(0)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=8, max_epochs=-1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                         callbacks=[capture, GainRLScheduler(use_cache=False, layer=layer, site=site)])
    trainer.fit(module, datamodule=dm)
    assert len(capture.reports) == 2  # 2 iterations x 2 mini-batches = 4 optimizer steps per rollout
    if site == "mlp_input":  # checkpointing really recomputed the layer: every training forward ran it twice
        rollouts, passes, micro_batches = 2, 2, 2 * G // 2
        assert capture.mlp_calls == rollouts * passes * micro_batches * 2
    module.policy.eval()
    for report, rollout in zip(capture.reports, capture.rollouts, strict=True):
        input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
        attention = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
        hidden = hidden_at(module.policy, input_ids, attention, layer, site)
        per_completion = mean_pairwise_cosine(hidden, attention.bool()).float()
        expected = per_completion.view(-1, G).mean(dim=1)
        assert report["signal"].shape == expected.shape == (2,)
        torch.testing.assert_close(report["signal"], expected, atol=1e-5, rtol=1e-5)
    assert module.angle_probe.pop_signal().numel() == 0  # nothing captured beyond the first pass


def test_the_scheduler_layer_is_checked_against_the_model(tiny_model_dir, varied_data, tmp_path):
    module = GRPOModule(model_name_or_path=str(tiny_model_dir), num_generations=2, max_completion_length=4,
                        rewards=[digit_reward])
    dm = GainRLDataModule(train_data=str(varied_data), preset="generic", prompt="none", tokenizer=str(tiny_model_dir),
                          prompts_per_step=2, schedule=ScheduleSettings(name="uniform", subset_size=4))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         default_root_dir=tmp_path, callbacks=[GainRLScheduler(use_cache=False, layer=7)])
    with pytest.raises(ValueError, match=r"scheduler.layer=7 is out of range for a model with 2 decoder layers"):
        trainer.fit(module, datamodule=dm)
