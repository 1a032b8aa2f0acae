"""A tiny GRPO run that checkpoints every step and can die mid-run (SIGKILL or SIGTERM) or resume.

Run by tests/test_resume.py in subprocesses. Writes <out>/record.jsonl: one line per trained step with the
prompt indices drawn and the loss, so an interrupted-and-resumed run can be compared with a straight one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import torch


def digit_reward(prompts, completions, **columns):
    """Share of digit characters: a reward the tiny random model's groups rarely tie on."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


class Record(pl.Callback):
    def __init__(self, path: Path, die_after: int | None, sig: str) -> None:
        self.path, self.die_after, self.sig = path, die_after, sig

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": trainer.global_step, "indices": batch["index"].tolist(),
                                 "loss": float(trainer.callback_metrics["train/loss"]),
                                 "reward": float(trainer.callback_metrics["reward/total"]),
                                 "lr": float(trainer.callback_metrics["train/learning_rate"]),
                                 "weights": float(sum(p.double().sum() for p in pl_module.policy.parameters()
                                                      if p.requires_grad)),
                                 "mu": trainer.datamodule.sampler.mu}) + "\n")
        if self.die_after is not None and trainer.global_step == self.die_after and self.sig == "term":
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning finishes the hook chain, then we save and exit

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # SIGKILL right after the previous step's checkpoint was written: nothing gets to clean up
        if self.die_after is not None and trainer.global_step == self.die_after and self.sig == "kill":
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--die-after", type=int, default=None)
    p.add_argument("--signal", choices=["kill", "term"], default="kill")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--lora", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    from gainrl_pl.callbacks import GainRLCheckpoint, GainRLScheduler
    from gainrl_pl.datamodules import GainRLDataModule, ScheduleSettings

    from gainrl_pl.model_setup import LoraSettings
    from gainrl_pl.module import GRPOModule

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0)
    module = GRPOModule(model_name_or_path=args.model, num_generations=4, max_completion_length=6,
                        rewards=[digit_reward], learning_rate=1e-3, lr_schedule="cosine", warmup_steps=2,
                        lora=LoraSettings(r=4, alpha=8) if args.lora else None)
    dm = GainRLDataModule(train_data=args.data, preset="generic", prompt="none", tokenizer=args.model,
                          prompts_per_step=2, schedule=ScheduleSettings(name="angle", subset_size=6, sigma=0.5,
                                                                         step_size=0.2, max_shift=0.3))
    ckpt = GainRLCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1, save_top_k=2)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, max_epochs=-1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         num_sanity_val_steps=0, default_root_dir=out,
                         callbacks=[GainRLScheduler(use_cache=False), Record(out / "record.jsonl", args.die_after,
                                                                             args.signal), ckpt])
    trainer.fit(module, datamodule=dm, ckpt_path="last" if args.resume else None)
    (out / "done.json").write_text(json.dumps({"global_step": trainer.global_step}))


if __name__ == "__main__":
    main()
