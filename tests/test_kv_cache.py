"""The paged cache against a dense one: whatever blocks a table names, a row reads back exactly
the keys and values written at its positions, padding writes nowhere, and a copied block equals
its source."""

import jax.numpy as jnp
import numpy as np

from codellama_jax.config import LlamaConfig
from codellama_jax.kv_cache import KVCache


def test_rows_read_back_what_was_written_through_scrambled_block_tables():
    L, K, H, Z, M = 2, 3, 4, 4, 10
    config = LlamaConfig(vocab_size=32, dim=K * H * 2, num_layers=L, num_heads=K * 2, num_kv_heads=K, head_dim=H, ffn_dim=8)
    cache = KVCache.zeros(config, M, Z, jnp.float32)
    rng = np.random.default_rng(0)
    lengths = [7, 12]
    table_BJ = np.array([[9, 2, M, M], [4, 0, 6, M]], np.int32)  # rows in no order; M: no block
    T = 16  # padding positions 7.. and 12.. fall past the allocated blocks, or in the row's own last block
    k_BTKH, v_BTKH = rng.normal(size=(2, 2, T, K, H)).astype(np.float32)
    positions_BT = np.broadcast_to(np.arange(T, dtype=np.int32), (2, T))
    cache = cache.write(1, jnp.asarray(k_BTKH), jnp.asarray(v_BTKH), jnp.asarray(table_BJ), jnp.asarray(positions_BT))
    k_BKSH, v_BKSH = cache.read(1, jnp.asarray(table_BJ))
    assert k_BKSH.shape == (2, K, 4 * Z, H)
    for b, length in enumerate(lengths):
        np.testing.assert_array_equal(np.asarray(k_BKSH)[b, :, :length], k_BTKH[b, :length].transpose(1, 0, 2))
        np.testing.assert_array_equal(np.asarray(v_BKSH)[b, :, :length], v_BTKH[b, :length].transpose(1, 0, 2))
    untouched = sorted(set(range(M)) - set(table_BJ.ravel()))
    assert not np.asarray(cache.k_KLMZH)[:, :, untouched].any() and not np.asarray(cache.k_KLMZH)[:, 0].any()

    copied = cache.copy_blocks(jnp.array([6, 2]), jnp.array([1, M]))  # the second pair copies nowhere
    np.testing.assert_array_equal(np.asarray(copied.v_KLMZH)[:, :, 1], np.asarray(cache.v_KLMZH)[:, :, 6])
    np.testing.assert_array_equal(np.delete(np.asarray(copied.v_KLMZH), 1, axis=2), np.delete(np.asarray(cache.v_KLMZH), 1, axis=2))
