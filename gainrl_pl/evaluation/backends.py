"""Generation backends for evaluation: which model (base, adapter, checkpoint) and how it generates.

`resolve_model_spec` turns `--model/--adapter/--checkpoint` into a `ModelSpec`; `load_backend` loads it
into the transformers backend (default, CPU or GPU) or vLLM (optional, GPU). Both take prompts as token
ids and return decoded `Completion`s, so they see identical prompts and decode the same way.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

BACKENDS = ("transformers", "vllm")


@dataclass
class ModelSpec:
    """What is evaluated: a base model, optionally with a LoRA adapter on it."""

    base: str | None
    """Model directory, hub id, or None / `builtin` for the built-in SmolLM2-135M-Instruct."""
    adapter: str | None = None
    """peft LoRA adapter directory, merged into `base` before generation."""
    label: str = "builtin"
    """How results name the model (the path or id the user gave)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The training run's model settings (`export.training_settings`): 4-bit base, GGUF file, ..."""


def resolve_model_spec(model: str | None = None, adapter: str | None = None,
                       checkpoint: str | None = None) -> ModelSpec:
    """Turn `--model` / `--adapter` / `--checkpoint` into a ModelSpec.

    A checkpoint `X.ckpt` is evaluated through the Hugging Face directory `X.hf/` saved beside it (an
    adapter, or a full model for a full fine-tune); `model` then overrides the adapter's base model.

    Raises:
        FileNotFoundError: a missing checkpoint, `.hf` directory or adapter config (with what to do).
        ValueError: both `adapter` and `checkpoint`.
    """
    from gainrl_pl.evaluation.export import adapter_base_model, training_settings

    if adapter and checkpoint:
        raise ValueError("pass either --adapter or --checkpoint, not both")
    label = checkpoint or adapter or model or "builtin"
    if checkpoint:
        path = Path(checkpoint)
        # the rule of callbacks.checkpoint.hf_dir_for, not imported: that module pulls in Lightning (seconds)
        hf_dir = path if path.is_dir() else path.with_suffix(".hf")
        if not hf_dir.is_dir():
            raise FileNotFoundError(f"checkpoint {checkpoint}: no Hugging Face directory {hf_dir} beside it "
                                    "(the checkpoint callback writes one when save_hf is on); pass --adapter or "
                                    "--model with a model directory instead")
        if not (hf_dir / "adapter_config.json").exists() and (hf_dir / "config.json").exists():
            if model is not None:
                raise ValueError(f"{hf_dir} is a full model (no adapter), so --model {model} has no effect")
            # a full fine-tune saved plain weights: of the run's settings only trust_remote_code still applies
            remote = training_settings(hf_dir).get("trust_remote_code", False)
            return ModelSpec(str(hf_dir), None, label, {"trust_remote_code": remote})
        adapter = str(hf_dir)
    if adapter:
        base, settings = adapter_base_model(adapter, model)
        return ModelSpec(base, str(adapter), label, settings)
    return ModelSpec(model, None, label, {})


