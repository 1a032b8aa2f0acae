"""GRPO step time and peak GPU memory on a real-size architecture (issue 7 section 4), random weights.

Nothing can be downloaded on a lent GPU, so the model is built from a config: the shape of
Qwen2.5-1.5B (28 layers, hidden 1536, MLP 8960, 12 heads / 2 KV heads, vocabulary 151,936, tied
embeddings) with random weights, saved once in bf16 with a small offline tokenizer (ids the tokenizer
does not know decode to nothing: rewards are 0, which costs the same compute). Each configuration runs
`GRPOModule` under a real Lightning `Trainer` in its own subprocess (clean CUDA memory):

- `bf16_full`: every weight trained, bf16 weights and AdamW state (`bf16-true`);
- `mixed_full`: every weight trained, fp32 master weights and AdamW state, bf16 matmuls (`bf16-mixed`): what
  the shipped GSM8K configs do (a 1e-6 update is below half a bf16 step for most weights);
- `bf16_lora`: LoRA r=16 on all linear layers over a bf16 base (`bf16-true`);
- `mixed_lora`: LoRA r=16 over an fp32 base, `bf16-mixed` (the demo and code configs);
- `qlora`: LoRA r=16 over a 4-bit NF4 base (double quantization, bf16 compute), fp32 adapters, `bf16-mixed`
  (configs/math_qwen15b_qlora_24gb.yaml).

Default per step: 1 prompt of 512 tokens x G=8 completions of 512 new tokens (EOS is practically never
sampled from random weights, so every completion runs to the cap), gradient checkpointing on. Reported:
seconds per step (median after a warm-up step) and `torch.cuda.max_memory_allocated` over training.
The issue's goal: QLoRA fits in 12 GiB.

    python benchmarks/gpu_step.py                                   # on a GPU: the three configs
    python benchmarks/gpu_step.py --shape tiny --device cpu --configs bf16_lora --steps 1   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import git_describe, proc_status_kb  # benchmarks/ is on sys.path when a script runs

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (BENCHMARKS.md section 1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIGS = ("bf16_full", "mixed_full", "bf16_lora", "mixed_lora", "qlora")
# (weights dtype, Trainer precision) per config; LoRA on every config but the two full ones
PRECISION = {"bf16_full": ("bfloat16", "bf16-true"), "mixed_full": ("float32", "bf16-mixed"),
             "bf16_lora": ("bfloat16", "bf16-true"), "mixed_lora": ("float32", "bf16-mixed"),
             "qlora": ("bfloat16", "bf16-mixed")}
SHAPES = {
    # Qwen2.5-1.5B's published config.json values
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                         rope_theta=1000000.0, tie_word_embeddings=True),
    # Qwen2.5-0.5B's (the shipped GSM8K configs' model)
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                         rope_theta=1000000.0, tie_word_embeddings=True),
    # the same architecture, small enough for a CPU smoke run
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096, tie_word_embeddings=True),
}


def build_model_dir(shape: str, path: Path, *, vocab_size: int | None = None) -> Path:
    """Random-weight Qwen2 of `shape` + the offline test tokenizer, written once to `path`.

    `vocab_size`: override the shape's (e.g. the tokenizer's own size, so that sampled ids decode to text)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from gainrl_pl.testing import build_tiny_tokenizer

    if (path / "config.json").exists():
        return path
    tokenizer = build_tiny_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    shape_args = {**SHAPES[shape], **({"vocab_size": vocab_size} if vocab_size else {})}
    config = Qwen2Config(**shape_args, eos_token_id=eos, pad_token_id=eos, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=eos)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def write_prompts(path: Path, model_dir: Path, prompt_tokens: int, count: int) -> Path:
    """Questions whose rendered prompt (no template text: `prompt: none`) is about `prompt_tokens` long."""
    from gainrl_pl.models import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    words = "count the apples and the pears in each basket then add them ".split()
    with path.open("w") as fh:
        for i in range(count):
            text, k = f"Problem {i}:", 0
            while len(tokenizer(text)["input_ids"]) < prompt_tokens:
                text += " " + words[k % len(words)]
                k += 1
            fh.write(json.dumps({"question": text, "answer": "0"}) + "\n")
    return path


