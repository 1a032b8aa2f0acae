"""Lightning DataModules: rows -> prompts -> ranked dataset -> sampler."""

from gainrl_pl.datamodules.gainrl import GainRLDataModule, ScheduleSettings

__all__ = ["GainRLDataModule", "ScheduleSettings"]
