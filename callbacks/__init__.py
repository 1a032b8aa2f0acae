"""Lightning callbacks: the GAIN-RL scheduler and checkpoints that lose nothing."""

from gainrl_pl.callbacks.checkpoint import GainRLCheckpoint, hf_dir_for
from gainrl_pl.callbacks.scheduler import GainRLScheduler

__all__ = ["GainRLCheckpoint", "GainRLScheduler", "hf_dir_for"]
