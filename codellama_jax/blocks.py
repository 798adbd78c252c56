"""The host's account of the paged KV cache (kv_cache.py): which blocks are free, how many
sequences hold each one, and which hold a prefix that a new prompt can reuse.

A sequence holds a list of blocks, its block table, which the scheduler grows a call ahead of
the positions the device writes; a block returns to the pool when its last holder releases it
(the samples of one prompt hold its full blocks together).

Prefix caching (vLLM's scheme): a full block is named by a digest of its tokens and of every
token before it (a chain of SHA-256, so two prompts share a block only when they agree on
everything up to its end, and no prompt can be crafted to read another's keys). Once its keys
and values are written, a full block is registered under its digest; a prompt starting with the
same tokens holds those blocks and prefills only the rest. A registered block nobody holds is
kept, and reused, until its memory is needed: then the least recently released goes first.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Iterable, Iterator, Sequence

import numpy as np

from codellama_jax import kv_cache


class BlockPool:
    """`num_blocks` blocks of `block_size` positions each; `prefix_caching` off: nothing is
    registered or found."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a pool needs at least one block of at least one position, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.reset()

    def reset(self) -> None:
        """Every block free again, nothing registered."""
        self._free = collections.deque(range(self.num_blocks))
        self._holders = [0] * self.num_blocks
        self._by_digest: dict[bytes, int] = {}
        self._digest: dict[int, bytes] = {}
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # registered, unheld: oldest first

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated: free ones and registered ones nobody holds."""
        return len(self._free) + len(self._idle)

    def blocks_for(self, positions: int) -> int:
        """Blocks that hold `positions` positions."""
        return kv_cache.blocks_for(positions, self.block_size)

    def allocate(self, count: int) -> list[int]:
        """`count` blocks, now held once each: free ones first, then the registered blocks
        released longest ago (forgotten)."""
        if count > self.num_free:
            raise RuntimeError(f"{count} blocks asked for, {self.num_free} free")
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._idle.popitem(last=False)
                del self._by_digest[self._digest.pop(block)]
            self._holders[block] = 1
            blocks.append(block)
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """One more holder for each of `blocks`."""
        for block in blocks:
            if self._holders[block] == 0:
                del self._idle[block]
            self._holders[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """One holder less for each of `blocks`; a block nobody holds is free, or idle when it is
        registered (the last blocks of a sequence first: a shorter prefix is likelier reused)."""
        for block in reversed(blocks):
            if self._holders[block] < 1:
                raise RuntimeError(f"block {block} released more often than it was held")
            self._holders[block] -= 1
            if self._holders[block] == 0:
                if block in self._digest:
                    self._idle[block] = None
                else:
                    self._free.append(block)

    def digests(self, tokens: Sequence[int]) -> Iterator[bytes]:
        """The digest of every full block of `tokens`, in order, as they are asked for (a lookup
        stops hashing at its first miss, not at the prompt's end)."""
        Z, chain = self.block_size, b""
        ids = np.asarray(tokens, np.int64)
        for start in range(0, len(ids) - Z + 1, Z):
            chain = hashlib.sha256(chain + ids[start : start + Z].tobytes()).digest()
            yield chain

    def cached_prefix(self, tokens: Sequence[int]) -> list[int]:
        """The registered blocks that hold the longest prefix of `tokens`, leaving at least one
        token to compute (its logits give the next token); `share` them to hold them."""
        blocks = []
        if self.prefix_caching:
            for digest in self.digests(tokens[:-1]):
                block = self._by_digest.get(digest)
                if block is None:
                    break
                blocks.append(block)
        return blocks

    def register(self, tokens: Sequence[int], blocks: Sequence[int]) -> None:
        """Registers the full blocks of `tokens` (whose keys and values `blocks` hold, written)
        for reuse; a block whose digest another block already has stays unregistered."""
        if not self.prefix_caching:
            return
        for digest, block in zip(self.digests(tokens), blocks):
            if digest not in self._by_digest and block not in self._digest:
                self._by_digest[digest], self._digest[block] = block, digest
