"""The attention seam: what the model tells attention about a call (`AttentionMeta`), and
grouped-query attention over the call's own tokens or the KV cache.

The model only computes q/k/v and hands them here with the metadata; where keys and values are
stored and how they are read is this module's and `kv_cache.py`'s business, so a paged cache or an
accelerator kernel replaces these functions without touching the model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from codellama_jax.kv_cache import KVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMeta:
    """Where each query token sits, where its keys and values go, and what it reads.

    `positions_BT`: each token's position in its sequence (RoPE, causality, cache write index).
    `table_BJ`: the cache blocks of each batch row (kv_cache.py); a row whose entries are all
    out of the pool is padding, never written.
    `cached` (static): False when the tokens attend only to each other (a fresh prompt, or no
    cache); True when they attend to every position of their row's blocks up to their own,
    their own keys written first.
    """

    positions_BT: jax.Array
    table_BJ: jax.Array | None = None
    cached: bool = dataclasses.field(default=False, metadata=dict(static=True))


def attend(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Dense grouped-query attention, the reference: query head n reads kv head n // G, softmax
    in float32. The queries of one kv head are gathered as rows `[B, K, T*G, H]` so both products
    are plain batched matmuls over (B, K): XLA:CPU runs them ~3x faster than a 5-axis einsum."""
    B, T, N, H = q_BTNH.shape
    K = k_BKSH.shape[1]
    G = N // K
    q_BKRH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)
    scores_BKRS = jax.lax.dot_general(
        q_BKRH, k_BKSH, (((3,), (3,)), ((0, 1), (0, 1))), preferred_element_type=jnp.float32
    )
    mask_B1RS = jnp.repeat(mask_BTS, G, axis=1)[:, None]
    scores_BKRS = jnp.where(mask_B1RS, scores_BKRS * (H**-0.5), -jnp.inf)
    probs_BKRS = jax.nn.softmax(scores_BKRS, axis=-1).astype(v_BKSH.dtype)
    out_BKRH = jax.lax.dot_general(probs_BKRS, v_BKSH, (((3,), (2,)), ((0, 1), (0, 1))))
    return out_BKRH.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, N, H)


def attention(
    q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, meta: AttentionMeta, cache: KVCache | None, layer
) -> tuple[jax.Array, KVCache | None]:
    """One layer's attention output `[B, T, N, H]`, and the cache with this call's keys and
    values written in (when there is one)."""
    positions_BT = meta.positions_BT
    if cache is not None:
        cache = cache.write(layer, k_BTKH, v_BTKH, meta.table_BJ, positions_BT)
    if not meta.cached:
        k_BKSH, v_BKSH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
        mask_BTS = positions_BT[:, None, :] <= positions_BT[:, :, None]
    else:
        k_BKSH, v_BKSH = cache.read(layer, meta.table_BJ)
        mask_BTS = jnp.arange(k_BKSH.shape[2])[None, None, :] <= positions_BT[:, :, None]
    return attend(q_BTNH, k_BKSH, v_BKSH, mask_BTS), cache
