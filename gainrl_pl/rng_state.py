"""Random-number-generator state as plain tensors and lists, so checkpoints load with weights_only=True.

An exact resume needs the streams that sampling draws from (torch CPU/CUDA, numpy's legacy global
generator, Python's `random`) to continue where the interrupted run left them, on every DDP rank: each
rank samples from its own streams (`seed_rank_streams`), so a checkpoint holds one state per rank.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def collect_rng_states() -> dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA), numpy and Python."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                                       float(cached)],
                             "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_states(state: dict[str, Any]) -> None:
    """Inverse of `collect_rng_states`."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_seed(base_seed: int, rank: int) -> int:
    """A 63-bit seed for DDP rank `rank` derived from `base_seed`; rank 0 keeps `base_seed` itself.

    Seeding every rank alike (what `seed_everything` does) makes ranks that sample the same prompt draw
    the same completions; numpy's SeedSequence mixes (seed, rank) into well-separated streams.
    """
    if rank == 0:
        return int(base_seed)
    words = np.random.SeedSequence([int(base_seed) % 2**64, int(rank)]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def seed_rank_streams(rank: int) -> None:
    """Re-seed this process's torch (CPU and CUDA), numpy and Python streams for DDP rank `rank`.

    Derived from torch's initial seed (the one `seed_everything` set, the same on every rank), so a run is
    reproducible and ranks differ. Rank 0 is left untouched: a one-process run and rank 0 draw alike.
    """
    if rank == 0:
        return
    seed = rank_seed(torch.initial_seed(), rank)
    torch.manual_seed(seed)  # seeds every CUDA device too
    np.random.seed(seed % 2**32)
    random.seed(seed)


CHECKPOINT_KEY = "gainrl_rng_states"  # where a checkpoint holds every rank's states


def collect_rng_states_of_all_ranks(state: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`collect_rng_states()` of every DDP rank, by rank; a collective, so every rank must call it.

    Lightning builds a checkpoint on every rank but writes rank 0's: gathered, rank 0's copy holds them all.
    Without torch.distributed, a list of this process's state. `state`: this rank's states taken earlier
    (default: now).
    """
    state = collect_rng_states() if state is None else state
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        states: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, state)
        return states
    return [state]


def rng_state_of_rank(saved: dict[str, Any] | list[dict[str, Any]] | None, rank: int) -> dict[str, Any] | None:
    """This rank's entry of a checkpoint's RNG states (None if it has none: then the rank seeds afresh).

    Checkpoints before per-rank states held one dict, rank 0's.
    """
    if saved is None:
        return None
    states = [saved] if isinstance(saved, dict) else list(saved)
    return states[rank] if rank < len(states) else None
