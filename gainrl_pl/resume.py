"""Resuming a run as a user launches it: `gainrl-pl fit --config C.yaml --ckpt_path last`.

Lightning gives every run a new logger version (`runs/demo/csv/version_N`) and keeps its checkpoints under
it, so Lightning's own `ckpt_path="last"` looks in the *new* run's empty directory, finds nothing and
trains from step 0 with a warning. Here `last` means the newest `last.ckpt` of any earlier run of this
config (the places `find_last_checkpoint` names), and a resumed run writes into that run's directories:
every logger is pinned to the version recorded in the checkpoint, CSV metrics continue in the same
`metrics.csv` (rows after the checkpoint are dropped; they are logged again), TensorBoard purges the
events after it, and new checkpoints go next to the old ones.

`ckpt_path` values the CLI understands:
    last            the newest last.ckpt of this config's runs; none found is an error naming where it looked
    last_or_fresh   the same, but start a new run when there is none (for job scripts that relaunch)
    PATH            a checkpoint file; its run's logs continue when they are this config's
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

LAST = "last"
LAST_OR_FRESH = "last_or_fresh"
RUN_RECORD_KEY = "gainrl_run"
"""Checkpoint key holding each logger's version and directory (written by GainRLCheckpoint)."""
_VERSION_DIR = re.compile(r"^version_(\d+)$")


class NothingToResumeError(FileNotFoundError):
    """`--ckpt_path last` found no checkpoint; the message names every place it looked."""


@dataclass(frozen=True)
class ResumePlan:
    """What a resumed run continues: the checkpoint file and the logger versions to write to."""

    checkpoint: str
    """The checkpoint file Lightning restores."""
    versions: dict[int, int | str]
    """Logger index -> version to pin (loggers not listed start a new version)."""
    notes: tuple[str, ...] = ()
    """Lines to print for the user (e.g. a logger whose logs start anew)."""


# ----------------------------------------------------------------------------------------------- where
def _version_dir_name(version: int | str) -> str:
    return version if isinstance(version, str) else f"version_{version}"


def _parse_version(name: str) -> int | str:
    match = _VERSION_DIR.match(name)
    return int(match.group(1)) if match else name


def _logger_base(trainer: pl.Trainer, logger) -> Path:
    """`<save_dir>/<name>`: the folder holding a logger's version directories (Lightning's layout)."""
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    return Path(save_dir) / str(logger.name or "")


def _search_places(trainer: pl.Trainer) -> list[tuple[Path, str]]:
    """(folder, glob pattern) pairs where runs of this trainer's config leave `last.ckpt`.

    A checkpoint callback with a fixed `dirpath` saves there; without one, Lightning saves under the first
    logger's run directory (`<save_dir>/<name>/<version>/checkpoints`), or `<default_root_dir>/checkpoints`
    when there is no logger.
    """
    places: list[tuple[Path, str]] = []
    callbacks = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)] or [ModelCheckpoint]
    for cb in callbacks:
        name = f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None:
            places.append((Path(cb.dirpath), name))
        elif trainer.loggers:
            places.append((_logger_base(trainer, trainer.loggers[0]), f"*/checkpoints/{name}"))
        else:
            places.append((Path(trainer.default_root_dir) / "checkpoints", name))
    return list(dict.fromkeys(places))


def checkpoint_search_places(trainer: pl.Trainer) -> list[str]:
    """Where `--ckpt_path last` looks, as glob patterns (for messages and docs)."""
    return [str(folder.resolve() / pattern) for folder, pattern in _search_places(trainer)]


def find_last_checkpoint(trainer: pl.Trainer) -> Path | None:
    """The most recently written `last.ckpt` in `checkpoint_search_places`, or None."""
    found = [p for folder, pattern in _search_places(trainer) for p in folder.glob(pattern) if p.is_file()]
    if not found:
        return None
    return max(found, key=lambda p: (p.stat().st_mtime_ns, str(p)))


