"""The key/value cache: keys and values `[L, B, K, S, H]` (layer, cache row, kv head, position,
head dim), one array each so that the scan over layers carries them and writes in place.
Attention reads a row's `[K, S, H]` without transposes; sharding splits rows over 'data' and kv
heads over 'model'. Writes and reads go through the two methods here, the attention seam's cache
side (a paged cache replaces them)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from codellama_jax.config import LlamaConfig

AXES = ("layers", "batch", "kv_heads", "length", "head_dim")


class KVCache(NamedTuple):
    k_LBKSH: jax.Array
    v_LBKSH: jax.Array

    @staticmethod
    def shape(config: LlamaConfig, batch: int, length: int) -> tuple[int, ...]:
        return (config.num_layers, batch, config.num_kv_heads, length, config.head_dim)

    @classmethod
    def zeros(cls, config: LlamaConfig, batch: int, length: int, dtype) -> KVCache:
        shape = cls.shape(config, batch, length)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def length(self) -> int:
        return self.k_LBKSH.shape[3]

    def write(self, layer, k_BTKH: jax.Array, v_BTKH: jax.Array, rows_B: jax.Array, positions_BT: jax.Array) -> KVCache:
        """The cache with batch row b's keys and values at cache row `rows_B[b]`, positions
        `positions_BT[b]`; writes to a row or position outside the cache are dropped (padding)."""

        def put(cache, new_BTKH):
            return cache.at[layer, rows_B[:, None], :, positions_BT].set(new_BTKH.astype(cache.dtype), mode="drop")

        return KVCache(put(self.k_LBKSH, k_BTKH), put(self.v_LBKSH, v_BTKH))

    def read(self, layer, rows_B: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
        """Keys and values `[B, K, window, H]` of cache rows `rows_B`; a row outside (padding)
        reads the last row (clamped: a gather that fills would mask every element it reads)."""

        def get(cache):
            return cache.at[layer, rows_B, :, :window].get(mode="clip")

        return get(self.k_LBKSH), get(self.v_LBKSH)

    def copy_rows(self, src_R: jax.Array, dst_R: jax.Array, length: int) -> KVCache:
        """Positions below `length` of rows `src_R` copied to rows `dst_R` (n samples of one prompt)."""

        def copy(cache):
            return cache.at[:, dst_R, :, :length].set(cache.at[:, src_R, :, :length].get(mode="fill", fill_value=0),
                                                      mode="drop")  # fmt: skip

        return KVCache(copy(self.k_LBKSH), copy(self.v_LBKSH))
