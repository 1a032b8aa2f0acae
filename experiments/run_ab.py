"""Run ONE arm and seed of a GAIN-RL schedule study and write its metrics to JSON (or the shared baseline).

    .venv/bin/python experiments/run_ab.py --arm gainrl --seed 0                      # the powered CPU study
    .venv/bin/python experiments/run_ab.py --baseline                                 # step-0 validation, once
    .venv/bin/python experiments/run_ab.py --arm uniform --seed 0 --design miniature  # the 12-step miniature
    .venv/bin/python experiments/run_ab.py --arm uniform --seed 0 --design gpu        # paper config on GSM8K
    .venv/bin/python experiments/run_ab.py --arm gainrl --seed 0 -- --trainer.max_steps 4   # extra CLI overrides

An arm is nothing but a list of `gainrl-pl fit` CLI overrides on top of one base config per design (ARMS
below), so every arm sees the same data, the same compute per step and the same validation prompts. The run
goes through `gainrl_pl.cli.run_lightning_cli(..., run=False)` rather than the console script because the
per-prompt "first solved" step needs the rollout report that the GAIN-RL scheduler callback consumes and
clears in its own `on_train_batch_end`: our recorder is inserted at the *front* of the trainer's callbacks
so it reads the report first.

Designs:
- `power` (default): `data/arithmetic/study_train.jsonl` (1,024 prompts, 8 families) and all 256 rows of
  `study_val.jsonl`, 30 steps of 4 prompts x G=4, 64 new tokens, rounds of 8 prompts, greedy validation in
  fp32 after every 3 rounds (steps 6, 12, ..., 30) with each prompt's result saved. Step 0 is the same for
  every arm and seed (LoRA starts as the identity), so it is validated once (`--baseline`) into
  `<out-dir>/baseline.json` and the runs skip it.
- `miniature`: the 12-step study of BENCHMARKS.md section 3 (24 validation prompts), unchanged.
- `gpu`: the paper's GSM8K config.

Output: `<out-dir>/<arm>_seed<k>.json` (default out-dir `experiments/results/<design>/`, the miniature's
`experiments/results/`), written atomically when the run ends, with validation accuracy per step (and per
prompt), train reward and generated groups per step, the scheduler's per-round history (mu, both update
terms, GRESO's skips, MoPPS's posteriors), each drawn training prompt's first-solved step (the miniature:
every prompt's), the angle score of every training prompt (angle arms), and wall and CPU times.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
# Before torch loads: spinning OpenMP workers make 2-thread torch up to 13x slower while another process
# holds a core of this shared 2-core machine (BENCHMARKS.md section 1). Passive waiting costs nothing alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DESIGNS = ("power", "miniature", "gpu")

# Arms: CLI overrides on the design's base config. `difficulty_field level` is the arithmetic set's
# difficulty rank (data/arithmetic/README.md); on GSM8K (gpu) there is no such column: point
# --data.train_data at a set that has one (e.g. MATH) for those arms.
ARMS: dict[str, list[str]] = {
    "gainrl": ["--data.schedule.name", "angle"],
    # the investigation of issue 7: a mid-depth layer ranks this set's easy families first (angle_layers.py)
    "gainrl_layer8": ["--data.schedule.name", "angle", "--scheduler.layer", "8"],  # the ranking's and signal's layer
    "uniform": ["--data.schedule.name", "uniform"],
    "length": ["--data.schedule.name", "length"],
    "accuracy_curriculum": ["--data.schedule.name", "accuracy_curriculum", "--data.schedule.difficulty_field", "level"],
    "gainrl_half": ["--data.schedule.name", "angle", "--data.train_fraction", "0.5"],
    "adarft": ["--data.schedule.name", "adarft", "--data.schedule.difficulty_field", "level"],
    "pass_rate_priority": ["--data.schedule.name", "pass_rate_priority"],
    "greso": ["--data.schedule.name", "greso"],
    # MoPPS also gets extra.rollouts_per_prompt = model.num_generations (set in `configure_arm`)
    "mopps": ["--data.schedule.name", "mopps"],
    # DAPO dynamic sampling: drops zero-variance groups and generates more (up to 8 extra rounds: with 3, 15 of
    # 16 groups of a step came back all-equal and seed 0 stopped); a step still short trains on what it kept.
    # Generation is counted in groups generated, training in groups trained (both in the report).
    "uniform_filter": ["--data.schedule.name", "uniform", "--model.dynamic_sampling", "true",
                       "--model.max_extra_generation_rounds", "8", "--model.dynamic_sampling_allow_partial", "true"],
    # the paper's GRESO: pre-rollout skipping plus the post-rollout filter
    "greso_filter": ["--data.schedule.name", "greso", "--model.dynamic_sampling", "true"],
}

# The paper's GAIN-RL defaults (sigma 1000, n 500, adj_max 1000 ranks on GSM8K's N = 7473, spec sections 4-5)
# as fractions of N, so they mean the same on a 1,024-prompt set; alpha 2, beta 0.5, mu_0 0, adj_min 0.
PAPER_GAUSSIAN = {"sigma": round(1000 / 7473, 4), "step_size": round(500 / 7473, 4),
                  "max_shift": round(1000 / 7473, 4), "sensitivity": 2.0, "target_accuracy": 0.5,
                  "initial_mu": 0.0, "min_shift": 0.0}

# Names another branch may give GRPOModule's validation-precision option; the first one present is used.
VAL_DTYPE_OPTIONS = ("val_dtype", "validation_dtype", "eval_dtype")


def _logger(run_dir: Path) -> list[dict]:
    return [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir), "name": "csv"}}]


def miniature_config(run_dir: Path) -> dict:
    """configs/demo.yaml (frozen copy) shrunk so one run costs minutes on 2 CPU cores (BENCHMARKS section 3).

    12 optimizer steps of 4 prompts x G=4; a round (the paper's epoch) = 8 prompts = 2 steps, so mu gets 6
    updates; validation (greedy, the fixed first 24 rows of demo_val) every 2 rounds = steps 0, 4, 8, 12.
    sigma / step_size / max_shift stay fractions of N as in demo.yaml (the paper's 1000 / 500 / 1000 ranks
    are for GSM8K's N = 7473 and would make the Gaussian flat over 192 prompts).
    """
    # A frozen copy of configs/demo.yaml: the demo config keeps evolving, the study's base must not.
    cfg = yaml.safe_load((ROOT / "experiments/configs/demo_base.yaml").read_text())
    cfg["trainer"].update(max_steps=12, check_val_every_n_epoch=2, default_root_dir=str(run_dir),
                          logger=_logger(run_dir))
    cfg["model"].update(max_completion_length=48, val_max_completion_length=64, log_completions_every_n_steps=4)
    cfg["data"].update(prompts_per_step=4, val_limit=24, val_batch_size=24)
    cfg["data"]["schedule"].update(subset_size=8)
    # no step checkpoints: they cost time and the study only needs metrics
    cfg["checkpoint"] = {"every_n_train_steps": 100000, "save_last": False, "save_hf": False}
    return cfg


def power_config(run_dir: Path) -> dict:
    """The powered CPU study (issue 18): 1,024 training prompts over 8 families, 256 validation prompts.

    Same model, LoRA, loss, lr, G and temperature as the miniature; 64 new tokens in training too (at 48
    the base model's answers were cut before the \\boxed{} so often that one-digit sums scored 0.28 instead
    of 0.47; experiments/README.md); 30 optimizer steps of 4 prompts; rounds of 8 prompts (2 steps: 15
    schedule updates); GAIN-RL, length and the level curriculum use the paper's Gaussian defaults as
    fractions of N (PAPER_GAUSSIAN). Validation: greedy, fp32, every 3 rounds (steps 6, 12, 18, 24, 30), all
    256 rows; step 0 comes from the shared baseline (`--baseline`), so `num_sanity_val_steps` is 0.

    Rollouts and validation on the vLLM engine in fp32 (since 2026-12-05): its greedy answers equalled the
    trainer's fp32 ones on all 256 prompts at 2.7x the speed, and validation was two thirds of a run
    (BENCHMARKS.md section 8). Runs before that (`results/power_hf_validation/`) sampled on a bf16 engine and
    validated on the trainer cast to fp32; the two are never mixed in one comparison (`val_decoding`).
    """
    cfg = yaml.safe_load((ROOT / "experiments/configs/demo_base.yaml").read_text())
    cfg["trainer"].update(max_steps=30, check_val_every_n_epoch=3, num_sanity_val_steps=0,
                          default_root_dir=str(run_dir), logger=_logger(run_dir), enable_progress_bar=False)
    cfg["model"].update(max_completion_length=64, val_max_completion_length=64, val_temperature=0.0,
                        log_completions_every_n_steps=10, rollout_engine="vllm",
                        vllm={"dtype": "float32", "use_for_validation": True})
    cfg["data"].update(train_data="data/arithmetic/study_train.jsonl", val_data="data/arithmetic/study_val.jsonl",
                       prompts_per_step=4, val_limit=None, val_batch_size=32)
    cfg["data"]["schedule"].update(subset_size=8, **PAPER_GAUSSIAN)
    cfg["checkpoint"] = {"every_n_train_steps": 100000, "save_last": False, "save_hf": False}
    return cfg


def gpu_config(run_dir: Path) -> dict:
    """The paper's GSM8K config (configs/gsm8k_qwen05b_paper.yaml), with a logger and a bounded length."""
    cfg = yaml.safe_load((ROOT / "configs/gsm8k_qwen05b_paper.yaml").read_text())
    cfg["trainer"].update(max_steps=400, default_root_dir=str(run_dir), logger=_logger(run_dir),
                          num_sanity_val_steps=-1)
    cfg["data"].update(val_limit=500)
    cfg["checkpoint"] = {"every_n_train_steps": 100000, "save_last": False, "save_hf": False}
    return cfg


CONFIGS = {"power": power_config, "miniature": miniature_config, "gpu": gpu_config}


def configure_arm(cfg: dict, arm: str) -> dict:
    """Arm-specific settings that live in the config rather than in CLI overrides."""
    if arm.startswith("mopps"):
        # the posterior counts an accuracy s as s G successes: G must be the run's G
        extra = cfg["data"]["schedule"].setdefault("extra", {}) or {}
        extra["rollouts_per_prompt"] = int(cfg["model"].get("num_generations", 8))
        cfg["data"]["schedule"]["extra"] = extra
    return cfg


def validation_precision_args(module_cls) -> tuple[list[str], str]:
    """CLI overrides that ask GRPOModule for fp32 validation, if it has such an option; and how it is done.

    Without one (this branch), the study's own `FP32Validation` callback casts the policy to fp32 around
    each validation instead.
    """
    params = inspect.signature(module_cls.__init__).parameters
    for name in VAL_DTYPE_OPTIONS:
        if name in params:
            return [f"--model.{name}", "float32"], f"fp32 greedy via model.{name}"
    return [], "fp32 greedy via experiments/run_ab.py FP32Validation (policy cast to fp32 around validation)"


def make_callbacks(fp32_validation: bool):
    """The study's callbacks; built lazily so `--help` does not import Lightning."""
    import lightning.pytorch as pl
    import torch

    class FP32Validation(pl.Callback):
        """Greedy validation in fp32 whatever the training dtype, so a result does not flip with the machine.

        Each parameter and buffer is cast to fp32 before validation and back to its own dtype afterwards
        (bf16 -> fp32 -> bf16 is exact, and peft keeps LoRA weights in fp32 already); assigning `.data` keeps
        the Parameter objects, so the optimizer's references and state are untouched.
        """

        def __init__(self) -> None:
            self._dtypes: dict[str, torch.dtype] = {}

        def on_validation_start(self, trainer, pl_module) -> None:
            self._dtypes = {}
            for name, t in [*pl_module.policy.named_parameters(), *pl_module.policy.named_buffers()]:
                if t.is_floating_point() and t.dtype != torch.float32:
                    self._dtypes[name] = t.dtype
                    t.data = t.data.float()

        def on_validation_end(self, trainer, pl_module) -> None:
            for name, t in [*pl_module.policy.named_parameters(), *pl_module.policy.named_buffers()]:
                if name in self._dtypes:
                    t.data = t.data.to(self._dtypes[name])
            self._dtypes = {}

    class StudyRecorder(pl.Callback):
        """Validation accuracy per step (and per prompt), train reward and groups per step, first-solved steps.

        Must run before GainRLScheduler, which sets `pl_module.last_rollout_report = None` once read.
        Per-prompt validation results: the module feeds each batch's per-prompt accuracies to its
        `val_accuracy` metric; the recorder wraps that metric's `update` and pairs the values with the batch's
        dataset positions (checked: one value per real prompt).
        """

        def __init__(self) -> None:
            self.val: list[dict] = []
            self.train: list[dict] = []
            self.first_solved: dict[int, int] = {}
            self.times_drawn: dict[int, int] = {}
            self.t0 = time.time()
            self._val_positions: list[int] = []
            self._val_values: list[float] = []
            self._val_t0 = self._val_cpu0 = 0.0
            self._step_t0 = self._step_cpu0 = 0.0
            self._wrapped = False

        def _wrap(self, pl_module) -> None:
            if self._wrapped:
                return
            metric = pl_module.val_accuracy
            original = metric.update

            def update(value, *args, **kwargs):
                self._val_values.extend(value.detach().float().reshape(-1).cpu().tolist())
                return original(value, *args, **kwargs)

            metric.update = update
            self._wrapped = True

        def on_validation_start(self, trainer, pl_module) -> None:
            self._wrap(pl_module)
            self._val_positions, self._val_values = [], []
            self._val_t0 = time.time()
            self._val_cpu0 = time.process_time()

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
            real = ~batch["is_padding"] if "is_padding" in batch else None
            positions = batch["index"] if real is None else batch["index"][real]
            self._val_positions.extend(int(p) for p in positions)

        # Not on_validation_epoch_end: callbacks' epoch-end hooks run before the module's, which is where
        # val/accuracy is logged, so they would read the previous validation's value.
        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                self._add_val(trainer, 0, float(pl_module.val_accuracy_at_start))
                return
            acc = trainer.callback_metrics.get("val/accuracy")
            if acc is not None:
                self._add_val(trainer, trainer.global_step, float(acc))

        def _add_val(self, trainer, step: int, acc: float) -> None:
            if len(self._val_values) != len(self._val_positions):
                raise RuntimeError(f"recorded {len(self._val_values)} per-prompt validation results for "
                                   f"{len(self._val_positions)} prompts: GRPOModule.validation_step changed")
            per_prompt = dict(zip(self._val_positions, self._val_values, strict=True))
            mean = sum(per_prompt.values()) / max(len(per_prompt), 1)
            if abs(mean - acc) > 1e-4:
                raise RuntimeError(f"per-prompt validation mean {mean:.4f} != logged val/accuracy {acc:.4f}")
            self.val.append({"step": step, "accuracy": acc, "elapsed_s": time.time() - self.t0,
                             "seconds": time.time() - self._val_t0, "cpu_s": time.process_time() - self._val_cpu0,
                             "per_prompt": [per_prompt[p] for p in sorted(per_prompt)]})
            print(f"[study] step {step} val/accuracy {acc:.4f} ({time.time() - self._val_t0:.0f} s)", flush=True)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._step_t0 = time.time()
            self._step_cpu0 = time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            report = getattr(pl_module, "last_rollout_report", None)
            if not report:
                return
            step = trainer.global_step  # already incremented: the step that used these rollouts ends here
            idx = report["index"].detach().cpu().long().tolist()
            acc = report["accuracy"].detach().cpu().float().tolist()
            for i, a in zip(idx, acc, strict=True):
                self.times_drawn[i] = self.times_drawn.get(i, 0) + 1
                if a > 0 and i not in self.first_solved:
                    self.first_solved[i] = step
            # the report covers every generated group (DAPO's dropped ones too): that is the generation cost;
            # the groups trained on are fewer under dynamic sampling (the module logs how many)
            trained = trainer.callback_metrics.get("dynamic_sampling/trained_groups")
            self.train.append({"step": step, "reward": sum(acc) / max(len(acc), 1), "indices": idx,
                               "per_prompt_accuracy": acc, "generated_groups": len(idx),
                               "trained_groups": len(idx) if trained is None else int(trained),
                               "seconds": time.time() - self._step_t0, "cpu_s": time.process_time() - self._step_cpu0,
                               "elapsed_s": time.time() - self.t0})

    return ([FP32Validation()] if fp32_validation else []), StudyRecorder()


def val_from_csv(run_dir: Path) -> list[dict]:
    """Validation accuracy per step from the run's CSVLogger file (a cross-check of the recorder).

    The step-0 row is the baseline the module logs at train start; later rows carry Lightning's logging step,
    one less than trainer.global_step at the end of the validated round.
    """
    import csv

    out = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("val/accuracy"):
                step = int(row["step"])
                out[0 if step == 0 else step + 1] = float(row["val/accuracy"])
    return [{"step": s, "accuracy": a} for s, a in sorted(out.items())]


def write_json_atomic(path: Path, data: dict, *, compact: bool = False) -> None:
    """A result file is complete or absent: the study skips existing files, so never leave half of one.

    `compact`: no indentation (a powered-study run holds 1,024 prompts: ~4x smaller in the repository)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(data, separators=(",", ":"), default=float) if compact else json.dumps(data, indent=1, default=float)
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def val_set_digest(dm) -> str:
    """Hash of the validation questions in order: a run and the baseline it is compared with must match."""
    text = "\n".join(item["question"] for item in dm.val_set or [])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def environment() -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"commit": commit, "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
            "machine": platform.machine()}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", choices=sorted(ARMS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--baseline", action="store_true",
                    help="validate the untrained model once (step 0, shared by every run of the design)")
    ap.add_argument("--design", choices=DESIGNS, default="power")
    ap.add_argument("--scale", choices=["cpu", "gpu"], default=None,
                    help="old spelling: cpu = --design miniature, gpu = --design gpu")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("GAINRL_STUDY_THREADS", "2")),
                    help="torch CPU threads (default: $GAINRL_STUDY_THREADS or 2). Keep it the same for every run "
                    "of a study: on this CPU 1-thread bf16 greedy decoding differed enough from 2-thread to move "
                    "the step-0 validation accuracy from 0.458 to 0.250")
    ap.add_argument("--out-dir", default=None,
                    help="results directory (default experiments/results/<design>/; miniature: experiments/results/)")
    ap.add_argument("--run-root", default=None, help="Lightning logs (default runs/study/<design>/)")
    args = ap.parse_args(argv)
    if args.scale:
        args.design = "miniature" if args.scale == "cpu" else "gpu"
    if not args.baseline and not args.arm:
        ap.error("give --arm (and --seed), or --baseline")

    import torch

    torch.set_num_threads(args.threads)
    from gainrl_pl.module import GRPOModule

    if args.arm and "dynamic_sampling" in " ".join(ARMS[args.arm]) and \
            "dynamic_sampling" not in inspect.signature(GRPOModule.__init__).parameters:
        sys.exit(f"{args.arm} needs GRPOModule(dynamic_sampling=...), which this checkout lacks")

    out_dir = Path(args.out_dir) if args.out_dir else (RESULTS if args.design == "miniature" else RESULTS / args.design)
    name = "baseline" if args.baseline else f"{args.arm}_seed{args.seed}" + ("_gpu" if args.design == "gpu" else "")
    run_root = Path(args.run_root) if args.run_root else ROOT / "runs" / "study" / (
        "" if args.design == "miniature" else args.design)
    run_dir = run_root / name
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = configure_arm(CONFIGS[args.design](run_dir), args.arm or "uniform")
    cfg_path = run_dir / "base_config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    fp32_args, val_decoding = ([], "as configured (miniature: bf16 greedy)") if args.design == "miniature" \
        else validation_precision_args(GRPOModule)
    fp32_callback = args.design != "miniature" and not fp32_args
    arm_args = ARMS["uniform" if args.baseline else args.arm]
    cli_args = ["--config", str(cfg_path), "--seed_everything", str(args.seed), "--data.schedule.seed",
                str(args.seed), *arm_args, *fp32_args, *extra]
    print(f"[study] gainrl-pl {'validate' if args.baseline else 'fit'} " + " ".join(cli_args), flush=True)

    from gainrl_pl.callbacks import GainRLScheduler

    from gainrl_pl.cli import run_lightning_cli
    from gainrl_pl.console import quiet_library_noise

    quiet_library_noise()  # the console `gainrl-pl fit` gives (run_lightning_cli alone installs no filters)

    t0, cpu0 = time.time(), time.process_time()
    cli = run_lightning_cli(cli_args, run=False)
    vllm_settings = getattr(cli.model, "vllm_settings", None)
    if (args.design != "miniature" and cli.model.engine_name == "vllm" and vllm_settings is not None
            and vllm_settings.use_for_validation):
        if vllm_settings.dtype != "float32":
            sys.exit(f"the {args.design} design validates fp32 greedy: model.vllm.dtype is {vllm_settings.dtype!r}, "
                     "set it to float32 (or model.vllm.use_for_validation to false)")
        fp32_callback, val_decoding = False, "fp32 greedy on the vLLM engine (model.vllm.dtype float32)"
    extra_callbacks, recorder = make_callbacks(fp32_callback)
    # the recorder first (it must read the rollout report before the scheduler clears it); fp32 casting
    # before any other callback's validation hooks
    cli.trainer.callbacks[:0] = [recorder, *extra_callbacks]
    dm = cli.datamodule
    # which engine generated the training rollouts (`auto` picks vLLM where it is installed): runs compared in
    # one study must share it
    common = {"design": args.design, "threads": args.threads, "val_decoding": val_decoding,
              "rollout_engine": cli.model.engine_name, "environment": environment(), "cli_args": cli_args}
    out = out_dir / f"{name}.json"
    if args.baseline:
        cli.trainer.validate(cli.model, datamodule=dm)
        val = recorder.val[-1]
        result = {**common, "kind": "baseline", "step": 0, "accuracy": val["accuracy"],
                  "per_prompt": val["per_prompt"], "seconds": val["seconds"], "cpu_s": val["cpu_s"],
                  "num_val_prompts": len(dm.val_set),
                  "val_digest": val_set_digest(dm),
                  "val_prompts": [{"question": it["question"], "family": it["columns"].get("family"),
                                   "level": it["columns"].get("level")} for it in dm.val_set],
                  "command": f".venv/bin/python experiments/run_ab.py --baseline --design {args.design}"}
        write_json_atomic(out, result)
        print(f"[study] wrote {out}: step-0 accuracy {val['accuracy']:.4f} in {time.time() - t0:.0f} s", flush=True)
        return

    cli.trainer.fit(cli.model, datamodule=dm)
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    sched = next(c for c in cli.trainer.callbacks if isinstance(c, GainRLScheduler))
    prompts = []
    for pos, item in enumerate(dm.train_set):
        prompts.append({"position": pos, "row": int(item["index"]), "question": item["question"],
                        "question_tokens": int(item["question_tokens"]),
                        "level": item["columns"].get("level"), "family": item["columns"].get("family"),
                        "angle_score": None if sched.scores is None else sched.scores[pos],
                        "times_drawn": recorder.times_drawn.get(pos, 0),
                        "first_solved_step": recorder.first_solved.get(pos)})
    angle_scores = None
    if args.design != "miniature":  # every prompt's record would be 1,024 entries: keep the drawn ones
        prompts = [p for p in prompts if p["times_drawn"] > 0]
        angle_scores = None if sched.scores is None else [float(x) for x in sched.scores]
    result = {**common, "kind": "run", "arm": args.arm, "seed": args.seed, "scale": args.design,
              "command": f".venv/bin/python experiments/run_ab.py --arm {args.arm} --seed {args.seed} "
                         f"--design {args.design}" + (" -- " + " ".join(extra) if extra else ""),
              "wall_s": wall, "cpu_s": cpu, "max_steps": cli.trainer.max_steps, "global_step": cli.trainer.global_step,
              "num_train_prompts": len(dm.train_set), "num_val_prompts": len(dm.val_set or []),
              "val_digest": val_set_digest(dm),
              "val": recorder.val, "val_from_csv": val_from_csv(run_dir), "train": recorder.train,
              "schedule_history": sched.history, "ranking": dm.ranking, "ranking_summary": sched.ranking_summary,
              "prompts": prompts, "angle_scores": angle_scores}
    if args.design == "miniature":  # the miniature's report reads per-prompt-free curves: keep its files as they were
        for v in result["val"]:
            v.pop("per_prompt", None)
    write_json_atomic(out, result, compact=args.design != "miniature")
    print(f"[study] wrote {out} in {wall:.0f} s", flush=True)


if __name__ == "__main__":
    main()
