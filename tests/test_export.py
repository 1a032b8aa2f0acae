"""`gainrl-pl export`: a merged LoRA model computes what base + adapter computed, loadable by plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gainrl_pl.evaluation.export import main as export_main
from gainrl_pl.evaluation.export import merge_adapter

TOKENS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 11, 300], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


def _lora(model, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    # init_lora_weights=False draws lora_B at random too (peft's default B = 0 would make the merge a no-op)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model.eval()(input_ids=TOKENS).logits


def test_merged_model_equals_base_plus_adapter(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapted = _lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert any(p.abs().sum() > 0 for n, p in adapted.named_parameters() if "lora_B" in n)
    adapted.save_pretrained(tmp_path / "adapter")
    expected = _logits(adapted)

    export_main(["--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")])

    merged_dir = tmp_path / "merged"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= \
        {p.name for p in merged_dir.iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # plain transformers, no peft, no gainrl_pl
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir)), expected, atol=1e-3)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_qlora_adapter_merges_into_the_dequantized_base(tiny_model_dir, tmp_path):
    """A 4-bit run: the merge must reproduce adapter + 4-bit base, not adapter + original weights.

    The run's settings are found in the Lightning checkpoint beside the adapter (`X.ckpt` / `X.hf/`).
    """
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from gainrl_pl.models import QuantizationSettings, disable_bnb_cpu_repacking, load_model

    quant = QuantizationSettings(compute_dtype="float32")
    base4 = load_model(str(tiny_model_dir), quantization_config=quant.to_bitsandbytes())
    # as in training: without this, CPU eval forwards repack the weights into a bf16 inference kernel
    disable_bnb_cpu_repacking(base4)
    adapted = _lora(base4)
    adapter_dir = tmp_path / "step000004.hf"
    adapted.save_pretrained(adapter_dir)
    expected = _logits(adapted)
    hparams = {"model_name_or_path": str(tiny_model_dir), "dtype": "float32",
               "quantization": {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32",
                                "skip_modules": ["lm_head"]}}
    torch.save({"hyper_parameters": hparams}, tmp_path / "step000004.ckpt")

    merged_dir = merge_adapter(adapter_dir, tmp_path / "merged")  # quantization="auto": read from the ckpt
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=0)

    # merging into the original float weights instead is off by the 4-bit rounding error
    naive = AutoModelForCausalLM.from_pretrained(merge_adapter(adapter_dir, tmp_path / "naive", quantization="none"))
    assert (_logits(naive) - expected).abs().max() > 1e-3


def test_errors_name_the_problem(tiny_model_dir, tmp_path):
    empty = tmp_path / "not-an-adapter"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge_adapter(empty, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="full model"):
        merge_adapter(Path(tiny_model_dir), tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merge_adapter(tmp_path / "missing", tmp_path / "out")
    (empty / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="would overwrite the adapter"):
        merge_adapter(empty, tmp_path)
    with pytest.raises(ValueError, match="base model"):
        merge_adapter(empty, tmp_path / "out")
