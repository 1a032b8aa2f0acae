"""Turning a loaded causal LM into a trainable policy: LoRA (peft), 4-bit (bitsandbytes), checkpointing.

Settings are plain dataclasses so LightningCLI shows their field docstrings in `--help`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from gainrl_pl.models import load_model, parse_dtype


@dataclass
class LoraSettings:
    """LoRA adapters (peft). With LoRA the reference model is the same weights with adapters off."""

    r: int = 16
    """Rank of the LoRA update matrices."""
    alpha: int = 32
    """LoRA scaling numerator (`lora_alpha`); the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]) or `all-linear` (every linear layer but the LM head)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r)."""

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"lora.r={self.r} must be a positive integer (typical: 8-64)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1)")


@dataclass
class QuantizationSettings:
    """4-bit weights (bitsandbytes) for QLoRA: the base model is frozen in 4 bits, LoRA trains in `compute_dtype`."""

    quant_type: str = "nf4"
    """`nf4` (NormalFloat4, QLoRA's choice) or `fp4`."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit/parameter)."""
    compute_dtype: str = "bfloat16"
    """dtype of the matmuls: `bfloat16`, `float16` or `float32`."""
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    """Modules kept unquantized."""

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quantization.quant_type={self.quant_type!r}: allowed values are 'nf4', 'fp4'")
        parse_dtype(self.compute_dtype)

    def to_bitsandbytes(self):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=parse_dtype(self.compute_dtype),
                                  llm_int8_skip_modules=list(self.skip_modules))


def disable_bnb_cpu_repacking(model: torch.nn.Module) -> int:
    """Keep bitsandbytes 4-bit layers differentiable on CPUs with AVX512-BF16.

    bitsandbytes repacks a `Linear4bit` weight in place into a CPU inference layout on the first eval-mode
    no-grad forward; after that its matmul has no autograd and LoRA gradients silently vanish (8 of 12 LoRA
    tensors got no gradient in a probe). The flag is private, hence the pinned bitsandbytes range and a test.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def build_policy(model_name_or_path: str | None, *, gguf_file: str | None = None, dtype: str = "float32",
                 lora: LoraSettings | None = None, quantization: QuantizationSettings | None = None,
                 gradient_checkpointing: bool = False, trust_remote_code: bool = False,
                 attn_implementation: str | None = None) -> torch.nn.Module:
    """Load the model and make it trainable as configured; returns a (possibly peft-wrapped) model in train mode."""
    if quantization is not None and lora is None:
        raise ValueError("quantization (4-bit) needs lora: 4-bit base weights cannot be trained directly; "
                         "set `lora:` too (QLoRA)")
    model = load_model(model_name_or_path, gguf_file=gguf_file, dtype=dtype,
                       quantization_config=quantization.to_bitsandbytes() if quantization else None,
                       trust_remote_code=trust_remote_code, attn_implementation=attn_implementation)
    model.config.use_cache = False  # training forwards never need the KV cache; generate() asks for it
    ckpt_kwargs = {"use_reentrant": False}  # works with frozen inputs (LoRA) without enable_input_require_grads
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        disable_bnb_cpu_repacking(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    if lora is not None:
        model = _add_lora(model, lora)
    model.train()
    return model


def _add_lora(model, lora: LoraSettings):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, use_rslora=lora.use_rslora, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"lora.target_modules={lora.target_modules!r} matched no module of this model "
                         f"({err}). Linear modules here: {names}; or use 'all-linear'.") from err


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def reference_context(model: torch.nn.Module):
    """Context in which `model` computes the reference policy: adapters off for a peft model."""
    return model.disable_adapter() if is_peft_model(model) else contextlib.nullcontext()
