"""Precision that trains: fp32 master weights under bf16 compute, and a warning when bf16 weights cannot move."""

from __future__ import annotations

import warnings

import pytest
import torch
from shipped_configs import REPO, cpu_swaps

from gainrl_pl.cli import run_lightning_cli
from gainrl_pl.precision import half_ulp, lost_update_fraction, vanishing_update_warning

PAPER = REPO / "configs" / "gsm8k_qwen05b_paper.yaml"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_ulp_is_half_the_gap_to_the_next_number(dtype):
    values = (torch.rand(10_000) * 8 + 1e-3).to(dtype)  # positive normal numbers
    values = values[values.float().log2() != values.float().log2().floor()]  # gaps differ at powers of two
    gap = torch.nextafter(values, torch.tensor(float("inf"), dtype=dtype)).float() - values.float()
    assert torch.equal(half_ulp(values), gap / 2)


def test_lost_update_fraction_predicts_what_bf16_arithmetic_does():
    torch.manual_seed(0)
    w = (torch.randn(1000, 1000) * 0.02).to(torch.bfloat16)  # a typical weight matrix
    for lr in (1e-6, 1e-5, 1e-4, 1e-3):
        predicted, dtype = lost_update_fraction([w], lr)
        actually_unchanged = float(((w + lr) == w).float().mean())  # one update of size lr, in bf16
        assert dtype == torch.bfloat16 and predicted == pytest.approx(actually_unchanged, abs=0.01)
    assert lost_update_fraction([w], 1e-6)[0] > 0.95
    assert lost_update_fraction([w.float()], 1e-6) == (0.0, None)  # fp32 loses nothing at this scale
    assert "bf16-mixed" in vanishing_update_warning([w], 1e-6) and vanishing_update_warning([w], 1e-1) is None


def test_lora_adapters_stay_fp32_on_a_bf16_base_and_under_4bit(tiny_model_dir):
    from gainrl_pl.models import LoraSettings, QuantizationSettings, build_policy

    for quantization in (None, QuantizationSettings(compute_dtype="bfloat16")):
        policy = build_policy(str(tiny_model_dir), dtype="bfloat16", lora=LoraSettings(r=4), quantization=quantization)
        trainable = {p.dtype for p in policy.parameters() if p.requires_grad}
        assert trainable == {torch.float32}, (quantization, trainable)


def _weights(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in module.policy.named_parameters() if p.requires_grad}


def _fit_paper_config(tiny_model_dir, tmp_path, monkeypatch, *extra):
    """The shipped paper config (lr 1e-6, full fine-tune) for 2 optimizer steps on CPU, tiny model."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GAINRL_PL_CACHE", str(tmp_path / "cache"))
    # run=False: LightningCLI builds everything from the config (no subcommand) and the test calls fit itself
    cli = run_lightning_cli(["--config", str(PAPER), *cpu_swaps(PAPER, tiny_model_dir, tmp_path, max_steps=2),
                             "--model.reward_funcs", "[cli_probe.digit_reward]",  # unequal rewards: every step has a gradient
                             "--model.beta", "0", "--trainer.logger", "false", *extra], run=False)
    before = _weights(cli.model)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2 and cli.model.hparams.learning_rate == 1e-6
    after = _weights(cli.model)
    changed = sum(int((before[n] != after[n]).sum()) for n in before) / sum(t.numel() for t in before.values())
    return cli, changed


def test_paper_config_at_lr_1e6_changes_nearly_every_weight(tiny_model_dir, tmp_path, monkeypatch):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli, changed = _fit_paper_config(tiny_model_dir, tmp_path, monkeypatch)
    assert not [w for w in caught if "cannot change" in str(w.message)]  # fp32 master weights: no warning
    assert str(cli.trainer.precision) == "bf16-mixed"
    assert all(p.dtype == torch.float32 for p in cli.model.policy.parameters())
    assert changed > 0.99, f"only {changed:.1%} of the weights moved in 2 steps at lr 1e-6"


def test_pure_bf16_weights_at_lr_1e6_warn_and_barely_train(tiny_model_dir, tmp_path, monkeypatch):
    with pytest.warns(UserWarning, match=r"trainable weights are bfloat16 values that an update of "
                                         r"learning_rate=1e-06 cannot change.*bf16-mixed"):
        _, changed = _fit_paper_config(tiny_model_dir, tmp_path, monkeypatch, "--model.dtype", "bfloat16",
                                       "--trainer.precision", "bf16-true")
    assert changed < 0.2  # what the warning is about: most weights never moved
