"""Rank helpers that work before the Trainer exists (DDP children re-run the script with RANK/LOCAL_RANK set)."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_only


def is_rank_zero() -> bool:
    """True in the process that alone writes files and registry entries."""
    return getattr(rank_zero_only, "rank", 0) == 0
