"""The Llama transformer in Flax NNX.

Shape letters: B batch, T query length, S key length, D model dim, N query heads, K kv heads,
G query heads per kv head, H head dim, F mlp dim, V vocab. Every parameter carries logical axis
names (`axes` metadata) that `sharding.py` maps to mesh axes; model code never names a
mesh axis.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from codellama_jax.config import LlamaConfig
from codellama_jax import quantize
from codellama_jax.kv_cache import KVCache

_INIT = nnx.initializers.normal(0.02)


class Proj(nnx.Module):
    """A weight `[in..., out...]` applied to the trailing input axes of `x`.

    The kernel keeps its head structure (`q_proj` is `[D, N, H]`, `o_proj` `[N, H, D]`) for
    sharding, but is applied as one 2-D matmul: XLA runs a contraction over several axes
    (`BTNH,NHD->BTD`) many times slower than the same product reshaped. With `quant="int8"`
    the kernel is int8 with a float32 scale per output channel (`quantize.py`), dequantized
    inside the matmul.
    """

    def __init__(self, in_shape, out_shape, axes: tuple[str, ...], *, param_dtype, dtype, quant=None, rngs: nnx.Rngs):
        shape, in_axes = (*in_shape, *out_shape), tuple(range(len(in_shape)))
        if quant == "int8":
            self.kernel = nnx.Param(jnp.zeros(shape, jnp.int8), axes=axes, quant_axes=in_axes)
            self.scale = nnx.Param(jnp.ones(out_shape, jnp.float32), axes=axes[len(in_shape) :])
        else:
            self.kernel = nnx.Param(_INIT(rngs.params(), shape, param_dtype), axes=axes)
            self.scale = None
        self.num_in = len(in_shape)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        in_shape, out_shape = kernel.shape[: self.num_in], kernel.shape[self.num_in :]
        lead = x.shape[: x.ndim - self.num_in]
        y = x.astype(self.dtype).reshape(-1, math.prod(in_shape)) @ kernel.reshape(math.prod(in_shape), -1)
        if self.scale is not None:
            y = y * self.scale[...].reshape(-1).astype(self.dtype)
        return y.reshape(*lead, *out_shape)


class RMSNorm(nnx.Module):
    """Root-mean-square norm with float32 statistics, scaled in the input dtype (as HF does)."""

    def __init__(self, dim: int, eps: float, *, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
        self.eps = eps

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        x32 = x_BTD.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x_BTD.dtype) * normed.astype(x_BTD.dtype)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies `[H/2]` of rotate-half RoPE, with linear or llama3 scaling."""
    H = config.head_dim
    inv_freq = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, H, 2, dtype=np.float32) / np.float32(H)))
    if config.rope_type == "linear":
        inv_freq = inv_freq / config.rope_factor
    elif config.rope_type == "llama3":
        factor, lo, hi = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_len
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_tables(positions_BT: jax.Array, config: LlamaConfig, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin `[B, T, 1, H]` of the rotary angles (computed in float32, once per forward)."""
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * rope_inv_freq(config)
    angles_BTH = jnp.concatenate([angles_BTh, angles_BTh], axis=-1)[:, :, None, :]
    return jnp.cos(angles_BTH).astype(dtype), jnp.sin(angles_BTH).astype(dtype)


def apply_rope(x_BTNH: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate-half RoPE, the layout of HF Llama q/k weights."""
    cos, sin = rope
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    return x_BTNH * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attend(q_BTNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Grouped-query attention: query head n reads kv head n // G. Softmax in float32.

    Keys and values are `[B, K, S, H]`, the cache's layout, so no step transposes the cache.
    The queries of one kv head are gathered as rows `[B, K, T*G, H]` so both products are
    plain batched matmuls over (B, K): XLA:CPU runs them ~3x faster than a 5-axis einsum."""
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


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, param_dtype, dtype, quant, rngs: nnx.Rngs):
        D, N, K, H = config.dim, config.num_heads, config.num_kv_heads, config.head_dim
        kw = dict(param_dtype=param_dtype, dtype=dtype, quant=quant, rngs=rngs)
        self.q_proj = Proj((D,), (N, H), ("embed", "heads", "head_dim"), **kw)
        self.k_proj = Proj((D,), (K, H), ("embed", "kv_heads", "head_dim"), **kw)
        self.v_proj = Proj((D,), (K, H), ("embed", "kv_heads", "head_dim"), **kw)
        self.o_proj = Proj((N, H), (D,), ("heads", "head_dim", "embed"), **kw)

    def __call__(self, x_BTD, positions_BT, rope, mask_BTS, kv):
        """Without a cache (`kv` None) the tokens attend to each other and their keys and values
        are returned (`[B, K, T, H]`); with one (`[B, K, S, H]` each) they are written at their
        positions first, and the tokens attend to the cache's first `mask_BTS.shape[-1]` positions."""
        q_BTNH = apply_rope(self.q_proj(x_BTD), rope)
        k_BTKH = apply_rope(self.k_proj(x_BTD), rope)
        v_BTKH = self.v_proj(x_BTD)
        if kv is None:
            k_BKSH, v_BKSH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
        else:
            rows_B1 = jnp.arange(x_BTD.shape[0])[:, None]
            k_BKSH = kv[0].at[rows_B1, :, positions_BT].set(k_BTKH.astype(kv[0].dtype))
            v_BKSH = kv[1].at[rows_B1, :, positions_BT].set(v_BTKH.astype(kv[1].dtype))
        S = mask_BTS.shape[-1]
        out_BTNH = attend(q_BTNH, k_BKSH[:, :, :S], v_BKSH[:, :, :S], mask_BTS)
        return self.o_proj(out_BTNH), (k_BKSH, v_BKSH)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig, *, param_dtype, dtype, quant, rngs: nnx.Rngs):
        D, F = config.dim, config.ffn_dim
        kw = dict(param_dtype=param_dtype, dtype=dtype, quant=quant, rngs=rngs)
        self.gate_proj = Proj((D,), (F,), ("embed", "mlp"), **kw)
        self.up_proj = Proj((D,), (F,), ("embed", "mlp"), **kw)
        self.down_proj = Proj((F,), (D,), ("mlp", "embed"), **kw)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        h_BTF = jax.nn.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD)
        return self.down_proj(h_BTF)


