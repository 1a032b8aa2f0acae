"""Rollouts: G sampled completions per prompt, in memory-bounded chunks, with masks that end at EOS."""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from gainrl_pl.models import position_ids_from_mask


@dataclass
class Rollout:
    """One batch of sampled completions, prompts repeated G times (row i belongs to prompt i // G)."""

    prompt_ids: torch.Tensor  # [B*G, P], left-padded
    prompt_mask: torch.Tensor  # [B*G, P]
    completion_ids: torch.Tensor  # [B*G, C], right-padded with pad_token_id
    completion_mask: torch.Tensor  # [B*G, C], 1 up to and including the first EOS
    truncated: torch.Tensor  # [B*G] bool: no EOS within max_new_tokens
    seconds: float
    """Wall time of generation (for tokens/s)."""
    sampling_logprobs: torch.Tensor | None = None
    """[B*G, C] the sampler's log-prob of each completion token, where the engine reports them (vLLM), else None."""


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask that keeps each completion up to and including its first EOS; also says which have none.

    Tokens after the first EOS are padding (generate keeps emitting pad once a row is done).
    """
    is_eos = torch.isin(completion_ids, torch.as_tensor(eos_token_ids, device=completion_ids.device))
    length = completion_ids.shape[1]
    positions = torch.arange(length, device=completion_ids.device).expand_as(completion_ids)
    first_eos = torch.where(is_eos, positions, torch.full_like(positions, length)).min(dim=1).values
    mask = (positions <= first_eos.unsqueeze(1)).long()
    truncated = first_eos >= length
    return mask, truncated


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token id that ends a completion: the generation config's EOS id(s) and the tokenizer's."""
    ids: set[int] = set()
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (cfg_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("the tokenizer and generation config define no eos_token_id; set tokenizer.eos_token")
    return sorted(ids)


def _forward_parameters(model) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model
    # the class's forward, not the instance's: profilers and hooks replace `model.forward` with (*args, **kwargs)
    return set(inspect.signature(type(base).forward).parameters)


@torch.no_grad()
def shared_prompt_cache(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, num_generations: int):
    """The KV cache of each distinct prompt's first P-1 tokens, computed once and repeated G times.

    `generate` on the G-times-repeated prompts would prefill every prompt G times, the largest avoidable
    cost of a rollout (G x the prompt's forward). The last prompt token is left out so that `generate`
    still runs one forward of its own and samples the first completion token from it. Position ids are
    the ones `generate` derives from the attention mask, so the cache equals the one it would build.
    Returns `(cache_kwarg_name, cache)`, or None where the model has no repeatable cache.
    """
    params = _forward_parameters(model)
    name = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None
    if name is None or prompt_ids.shape[1] < 2:
        return None
    mask = prompt_mask[:, :-1]
    kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # skip the full-vocabulary head
    out = model(input_ids=prompt_ids[:, :-1], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                use_cache=True, **kwargs)
    cache = out.get(name)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    cache.batch_repeat_interleave(num_generations)
    return name, cache


# Sampling settings with an option of their own: the loss reads them too (temperature scales the trained logits)
# or the rollout's shape depends on them, so `generation_kwargs` may not change them behind the option's back.
OWN_GENERATION_KEYS = {
    "temperature": "model.temperature", "top_p": "model.top_p", "top_k": "model.top_k", "min_p": "model.min_p",
    "repetition_penalty": "model.repetition_penalty", "max_new_tokens": "model.max_completion_length",
    "max_tokens": "model.max_completion_length", "max_length": "model.max_completion_length",
    "num_return_sequences": "model.num_generations", "n": "model.num_generations",
    "do_sample": "model.temperature (training samples, validation follows model.val_temperature)",
    "seed": "seed_everything", "pad_token_id": "the tokenizer", "eos_token_id": "the tokenizer",
    "stop_token_ids": "the tokenizer", "use_cache": "the rollout (always on)",
    "logprobs": "the rollout (it records the engine's log-probs itself)", "num_beams": "nothing: GRPO samples",
    "return_dict_in_generate": "the rollout", "output_scores": "the rollout", "output_logits": "the rollout",
    "detokenize": "the rollout",
}


def check_generation_kwargs(generation_kwargs: dict[str, Any] | None, allowed: Iterable[str], engine: str) -> None:
    """Refuse `generation_kwargs` keys the engine does not know, or that an option of ours owns.

    Args:
        generation_kwargs: TRL's `generation_kwargs`: extra fields of transformers' `GenerationConfig` or of
            vLLM's `SamplingParams` (whichever engine rolls out).
        allowed: The engine's field names.
        engine: Its name, for the message.

    Raises:
        ValueError: naming the key and what to set instead.
    """
    if generation_kwargs is None:
        return
    if not isinstance(generation_kwargs, dict):
        raise ValueError(f"generation_kwargs must be a mapping of {engine} sampling fields, got "
                         f"{type(generation_kwargs).__name__}")
    allowed = set(allowed)
    for key in generation_kwargs:
        if key in OWN_GENERATION_KEYS:
            raise ValueError(f"generation_kwargs sets {key!r}, which is set by {OWN_GENERATION_KEYS[key]}: "
                             "remove it from generation_kwargs and set that instead")
        if key not in allowed:
            raise ValueError(f"generation_kwargs key {key!r} is not a field of the {engine} engine's sampling "
                             f"settings; its fields: {', '.join(sorted(k for k in allowed if not k.startswith('_')))}")


def generation_config_fields() -> set[str]:
    """The fields of transformers' `GenerationConfig` (what `generate` accepts as sampling settings)."""
    from transformers import GenerationConfig

    return set(GenerationConfig().to_dict())


@torch.no_grad()
def generate_completions(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, num_generations: int,
                         max_new_tokens: int, pad_token_id: int, eos_ids: list[int], do_sample: bool = True,
                         temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                         min_p: float | None = None, repetition_penalty: float = 1.0,
                         generation_batch_size: int | None = None, share_prompt_prefill: bool = True,
                         generation_kwargs: dict[str, Any] | None = None) -> Rollout:
    """Sample `num_generations` completions per prompt, `generation_batch_size` sequences per `generate` call.

    The model is switched to eval mode (no dropout while sampling) and back; `use_cache=True` is passed
    explicitly because training configs turn the KV cache off. With `share_prompt_prefill` each prompt is
    prefilled once for its G completions (`shared_prompt_cache`) whenever a chunk holds whole groups
    (`generation_batch_size` a multiple of G); the completions are the same as without it.
    `generation_kwargs` are further `GenerationConfig` fields (see `check_generation_kwargs`).
    """
    was_training = model.training
    model.eval()
    prompts = prompt_ids.repeat_interleave(num_generations, dim=0)
    masks = prompt_mask.repeat_interleave(num_generations, dim=0)
    chunk = generation_batch_size or prompts.shape[0]
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_token_id,
                  eos_token_id=eos_ids, use_cache=True, repetition_penalty=repetition_penalty)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k or 0)
        if min_p:
            kwargs["min_p"] = min_p
    else:  # greedy: keep the model's sampling defaults from leaking in with a warning
        kwargs.update(temperature=None, top_p=None, top_k=None)
    kwargs.update(generation_kwargs or {})
    start = time.perf_counter()
    pieces = []
    try:
        share = share_prompt_prefill and num_generations > 1 and chunk % num_generations == 0
        for lo in range(0, prompts.shape[0], chunk):
            extra = {}
            if share:
                first, last = lo // num_generations, (lo + chunk) // num_generations
                shared = shared_prompt_cache(model, prompt_ids[first:last], prompt_mask[first:last], num_generations)
                if shared is not None:
                    extra[shared[0]] = shared[1]
            out = model.generate(input_ids=prompts[lo:lo + chunk], attention_mask=masks[lo:lo + chunk], **kwargs,
                                 **extra)
            pieces.append(out[:, prompts.shape[1]:])
    finally:
        model.train(was_training)
    width = max(p.shape[1] for p in pieces)
    completions = torch.full((prompts.shape[0], max(width, 1)), pad_token_id, dtype=prompts.dtype,
                             device=prompts.device)
    row = 0
    for piece in pieces:
        completions[row:row + piece.shape[0], :piece.shape[1]] = piece
        row += piece.shape[0]
    mask, truncated = completion_mask_from_ids(completions, eos_ids)
    if width == 0:
        mask.zero_()
    return Rollout(prompts, masks, completions, mask, truncated, time.perf_counter() - start)
