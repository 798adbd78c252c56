"""The host's account of the paged KV cache (kv_cache.py): which blocks are free and how many
sequences hold each one.

A sequence holds a list of blocks, its block table, which the scheduler grows a call ahead of
the positions the device writes; a block returns to the free list when its last holder releases
it (the samples of one prompt hold its full blocks together).
"""

from __future__ import annotations

import collections
from typing import Iterable


class BlockPool:
    """`num_blocks` blocks of `block_size` positions each."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a pool needs at least one block of at least one position, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.reset()

    def reset(self) -> None:
        """Every block free again."""
        self._free = collections.deque(range(self.num_blocks))
        self._holders = [0] * self.num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, positions: int) -> int:
        """Blocks that hold `positions` positions."""
        return -(-positions // self.block_size)

    def allocate(self, count: int) -> list[int]:
        """`count` free blocks, now held once each."""
        if count > len(self._free):
            raise RuntimeError(f"{count} blocks asked for, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        for block in blocks:
            self._holders[block] = 1
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """One more holder for each of `blocks`."""
        for block in blocks:
            self._holders[block] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """One holder less for each of `blocks`; a block nobody holds is free."""
        for block in blocks:
            self._holders[block] -= 1
            if self._holders[block] == 0:
                self._free.append(block)