def run_child(args) -> dict:
    import lightning.pytorch as pl
    import torch
    from gainrl_pl.datamodules import GainRLDataModule, ScheduleSettings

    from gainrl_pl.models import LoraSettings, QuantizationSettings
    from gainrl_pl.module import GRPOModule

    pl.seed_everything(0, verbose=False)
    full = args.config.endswith("_full")
    lora = None if full else LoraSettings(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    quant = QuantizationSettings() if args.config == "qlora" else None
    dtype, precision = PRECISION[args.config]
    module = GRPOModule(model_name_or_path=args.model_dir, dtype=dtype, lora=lora, quantization=quant,
                        gradient_checkpointing=True, num_generations=args.generations,
                        max_completion_length=args.new_tokens, temperature=1.0, beta=0.0, rewards=["accuracy"],
                        learning_rate=1e-6)
    dm = GainRLDataModule(train_data=args.data, preset="generic", prompt="none", tokenizer=args.model_dir,
                          prompts_per_step=args.prompts, max_prompt_length=args.prompt_tokens + 64,
                          schedule=ScheduleSettings(name="uniform", subset_size=args.prompts))
    cuda = args.device == "cuda"
    times: list[float] = []

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if cuda and batch_idx == 1:  # peak of the timed steps, after the warm-up step
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(accelerator=args.device, devices=1, precision=precision, max_steps=args.steps + 1,
                             max_epochs=-1,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                             use_distributed_sampler=False, default_root_dir=tmp, callbacks=[Timer()])
        trainer.fit(module, datamodule=dm)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else proc_status_kb("VmHWM") / 2**20
    params = list(module.policy.parameters())
    # what the config really trained: a wrong setting (LoRA or 4-bit silently off) shows here, not in the time
    trained = {"optimizer_steps": trainer.global_step, "precision": str(trainer.precision),
               "trained_dtype": str(next(p.dtype for p in params if p.requires_grad)).replace("torch.", ""),
               "trainable_params": sum(p.numel() for p in params if p.requires_grad),
               "params": sum(p.numel() for p in params),
               "linear4bit_layers": sum(type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit"
                                        for m in module.policy.modules())}  # not peft's LoRA wrappers of them
    return {"config": args.config, "step_s": times, "peak_gib": peak, **trained,
            "peak_kind": "max_memory_allocated" if cuda else "peak RSS (CPU)",
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--shape", default="qwen2.5-1.5b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--steps", type=int, default=3, help="timed steps per config (after one warm-up step)")
    p.add_argument("--prompts", type=int, default=1, help="prompts per step")
    p.add_argument("--generations", type=int, default=8, help="G")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--workdir", default=None, help="where the random model is written (default: a temp dir)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            p.error(f"--configs: {c!r} is not one of {', '.join(CONFIGS)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_step_"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.shape, work / args.shape)
    data = write_prompts(work / "prompts.jsonl", model_dir, args.prompt_tokens, max(8, args.prompts))
    print(f"# {git_describe()}\n# GRPO step on a random {args.shape} ({args.device}): {args.prompts} prompt(s) of "
          f"~{args.prompt_tokens} tokens x G={args.generations}, {args.new_tokens} new tokens, gradient checkpointing",
          flush=True)
    rows = []
    for config in configs:
        cmd = [sys.executable, __file__, "--child", "--config", config, "--model-dir", str(model_dir),
               "--data", str(data), "--device", args.device, "--steps", str(args.steps), "--prompts",
               str(args.prompts), "--generations", str(args.generations), "--prompt-tokens",
               str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"  {config}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
            rows.append({"config": config, "error": proc.returncode})
            continue
        result = json.loads(lines[-1][len("RESULT "):])
        timed = result["step_s"][1:] or result["step_s"]
        result["median_s"] = statistics.median(timed)
        rows.append(result)
        print(f"  {config}: steps {', '.join(f'{t:.1f}' for t in result['step_s'])} s (first = warm-up), "
              f"peak {result['peak_gib']:.2f} GiB ({result['peak_kind']}), {result['device']}", flush=True)
        print(f"  {config}: {result['optimizer_steps']} optimizer steps, {result['trainable_params']} of "
              f"{result['params']} parameters trainable, {result['linear4bit_layers']} 4-bit layers, "
              f"{result['trained_dtype']} trained weights, precision {result['precision']}", flush=True)
    print("\n| config | s/step (median) | peak memory GiB | device |\n| --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | failed | | |")
        else:
            print(f"| {r['config']} | {r['median_s']:.2f} | {r['peak_gib']:.2f} | {r['device']} |")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
