"""`gainrl-pl`: LightningCLI for `fit | validate | test`, plus the `angles`, `evaluate` and `export` tools.

    gainrl-pl fit --config configs/demo.yaml           # train (every option: gainrl-pl fit --help)
    gainrl-pl fit --config configs/demo.yaml --print_config
    gainrl-pl angles --data ../shared/data/gsm8k/train.jsonl --preset gsm8k --output scores.jsonl
"""

from __future__ import annotations

import os
import sys

TOOLS = {
    "angles": "gainrl_pl.angles_cli",
    "evaluate": "gainrl_pl.evaluate",
    "export": "gainrl_pl.export",
}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `gainrl-pl` console script."""
    # Torch's OpenMP workers spin while they wait; on a CPU shared with other processes that made 2-thread
    # forwards up to 13x slower (BENCHMARKS.md section 1). Must be set before torch loads; a user's value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        import importlib

        importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
        return
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
    run_lightning_cli(argv)


def run_lightning_cli(argv: list[str], run: bool = True):
    """Build (and by default run) the LightningCLI over GRPOModule, GainRLDataModule and the scheduler."""
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    # the settings dataclasses document each field in a docstring below it: show those in --help
    set_parsing_settings(docstring_parse_attribute_docstrings=True)

    from gainrl_pl.callbacks import GainRLCheckpoint, GainRLScheduler
    from gainrl_pl.datamodules import GainRLDataModule
    from gainrl_pl.module import GRPOModule

    class GainRLCLI(LightningCLI):
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
        args=argv,
        run=run,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"use_distributed_sampler": False, "max_epochs": -1, "num_sanity_val_steps": 0,
                          "log_every_n_steps": 1, "enable_checkpointing": True},
        parser_kwargs={"default_env": False},
        auto_configure_optimizers=True,
    )


if __name__ == "__main__":
    main()
