"""The DDP collectives the training step and the ranking use, each a no-op on a single process.

Every function here ends in a collective: under DDP every rank must call it, in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def gather_rows(tensor: torch.Tensor, all_gather: Callable[[torch.Tensor], torch.Tensor], world_size: int,
                rows_per_rank: list[int] | None = None) -> torch.Tensor:
    """All ranks' rows of `tensor`, rank by rank (`all_gather`: Lightning's, which stacks one tensor per rank).

    `rows_per_rank` gives each rank's row count when they differ: all_gather needs one shape, so the rows
    are padded to the longest, gathered, and the padding cut off again.
    """
    if world_size == 1:
        return tensor.detach()
    if rows_per_rank is None:
        return all_gather(tensor.detach()).reshape(-1, *tensor.shape[1:])
    padded = tensor.detach().new_zeros((max(rows_per_rank), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor.detach()
    gathered = all_gather(padded)
    return torch.cat([gathered[r, :n] for r, n in enumerate(rows_per_rank)])


def sum_over_ranks(tensor: torch.Tensor, strategy: Any, world_size: int) -> torch.Tensor:
    """`tensor` summed over the DDP ranks by the Lightning `strategy` (itself on one process)."""
    if world_size > 1:
        return strategy.reduce(tensor, reduce_op="sum")
    return tensor


def gather_objects(obj: Any) -> list[Any]:
    """all_gather for picklable objects when torch.distributed is up; [obj] otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


def from_rank_zero(obj: Any) -> Any:
    """Rank 0's `obj` on every rank when torch.distributed is up; `obj` otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj
