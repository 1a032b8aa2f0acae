"""Rollouts: G sampled completions per prompt, in memory-bounded chunks, with masks that end at EOS."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

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


@torch.no_grad()
def generate_completions(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, num_generations: int,
                         max_new_tokens: int, pad_token_id: int, eos_ids: list[int], do_sample: bool = True,
                         temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                         min_p: float | None = None, repetition_penalty: float = 1.0,
                         generation_batch_size: int | None = None, share_prompt_prefill: bool = True) -> Rollout:
    """Sample `num_generations` completions per prompt, `generation_batch_size` sequences per `generate` call.

    The model is switched to eval mode (no dropout while sampling) and back; `use_cache=True` is passed
    explicitly because training configs turn the KV cache off. With `share_prompt_prefill` each prompt is
    prefilled once for its G completions (`shared_prompt_cache`) whenever a chunk holds whole groups
    (`generation_batch_size` a multiple of G); the completions are the same as without it.
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
