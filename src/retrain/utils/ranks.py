"""Rank helpers that work before the Trainer exists (DDP children re-run the script with RANK/LOCAL_RANK set)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only


def is_rank_zero() -> bool:
    """True in the process that alone writes files and registry entries."""
    return getattr(rank_zero_only, "rank", 0) == 0


# The key under which `every_rank` keeps the list of each rank's state.
PER_RANK = "per_rank"


def _world() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def every_rank(state: Any) -> Any:
    """Every rank's `state`, gathered under DDP: Lightning writes rank 0's checkpoint only, and a loader's position
    or a metric's running sums differ per rank. Call it on every rank at once (as checkpoint hooks are). Alone:
    `state` as it is."""
    world = _world()[1]
    if world == 1:
        return state
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, state)
    return {PER_RANK: gathered}


def own_rank(state: Any) -> tuple[Any, str | None]:
    """This rank's part of what `every_rank` gathered, or None and why (another number of processes)."""
    rank, world = _world()
    states = state[PER_RANK] if isinstance(state, dict) and PER_RANK in state else [state]
    if len(states) != world:
        return None, f"saved by {len(states)} process(es), resumed by {world}"
    return states[rank], None
