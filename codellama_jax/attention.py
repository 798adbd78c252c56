"""The attention seam: what the model tells attention about a call (`AttentionMeta`), and
grouped-query attention over the call's own tokens or the paged KV cache.

The model only computes q/k/v and hands them here with the metadata; where keys and values are
stored and how they are read is this module's and `kv_cache.py`'s business. The reference reads a
row's blocks with one gather and runs dense attention (everywhere; prefill always). A decode
step on one GPU or TPU instead runs JAX's own Pallas paged-attention kernel for that backend,
which reads the blocks in place (`decode_kernel`); the tests check each against the reference in
Pallas' interpret mode.
"""

from __future__ import annotations

import dataclasses
import math

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
    `kernel` (static): how one token per row attends to the cache (`decode_attention`).
    """

    positions_BT: jax.Array
    table_BJ: jax.Array | None = None
    cached: bool = dataclasses.field(default=False, metadata=dict(static=True))
    kernel: str = dataclasses.field(default="reference", metadata=dict(static=True))


DECODE_ATTENTION = ("auto", "reference")  # what a user may ask for


def decode_kernel(mesh: jax.sharding.Mesh, block_size: int, head_dim: int, wanted: str = "auto") -> str:
    """The decode attention for a mesh: with `wanted` "auto", JAX's Pallas kernel of its backend
    ("gpu", "tpu") on one device, else the reference (the kernels are not yet wrapped to run per
    shard); "reference" always (to rule a kernel out). The GPU kernel's loads must be powers of
    two: blocks of at least 16 positions, and such a head dim; the TPU kernel's copies are of
    whole tiles: blocks of a multiple of 16 positions (bfloat16 sublanes), head dims of 128 lanes."""
    if wanted not in DECODE_ATTENTION:
        raise ValueError(f"unknown decode attention {wanted!r}; choose one of {', '.join(DECODE_ATTENTION)}")
    platform = mesh.devices.flat[0].platform
    if wanted == "reference" or mesh.size > 1 or platform not in ("gpu", "tpu"):
        return "reference"
    if platform == "gpu" and not (block_size >= 16 and _power_of_two(block_size) and _power_of_two(head_dim)):
        return "reference"
    if platform == "tpu" and not (block_size % 16 == 0 and head_dim % 128 == 0):
        return "reference"
    return platform


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


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
    if meta.cached and meta.kernel != "reference" and q_BTNH.shape[1] == 1:
        out_BNH = decode_attention(q_BTNH[:, 0], cache, layer, meta.table_BJ, positions_BT[:, 0] + 1, meta.kernel)
        return out_BNH[:, None], cache
    if not meta.cached:
        k_BKSH, v_BKSH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
        mask_BTS = positions_BT[:, None, :] <= positions_BT[:, :, None]
    else:
        k_BKSH, v_BKSH = cache.read(layer, meta.table_BJ)
        mask_BTS = jnp.arange(k_BKSH.shape[2])[None, None, :] <= positions_BT[:, :, None]
    return attend(q_BTNH, k_BKSH, v_BKSH, mask_BTS), cache


def decode_attention(q_BNH: jax.Array, cache: KVCache, layer, table_BJ: jax.Array, lengths_B: jax.Array,
                     kernel: str = "reference", interpret: bool = False) -> jax.Array:  # fmt: skip
    """One query token per row attending to the first `lengths_B` positions of the blocks its
    table lists, `[B, N, H]`: the reference (gather, then `attend`), or JAX's Pallas
    paged-attention kernel for "gpu" or "tpu" (`interpret`: run it on any backend, for tests).
    Table entries that are no block are clamped for the kernels; their positions are past
    `lengths_B`."""
    B, N, H = q_BNH.shape
    if kernel == "reference":
        k_BKSH, v_BKSH = cache.read(layer, table_BJ)
        mask_B1S = jnp.arange(k_BKSH.shape[2])[None, None, :] < lengths_B[:, None, None]
        return attend(q_BNH[:, None], k_BKSH, v_BKSH, mask_B1S)[:, 0]
    J = table_BJ.shape[1]
    K, L, M, Z, _ = cache.k_KLMZH.shape
    table_BJ = jnp.minimum(table_BJ, M - 1) + layer * M  # this layer's blocks among every layer's pages
    k_KPZH, v_KPZH = cache.k_KLMZH.reshape(K, L * M, Z, H), cache.v_KLMZH.reshape(K, L * M, Z, H)  # no copy
    q_BNH = (q_BNH * H**-0.5).astype(k_KPZH.dtype)  # the kernels do not scale the logits
    if kernel == "gpu":
        from jax.experimental.pallas.ops.gpu import paged_attention as gpu

        splits = math.gcd(J, 16)
        return gpu.paged_attention(q_BNH, k_KPZH, v_KPZH, table_BJ, lengths_B, k_splits=splits,
                                   pages_per_compute_block=math.gcd(J // splits, 8), interpret=interpret)  # fmt: skip
    if kernel == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention_kernel as tpu

        def run():
            return tpu.paged_attention(q_BNH, k_KPZH, v_KPZH, lengths_B, table_BJ, pages_per_compute_block=math.gcd(J, 8))

        if interpret:
            with pltpu.force_tpu_interpret_mode():
                return run()
        return run()
    raise ValueError(f"unknown decode attention kernel {kernel!r}; choose reference, gpu or tpu")
