"""Checkpoints that lose nothing: the HF adapter beside each one, the last k kept, a save on SIGTERM.

Lightning already writes local checkpoints atomically (an fsspec transaction: a temporary file renamed
on commit), so a crash mid-save leaves the previous checkpoint loadable; tests/test_resume.py checks it.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

from gainrl_pl.resume import RUN_RECORD_KEY, logger_record
from gainrl_pl.rng_state import CHECKPOINT_KEY as RNG_CHECKPOINT_KEY
from gainrl_pl.rng_state import collect_rng_states, collect_rng_states_of_all_ranks


def hf_dir_for(checkpoint_path: str | Path) -> Path:
    """Where the Hugging Face adapter/model of a checkpoint lives: `<name>.ckpt` -> `<name>.hf/`."""
    path = Path(checkpoint_path)
    return path.with_suffix(".hf")


class GainRLCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also saves the LoRA adapter (or full model) in Hugging Face format beside each
    checkpoint, keeps the last `save_top_k` by step, and saves `last.ckpt` when SIGTERM arrives.

    Args:
        save_hf: Write `<checkpoint>.hf/` (peft adapter or full model + tokenizer) beside each checkpoint.
        every_n_train_steps: Save every N optimizer steps.
        save_top_k: How many step checkpoints to keep (the newest); -1 keeps all.
        dirpath: Directory for the checkpoints; `null` = `<logger save_dir>/<name>/<version>/checkpoints` of the
            run (Lightning's default), where `--ckpt_path last` finds them.
        enable_version_counter: Add `-v1`, `-v2` to a name that exists instead of replacing the file; off, so
            `last.ckpt` is always the newest.
        save_before_validation: When a save and a validation fall on the same step, write `last.ckpt` again as
            the validation starts, marked to be validated again, and once more when it ends. A run killed
            without warning (SIGKILL, OOM killer, a lost node) during that validation then validates the step
            again on resume; otherwise the resume counts it as done and its metrics are never logged. Costs two
            extra writes of `last.ckpt` (not of the Hugging Face copy) at such steps only.
        (other arguments: see lightning's ModelCheckpoint)
    """

    def __init__(self, *args, save_hf: bool = True, every_n_train_steps: int | None = 50, save_top_k: int = 2,
                 save_last: bool | None = True, monitor: str | None = "step", mode: str = "max",
                 filename: str | None = "step{step:06d}", auto_insert_metric_name: bool = False,
                 enable_version_counter: bool = False, save_before_validation: bool = True, **kwargs) -> None:
        super().__init__(*args, every_n_train_steps=every_n_train_steps, save_top_k=save_top_k, save_last=save_last,
                         monitor=monitor, mode=mode, filename=filename, auto_insert_metric_name=auto_insert_metric_name,
                         enable_version_counter=enable_version_counter, **kwargs)
        self.save_hf = save_hf
        self.save_before_validation = save_before_validation
        self._sigterm_received = False  # this rank's; acted on only once every rank agrees (on_train_batch_end)
        self._user_sigterm_handler = None
        # The checkpoint of the batch end that a validation follows, built (not written) as it starts; this
        # rank's RNG states at the last batch end (the validation's DataLoader draws a seed before it starts)
        self._pre_validation: dict[str, Any] | None = None
        self._batch_end_rng: dict[str, Any] | None = None
        self._save_after_validation = False
        self._saved_at_batch_end: int | None = None  # the global step whose batch end wrote last.ckpt
        self._rewrite_after_validation = False
        self._marked_written = False  # last.ckpt was rewritten, marked, as this validation started
        self._resumed_mid_validation = False  # restored from a checkpoint marked to validate again

    @property
    def _last_path(self) -> str:
        return os.path.join(self.dirpath, f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")

    def _save_last(self, trainer: pl.Trainer, *, hf: bool = True) -> None:
        path = self.last_model_path = self._last_path  # recorded in the checkpoint: a resumed run replaces it
        super()._save_checkpoint(trainer, path)
        if hf:
            self._save_hf(trainer, path)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._save_hf(trainer, filepath)

    def _save_hf(self, trainer: pl.Trainer, filepath: str) -> None:
        if self.save_hf and trainer.is_global_zero and hasattr(trainer.lightning_module, "save_hf"):
            target = hf_dir_for(filepath)
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".hf-"))
            try:
                trainer.lightning_module.save_hf(str(tmp))
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            shutil.rmtree(hf_dir_for(filepath), ignore_errors=True)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # which logger versions this run writes to: `--ckpt_path` continues them (gainrl_pl.resume)
        checkpoint[RUN_RECORD_KEY] = {"loggers": logger_record(trainer)}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with warnings.catch_warnings():
            # With manual optimization Lightning warns that a batch-end checkpoint holds the weights after the
            # optimizer step, with a code sample for saving the state before it. After the step is what a
            # resume needs (the next step starts from it), so the warning asks for the wrong thing here.
            warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization",
                                    category=UserWarning)
            saved_before = self._last_global_step_saved
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Lightning stops after this batch (SIGTERMException); save first so the run can resume. A validation due
        # after this batch still starts (and is cut after its first batch): its first batch then saves again,
        # marked to be validated again (on_validation_batch_end), since this checkpoint, of an epoch's last
        # batch, would resume past that validation (Lightning counts the epoch as finished).
        if self._sigterm_agreed(trainer) and self.dirpath is not None:  # a collective: every rank, every batch
            self._save_last(trainer)
        # The final step is saved here, at its batch end like every other: saved in on_train_end, the checkpoint
        # would count the unfinished round as a finished epoch, and a run resumed from it would run one epoch
        # ahead of an uninterrupted one (validating after other steps).
        elif (self.dirpath is not None and 0 < trainer.max_steps <= trainer.global_step
              and self._last_global_step_saved != trainer.global_step):
            self._save_last(trainer)
        self._saved_at_batch_end = (trainer.global_step if self._last_global_step_saved == trainer.global_step
                                    != saved_before else None)
        self._batch_end_rng = collect_rng_states()  # copies, a few kB: what a save here would have held

    # ----------------------------------------------------------------- SIGTERM during a validation in fit
    # A long validation (hundreds of prompts) can outlast a scheduler's grace period between SIGTERM and SIGKILL.
    # The checkpoint for it is built as the validation starts (no training happens until it ends, so it holds
    # references, not copies) and written only if SIGTERM arrives: it is the state Lightning saves when a
    # validation step fails, which its loops resume by running that whole validation again. Lightning then
    # stops after the current validation batch.
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if (batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking or self.dirpath is None
                or trainer.state.fn != TrainerFn.FITTING):
            return
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(self.save_weights_only)  # a collective
        if RNG_CHECKPOINT_KEY in checkpoint and self._batch_end_rng is not None:
            # the resumed run draws the validation's DataLoader seed again, from the batch end's state
            checkpoint[RNG_CHECKPOINT_KEY] = collect_rng_states_of_all_ranks(self._batch_end_rng)
        if "loops" in checkpoint:
            # as if inside the first validation step (Lightning counts a batch started just after this hook):
            # the resumed run sees "restarted mid-evaluation" and validates from the first batch
            progress = checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]
            for counts in (progress["total"], progress["current"]):
                counts["started"] = counts["ready"]
        self._pre_validation = checkpoint
        if self.save_before_validation and self.save_last and self._saved_at_batch_end == trainer.global_step:
            # the batch end's last.ckpt would resume past this validation: replace it with the marked state
            self._write_pre_validation(trainer)
            self._rewrite_after_validation = self._marked_written = True

    def _write_pre_validation(self, trainer: pl.Trainer) -> str:
        path = self.last_model_path = self._last_path
        trainer.strategy.barrier("GainRLCheckpoint.pre_validation")
        trainer.strategy.save_checkpoint(self._pre_validation, path)
        trainer.strategy.barrier("GainRLCheckpoint.pre_validation")
        return path

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._pre_validation is None:
            return
        if self._sigterm_agreed(trainer):  # a collective: every rank runs the same validation batches
            if batch_idx + 1 >= trainer.num_val_batches[dataloader_idx]:
                # The last batch: Lightning finishes this validation (its metrics are logged) before it stops,
                # so the checkpoint is taken after it, as ModelCheckpoint would, and the resume does not repeat it
                self._pre_validation = None
                self._save_after_validation = True
                return
            if self._marked_written:  # written as this validation started; the weights are unchanged
                path = self._last_path
            else:
                path = self._write_pre_validation(trainer)
                self._save_hf(trainer, path)
            self._pre_validation = None
            self._rewrite_after_validation = False  # the marked checkpoint is the one to resume from
            if trainer.is_global_zero:
                print(f"[gainrl] SIGTERM during validation: saved step {trainer.global_step} as it was before this "
                      f"validation to {path}; resuming validates it again", flush=True)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # a fit that raised mid-validation on this trainer leaves nothing pending (runs before a checkpoint loads)
        self._pre_validation, self._save_after_validation, self._saved_at_batch_end = None, False, None
        self._rewrite_after_validation = self._marked_written = self._resumed_mid_validation = False

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # Resumed from a checkpoint marked to validate again: once that validation has run, last.ckpt is
        # rewritten as after it, or a second crash before the next save would repeat it (and log it twice)
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.val_loop.batch_progress")
        if progress:
            total = progress["total"]
            self._resumed_mid_validation = (total["started"] == total["ready"]
                                            and total["processed"] == total["started"] - 1)
            self._rewrite_after_validation = (self._resumed_mid_validation and bool(self.save_last)
                                              and self.dirpath is not None)

    def on_validation_end(self, trainer, pl_module) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        if fitting and self._resumed_mid_validation:
            # The marked checkpoint's one "started" batch outlives the validation it made Lightning run again
            # (its totals keep it: started = processed + 1), so any checkpoint taken from here on would also read
            # as mid-validation and be validated yet again: drop it now that the validation has finished
            total = trainer.fit_loop.epoch_loop.val_loop.batch_progress.total
            total.ready = total.started = total.processed
            self._resumed_mid_validation = False
        super().on_validation_end(trainer, pl_module)
        self._pre_validation = None
        if not fitting:
            return
        if self._rewrite_after_validation and not self._save_after_validation:
            # finished: a resume from here must not validate this step again (weights unchanged: no new HF copy)
            self._save_last(trainer, hf=False)
        self._rewrite_after_validation = self._marked_written = False
        if self._save_after_validation:
            self._save_after_validation = False
            self._save_last(trainer)
            if trainer.is_global_zero:
                print(f"[gainrl] SIGTERM during validation: saved step {trainer.global_step} after its last batch to "
                      f"{self.last_model_path}", flush=True)

    # ----------------------------------------------------------------- SIGTERM under DDP
    # A checkpoint save is collective (the RNG states are gathered, Lightning's barrier follows), so every rank
    # must decide to save at the same batch, whichever rank the signal reached and whenever. Lightning 2.6's own
    # SIGTERM handler broadcasts from inside the signal handler, a collective the other ranks are not in (it
    # pairs with whatever they run next, or hangs); while training it is replaced by a handler that only takes
    # note, and the ranks agree at each batch end with one all-reduce of that note.
    def on_fit_start(self, trainer, pl_module) -> None:
        super().on_fit_start(trainer, pl_module)
        self._sigterm_received = False
        self._user_sigterm_handler = signal.getsignal(signal.SIGTERM)  # Lightning installs its handler after this

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        super().on_sanity_check_start(trainer, pl_module)
        self._take_over_sigterm()

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._take_over_sigterm()

    def _take_over_sigterm(self) -> None:
        if threading.current_thread() is threading.main_thread():  # Lightning's handler is restored at teardown
            signal.signal(signal.SIGTERM, self._note_sigterm)

    def _note_sigterm(self, signum, frame) -> None:
        self._sigterm_received = True
        if callable(self._user_sigterm_handler):
            self._user_sigterm_handler(signum, frame)

    def _sigterm_agreed(self, trainer: pl.Trainer) -> bool:
        """Whether any rank received SIGTERM; every rank calls this at every batch end and gets the same answer."""
        received = trainer.strategy.reduce_boolean_decision(self._sigterm_received or trainer.received_sigterm,
                                                            all=False)
        if received:  # Lightning then stops every rank after this batch, as it would on its own SIGTERM
            trainer._signal_connector.received_sigterm = True
        return received

    def on_train_end(self, trainer, pl_module) -> None:
        # ModelCheckpoint saves only on its schedule: make sure the final weights are kept too
        if self.dirpath is not None and self._last_global_step_saved != trainer.global_step:
            self._save_last(trainer)
        if trainer.is_global_zero and self.dirpath is not None:
            last = self._last_path
            print(f"[gainrl] checkpoint: {last}")
            if self.save_hf:
                print(f"[gainrl] Hugging Face model/adapter: {hf_dir_for(last)}")

