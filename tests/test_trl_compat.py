"""Users coming from TRL: `reward_funcs`, real `trl.rewards` functions unchanged, conversational datasets,
the README's TRL-style config through the CLI, and the answer-extraction option of every shipped config."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from gainrl_pl.cli import main, run_lightning_cli
from gainrl_pl.rewards import ChatInputs, RewardComputer

# The `bench` extra carries trl; `make test` installs it, so CI runs these.
trl_rewards = pytest.importorskip("trl.rewards", reason="needs trl: pip install -e '.[bench]' (make test installs it)")

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "experiments" / "configs").glob("*.yaml"))

CHAT_ROWS = [
    {"prompt": [{"role": "system", "content": "Think in <think></think>, then box the answer."},
                {"role": "user", "content": f"What is {i} + {i % 5}?"}],
     "solution": f"\\boxed{{{i + i % 5}}}"}
    for i in range(16)
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------------- real trl.rewards
def test_trl_reward_functions_run_unchanged_and_agree_with_trl_itself():
    """Each trl.rewards function through RewardComputer, against the same function called as TRL calls it."""
    solutions = ["\\frac{1}{3}", "\\frac{1}{3}", "42", "42"]
    texts = ["<think>so</think> The answer is \\boxed{\\frac{1}{3}}", "<think>hm</think> \\boxed{\\frac{1}{2}}",
             "no think, \\boxed{42}", "<think>a</think><think>b</think> 41"]
    ids = [[1] * 10, [1, 2, 3] * 20, [5] * 40, [7, 8] * 3]
    prompts = [[{"role": "user", "content": "q"}]] * 4
    trl_completions = [[{"role": "assistant", "content": t}] for t in texts]
    functions = [trl_rewards.accuracy_reward, trl_rewards.think_format_reward, trl_rewards.reasoning_accuracy_reward,
                 trl_rewards.get_soft_overlong_punishment(max_completion_len=32, soft_punish_cache=16),
                 trl_rewards.get_cosine_scaled_reward(max_len=64),
                 trl_rewards.get_repetition_penalty_reward(ngram_size=2)]
    out = RewardComputer(functions)(["<rendered>"] * 4, texts, ChatInputs(prompts, from_data=True),
                                    solution=solutions, completion_ids=ids)
    for j, fn in enumerate(functions):
        expected = fn(prompts=prompts, completions=trl_completions, solution=solutions, completion_ids=ids)
        got = [None if math.isnan(v) else v for v in out.per_function[:, j].tolist()]
        assert got == pytest.approx(expected), out.names[j]
    assert out.per_function[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]  # a real answer check happened
    assert out.names[:2] == ["accuracy_reward", "think_format_reward"]


def test_trl_function_on_a_text_dataset_needs_the_chat_form_and_says_so():
    from gainrl_pl.rewards import RewardFunctionError

    prompts = [[{"role": "user", "content": "q"}]]
    with pytest.raises(RewardFunctionError, match="string indices.*completion_format='conversational'"):
        RewardComputer([trl_rewards.think_format_reward])(["q"], ["<think>a</think> b"], ChatInputs(prompts))
    forced = RewardComputer([trl_rewards.think_format_reward], completion_format="conversational")
    assert forced(["q"], ["<think>a</think> b"], ChatInputs(prompts)).total.tolist() == [1.0]


# ----------------------------------------------------------------------------------------------- GRPOModule, real fits
def _module(tiny_model_dir, **kw):
    from gainrl_pl.module import GRPOModule

    return GRPOModule(model_name_or_path=str(tiny_model_dir), num_generations=2, max_completion_length=6,
                      learning_rate=1e-3, **kw)


def _datamodule(tiny_model_dir, path, **kw):
    from gainrl_pl.datamodules import GainRLDataModule, ScheduleSettings

    return GainRLDataModule(train_data=str(path), val_data=str(path), preset=kw.pop("preset", "trl"),
                            tokenizer=str(tiny_model_dir), prompts_per_step=4, val_batch_size=4, val_limit=4,
                            schedule=ScheduleSettings(name="uniform", subset_size=8), **kw)


def test_fit_and_validate_with_trl_rewards_on_a_conversational_dataset(tiny_model_dir, tmp_path):
    """TRL's functions in training and validation, including those that need completion_ids there."""
    import lightning.pytorch as pl
    from gainrl_pl.callbacks import GainRLScheduler

    data = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)
    overlong = trl_rewards.get_soft_overlong_punishment(max_completion_len=6, soft_punish_cache=4)
    seen = []

    def spy(prompts, completions, solution, completion_ids, **kwargs):
        seen.append((prompts[0], completions[0], solution[0], completion_ids[0]))
        return [0.0] * len(completions)

    module = _module(tiny_model_dir, reward_funcs=[trl_rewards.accuracy_reward, overlong, spy])
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=2, max_epochs=-1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                         use_distributed_sampler=False, limit_val_batches=1, check_val_every_n_epoch=1,
                         callbacks=[GainRLScheduler(use_cache=False)], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=_datamodule(tiny_model_dir, data))
    assert trainer.global_step == 2
    assert module.reward_names == ["accuracy_reward", "soft_overlong_punishment_reward", "spy"]
    metrics = trainer.callback_metrics
    assert -1.0 <= float(metrics["reward/soft_overlong_punishment_reward/mean"]) <= 0.0
    assert 0.0 <= float(metrics["val/accuracy"]) <= 1.0  # validation ran TRL's functions too
    prompt, completion, solution, ids = seen[0]
    assert prompt in [row["prompt"] for row in CHAT_ROWS]  # the dataset's own messages
    assert isinstance(completion, list) and completion[0]["role"] == "assistant"
    assert isinstance(completion[0]["content"], str) and solution.startswith("\\boxed{")
    assert isinstance(ids, list) and all(isinstance(t, int) for t in ids)
    assert len(seen) > 2  # training steps and the validation pass