# ----------------------------------------------------------------------------------------------- plan
def logger_record(trainer: pl.Trainer) -> list[dict[str, Any]]:
    """Each logger's class, version and directory, as a checkpoint stores them (`RUN_RECORD_KEY`)."""
    record = []
    for logger in trainer.loggers:
        version = getattr(logger, "version", None)
        if not isinstance(version, (int, str)):
            version = None
        record.append({"type": type(logger).__name__, "version": version,
                       "log_dir": None if version is None else _log_dir_with_version(trainer, logger, version)})
    return record


def _pinnable(logger) -> bool:
    # Lightning's file loggers (CSV, TensorBoard) choose their version lazily from `_version`.
    return hasattr(logger, "_version") and getattr(logger, "_experiment", None) is None


def _log_dir_with_version(trainer: pl.Trainer, logger, version: int | str) -> str:
    return os.path.realpath(_logger_base(trainer, logger) / _version_dir_name(version))


def _recorded_loggers(path: str) -> list[dict[str, Any]]:
    import torch

    # mmap: only the few metadata entries are read, not gigabytes of weights and optimizer state
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ValueError(f"ckpt_path={path!r} cannot be read as a Lightning checkpoint "
                         f"({type(err).__name__}: {err})") from err
    return list((checkpoint.get(RUN_RECORD_KEY) or {}).get("loggers") or [])


def plan_resume(trainer: pl.Trainer, checkpoint: str) -> ResumePlan:
    """Which logger versions a run resumed from `checkpoint` writes to.

    A logger is pinned to the version the checkpoint recorded for it when that version's directory is where
    this config's logger writes (same save_dir and name); a checkpoint without the record (an older one)
    pins the loggers whose layout its path matches. Any other logger starts a new version, said in `notes`.
    """
    record = _recorded_loggers(checkpoint)
    versions: dict[int, int | str] = {}
    notes: list[str] = []
    ckpt_run_dir = os.path.realpath(Path(checkpoint).parent.parent)
    for i, logger in enumerate(trainer.loggers):
        if not _pinnable(logger):
            notes.append(f"{type(logger).__name__} cannot be pointed at the earlier run; it logs as a new run")
            continue
        version = None
        if i < len(record) and record[i].get("version") is not None:
            candidate = record[i]["version"]
            if record[i].get("log_dir") == _log_dir_with_version(trainer, logger, candidate):
                version = candidate
        elif not record:  # an older checkpoint: trust the directory layout it sits in
            candidate = _parse_version(Path(ckpt_run_dir).name)
            if _log_dir_with_version(trainer, logger, candidate) == ckpt_run_dir or (
                    i > 0 and Path(_log_dir_with_version(trainer, logger, candidate)).is_dir()):
                version = candidate
        if version is None:
            notes.append(f"{type(logger).__name__}: the checkpoint's run did not log to "
                         f"{_logger_base(trainer, logger)}; this run logs to a new version there")
        else:
            versions[i] = version
    return ResumePlan(os.path.realpath(checkpoint), versions, tuple(notes))


def resolve_ckpt_path(trainer: pl.Trainer, ckpt_path: str | None) -> str | None:
    """`last` / `last_or_fresh` -> the newest last.ckpt of this config's runs; a path -> itself.

    Raises:
        NothingToResumeError: `last` and no checkpoint found (the message lists the places), or a path that
            does not exist.
    """
    if ckpt_path is None:
        return None
    if ckpt_path in (LAST, LAST_OR_FRESH):
        found = find_last_checkpoint(trainer)
        if found is not None:
            return str(found)
        if ckpt_path == LAST_OR_FRESH:
            return None
        places = "\n  ".join(str(p) for p in checkpoint_search_places(trainer))
        raise NothingToResumeError(
            f"--ckpt_path last: no checkpoint to resume from. Looked for:\n  {places}\n"
            "Start a new run by leaving out --ckpt_path, pass a checkpoint file (--ckpt_path PATH), or use "
            "--ckpt_path last_or_fresh to resume when there is a checkpoint and start fresh when there is none.")
    if "://" not in ckpt_path and ckpt_path not in ("best", "hpc", "registry") and not Path(ckpt_path).is_file():
        raise NothingToResumeError(f"--ckpt_path {ckpt_path}: no such checkpoint file "
                                   f"(absolute: {Path(ckpt_path).resolve()})")
    return ckpt_path