class Block(nnx.Module):
    def __init__(self, config: LlamaConfig, *, param_dtype, dtype, quant, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.dim, config.rms_norm_eps, param_dtype=param_dtype)
        self.attn = Attention(config, param_dtype=param_dtype, dtype=dtype, quant=quant, rngs=rngs)
        self.mlp_norm = RMSNorm(config.dim, config.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(config, param_dtype=param_dtype, dtype=dtype, quant=quant, rngs=rngs)

    def __call__(self, x_BTD, positions_BT, rope, mask_BTS, kv):
        attn_BTD, kv = self.attn(self.attn_norm(x_BTD), positions_BT, rope, mask_BTS, kv)
        h_BTD = x_BTD + attn_BTD
        return h_BTD + self.mlp(self.mlp_norm(h_BTD)), kv


class Llama(nnx.Module):
    """Decoder-only Llama. `param_dtype` is how weights are stored, `dtype` how activations
    compute; `quant="int8"` stores the matmul weights and the embedding table as int8 with a
    float32 scale per output channel (per vocabulary row for the embedding)."""

    def __init__(
        self, config: LlamaConfig, *, param_dtype=jnp.float32, dtype=jnp.float32, quant: str | None = None, rngs: nnx.Rngs
    ):
        quantize.check(quant)
        self.config = config
        self.dtype = dtype
        V, D = config.vocab_size, config.dim
        if quant == "int8":
            self.embed = nnx.Param(jnp.zeros((V, D), jnp.int8), axes=("vocab", "embed"), quant_axes=(1,))
            self.embed_scale = nnx.Param(jnp.ones((V,), jnp.float32), axes=("vocab",))
        else:
            self.embed = nnx.Param(_INIT(rngs.params(), (V, D), param_dtype), axes=("vocab", "embed"))
            self.embed_scale = None
        self.layers = nnx.List(
            [Block(config, param_dtype=param_dtype, dtype=dtype, quant=quant, rngs=rngs) for _ in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.dim, config.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = (
            None
            if config.tie_embeddings
            else Proj((D,), (V,), ("embed", "vocab"), param_dtype=param_dtype, dtype=dtype, quant=quant, rngs=rngs)
        )

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
        """Float32 logits `[B, T, V]` for tokens at the given positions (causal over positions)."""
        return self.head(self.hidden(tokens_BT, positions_BT)[0])

    def hidden(
        self, tokens_BT: jax.Array, positions_BT: jax.Array, cache: KVCache | None = None, window: int | None = None
    ) -> tuple[jax.Array, KVCache]:
        """Final-norm hidden states `[B, T, D]` and the cache: the tokens' own keys and values
        (`[B, K, T, H]` per layer) without a cache, else the given cache with them written in.
        With a cache, attention reads only its first `window` positions (all by default): every
        position must lie below it, and a long cache then costs only what is in use."""
        x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(self.dtype)
        if self.embed_scale is not None:
            x_BTD = x_BTD * jnp.take(self.embed_scale[...], tokens_BT, axis=0)[..., None].astype(self.dtype)
        rope = rope_tables(positions_BT, self.config, self.dtype)
        if cache is None:  # causal over the given positions
            mask_BTS = positions_BT[:, None, :] <= positions_BT[:, :, None]
        else:  # every cached position up to the token's own
            mask_BTS = jnp.arange(window or cache.length)[None, None, :] <= positions_BT[:, :, None]
        ks, vs = [], []
        for i, block in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x_BTD, (k, v) = block(x_BTD, positions_BT, rope, mask_BTS, kv)
            ks.append(k)
            vs.append(v)
        return self.norm(x_BTD), KVCache(tuple(ks), tuple(vs))

    def head(self, x_BTD: jax.Array) -> jax.Array:
        """Float32 logits of hidden states (the tied embedding or lm_head)."""
        if self.lm_head is None:
            logits_BTV = jnp.einsum("BTD,VD->BTV", x_BTD, self.embed[...].astype(self.dtype))
            if self.embed_scale is not None:
                logits_BTV = logits_BTV * self.embed_scale[...].astype(self.dtype)
        else:
            logits_BTV = self.lm_head(x_BTD)
        return logits_BTV.astype(jnp.float32)


def abstract_model(config: LlamaConfig, *, param_dtype=jnp.float32, dtype=jnp.float32, quant: str | None = None) -> Llama:
    """The model's structure with `ShapeDtypeStruct` leaves: no memory is allocated."""
    return nnx.eval_shape(lambda: Llama(config, param_dtype=param_dtype, dtype=dtype, quant=quant, rngs=nnx.Rngs(0)))
