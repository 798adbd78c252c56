"""The key/value cache: per layer, keys and values `[B, K, S, H]` (batch, kv head, cache position,
head dim): attention reads it without transposes, and sharding can split rows over 'data' and kv
heads over 'model'."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from codellama_jax.config import LlamaConfig


class KVCache(NamedTuple):
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, config: LlamaConfig, batch: int, length: int, dtype) -> KVCache:
        shape = (batch, config.num_kv_heads, length, config.head_dim)
        return cls(
            tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
            tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        )

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    def insert(self, prefix: KVCache, row: jax.Array | int = 0) -> KVCache:
        """This cache with `prefix` (keys/values of positions 0..T-1 of some rows) written at
        `row`, positions from 0."""

        def put(dst, src):
            return jax.lax.dynamic_update_slice(dst, src.astype(dst.dtype), (row, 0, 0, 0))

        return KVCache(tuple(map(put, self.k, prefix.k)), tuple(map(put, self.v, prefix.v)))
