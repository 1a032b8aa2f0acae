"""Rollouts: G sampled completions per prompt, in memory-bounded chunks, with masks that end at EOS."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


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


@torch.no_grad()
def generate_completions(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, num_generations: int,
                         max_new_tokens: int, pad_token_id: int, eos_ids: list[int], do_sample: bool = True,
                         temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                         min_p: float | None = None, repetition_penalty: float = 1.0,
                         generation_batch_size: int | None = None) -> Rollout:
    """Sample `num_generations` completions per prompt, `generation_batch_size` sequences per `generate` call.

    The model is switched to eval mode (no dropout while sampling) and back; `use_cache=True` is passed
    explicitly because training configs turn the KV cache off.
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
        for lo in range(0, prompts.shape[0], chunk):
            out = model.generate(input_ids=prompts[lo:lo + chunk], attention_mask=masks[lo:lo + chunk], **kwargs)
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
