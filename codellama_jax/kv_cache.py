"""The paged key/value cache: a pool of blocks, keys and values `[K, L, M, Z, H]` (kv head, layer,
block, position within the block, head dim), one array each so that the scan over layers
carries them and writes in place. Kv heads lead so that the pool is, without a copy, the
`[K, L*M, Z, H]` pages JAX's paged attention kernels take, layer l's blocks numbered from l*M
(attention.py): a per-layer slice would be copied for the kernel at every layer of every step.

A sequence's keys and values live in the blocks its block table lists: position p in block
`table[p // Z]` at offset `p % Z`. The tables are the host's (blocks.py decides which blocks a
sequence holds, and shares full blocks between sequences with the same prefix) and come with
every call as `table_BJ`, J blocks per row; an entry of M (out of the pool) is no block: writes
there are dropped. Reads gather a row's blocks straight into `[K, J*Z, H]`, the dense layout
attention takes. Sharding splits kv heads over 'model'; blocks are not split (a block is read
by whichever row holds it)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from codellama_jax.config import LlamaConfig

AXES = ("kv_heads", "layers", "blocks", "block", "head_dim")


def blocks_for(positions: int, block_size: int) -> int:
    """Blocks of `block_size` positions that hold `positions` positions."""
    return -(-positions // block_size)


class KVCache(NamedTuple):
    k_KLMZH: jax.Array
    v_KLMZH: jax.Array

    @staticmethod
    def shape(config: LlamaConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (config.num_kv_heads, config.num_layers, num_blocks, block_size, config.head_dim)

    @classmethod
    def zeros(cls, config: LlamaConfig, num_blocks: int, block_size: int, dtype) -> KVCache:
        shape = cls.shape(config, num_blocks, block_size)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def num_blocks(self) -> int:
        return self.k_KLMZH.shape[2]

    @property
    def block_size(self) -> int:
        return self.k_KLMZH.shape[3]

    def write(self, layer, k_BTKH: jax.Array, v_BTKH: jax.Array, table_BJ: jax.Array, positions_BT: jax.Array) -> KVCache:
        """The cache with batch row b's keys and values at positions `positions_BT[b]` of the
        blocks `table_BJ[b]` lists; a position past the table, or in an entry that is no block,
        is dropped (padding)."""
        Z = self.block_size
        block_BT = jnp.take_along_axis(table_BJ, positions_BT // Z, axis=1, mode="fill", fill_value=self.num_blocks)

        def put(cache, new_BTKH):
            new_KBTH = jnp.moveaxis(new_BTKH, 2, 0).astype(cache.dtype)
            return cache.at[:, layer, block_BT, positions_BT % Z].set(new_KBTH, mode="drop")

        return KVCache(put(self.k_KLMZH, k_BTKH), put(self.v_KLMZH, v_BTKH))

    def read(self, layer, table_BJ: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values `[B, K, J*Z, H]` of the blocks each row's table lists, in order, by one
        gather per array that lays them out that way (no transpose after it); an entry that is
        no block reads the last block (clamped: its positions are masked by the caller)."""
        B, J = table_BJ.shape
        K, _, M, Z, H = self.k_KLMZH.shape
        index_BJ2 = jnp.stack([jnp.broadcast_to(jnp.asarray(layer, table_BJ.dtype), (B, J)), table_BJ], axis=-1)
        numbers = jax.lax.GatherDimensionNumbers(offset_dims=(1, 3, 4), collapsed_slice_dims=(1, 2), start_index_map=(1, 2))

        def get(cache):
            blocks_BKJZH = jax.lax.gather(cache, index_BJ2, numbers, (K, 1, 1, Z, H), mode="clip")
            return blocks_BKJZH.reshape(B, K, J * Z, H)

        return get(self.k_KLMZH), get(self.v_KLMZH)

    def copy_blocks(self, src_C: jax.Array, dst_C: jax.Array) -> KVCache:
        """Blocks `src_C` copied to blocks `dst_C` in every layer (the partly filled last block of
        a prompt, for each of its other samples); a destination that is no block is skipped."""

        def copy(cache):
            return cache.at[:, :, dst_C].set(cache.at[:, :, src_C].get(mode="clip"), mode="drop")

        return KVCache(copy(self.k_KLMZH), copy(self.v_KLMZH))
