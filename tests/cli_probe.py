"""Pieces the CLI subprocess tests plug into `gainrl-pl` by dotted path (the tests put this folder on PYTHONPATH).

    --model.reward_funcs '[cli_probe.digit_reward]'  --trainer.callbacks+=cli_probe.StepRecord

`StepRecord` appends one JSON line per trained step to the file named by $GAINRL_STEP_RECORD.
"""

from __future__ import annotations

import json
import os
import re

import lightning.pytorch as pl


def digit_reward(prompts, completions, **columns):
    """Share of digit characters: a reward the tiny random model's groups rarely tie on (so every step learns)."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


class StepRecord(pl.Callback):
    """Per trained step: the prompts drawn, loss, reward, learning rate, a weight checksum and mu."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        row = {"step": trainer.global_step, "indices": batch["index"].tolist(),
               "loss": float(metrics["train/loss"]), "reward": float(metrics["reward/total"]),
               "lr": float(metrics["train/learning_rate"]),
               "weights": float(sum(p.detach().double().sum() for p in pl_module.policy.parameters()
                                          if p.requires_grad)),
               "mu": float(trainer.datamodule.sampler.mu), "precision": str(trainer.precision),
               "device": str(pl_module.device),
               "trained_dtype": str(next(p.dtype for p in pl_module.policy.parameters() if p.requires_grad))}
        with open(os.environ["GAINRL_STEP_RECORD"], "a") as fh:
            fh.write(json.dumps(row) + "\n")


# Messages that reached the demo's console before they were settled (tests/test_console.py, test_resume.py).
SETTLED = ("Using ModelCheckpoint with manual optimization", "Trying to infer the `batch_size`",
           "LeafSpec", "Tip: For seamless cloud", "Failed to load CPU gemm_4bit_forward",
           "args parameter is intended to run from within Python", "is not supported by the model summary",
           "module(s) in eval mode", "exists and is not empty", "dataloader is not resumable",
           "no last checkpoint available", "Previous log files in this directory will be deleted")
PYTHON_WARNING = re.compile(r"^\S+\.py:\d+: ", re.MULTILINE)  # how warnings.warn prints: file.py:LINE: message


def console_problems(text: str) -> list[str]:
    """The warning lines and settled messages in a run's console output (empty = clean)."""
    found = [m.group(0) + text[m.end():].split("\n", 1)[0][:160] for m in PYTHON_WARNING.finditer(text)]
    return found + [s for s in SETTLED if s in text]


class SigtermDuringValidation(pl.Callback):
    """Sends this process SIGTERM at the end of validation batch $GAINRL_SIGTERM_VAL_BATCH (default 0) after step
    $GAINRL_SIGTERM_VAL_STEP (a scheduler preempting a run in the middle of a long validation); with
    GAINRL_SIGTERM_VAL_BATCH=train, at the end of that step's training batch, before its validation; with `next`,
    as the next training batch starts, after it. GAINRL_SIGTERM_VAL_SIGNAL=KILL sends SIGKILL instead (no grace)."""

    def __init__(self) -> None:
        self.sent = False

    def _send(self) -> None:
        import signal

        self.sent = True
        os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("GAINRL_SIGTERM_VAL_SIGNAL", "TERM")))

    def _at_step(self, trainer, where: str) -> bool:
        return (not self.sent and not trainer.sanity_checking
                and trainer.global_step == int(os.environ["GAINRL_SIGTERM_VAL_STEP"])
                and os.environ.get("GAINRL_SIGTERM_VAL_BATCH", "0") == where)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._at_step(trainer, "train"):
            self._send()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._at_step(trainer, "next"):
            self._send()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._at_step(trainer, str(batch_idx)):
            self._send()

