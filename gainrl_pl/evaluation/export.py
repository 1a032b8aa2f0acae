"""`gainrl-pl export`: merge a LoRA adapter into its base model and write a plain Hugging Face model dir.

    gainrl-pl export --adapter runs/demo/checkpoints/step000024.hf --output exported/demo-merged

The output (safetensors, tokenizer, chat template, generation config) loads with `transformers` and vLLM
without this package. The merge is done in float32 and cast to `--dtype` afterwards.

4-bit (QLoRA) runs: the adapter was trained against the *dequantized 4-bit* base weights, not the
original ones. With `--quantization auto` (the default) the run's settings are read from the Lightning
checkpoint beside the adapter (`X.ckpt` next to `X.hf/`); for a 4-bit run the base is quantized exactly
as in training, dequantized to float32, and the adapter merged into that, so the merged model computes
what the trained model computed. `--quantization nf4|fp4` forces it, `none` merges into the original
weights (which differs from the trained model by the 4-bit rounding error).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

_RUN_SETTINGS = ("model_name_or_path", "gguf_file", "dtype", "quantization", "trust_remote_code")


def training_settings(adapter_dir: str | Path) -> dict[str, Any]:
    """Model settings of the run that saved `adapter_dir`, from the Lightning checkpoint beside it.

    The checkpoint callback writes `X.hf/` beside `X.ckpt` (`callbacks.checkpoint.hf_dir_for`), so the
    checkpoint is the adapter directory with the suffix `.ckpt`. Returns the GRPOModule hyperparameters
    `model_name_or_path`, `gguf_file`, `dtype`, `quantization` (a dict or None) and `trust_remote_code`
    found there, or `{}` when there is no such checkpoint or it cannot be read (with a warning).
    """
    ckpt = Path(adapter_dir).with_suffix(".ckpt")
    if not ckpt.is_file():
        return {}
    try:
        # mmap: a full fine-tune checkpoint holds the whole model; only the hyperparameters are wanted.
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # an old or foreign checkpoint: fall back to adapter_config.json
        warnings.warn(f"could not read the run settings from {ckpt} ({type(err).__name__}: {err}); "
                      "using adapter_config.json only", stacklevel=2)
        return {}
    hparams = state.get("hyper_parameters") or {}
    return {key: hparams[key] for key in _RUN_SETTINGS if key in hparams}


def resolve_quantization(quantization: Any, settings: dict[str, Any]):
    """`auto` -> the run's setting; `none`/None -> no 4-bit; `nf4`/`fp4`, a dict or QuantizationSettings as given."""
    from gainrl_pl.models import QuantizationSettings

    if quantization == "auto":
        quantization = settings.get("quantization")
    if quantization is None or quantization == "none":
        return None
    if isinstance(quantization, QuantizationSettings):
        return quantization
    if isinstance(quantization, dict):
        return QuantizationSettings(**quantization)
    if quantization in ("nf4", "fp4"):
        return QuantizationSettings(quant_type=quantization)
    raise ValueError(f"quantization={quantization!r}: allowed values are auto, none, nf4, fp4")


