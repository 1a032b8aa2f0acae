"""Tiny offline models for tests, examples and smoke runs: no download, a few hundred KB, seconds to build.

`build_tiny_model_dir(path)` writes a Llama-architecture model with random weights and a byte-level BPE
tokenizer trained on a small math corpus, with a ChatML chat template (like SmolLM2's: eos = pad =
`<|im_end|>`), so every code path that real instruct models take (chat templates, offsets, padding,
`generate`, peft) runs on it.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "What is 2 + 2? The answer is \\boxed{4}.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? #### 72",
    "You are a helpful assistant. Solve the math problem.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000 3.5 1/2 -7",
    "plus minus times divided by equals sum product difference total each boxes apples",
    "def add(a, b):\n    return a + b\n```python\nprint(add(1, 2))\n```",
]


def build_tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE `PreTrainedTokenizerFast` with ChatML special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token=None,
                                   additional_special_tokens=["<|im_start|>", "<|endoftext|>"])
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_llama_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, eos_token_id: int = 0,
                      pad_token_id: int = 0):
    """A ~100k-parameter LlamaConfig (4 heads, 2 KV heads, tied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                       num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, tie_word_embeddings=True, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, bos_token_id=None)


def build_tiny_model_dir(path: str | Path, *, seed: int = 0, num_layers: int = 2, hidden_size: int = 64) -> Path:
    """Write a tiny random Llama model + tokenizer to `path` (loadable with `load_model(path)`)."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = tiny_llama_config(len(tokenizer), hidden_size=hidden_size, num_layers=num_layers,
                               eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