def apply_resume(trainer: pl.Trainer, plan: ResumePlan) -> None:
    """Point the loggers at the earlier run's versions and make them continue its files.

    Lightning's CSVLogger deletes an existing `metrics.csv` when it starts: a pinned one is replaced by a
    `ContinuedCSVLogger`, which keeps it. Rows and events logged after the checkpoint are logged again by this
    run, so `ContinueLogs` drops them once the restored loop knows its first logging step. Nothing is written
    here: loggers create their files lazily, on global rank 0.
    """
    loggers = list(trainer.loggers)
    for index, version in plan.versions.items():
        logger = loggers[index]
        if type(logger) is CSVLogger:
            loggers[index] = ContinuedCSVLogger(logger.save_dir, name=logger.name, version=version,
                                                prefix=logger._prefix,
                                                flush_logs_every_n_steps=logger._flush_logs_every_n_steps)
        else:
            logger._version = version
    trainer.loggers = loggers
    # The accuracy before training is already in the run's logs; a resumed run does not measure it again.
    trainer.num_sanity_val_steps = 0
    trainer.callbacks.append(ContinueLogs())


# ----------------------------------------------------------------------------------------------- logs
class ContinuedCSVLogger(CSVLogger):
    """Lightning's CSVLogger, but an existing `metrics.csv` of its version is kept and appended to.

    (arguments: see lightning's CSVLogger)
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedCSVWriter(self.log_dir)
        return self._experiment


class ContinueLogs(Callback):
    """On the first batch of a resumed run, drop what the earlier run logged after the checkpoint.

    That is the rows of `metrics.csv` and TensorBoard events at or after the first logging step of this run,
    and the rows of `completions.jsonl` of later optimizer steps: this run logs those steps again. The first
    logging step is read from the restored loop only at the first batch, because Lightning adjusts it when
    the training epoch starts.
    """

    def __init__(self) -> None:
        self.done = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.done:
            return
        self.done = True
        if not trainer.is_global_zero:
            return
        first_step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning's loggers write next
        for logger in trainer.loggers:
            experiment = logger.experiment
            if isinstance(experiment, _ContinuedCSVWriter):
                experiment.drop_rows_from(first_step)
            elif isinstance(logger, TensorBoardLogger) and hasattr(experiment, "_get_file_writer"):
                _purge_tensorboard_from(experiment, first_step)
        log_dir = getattr(trainer.logger, "log_dir", None)
        if log_dir:
            _drop_completions_after(Path(log_dir) / "completions.jsonl", trainer.global_step)


def _purge_tensorboard_from(writer, step: int) -> None:
    """What SummaryWriter(purge_step=step) writes: TensorBoard then hides earlier files' events from `step` on."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    writer._get_file_writer().add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
    writer.flush()


def _drop_completions_after(path: Path, global_step: int) -> None:
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _completion_step(line) <= global_step]
    if len(kept) != len(lines):
        path.write_text("".join(kept), encoding="utf-8")


def _completion_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0.0


class _ContinuedCSVWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing `metrics.csv` is kept (and its columns carried on)."""

    def _check_log_dir_exists(self) -> None:  # Lightning's writer deletes metrics.csv here
        header, _ = self._read()
        self.metrics_keys = header

    def _read(self) -> tuple[list[str], list[dict[str, str]]]:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return [], []
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            return sorted(reader.fieldnames or []), list(reader)  # Lightning keeps its columns sorted

    def drop_rows_from(self, step: int) -> None:
        """Remove the rows logged at `step` or later from the file (and from the rows not yet written)."""
        self.metrics = [row for row in self.metrics if _step_of(row) < step]
        header, rows = self._read()
        if not header:
            return
        with open(self.metrics_file_path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header)
            writer.writeheader()
            writer.writerows(row for row in rows if _step_of(row) < step)


def _step_of(row: dict) -> float:
    try:
        return float(row.get("step") or 0)
    except (TypeError, ValueError):
        return 0.0