def test_answer_extraction_reaches_training_and_validation_rewards(tiny_model_dir, tmp_path):
    """`_rewards` scores training rollouts and validation alike; the option decides what it accepts."""
    data = write_jsonl(tmp_path / "toy.jsonl", [{"question": "What is 4 + 5?", "answer": "9"}] * 4)
    dm = _datamodule(tiny_model_dir, data, preset="generic", prompt="none")
    dm.setup("fit")
    batch = dm.collate(dm._with_positions(dm.train_set[:1]))
    completions = ["Step 1: 7, step 2: 9", "\\boxed{9}"]
    for extraction, expected in (("boxed", [0.0, 1.0]), ("flexible", [1.0, 1.0])):
        module = _module(tiny_model_dir, answer_extraction=extraction)
        assert module.hparams.answer_extraction == extraction
        assert module._rewards(batch, completions, group=2).total.tolist() == expected
    with pytest.raises(ValueError, match="answer_extraction='last_number'.*boxed, flexible"):
        _module(tiny_model_dir, answer_extraction="last_number")


def test_reward_funcs_and_rewards_are_one_option(tiny_model_dir):
    a = _module(tiny_model_dir, reward_funcs=["accuracy", "format"])
    b = _module(tiny_model_dir, rewards=["accuracy", "format"])
    assert a.reward_names == b.reward_names == ["accuracy_reward", "format_reward"]
    assert a.hparams.reward_funcs == b.hparams.reward_funcs == ["accuracy", "format"]
    assert _module(tiny_model_dir).reward_names == ["accuracy_reward"]  # neither: accuracy
    with pytest.raises(ValueError, match="one option under two names"):
        _module(tiny_model_dir, reward_funcs=["accuracy"], rewards=["format"])


# ----------------------------------------------------------------------------------------------- through the CLI
def _cli_overrides(tiny_model_dir, root):
    return ["--seed_everything", "0", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.max_steps", "2", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(root),
            "--model.model_name_or_path", str(tiny_model_dir), "--model.num_generations", "2",
            "--model.max_completion_length", "4", "--model.learning_rate", "1e-3",
            "--data.prompts_per_step", "4", "--data.schedule.name", "uniform", "--data.schedule.subset_size", "8",
            "--scheduler.use_cache", "false", "--checkpoint.dirpath", str(root / "ckpt")]


@pytest.mark.parametrize("key", ["reward_funcs", "rewards"])
def test_both_names_parse_through_the_cli(tiny_model_dir, tmp_path, key):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {key: ["accuracy", "trl.rewards.think_format_reward"],
                                                "answer_extraction": "flexible"}}))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    printed = yaml.safe_load(out.getvalue())["model"]
    assert printed[key] == ["accuracy", "trl.rewards.think_format_reward"]
    assert printed["answer_extraction"] == "flexible"
    # run=False: parse and instantiate only (no subcommand)
    cli = run_lightning_cli(["--config", str(config), "--model.model_name_or_path", str(tiny_model_dir)], run=False)
    assert cli.model.reward_names == ["accuracy_reward", "think_format_reward"]
    assert cli.model.reward_computer.funcs[0].extraction == "flexible"