def adapter_base_model(adapter_dir: str | Path, base_model: str | None = None) -> tuple[str, dict[str, Any]]:
    """The base model of a LoRA adapter and the run settings (see `training_settings`).

    The base is, in order: `base_model`, the checkpoint's `model_name_or_path` (portable: `builtin` stays
    `builtin`), or `base_model_name_or_path` in `adapter_config.json` (an absolute path on the machine
    that trained it).

    Raises:
        FileNotFoundError: `adapter_dir` has no `adapter_config.json` (the message says what it holds instead).
        ValueError: no base model is named anywhere.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.exists():
        if (adapter_dir / "config.json").exists():
            raise FileNotFoundError(f"{adapter_dir} holds a full model (config.json), not a LoRA adapter: it is "
                                    "already a Hugging Face model directory; load it directly (e.g. --model DIR)")
        what = "does not exist" if not adapter_dir.exists() else "holds no adapter_config.json"
        raise FileNotFoundError(f"{adapter_dir} {what}: pass the directory of a peft LoRA adapter (saved beside "
                                "each checkpoint as `<ckpt>.hf/`)")
    settings = training_settings(adapter_dir)
    base = base_model or settings.get("model_name_or_path") or \
        json.loads(config_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"the adapter in {adapter_dir} does not name its base model: pass --base-model")
    return str(base), settings


def load_merged_model(adapter_dir: str | Path, *, base_model: str | None = None, dtype: str = "float32",
                      quantization: Any = "auto", trust_remote_code: bool | None = None):
    """Base model with the LoRA adapter merged into its weights (a plain transformers model, eval mode).

    Args:
        adapter_dir: peft adapter directory (`adapter_config.json` + weights).
        base_model: Override the base model (see `adapter_base_model`).
        dtype: dtype of the returned weights; the merge itself is done in float32.
        quantization: `auto` (from the run's checkpoint), `none`, `nf4`, `fp4`, or settings: for a 4-bit
            run the base is quantized as in training and dequantized before merging (see module doc).
        trust_remote_code: Run model code from the model directory; `None` = what the run used (else off).

    Returns:
        `(model, base)`: the merged model and the base model name it was built on.
    """
    from peft import PeftModel

    from gainrl_pl.models import load_model, parse_dtype

    base, settings = adapter_base_model(adapter_dir, base_model)
    remote = bool(settings.get("trust_remote_code", False)) if trust_remote_code is None else trust_remote_code
    gguf_file = settings.get("gguf_file") if base == settings.get("model_name_or_path") else None
    quant = resolve_quantization(quantization, settings)
    try:
        if quant is not None:
            # Quantize from the dtype the run loaded in (the 4-bit codes depend on it), then dequantize to
            # float32: these are exactly the weights the 4-bit matmul used while the adapter trained.
            model = load_model(base, gguf_file=gguf_file, dtype=settings.get("dtype", "float32"),
                               quantization_config=replace(quant, compute_dtype="float32").to_bitsandbytes(),
                               trust_remote_code=remote)
            model = model.dequantize(dtype=torch.float32)
            model.is_loaded_in_4bit = False  # dequantize() leaves the flag, and peft would treat it as 4-bit
        else:
            model = load_model(base, gguf_file=gguf_file, dtype="float32", trust_remote_code=remote)
    except OSError as err:  # FileNotFoundError included: a moved base path, an unreachable hub id
        raise FileNotFoundError(f"cannot load the adapter's base model {base!r} ({err}); pass the base model "
                                "explicitly (--base-model for export, --model for evaluate)") from err
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged = merged.to(parse_dtype(dtype)).eval()
    return merged, base


def load_adapter_tokenizer(adapter_dir: str | Path, *, base_model: str | None = None,
                           trust_remote_code: bool | None = None):
    """The tokenizer saved beside the adapter (the run saves it there), else the base model's."""
    from gainrl_pl.models import load_tokenizer

    base, settings = adapter_base_model(adapter_dir, base_model)
    remote = bool(settings.get("trust_remote_code", False)) if trust_remote_code is None else trust_remote_code
    if (Path(adapter_dir) / "tokenizer_config.json").exists():
        return load_tokenizer(str(adapter_dir), trust_remote_code=remote)
    gguf_file = settings.get("gguf_file") if base == settings.get("model_name_or_path") else None
    return load_tokenizer(base, gguf_file=gguf_file, trust_remote_code=remote)


def merge_adapter(adapter_dir: str | Path, output_dir: str | Path, *, base_model: str | None = None,
                  dtype: str = "float32", quantization: Any = "auto", trust_remote_code: bool | None = None) -> Path:
    """Merge `adapter_dir` (a peft LoRA adapter) into its base and save a standalone model to `output_dir`.

    Writes safetensors weights, config, generation config and the tokenizer (with its chat template)
    atomically: a crash leaves no half-written `output_dir`. Arguments as in `load_merged_model`.

    Returns:
        `output_dir` as a Path.
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    # output_dir is replaced wholesale below: never let that delete the adapter we read from.
    if adapter_dir.resolve() == output_dir.resolve() or output_dir.resolve() in adapter_dir.resolve().parents:
        raise ValueError(f"output {output_dir} would overwrite the adapter {adapter_dir}: choose another directory")
    merged, _ = load_merged_model(adapter_dir, base_model=base_model, dtype=dtype, quantization=quantization,
                                  trust_remote_code=trust_remote_code)
    tokenizer = load_adapter_tokenizer(adapter_dir, base_model=base_model, trust_remote_code=trust_remote_code)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=".export-"))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)  # also writes generation_config.json
        tokenizer.save_pretrained(tmp)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def main(argv: list[str] | None = None) -> None:
    """Entry point of `gainrl-pl export` (see the module docstring)."""
    p = argparse.ArgumentParser(prog="gainrl-pl export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="LoRA adapter directory (adapter_config.json inside)")
    p.add_argument("--output", required=True, help="directory to write the merged model to")
    p.add_argument("--base-model", default=None, help="base model (default: the run's, else the adapter's)")
    p.add_argument("--dtype", default="float32", help="dtype of the merged weights (float32, bfloat16, float16)")
    p.add_argument("--quantization", default="auto", choices=("auto", "none", "nf4", "fp4"),
                   help="4-bit base the adapter trained on: auto = read from the checkpoint beside the adapter")
    p.add_argument("--trust-remote-code", action="store_true", default=None)
    args = p.parse_args(argv)
    out = merge_adapter(args.adapter, args.output, base_model=args.base_model, dtype=args.dtype,
                        quantization=args.quantization, trust_remote_code=args.trust_remote_code)
    print(f"merged model written to {out}")


if __name__ == "__main__":
    main()
