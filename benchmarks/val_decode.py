"""Greedy validation decoding: the trainer's model in fp32 (what the schedule study validates with) against the
vLLM engine in fp32 and bf16, on the study's validation prompts. Prints seconds per prompt, each ratio to the
fp32 transformers baseline measured in the same process, and how often the engines' greedy answers agree.

    .venv/bin/python benchmarks/val_decode.py --limit 64                        # the first 64 of study_val.jsonl
    .venv/bin/python benchmarks/val_decode.py --limit 64 --vllm-dtype bfloat16  # vLLM allows one engine a process

Why: in the study (experiments/README.md) validation is two thirds of each run's time. A faster decoder
buys seeds, but only if its greedy answers are the same answers (a study compares arms validated one way).
The model and prompts are the study's (experiments/run_ab.py `power_config`, LoRA at its identity init,
i.e. the step-0 policy); each engine decodes every prompt once, after one warm-up batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "experiments"), str(REPO / "benchmarks")]



def build(run_dir: Path, vllm_dtype: str):
    import run_ab
    import yaml

    from gainrl_pl.cli import run_lightning_cli
    from gainrl_pl.console import quiet_library_noise

    quiet_library_noise()
    cfg = run_ab.power_config(run_dir)
    cfg["trainer"]["logger"] = False
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cli = run_lightning_cli(["--config", str(path), "--model.rollout_engine", "vllm",
                             "--model.vllm.dtype", vllm_dtype], run=False)
    dm = cli.datamodule
    dm.prepare_data()
    dm.setup("validate")
    return cli.model, dm


def decode(module, batches, engine: str) -> tuple[list[str], list[bool], float]:
    import torch

    texts, correct = [], []
    kwargs = dict(num_generations=1, temperature=1e-5, max_new_tokens=module.hparams.val_max_completion_length,
                  do_sample=False)
    generate = module._generate if engine == "hf_fp32" else module._generate_vllm
    generate(batches[0], **kwargs)  # warm-up: engine start, first kernels
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            rollout = generate(batch, **kwargs)
            completions = module._decode(rollout.completion_ids, rollout.completion_mask)
            rewards = module._rewards(batch, completions, 1, rollout)
            texts += completions
            correct += module._accuracy_values(rewards).view(-1).tolist()
    return texts, correct, time.perf_counter() - t0


def time_training_rollouts(module, batch, repeats: int) -> float:
    """Seconds per study-sized training rollout on the engine: 4 prompts x G=4 sampled at T=0.7, 64 tokens."""
    import torch

    small = {k: (v[:4] if isinstance(v, (list, torch.Tensor)) else v) for k, v in batch.items()}
    small["columns"] = {k: v[:4] for k, v in batch["columns"].items()}
    kwargs = dict(num_generations=4, temperature=0.7, max_new_tokens=64, do_sample=True)
    module._generate_vllm(small, **kwargs)
    t0 = time.perf_counter()
    for _ in range(repeats):
        module._generate_vllm(small, **kwargs)
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    import torch
    from common import git_describe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=64, help="validation prompts (the first N of 256)")
    ap.add_argument("--vllm-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the vLLM engine's weights (one engine per process: run again for the other)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rollouts", type=int, default=5, help="timed training-sized rollouts on the engine")
    args = ap.parse_args()
    del sys.argv[1:]  # LightningCLI, built below with its own arguments, would also read ours
    engines = ["hf_fp32", f"vllm_{'fp32' if args.vllm_dtype == 'float32' else 'bf16'}"]
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in engines:
            # one module per engine dtype (the engine's dtype is fixed when it starts)
            module, dm = build(Path(tmp), args.vllm_dtype)
            module.eval()
            if engine == "hf_fp32":
                module.policy.float()  # as run_ab's FP32Validation does around each validation
            batches = []
            for batch in dm.val_dataloader():
                batches.append(batch)
                if sum(len(b["prompt"]) for b in batches) >= args.limit:
                    break
            n = sum(len(b["prompt"]) for b in batches)
            texts, correct, seconds = decode(module, batches, engine)
            results[engine] = (texts, correct, seconds, n)
            print(f"[{engine}] {n} prompts in {seconds:.1f} s", flush=True)
            if engine.startswith("vllm") and args.rollouts:
                rollout_s = time_training_rollouts(module, batches[0], args.rollouts)
    base_texts, base_correct, base_s, n = results["hf_fp32"]
    print(f"\n## Greedy validation decoding, {n} study prompts, 64 new tokens, {args.threads} threads, "
          f"{git_describe()}\n")
    print("| engine | s / prompt | speed vs hf_fp32 | accuracy | same completion as hf_fp32 | same verdict |")
    print("| --- | --- | --- | --- | --- | --- |")
    for engine, (texts, correct, seconds, _) in results.items():
        same = sum(a == b for a, b in zip(texts, base_texts, strict=True)) / n
        verdict = sum(a == b for a, b in zip(correct, base_correct, strict=True)) / n
        print(f"| {engine} | {seconds / n:.3f} | {base_s / seconds:.2f}x | {sum(correct) / n:.3f} | {same:.3f} | "
              f"{verdict:.3f} |")
    if args.rollouts:
        print(f"\nTraining-sized rollout on {engines[1]} (4 prompts x G=4, T=0.7, 64 tokens, mean of {args.rollouts}): "
              f"{rollout_s:.2f} s; hf_fp32 validation in this process {base_s / n:.3f} s / prompt (the anchor "
              "to compare runs of the two engine dtypes)")


if __name__ == "__main__":
    main()
