"""Rollouts: sharing each prompt's prefill among its G completions changes nothing but the work done."""

from __future__ import annotations

import pytest
import torch

from gainrl_pl.grpo import token_entropy, token_logprobs, token_logprobs_and_entropy
from gainrl_pl.rollout import eos_token_ids, generate_completions, shared_prompt_cache

QUESTIONS = ["What is 2 plus 2?", "hi", "Add 13 and 29, then multiply the sum by 3. What is the result?"]


def _prompts(tokenizer):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in QUESTIONS]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
    assert (enc["attention_mask"] == 0).any(), "the prompts must need left padding for this test to mean anything"
    return enc["input_ids"], enc["attention_mask"]


def _rollout(model, tokenizer, ids, mask, *, share, seed=0, **kw):
    torch.manual_seed(seed)
    return generate_completions(model, ids, mask, num_generations=3, max_new_tokens=10,
                                pad_token_id=tokenizer.pad_token_id, eos_ids=eos_token_ids(model, tokenizer),
                                share_prompt_prefill=share, **kw)


class _TokenCounter:
    """Counts the (rows x positions) every forward of the model receives."""

    def __init__(self, model) -> None:
        self.tokens = 0
        self.handle = model.get_decoder().register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        self.tokens += x.shape[0] * x.shape[1]


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("generation_batch_size", [None, 3, 6, 4])
def test_shared_prefill_gives_the_same_completions_with_less_work(tiny_model, tiny_tokenizer, lora,
                                                                  generation_batch_size):
    model = tiny_model
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))  # non-zero adapters
    ids, mask = _prompts(tiny_tokenizer)
    counter = _TokenCounter(model)
    plain = _rollout(model, tiny_tokenizer, ids, mask, share=False, generation_batch_size=generation_batch_size)
    plain_tokens, counter.tokens = counter.tokens, 0
    shared = _rollout(model, tiny_tokenizer, ids, mask, share=True, generation_batch_size=generation_batch_size)
    assert torch.equal(shared.completion_ids, plain.completion_ids)  # sampled, same seed: the same tokens
    assert torch.equal(shared.completion_mask, plain.completion_mask)
    assert torch.equal(shared.prompt_ids, plain.prompt_ids)
    prefill = ids.shape[0] * (ids.shape[1] - 1)
    if generation_batch_size in (None, 3, 6):  # whole groups per chunk: prompts prefilled once, not 3 times
        assert counter.tokens == plain_tokens - 2 * prefill
    else:  # 4 rows per chunk split groups: no sharing, identical work
        assert counter.tokens == plain_tokens


def test_shared_prefill_greedy_and_model_mode(tiny_model, tiny_tokenizer):
    ids, mask = _prompts(tiny_tokenizer)
    tiny_model.train()
    plain = _rollout(tiny_model, tiny_tokenizer, ids, mask, share=False, do_sample=False)
    shared = _rollout(tiny_model, tiny_tokenizer, ids, mask, share=True, do_sample=False)
    assert torch.equal(shared.completion_ids, plain.completion_ids)
    assert tiny_model.training  # restored after generation


def test_shared_prompt_cache_matches_a_full_prefill(tiny_model, tiny_tokenizer):
    """The cache of P-1 tokens, repeated G times, equals the cache of the repeated prompts built by a forward."""
    ids, mask = _prompts(tiny_tokenizer)
    tiny_model.eval()
    name, cache = shared_prompt_cache(tiny_model, ids, mask, 2)
    rep_ids, rep_mask = ids[:, :-1].repeat_interleave(2, 0), mask[:, :-1].repeat_interleave(2, 0)
    pos = (rep_mask.cumsum(-1) - 1).masked_fill(rep_mask == 0, 0)
    with torch.no_grad():
        full = tiny_model(input_ids=rep_ids, attention_mask=rep_mask, position_ids=pos, use_cache=True)[name]
    for got, want in zip(cache.layers, full.layers, strict=True):
        real = rep_mask.bool()  # positions that are padding hold values that attention never reads
        torch.testing.assert_close(got.keys.transpose(1, 2)[real], want.keys.transpose(1, 2)[real])
        torch.testing.assert_close(got.values.transpose(1, 2)[real], want.values.transpose(1, 2)[real])
    assert shared_prompt_cache(tiny_model, ids[:, -1:], mask[:, -1:], 2) is None  # nothing to share


def test_logprobs_and_entropy_in_one_pass_match_the_separate_functions():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 5, 17, generator=g, requires_grad=True)
    ids = torch.randint(0, 17, (3, 5), generator=g)
    for chunk in (1, 4, None):
        logp, entropy = token_logprobs_and_entropy(logits, ids, temperature=0.8, chunk_size=chunk)
        torch.testing.assert_close(logp, token_logprobs(logits, ids, temperature=0.8, chunk_size=chunk))
        torch.testing.assert_close(entropy, token_entropy(logits, temperature=0.8, chunk_size=chunk))
        assert entropy.requires_grad  # differentiable for entropy_coef; its gradient is checked in test_grpo_math
        weights = torch.randn(3, 5, generator=g)
        (grad,) = torch.autograd.grad((logp * weights).sum(), logits)
        (want,) = torch.autograd.grad((token_logprobs(logits, ids, temperature=0.8) * weights).sum(), logits)
        torch.testing.assert_close(grad, want)


def test_shared_prefill_survives_a_wrapped_forward(tiny_model, tiny_tokenizer):
    """Profilers and hooks replace `model.forward` with a (*args, **kwargs) function; sharing must still apply."""
    ids, mask = _prompts(tiny_tokenizer)
    inner = tiny_model.forward
    tiny_model.forward = lambda *args, **kwargs: inner(*args, **kwargs)
    assert shared_prompt_cache(tiny_model, ids, mask, 2) is not None


def test_generation_kwargs_reach_generate(tiny_model, tiny_tokenizer):
    ids, mask = _prompts(tiny_tokenizer)
    eos = set(eos_token_ids(tiny_model, tiny_tokenizer))
    free = _rollout(tiny_model, tiny_tokenizer, ids, mask, share=True)
    seen = {int(t) for t in free.completion_ids[free.completion_mask.bool()]} - eos
    assert len(seen) > 5
    banned = _rollout(tiny_model, tiny_tokenizer, ids, mask, share=True,
                      generation_kwargs={"suppress_tokens": sorted(seen)})
    produced = {int(t) for t in banned.completion_ids[banned.completion_mask.bool()]}
    assert produced and not produced & seen


def test_generation_kwargs_that_an_option_owns_or_no_engine_knows_are_named():
    from gainrl_pl.rollout import check_generation_kwargs, generation_config_fields

    fields = generation_config_fields()
    check_generation_kwargs({"no_repeat_ngram_size": 3, "suppress_tokens": [5]}, fields, "transformers")
    with pytest.raises(ValueError, match="sets 'temperature', which is set by model.temperature"):
        check_generation_kwargs({"temperature": 0.5}, fields, "transformers")
    with pytest.raises(ValueError, match="'max_new_tokens', which is set by model.max_completion_length"):
        check_generation_kwargs({"max_new_tokens": 5}, fields, "transformers")
    with pytest.raises(ValueError, match="'presence_penalty' is not a field of the transformers engine.*typical_p"):
        check_generation_kwargs({"presence_penalty": 0.5}, fields, "transformers")
    with pytest.raises(ValueError, match="must be a mapping"):
        check_generation_kwargs([("typical_p", 0.9)], fields, "transformers")