def default_device() -> torch.device:
    """`cuda:LOCAL_RANK` when CUDA is present (one GPU per torchrun process), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def _eval_dtype(dtype: str, device: torch.device) -> str:
    # bf16 halves memory and time on GPUs; on CPU float32 is the safe default (bf16 matmuls are emulated
    # on many CPUs, and greedy answers should not hinge on rounding).
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return dtype


def resolve_eval_dtype(dtype: str, backend: str = "transformers") -> str:
    """The dtype a backend will load with: `auto` -> bfloat16 on a (bf16-capable) GPU, else float32."""
    return _eval_dtype(dtype, torch.device("cuda") if backend == "vllm" else default_device())


@dataclass
class Completion:
    """One generated completion."""

    text: str
    length: int
    """Generated tokens, EOS included."""
    truncated: bool
    """No EOS within max_new_tokens."""


class TransformersBackend:
    """Batched `generate` on a transformers model (an adapter merged in): the default, CPU or GPU."""

    name = "transformers"

    def __init__(self, spec: ModelSpec, *, dtype: str = "auto", device: torch.device | None = None) -> None:
        from gainrl_pl.evaluation.export import load_adapter_tokenizer, load_merged_model
        from gainrl_pl.models import load_model, load_tokenizer
        from gainrl_pl.rollout import eos_token_ids

        self.spec, self.device = spec, device or default_device()
        self.dtype = _eval_dtype(dtype, self.device)
        remote = bool(spec.settings.get("trust_remote_code", False))
        if spec.adapter:
            # merged once, so generation runs at base-model speed (no LoRA matmuls per token)
            self.model, _ = load_merged_model(spec.adapter, base_model=spec.base, dtype=self.dtype)
            self.tokenizer = load_adapter_tokenizer(spec.adapter, base_model=spec.base)
        else:
            gguf_file = spec.settings.get("gguf_file")
            self.model = load_model(spec.base, gguf_file=gguf_file, dtype=self.dtype, trust_remote_code=remote)
            self.tokenizer = load_tokenizer(spec.base, gguf_file=gguf_file, trust_remote_code=remote)
        self.model.to(self.device).eval()
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)

    def generate(self, prompt_ids: list[list[int]], *, num_samples: int, temperature: float, top_p: float,
                 max_new_tokens: int) -> list[list[Completion]]:
        """`num_samples` completions for each prompt (token ids), greedy when `temperature` is 0."""
        from gainrl_pl.rollout import generate_completions

        batch = self.tokenizer.pad({"input_ids": prompt_ids}, return_tensors="pt")  # left padding
        rollout = generate_completions(
            self.model, batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
            num_generations=num_samples, max_new_tokens=max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
            eos_ids=self.eos_ids, do_sample=temperature > 0, temperature=temperature or 1.0, top_p=top_p)
        pairs = zip(rollout.completion_ids, rollout.completion_mask, strict=True)
        rows = [ids[mask.bool()].tolist() for ids, mask in pairs]  # up to and including the first EOS
        texts = self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        truncated = rollout.truncated.tolist()
        flat = [Completion(t, len(r), bool(tr)) for t, r, tr in zip(texts, rows, truncated, strict=True)]
        return [flat[i:i + num_samples] for i in range(0, len(flat), num_samples)]

    def close(self) -> None:
        """Release the model."""
        self.model = None


def check_vllm_available() -> None:
    """Raise a RuntimeError saying what is missing when the vLLM backend cannot run here."""
    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError("--backend vllm needs the optional `vllm` package (pip install vllm, on a CUDA "
                           "machine); the default --backend transformers needs nothing extra")
    if not torch.cuda.is_available():
        raise RuntimeError("--backend vllm needs a CUDA GPU; on this machine use --backend transformers")


class VLLMBackend:
    """vLLM on a plain model directory (an adapter is merged into a temporary one first). GPU only.

    Prompts go in as token ids and completions are decoded by our tokenizer, so both backends see the
    same prompts and produce text the same way. One engine per process: for several GPUs, run one
    process per GPU with `CUDA_VISIBLE_DEVICES=R ... --shard-rank R --num-shards W`, then `--merge`.
    """

    name = "vllm"

    def __init__(self, spec: ModelSpec, *, dtype: str = "auto", seed: int = 0) -> None:
        check_vllm_available()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # vLLM sets up its own distributed state; inside a torchrun group it would clash with ours
            raise RuntimeError("--backend vllm runs one engine per process and not under torchrun: start one "
                               "process per GPU with CUDA_VISIBLE_DEVICES=R ... --shard-rank R --num-shards W, "
                               "then rerun with --merge")
        from transformers import GenerationConfig
        from vllm import LLM

        from gainrl_pl.evaluation.export import merge_adapter
        from gainrl_pl.models import load_tokenizer, resolve_model_source
        from gainrl_pl.rollout import eos_token_ids

        self.spec = spec
        self.dtype = _eval_dtype(dtype, torch.device("cuda"))
        self._tmp = None
        if spec.adapter:
            self._tmp = tempfile.mkdtemp(prefix="gainrl-eval-merged-")
            model_dir = str(merge_adapter(spec.adapter, Path(self._tmp) / "model", base_model=spec.base,
                                          dtype=self.dtype))
        else:
            model_dir = resolve_model_source(spec.base, spec.settings.get("gguf_file")).path
        self.tokenizer = load_tokenizer(model_dir)
        has_config = (Path(model_dir) / "generation_config.json").exists()
        generation_config = GenerationConfig.from_pretrained(model_dir) if has_config else None
        # the same EOS set as the transformers backend: generation config's EOS ids and the tokenizer's
        self.eos_ids = eos_token_ids(SimpleNamespace(generation_config=generation_config), self.tokenizer)
        self.llm = LLM(model=model_dir, tokenizer=model_dir, dtype=self.dtype, seed=seed)

    def generate(self, prompt_ids: list[list[int]], *, num_samples: int, temperature: float, top_p: float,
                 max_new_tokens: int) -> list[list[Completion]]:
        """`num_samples` completions for each prompt (token ids), greedy when `temperature` is 0."""
        from vllm import SamplingParams

        params = SamplingParams(n=num_samples, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                max_tokens=max_new_tokens, stop_token_ids=self.eos_ids, detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        result = []
        for out in outputs:
            comps = [list(c.token_ids) for c in out.outputs]
            texts = self.tokenizer.batch_decode(comps, skip_special_tokens=True)
            result.append([Completion(t, len(ids), c.finish_reason == "length")
                           for t, ids, c in zip(texts, comps, out.outputs, strict=True)])
        return result

    def close(self) -> None:
        """Drop the engine and the temporary merged model."""
        self.llm = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


def load_backend(spec: ModelSpec, backend: str = "transformers", *, dtype: str = "auto", seed: int = 0):
    """A generation backend (`transformers` or `vllm`) holding the model of `spec`."""
    if backend == "transformers":
        return TransformersBackend(spec, dtype=dtype)
    if backend == "vllm":
        return VLLMBackend(spec, dtype=dtype, seed=seed)
    raise ValueError(f"backend={backend!r} is unknown; allowed: {', '.join(BACKENDS)}")


class LazyBackend:
    """Loads the backend on the first `generate`, so benchmarks that are already done cost no model load."""

    def __init__(self, spec: ModelSpec, backend: str, dtype: str, seed: int) -> None:
        self.spec, self.name, self._args, self._engine = spec, backend, (backend, dtype, seed), None
        self.dtype = resolve_eval_dtype(dtype, backend)

    @property
    def tokenizer(self):
        """The backend's tokenizer (loads the backend)."""
        return self._load().tokenizer

    def _load(self):
        if self._engine is None:
            backend, dtype, seed = self._args
            self._engine = load_backend(self.spec, backend, dtype=dtype, seed=seed)
        return self._engine

    def generate(self, *args, **kwargs):
        """Delegate to the loaded backend."""
        return self._load().generate(*args, **kwargs)

    def close(self) -> None:
        """Close the backend if it was loaded."""
        if self._engine is not None:
            self._engine.close()
