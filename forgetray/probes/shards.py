"""Sharding a probe over ranks: `shard=(rank, world)` evaluates items rank::world.

ZeRO-3 needs every rank to make the same number of forward calls, so each rank pads its share with copies of an item
(run, then dropped) until every rank has the same count; the padding is computed from the full item list, which
every rank has, so no communication is needed.
"""

from __future__ import annotations

import math


def shard_indices(n_items: int, shard: tuple[int, int]) -> tuple[list[int], int]:
    """Global indices this rank evaluates and how many of them are real.

    Items rank::world, then copies of this rank's first item (or item 0) until the share has ceil(n/world) entries,
    the same on every rank. Only the first `n_real` entries' results are kept.
    """
    rank, world = shard
    if not (isinstance(world, int) and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
    mine = list(range(rank, n_items, world))
    size = math.ceil(n_items / world)
    filler = mine[0] if mine else 0
    return mine + [filler] * (size - len(mine)), len(mine)
