"""What fp32 master weights cost: GRPO step time, peak memory and validation time per precision setting, on CPU.

The built-in SmolLM2-135M-Instruct under a real Lightning Trainer, on the demo's arithmetic prompts:
8 prompts x G=4 completions of `--max-new-tokens` per step, a full fine-tune (lr 1e-6, the paper's) or LoRA
r=16 on all linear layers (lr 3e-4, the demo's). Settings (model.dtype / trainer.precision):

    full_bf16_true    bfloat16 / bf16-true    the old GSM8K configs: bf16 weights and AdamW state (the baseline)
    full_bf16_mixed   float32  / bf16-mixed   the configs now: fp32 master weights, bf16 autocast
    lora_bf16_true    bfloat16 / bf16-true    the old QLoRA config's way: adapters cast to bf16 (the baseline)
    lora_bf16_32      bfloat16 / 32-true      the old demo: bf16 base, fp32 adapters, no autocast
    lora_bf16_mixed   float32  / bf16-mixed   fp32 base and adapters, bf16 autocast
    lora_fp32         float32  / 32-true      everything fp32

Each (setting, repeat) runs in its own subprocess (its own peak RSS), interleaved (A B C, then C B A, ...) so
that load from other jobs hits every setting. Per run: one warm-up step (not counted), `--steps` timed
steps (one batch end to the next: generation, rewards, loss, backward, optimizer), the share of trainable
weights the steps changed, then greedy validation of `--val-prompts` demo_val problems timed in the weights'
dtype (fp32 for fp32 weights) and under the trainer's autocast. Ratios are against the bf16-true baseline of
the same kind, from the same command.

    python benchmarks/precision.py --settings full_bf16_true,full_bf16_mixed,lora_bf16_32,lora_bf16_mixed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import git_describe, proc_status_kb  # benchmarks/ is on sys.path when a script runs

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/README.md; must precede `import torch`
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {  # name: (model.dtype, trainer.precision, lora?)
    "full_bf16_true": ("bfloat16", "bf16-true", False),
    "full_bf16_mixed": ("float32", "bf16-mixed", False),
    "lora_bf16_true": ("bfloat16", "bf16-true", True),
    "lora_bf16_32": ("bfloat16", "32-true", True),
    "lora_bf16_mixed": ("float32", "bf16-mixed", True),
    "lora_fp32": ("float32", "32-true", True),
}
BASELINE = {"full": "full_bf16_true", "lora": "lora_bf16_true"}


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:  # VmHWM := VmRSS: the model load's peak does not count
        fh.write("5")


def run_setting(args) -> dict:
    import lightning.pytorch as pl
    import torch
    from gainrl_pl.callbacks import GainRLScheduler
    from gainrl_pl.datamodules import GainRLDataModule, ScheduleSettings

    from gainrl_pl.models import LoraSettings
    from gainrl_pl.module import GRPOModule

    torch.set_num_threads(args.threads)
    dtype, precision, lora = SETTINGS[args.child]
    pl.seed_everything(0)
    module = GRPOModule(model_name_or_path="builtin", dtype=dtype, num_generations=4,
                        max_completion_length=args.max_new_tokens, temperature=0.7, rewards=["accuracy"],
                        learning_rate=3e-4 if lora else 1e-6, max_grad_norm=1.0,
                        lora=LoraSettings(r=16, alpha=32, target_modules="all-linear") if lora else None,
                        val_max_completion_length=64)
    data = REPO / "data" / "arithmetic"
    dm = GainRLDataModule(train_data=str(data / "demo_train.jsonl"), val_data=str(data / "demo_val.jsonl"),
                          preset="arithmetic", prompt="paper", tokenizer="builtin", prompts_per_step=8,
                          val_batch_size=args.val_prompts, val_limit=args.val_prompts,
                          schedule=ScheduleSettings(name="uniform", subset_size=8 * (args.steps + 1)))
    before = {n: p.detach().float().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    stamps: list[tuple[float, float]] = []

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stamps.append((time.perf_counter(), time.process_time()))
            if len(stamps) == 1:
                _reset_peak_rss()  # after the warm-up step: optimizer state exists, page faults done

    trainer = pl.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=args.steps + 1, max_epochs=-1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                         limit_val_batches=0, callbacks=[GainRLScheduler(use_cache=False), Clock()])
    trainer.fit(module, datamodule=dm)
    peak_mb = proc_status_kb("VmHWM") / 1024
    walls = [b[0] - a[0] for a, b in zip(stamps, stamps[1:], strict=False)]
    cpus = [b[1] - a[1] for a, b in zip(stamps, stamps[1:], strict=False)]
    after = {n: p.detach().float() for n, p in module.policy.named_parameters() if p.requires_grad}
    changed = sum(int((before[n] != after[n]).sum()) for n in before) / sum(t.numel() for t in before.values())
    trainer.limit_val_batches = 1.0
    val = {}
    for autocast in (False, True):
        module.hparams.val_autocast = autocast
        t0 = time.perf_counter()
        metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
        val["autocast" if autocast else "weights_dtype"] = {"seconds": time.perf_counter() - t0,
                                                            "accuracy": metrics["val/accuracy"]}
    return {"setting": args.child, "dtype": dtype, "precision": precision, "lora": lora,
            "step_wall_s": walls, "step_cpu_s": cpus, "peak_rss_mb": peak_mb, "changed_fraction": changed,
            "validation": val}


def run_child(args, setting: str) -> dict:
    cmd = [sys.executable, __file__, "--child", setting, "--steps", str(args.steps), "--threads", str(args.threads),
           "--max-new-tokens", str(args.max_new_tokens), "--val-prompts", str(args.val_prompts)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{setting} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    by_setting: dict[str, list[dict]] = {}
    for r in results:
        by_setting.setdefault(r["setting"], []).append(r)
    medians = {}
    for name, runs in by_setting.items():
        medians[name] = {"step_wall_s": statistics.median(s for r in runs for s in r["step_wall_s"]),
                         "step_cpu_s": statistics.median(s for r in runs for s in r["step_cpu_s"]),
                         "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
                         "changed_fraction": statistics.median(r["changed_fraction"] for r in runs),
                         "val_weights_dtype_s": statistics.median(r["validation"]["weights_dtype"]["seconds"] for r in runs),
                         "val_autocast_s": statistics.median(r["validation"]["autocast"]["seconds"] for r in runs)}
    for name, m in medians.items():
        base = medians.get(BASELINE["lora" if SETTINGS[name][2] else "full"])
        ratio = {} if base is None else {
            "step_wall_ratio": m["step_wall_s"] / base["step_wall_s"],
            "step_cpu_ratio": m["step_cpu_s"] / base["step_cpu_s"],
            "peak_rss_ratio": m["peak_rss_mb"] / base["peak_rss_mb"]}
        rows.append({"setting": name, "dtype": SETTINGS[name][0], "precision": SETTINGS[name][1], **m, **ratio,
                     "val_fp32_over_autocast": m["val_weights_dtype_s"] / m["val_autocast_s"]})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from {', '.join(SETTINGS)}")
    p.add_argument("--steps", type=int, default=2, help="timed steps per run (after one warm-up step)")
    p.add_argument("--repeats", type=int, default=1, help="runs per setting, interleaved")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--max-new-tokens", type=int, default=32, help="completion length in training")
    p.add_argument("--val-prompts", type=int, default=24, help="greedy validation prompts (64 new tokens)")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_setting(args)))
        return
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    results = []
    for repeat in range(args.repeats):
        for setting in settings if repeat % 2 == 0 else settings[::-1]:
            result = run_child(args, setting)
            results.append(result)
            print(f"[{repeat}] {setting}: step {statistics.median(result['step_wall_s']):.2f} s wall, "
                  f"peak {result['peak_rss_mb']:.0f} MB, changed {result['changed_fraction']:.3f}", flush=True)
    summary = summarize(results)
    print(f"\n{git_describe()}, {args.threads} threads, {args.steps} steps x {args.repeats} repeats")
    print("| setting | dtype / precision | s/step (wall) | CPU s/step | ratio (wall, CPU) | peak RSS MB | ratio "
          "| weights changed | val fp32 s | val autocast s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in summary:
        ratio = (f"{r['step_wall_ratio']:.2f}x, {r['step_cpu_ratio']:.2f}x" if "step_wall_ratio" in r else "")
        print(f"| {r['setting']} | {r['dtype']} / {r['precision']} | {r['step_wall_s']:.2f} | {r['step_cpu_s']:.2f} "
              f"| {ratio} | {r['peak_rss_mb']:.0f} | {r.get('peak_rss_ratio', float('nan')):.2f}x "
              f"| {r['changed_fraction']:.3f} | {r['val_weights_dtype_s']:.1f} | {r['val_autocast_s']:.1f} |")
    if args.output:
        Path(args.output).write_text(json.dumps({"results": results, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
