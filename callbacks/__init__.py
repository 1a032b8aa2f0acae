"""Lightning callbacks: the GAIN-RL scheduler."""

from gainrl_pl.callbacks.scheduler import GainRLScheduler

__all__ = ["GainRLScheduler"]
