"""Run ONE arm and seed of the miniature GAIN-RL study and write its metrics to JSON.

    .venv/bin/python experiments/run_ab.py --arm gainrl --seed 0              # CPU, SmolLM2-135M, arithmetic
    .venv/bin/python experiments/run_ab.py --arm uniform --seed 0 --scale gpu # paper config on GSM8K
    .venv/bin/python experiments/run_ab.py --arm gainrl --seed 0 -- --trainer.max_steps 4   # extra CLI overrides

An arm is nothing but a list of `gainrl-pl fit` CLI overrides on top of one base config (ARMS below), so
every arm sees the same data, the same compute per step and the same validation prompts. The run goes
through `gainrl_pl.cli.run_lightning_cli(..., run=False)` rather than the console script because the
per-prompt "first solved" step needs the rollout report that the GAIN-RL scheduler callback consumes and
clears in its own `on_train_batch_end`: our recorder is inserted at the *front* of the trainer's callbacks
so it reads the report first.

Output: `experiments/results/<arm>_seed<k>.json` (or `--out`), with validation accuracy per step (step 0 =
the baseline before training, from num_sanity_val_steps=-1), train reward per step, the scheduler's per-round
history (mu, both update terms, drawn ranks), and per training prompt its first-solved step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Before torch loads: spinning OpenMP workers make 2-thread torch up to 13x slower while another process
# holds a core of this shared 2-core machine (BENCHMARKS.md section 1). Passive waiting costs nothing alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Arms: CLI overrides on the base config. `difficulty_field level` is the arithmetic set's difficulty rank
# (data/arithmetic/README.md); on GSM8K (gpu scale) there is no such column: point --data.train_data at a
# set that has one (e.g. MATH) for those two arms.
ARMS: dict[str, list[str]] = {
    "gainrl": ["--data.schedule.name", "angle"],
    # the investigation of issue 7: a mid-depth layer ranks this set's easy families first (angle_layers.py)
    "gainrl_layer8": ["--data.schedule.name", "angle", "--scheduler.layer", "8"],  # the ranking's and signal's layer
    "uniform": ["--data.schedule.name", "uniform"],
    "length": ["--data.schedule.name", "length"],
    "accuracy_curriculum": ["--data.schedule.name", "accuracy_curriculum", "--data.schedule.difficulty_field", "level"],
    "gainrl_half": ["--data.schedule.name", "angle", "--data.train_fraction", "0.5"],
    "adarft": ["--data.schedule.name", "adarft", "--data.schedule.difficulty_field", "level"],
    # DAPO dynamic sampling: only usable once GRPOModule has the flag (checked at run time below)
    "uniform_filter": ["--data.schedule.name", "uniform", "--model.dynamic_sampling", "true"],
}


def cpu_config(run_dir: Path) -> dict:
    """configs/demo.yaml (frozen copy) shrunk so one run costs minutes on 2 CPU cores.

    12 optimizer steps of 4 prompts x G=4; a round (the paper's epoch) = 8 prompts = 2 steps, so mu gets 6
    updates; validation (greedy, the fixed first 24 rows of demo_val) every 2 rounds = steps 0, 4, 8, 12.
    sigma / step_size / max_shift stay fractions of N as in demo.yaml (the paper's 1000 / 500 / 1000 ranks
    are for GSM8K's N = 7473 and would make the Gaussian flat over 192 prompts).
    """
    # A frozen copy of configs/demo.yaml: the demo config keeps evolving, the study's base must not.
    cfg = yaml.safe_load((ROOT / "experiments/configs/demo_base.yaml").read_text())
    cfg["trainer"].update(max_steps=12, check_val_every_n_epoch=2, default_root_dir=str(run_dir),
                          logger=[{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": str(run_dir), "name": "csv"}}])
    cfg["model"].update(max_completion_length=48, val_max_completion_length=64, log_completions_every_n_steps=4)
    cfg["data"].update(prompts_per_step=4, val_limit=24, val_batch_size=24)
    cfg["data"]["schedule"].update(subset_size=8)
    # no step checkpoints: they cost time and the study only needs metrics
    cfg["checkpoint"] = {"every_n_train_steps": 100000, "save_last": False, "save_hf": False}
    return cfg


def gpu_config(run_dir: Path) -> dict:
    """The paper's GSM8K config (configs/gsm8k_qwen05b_paper.yaml), with a logger and a bounded length."""
    cfg = yaml.safe_load((ROOT / "configs/gsm8k_qwen05b_paper.yaml").read_text())
    cfg["trainer"].update(max_steps=400, default_root_dir=str(run_dir),
                          logger=[{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": str(run_dir), "name": "csv"}}],
                          num_sanity_val_steps=-1)
    cfg["data"].update(val_limit=500)
    cfg["checkpoint"] = {"every_n_train_steps": 100000, "save_last": False, "save_hf": False}
    return cfg


def make_recorder():
    """A callback that records what the study needs; built lazily so `--help` does not import Lightning."""
    import lightning.pytorch as pl

    class StudyRecorder(pl.Callback):
        """Val accuracy per step, train reward per step, and each prompt's first step with a correct completion.

        Must run before GainRLScheduler, which sets `pl_module.last_rollout_report = None` once read.
        """

        def __init__(self) -> None:
            self.val: list[dict] = []
            self.train: list[dict] = []
            self.first_solved: dict[int, int] = {}
            self.times_drawn: dict[int, int] = {}
            self.t0 = time.time()

        # Not on_validation_epoch_end: callbacks' epoch-end hooks run before the module's, which is where
        # val/accuracy is logged, so they would read the previous validation's value.
        def on_sanity_check_end(self, trainer, pl_module) -> None:
            # Lightning drops sanity-check metrics; the module keeps that pass (the untrained baseline) aside.
            acc = getattr(pl_module, "val_accuracy_at_start", None)
            if acc is not None:
                self._add_val(0, float(acc))

        def on_validation_end(self, trainer, pl_module) -> None:
            acc = trainer.callback_metrics.get("val/accuracy")
            if acc is not None and not trainer.sanity_checking:
                self._add_val(trainer.global_step, float(acc))

        def _add_val(self, step: int, acc: float) -> None:
            self.val.append({"step": step, "accuracy": acc, "elapsed_s": time.time() - self.t0})
            print(f"[study] step {step} val/accuracy {acc:.4f}", flush=True)

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
            self.train.append({"step": step, "reward": sum(acc) / max(len(acc), 1), "indices": idx,
                               "per_prompt_accuracy": acc, "elapsed_s": time.time() - self.t0})

    return StudyRecorder()


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


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", required=True, choices=sorted(ARMS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("GAINRL_STUDY_THREADS", "2")),
                    help="torch CPU threads (default: $GAINRL_STUDY_THREADS or 2). Keep it the same for every run "
                    "of a study: on this CPU 1-thread bf16 greedy decoding differed enough from 2-thread to move "
                    "the step-0 validation accuracy from 0.458 to 0.250")
    ap.add_argument("--out", default=None, help="result JSON (default experiments/results/<arm>_seed<k>.json)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.arm == "uniform_filter":
        import inspect

        from gainrl_pl.module import GRPOModule
        if "dynamic_sampling" not in inspect.signature(GRPOModule.__init__).parameters:
            sys.exit("uniform_filter needs GRPOModule(dynamic_sampling=...), which this checkout lacks")

    name = f"{args.arm}_seed{args.seed}" + ("" if args.scale == "cpu" else "_gpu")
    run_dir = ROOT / "runs" / "study" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = (cpu_config if args.scale == "cpu" else gpu_config)(run_dir)
    cfg_path = run_dir / "base_config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cli_args = ["--config", str(cfg_path), "--seed_everything", str(args.seed),
                "--data.schedule.seed", str(args.seed), *ARMS[args.arm], *extra]
    print("[study] gainrl-pl fit " + " ".join(cli_args), flush=True)

    from gainrl_pl.callbacks import GainRLScheduler

    from gainrl_pl.cli import run_lightning_cli

    t0 = time.time()
    cli = run_lightning_cli(cli_args, run=False)
    recorder = make_recorder()
    cli.trainer.callbacks.insert(0, recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    wall = time.time() - t0

    sched = next(c for c in cli.trainer.callbacks if isinstance(c, GainRLScheduler))
    dm = cli.datamodule
    prompts = []
    for pos, item in enumerate(dm.train_set):
        prompts.append({"position": pos, "row": int(item["index"]), "question": item["question"],
                        "question_tokens": int(item["question_tokens"]),
                        "level": item["columns"].get("level"), "family": item["columns"].get("family"),
                        "angle_score": None if sched.scores is None else sched.scores[pos],
                        "times_drawn": recorder.times_drawn.get(pos, 0),
                        "first_solved_step": recorder.first_solved.get(pos)})
    result = {"arm": args.arm, "seed": args.seed, "scale": args.scale, "cli_args": cli_args,
              "command": f".venv/bin/python experiments/run_ab.py --arm {args.arm} --seed {args.seed} --scale {args.scale}",
              "threads": args.threads, "wall_s": wall, "max_steps": cli.trainer.max_steps, "global_step": cli.trainer.global_step,
              "num_train_prompts": len(dm.train_set), "num_val_prompts": len(dm.val_set or []),
              "val": recorder.val, "val_from_csv": val_from_csv(run_dir), "train": recorder.train, "schedule_history": sched.history,
              "ranking": dm.ranking, "ranking_summary": sched.ranking_summary, "prompts": prompts}
    out = Path(args.out) if args.out else ROOT / "experiments" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    print(f"[study] wrote {out} in {wall:.0f} s", flush=True)


if __name__ == "__main__":
    main()