def _readme_trl_config() -> dict:
    """The YAML example of the README's "Coming from TRL" section (the user's path, so it is tested)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Coming from TRL", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert block, "the README's TRL section lost its YAML example"
    return yaml.safe_load(block.group(1))


def test_readme_trl_config_fits_with_a_tiny_model(tiny_model_dir, tmp_path):
    config = _readme_trl_config()
    assert config["model"]["reward_funcs"] == ["trl.rewards.accuracy_reward", "trl.rewards.think_format_reward"]
    assert config["data"]["preset"] == "trl"
    config["data"]["train_data"] = str(write_jsonl(tmp_path / "my_rows.jsonl", CHAT_ROWS))
    path = tmp_path / "trl_style.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = run_lightning_cli(["fit", "--config", str(path), *_cli_overrides(tiny_model_dir, tmp_path)])
    assert cli.trainer.global_step == 2
    assert cli.datamodule.summary["train"]["conversational"] is True
    metrics = cli.trainer.callback_metrics
    assert {"reward/accuracy_reward/mean", "reward/think_format_reward/mean"} <= set(metrics)
    assert all(math.isfinite(float(metrics[k])) for k in ("reward/total", "train/loss"))


# ----------------------------------------------------------------------------------------------- shipped configs
@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=[c.name for c in SHIPPED_CONFIGS])
def test_every_shipped_config_sets_answer_extraction(config):
    model = yaml.safe_load(config.read_text())["model"]
    assert model.get("answer_extraction") in ("boxed", "flexible"), f"{config.name}: set model.answer_extraction"


# ----------------------------------------------------------------------------------------------- the loss, TRL's own
def _trl_loss(trainer_cls, loss_type, level, logp, old, ref, adv, mask, engine_weights, *, beta, bias_kl, opsm,
              epsilon_high, num_items):
    """TRL's `GRPOTrainer._compute_loss` on given log-probs: a stand-in trainer holding just the attributes it reads
    (one process, no accumulation, no entropy bonus), so the very code TRL users run computes the loss."""
    from collections import defaultdict
    from types import SimpleNamespace

    import torch

    class OneProcess:
        num_processes = 1
        sync_gradients = True

        def reduce(self, t, reduction="sum"):
            return t

        def gather(self, t):
            return t

    args = SimpleNamespace(use_bias_correction_kl=bias_kl, delta=None, sapo_temperature_pos=1.0,
                           sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                           vespo_lambda_neg=2.0, steps_per_generation=1)
    batch, length = logp.shape
    trainer = SimpleNamespace(
        args=args, loss_type=loss_type, importance_sampling_level=level, beta=beta, epsilon_low=0.2,
        epsilon_high=epsilon_high, top_entropy_quantile=1.0, off_policy_mask_threshold=opsm,
        use_vllm=engine_weights is not None, vllm_importance_sampling_correction=True,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, accelerator=OneProcess(),
        max_completion_length=length, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)}, get_off_policy_mask=trainer_cls.get_off_policy_mask,
        get_gamma_weights=trainer_cls.get_gamma_weights,
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros(batch, length), None))
    inputs = dict(prompt_ids=torch.zeros(batch, 1, dtype=torch.long), prompt_mask=torch.ones(batch, 1),
                  completion_ids=torch.zeros(batch, length, dtype=torch.long), completion_mask=mask.float(),
                  advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref,
                  num_items_in_batch=torch.tensor(float(num_items)))
    if engine_weights is not None:
        inputs["importance_sampling_ratio"] = engine_weights
    return trainer_cls._compute_loss(trainer, None, inputs)


def test_policy_loss_equals_trls_own_loss_and_gradient():
    """Every loss type at both ratio levels, with and without the bias-corrected KL, vLLM importance weights and the
    off-policy mask: our pure `policy_loss` and TRL's `_compute_loss` give the same loss and the same gradient."""
    import itertools

    import torch

    from gainrl_pl.grpo import LOSS_TYPES, off_policy_sequence_mask, policy_loss

    trainer_cls = pytest.importorskip("trl.trainer.grpo_trainer").GRPOTrainer
    gen = torch.Generator().manual_seed(0)
    batch, length = 6, 7
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 2:] = False
    worst = 0.0
    for loss_type, level, bias_kl, engine, opsm in itertools.product(LOSS_TYPES, ("token", "sequence"), (False, True),
                                                                     (False, True), (None, 0.05)):
        base = -torch.rand(batch, length, generator=gen) * 2
        old = torch.where(mask, base + 0.3 * torch.randn(batch, length, generator=gen), 0.0)
        ref = base + 0.3 * torch.randn(batch, length, generator=gen)
        adv = torch.randn(batch, generator=gen)
        weights = torch.where(mask, torch.rand(batch, length, generator=gen) + 0.5, 1.0) if engine else None
        epsilon_high = 5.0 if loss_type == "cispo" else 0.28
        theirs_logp, ours_logp = base.clone().requires_grad_(), base.clone().requires_grad_()
        theirs = _trl_loss(trainer_cls, loss_type, level, theirs_logp, old, ref, adv, mask, weights, beta=0.1,
                           bias_kl=bias_kl, opsm=opsm, epsilon_high=epsilon_high, num_items=int(mask.sum()))
        theirs.backward()
        keep = None if opsm is None else off_policy_sequence_mask(adv, ours_logp, old, mask, opsm)
        ours, _ = policy_loss(ours_logp, old, ref, adv, mask, loss_type=loss_type, epsilon=0.2,
                              epsilon_high=epsilon_high, beta=0.1, max_completion_length=length,
                              num_items_in_batch=int(mask.sum()), sampling_weights=weights, loss_weights=keep,
                              importance_sampling_level=level, use_bias_correction_kl=bias_kl)
        ours.backward()
        case = (loss_type, level, bias_kl, engine, opsm)
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-5), case
        torch.testing.assert_close(ours_logp.grad, theirs_logp.grad, atol=1e-5, rtol=1e-4, msg=str(case))
        worst = max(worst, abs(ours.item() - theirs.item()))
    assert worst < 1e-5
