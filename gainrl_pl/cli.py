"""`gainrl-pl`: LightningCLI for `fit | validate | test`, plus the `angles`, `evaluate` and `export` tools.

    gainrl-pl fit --config configs/demo.yaml           # train (every option: gainrl-pl fit --help)
    gainrl-pl fit --config configs/demo.yaml --print_config
    gainrl-pl fit --config configs/demo.yaml --ckpt_path last    # continue the last run where it stopped
    gainrl-pl angles --data openai/gsm8k:main:train --preset gsm8k --output scores.jsonl

--ckpt_path: `last` = the newest last.ckpt of this config's runs (an error naming where it looked when there
is none); `last_or_fresh` = the same, or a new run when there is none; or a checkpoint file. A resumed run
logs into the run it continues (same version directories).
"""

from __future__ import annotations

import os
import sys
import warnings

TOOLS = {
    "angles": "gainrl_pl.schedules.angles_cli",
    "evaluate": "gainrl_pl.evaluation.evaluate",
    "export": "gainrl_pl.evaluation.export",
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `gainrl-pl` console script."""
    # Torch's OpenMP workers spin while they wait; on a CPU shared with other processes that made 2-thread
    # forwards up to 13x slower (BENCHMARKS.md section 1). Must be set before torch loads; a user's value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from gainrl_pl.console import quiet_library_noise

    quiet_library_noise()
    from_command_line = argv is None
    argv = resolve_config_paths(list(sys.argv[1:] if argv is None else argv))
    if from_command_line:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself
    if argv and argv[0] in TOOLS:
        import importlib

        importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
    from gainrl_pl.resume import NothingToResumeError

    try:
        run_lightning_cli(argv)
    except NothingToResumeError as err:
        print(f"gainrl-pl: error: {err}", file=sys.stderr)
        sys.exit(2)


def resolve_config_paths(argv: list[str]) -> list[str]:
    """`--config configs/demo.yaml` from any directory: a `--config` (`-c`) path that does not exist from the CWD is
    looked up in the repository, then among the configs a wheel install ships (`shipped_file`); anything else
    (an existing file, inline YAML, a path found nowhere, which jsonargparse then reports) is left as it is."""
    from pathlib import Path

    from gainrl_pl.data.loading import shipped_file

    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            at, value, prefix = i + 1, out[i + 1], ""
        elif arg.startswith("--config="):
            at, value, prefix = i, arg.split("=", 1)[1], "--config="
        else:
            continue
        if "\n" in value or Path(value).expanduser().exists():
            continue
        found = shipped_file(value)
        if found is not None and found.is_file():
            out[at] = prefix + str(found)
    return out


def run_lightning_cli(argv: list[str], run: bool = True):
    """Build (and by default run) the LightningCLI over GRPOModule, GainRLDataModule and the scheduler."""
    # Every class documents its options in an `Args:` section, settings dataclasses included: jsonargparse's
    # attribute docstrings (a field's docstring below it) are left off, as they read the source of every class of
    # every subcommand (Trainer, loggers, ...) and tripled the time to build the parser (2.1 s -> 0.6 s a launch).
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from gainrl_pl import resume
    from gainrl_pl.callbacks import GainRLCheckpoint, GainRLScheduler
    from gainrl_pl.console import name_steps_in_progress_bar, quiet_resume_warnings
    from gainrl_pl.datamodules import GainRLDataModule
    from gainrl_pl.module import GRPOModule

    class GainRLCLI(LightningCLI):
        def _resolve_checkpoint(self) -> None:
            """`--ckpt_path last` -> this config's newest last.ckpt; a fit continues that run's logs."""
            config = self.config_init[self.subcommand]
            requested = config.get("ckpt_path")
            path = resume.resolve_ckpt_path(self.trainer, requested)
            config["ckpt_path"] = path
            if path is None:
                if requested == resume.LAST_OR_FRESH:
                    then = "starting a new run" if self.subcommand == "fit" else "using the model as configured"
                    print(f"[gainrl] --ckpt_path last_or_fresh: no checkpoint of this config yet; {then}")
                return
            if self.subcommand != "fit":
                # validate/test write no checkpoints: where the callback would put them does not matter
                warnings.filterwarnings("ignore", message="The dirpath has changed from")
            elif "://" not in path:
                quiet_resume_warnings()
                plan = resume.plan_resume(self.trainer, path)
                resume.apply_resume(self.trainer, plan)
                if self.trainer.is_global_zero:
                    print(f"[gainrl] resuming from {path}")
                    for note in plan.notes:
                        print(f"[gainrl] {note}")

        def before_fit(self) -> None:
            name_steps_in_progress_bar(self.trainer)
            self._resolve_checkpoint()

        def before_validate(self) -> None:
            self._resolve_checkpoint()

        def before_test(self) -> None:
            self._resolve_checkpoint()

        def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
            # The scheduler is always present (with uniform sampling it only logs), so A/B runs
            # differ in `data.schedule.name` alone.
            parser.add_lightning_class_args(GainRLScheduler, "scheduler")
            parser.add_lightning_class_args(GainRLCheckpoint, "checkpoint")
            parser.link_arguments("model.model_name_or_path", "data.tokenizer")
            parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")

    return GainRLCLI(
        GRPOModule,
        GainRLDataModule,
        # None: LightningCLI reads sys.argv itself (passing both makes it warn that args and argv disagree)
        args=None if argv == sys.argv[1:] else argv,
        run=run,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"use_distributed_sampler": False, "max_epochs": -1, "num_sanity_val_steps": 0,
                          "log_every_n_steps": 1, "enable_checkpointing": True},
        parser_kwargs={"default_env": False},
        auto_configure_optimizers=True,
    )


if __name__ == "__main__":
    main()
