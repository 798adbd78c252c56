"""Decode attention over the paged cache: JAX's Pallas paged-attention kernels (GPU and TPU, run
in interpret mode here) against the reference gather-and-attend, for ragged lengths, grouped
query heads and block tables that share blocks; and the kernel chosen per mesh."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codellama_jax import sharding
from codellama_jax.attention import decode_attention, decode_kernel
from codellama_jax.kv_cache import KVCache


@pytest.mark.parametrize("J", [4, 32], ids=["4 blocks", "32 blocks"])  # 32: the kernels split and group blocks
@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_pallas_paged_kernels_equal_the_reference(kernel, J):
    L, N, K, H, M, Z = 2, 8, 2, 64, J + 8, 16  # four query heads per kv head
    rng = np.random.default_rng(0)

    def values(*shape):  # float32 that bfloat16 holds exactly: TPU's interpreter multiplies as a TPU does, in bfloat16
        return jnp.asarray(rng.normal(size=shape), jnp.bfloat16).astype(jnp.float32)

    cache = KVCache(values(K, L, M, Z, H), values(K, L, M, Z, H))
    q_BNH = values(4, N, H)
    # blocks in no order; rows 0 and 3 share their first two (a cached prefix); M is no block (past the length)
    table_BJ = np.stack([rng.permutation(M)[:J] for _ in range(4)]).astype(np.int32)
    table_BJ[3, :2] = table_BJ[0, :2]
    table_BJ[1, 2:], table_BJ[3, 3:] = M, M
    lengths_B = jnp.asarray(np.array([J * Z - 24, 17, J * Z, 33], np.int32))
    table_BJ = jnp.asarray(table_BJ)
    want = decode_attention(q_BNH, cache, 1, table_BJ, lengths_B)
    got = decode_attention(q_BNH, cache, 1, table_BJ, lengths_B, kernel=kernel, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
    assert not np.allclose(np.asarray(got)[0], np.asarray(got)[3])  # shared blocks, different lengths and queries


def test_the_kernel_follows_the_backend_of_a_one_device_mesh():
    assert decode_kernel(sharding.single_device_mesh(), 16, 128) == "reference"  # CPU: no kernel
    assert decode_kernel(sharding.make_mesh((1, 2), jax.devices()[:2]), 16, 128) == "reference"

    def one(platform):  # a one-device mesh of another backend, as decode_kernel reads it
        return types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform=platform)]), size=1)

    assert decode_kernel(one("gpu"), 16, 128) == "gpu" and decode_kernel(one("tpu"), 32, 128) == "tpu"
    # the GPU kernel's loads are powers of two of at least 16 positions; the TPU kernel's whole tiles
    assert {decode_kernel(one("gpu"), z, h) for z, h in ((12, 128), (8, 128), (16, 96))} == {"reference"}
    assert {decode_kernel(one("tpu"), z, h) for z, h in ((12, 128), (8, 128), (16, 64))} == {"reference"}
    assert decode_kernel(one("tpu"), 16, 128, "reference") == "reference"  # --decode-attention reference
    with pytest.raises(ValueError, match="unknown decode attention 'kernel'; choose one of auto, reference"):
        decode_kernel(one("tpu"), 16, 128, "kernel")
    with pytest.raises(ValueError, match="unknown decode attention kernel"):
        decode_attention(jnp.zeros((1, 2, 4)), KVCache(jnp.zeros((1, 1, 2, 4, 4)), jnp.zeros((1, 1, 2, 4, 4))), 0,
                         jnp.zeros((1, 1), jnp.int32), jnp.ones(1, jnp.int32), kernel="cuda")  # fmt: skip
