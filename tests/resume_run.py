"""A tiny GRPO run that checkpoints every step and can die mid-run (SIGKILL or SIGTERM) or resume.

Run by tests/test_resume.py and tests/test_ddp.py in subprocesses (`--devices 2`: real DDP over gloo, which
re-launches this script once per rank). Each rank writes <out>/record<rank>.jsonl: one line per trained step
with the prompts drawn, the completions sampled, the rewards, advantages and loss, so an interrupted-and-resumed
run can be compared with a straight one rank by rank.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import torch

SAMPLED: list[str] = []  # this process's completions since the last record line
ADVANTAGES: list[dict] = []  # this process's compute_advantages calls since the last record line


def digit_reward(prompts, completions, **columns):
    """Share of digit characters: a reward the tiny random model's groups rarely tie on."""
    SAMPLED.extend(completions)
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def record_advantages() -> None:
    """Wrap the module's compute_advantages to record its inputs and outputs (the global-std check)."""
    import gainrl_pl.module as module

    real = module.compute_advantages

    def recording(rewards, *args, **kwargs):
        out = real(rewards, *args, **kwargs)
        ADVANTAGES.append({"rewards": rewards.tolist(), "advantages": out.tolist()})
        return out

    module.compute_advantages = recording


class Record(pl.Callback):
    def __init__(self, out: Path, die_after: int | None, sig: str, signal_rank: int | None) -> None:
        self.out, self.die_after, self.sig, self.signal_rank = out, die_after, sig, signal_rank

    def setup(self, trainer, pl_module, stage) -> None:
        self.path = self.out / f"record{trainer.global_rank}.jsonl"
        self.dies = self.die_after is not None and self.signal_rank in (None, trainer.global_rank)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        scheduler = next(c for c in trainer.callbacks if type(c).__name__ == "GainRLScheduler")
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": trainer.global_step, "indices": batch["index"].tolist(),
                                 "prompts": batch["prompt"], "completions": list(SAMPLED),
                                 "advantages": list(ADVANTAGES),
                                 "loss": float(trainer.callback_metrics["train/loss"]),
                                 "reward": float(trainer.callback_metrics["reward/total"]),
                                 "lr": float(trainer.callback_metrics["train/learning_rate"]),
                                 "weights": float(sum(p.double().sum() for p in pl_module.policy.parameters()
                                                      if p.requires_grad)),
                                 "mu": trainer.datamodule.sampler.mu,
                                 "ranking_summary": scheduler.ranking_summary}) + "\n")
        SAMPLED.clear()
        ADVANTAGES.clear()
        if self.dies and trainer.global_step == self.die_after and self.sig == "term":
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning finishes the hook chain, then we save and exit

    def on_validation_end(self, trainer, pl_module) -> None:
        SAMPLED.clear()  # the validation's completions (its reward calls) are not the next step's

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # SIGKILL right after the previous step's checkpoint was written: nothing gets to clean up
        if self.dies and trainer.global_step == self.die_after and self.sig == "kill":
            os.kill(os.getpid(), signal.SIGKILL)


class PerRankScoreCache(pl.Callback):
    """Gives each rank its own score-cache directory, as node-local caches on a multi-node run are."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def setup(self, trainer, pl_module, stage) -> None:
        scheduler = next(c for c in trainer.callbacks if type(c).__name__ == "GainRLScheduler")
        scheduler.use_cache, scheduler.cache_dir = True, str(self.root / f"rank{trainer.global_rank}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--die-after", type=int, default=None)
    p.add_argument("--signal", choices=["kill", "term"], default="kill")
    p.add_argument("--signal-rank", type=int, default=None, help="only this rank signals itself (default: every rank)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--lora", action="store_true")
    p.add_argument("--devices", type=int, default=1, help="> 1: DDP over gloo")
    p.add_argument("--scale-rewards", default="group")
    p.add_argument("--score-cache", default=None, help="a score-cache root with one directory per rank")
    p.add_argument("--val", type=int, default=0, help="> 0: validate on the first N rows after each round")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    from gainrl_pl.callbacks import GainRLCheckpoint, GainRLScheduler
    from gainrl_pl.datamodules import GainRLDataModule, ScheduleSettings

    from gainrl_pl.models import LoraSettings
    from gainrl_pl.module import GRPOModule

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record_advantages()
    pl.seed_everything(0)
    module = GRPOModule(model_name_or_path=args.model, num_generations=4, max_completion_length=6,
                        rewards=[digit_reward], learning_rate=1e-3, lr_schedule="cosine", warmup_steps=2,
                        scale_rewards=args.scale_rewards, lora=LoraSettings(r=4, alpha=8) if args.lora else None)
    dm = GainRLDataModule(train_data=args.data, preset="generic", prompt="none", tokenizer=args.model,
                          prompts_per_step=2, schedule=ScheduleSettings(name="angle", subset_size=6, sigma=0.5,
                                                                         step_size=0.2, max_shift=0.3),
                          val_data=args.data if args.val else None, val_limit=args.val or None, val_batch_size=1)
    ckpt = GainRLCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1, save_top_k=2)
    callbacks = [GainRLScheduler(use_cache=False), Record(out, args.die_after, args.signal, args.signal_rank), ckpt]
    if args.score_cache:
        callbacks.append(PerRankScoreCache(Path(args.score_cache)))
    ddp = dict(devices=args.devices, strategy="ddp") if args.devices > 1 else dict(devices=1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=args.steps, max_epochs=-1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         num_sanity_val_steps=0, default_root_dir=out, callbacks=callbacks, **ddp)
    trainer.fit(module, datamodule=dm, ckpt_path="last" if args.resume else None)
    (out / f"done{trainer.global_rank}.json").write_text(json.dumps({"global_step": trainer.global_step}))


if __name__ == "__main__":
    main()
