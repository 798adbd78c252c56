"""The Llama transformer in Flax NNX.

Shape letters: L layers, B batch, T query length, S key length, D model dim, N query heads,
K kv heads, G query heads per kv head, H head dim, F mlp dim, V vocab. Every parameter carries
logical axis names (`axes` metadata) that `sharding.py` maps to mesh axes; model code never names
a mesh axis. The layers are one Block with stacked parameters applied by one `lax.scan`
(`scan_layers`: compile time independent of depth), or a list of Blocks applied one by one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from codellama_jax.config import LlamaConfig
from codellama_jax import quantize
from codellama_jax.attention import AttentionMeta, attention
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


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, param_dtype, dtype, quant, rngs: nnx.Rngs):
        D, N, K, H = config.dim, config.num_heads, config.num_kv_heads, config.head_dim
        kw = dict(param_dtype=param_dtype, dtype=dtype, quant=quant, rngs=rngs)
        self.q_proj = Proj((D,), (N, H), ("embed", "heads", "head_dim"), **kw)
        self.k_proj = Proj((D,), (K, H), ("embed", "kv_heads", "head_dim"), **kw)
        self.v_proj = Proj((D,), (K, H), ("embed", "kv_heads", "head_dim"), **kw)
        self.o_proj = Proj((N, H), (D,), ("heads", "head_dim", "embed"), **kw)

    def __call__(self, x_BTD, rope, meta: AttentionMeta, cache: KVCache | None, layer):
        q_BTNH = apply_rope(self.q_proj(x_BTD), rope)
        k_BTKH = apply_rope(self.k_proj(x_BTD), rope)
        out_BTNH, cache = attention(q_BTNH, k_BTKH, self.v_proj(x_BTD), meta, cache, layer)
        return self.o_proj(out_BTNH), cache


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

    def __call__(self, x_BTD, rope, meta: AttentionMeta, cache: KVCache | None, layer):
        attn_BTD, cache = self.attn(self.attn_norm(x_BTD), rope, meta, cache, layer)
        h_BTD = x_BTD + attn_BTD
        return h_BTD + self.mlp(self.mlp_norm(h_BTD)), cache


def stacked_blocks(config: LlamaConfig, *, param_dtype, dtype, quant, rngs: nnx.Rngs) -> Block:
    """All layers as one Block whose parameters have a leading `layers` axis (logical name
    "layers"), so the forward pass is one `lax.scan` and compiles once however deep the model.
    An int8 kernel's `quant_axes` count that axis too."""

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return Block(config, param_dtype=param_dtype, dtype=dtype, quant=quant, rngs=rngs)

    blocks = create(rngs)
    for _, var in nnx.iter_graph(blocks):
        if isinstance(var, nnx.Param):
            var.set_metadata(axes=("layers", *var.axes))
            if "quant_axes" in var.get_metadata():
                var.set_metadata(quant_axes=tuple(a + 1 for a in var.quant_axes))
    return blocks


class Llama(nnx.Module):
    """Decoder-only Llama. `param_dtype` is how weights are stored, `dtype` how activations
    compute; `quant="int8"` stores the matmul weights and the embedding table as int8 with a
    float32 scale per output channel (per vocabulary row for the embedding). `scan_layers=False`
    keeps one variable per layer (`layers.{i}...`, as checkpoints store them) and unrolls the
    layers: XLA:CPU copies each layer's weights out of a stacked variable before its matmuls."""

    def __init__(
        self,
        config: LlamaConfig,
        *,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
        quant: str | None = None,
        scan_layers: bool = True,
        rngs: nnx.Rngs,
    ):
        quantize.check(quant)
        if quant and not scan_layers:  # XLA hoists every layer's dequantization to the start of a call
            raise ValueError("int8 weights need scanned layers: unrolled, each call would hold every layer's "
                             "weights dequantized (4x the int8 bytes); leave scan_layers on (--no-scan-layers off)")
        self.config = config
        self.dtype = dtype
        V, D = config.vocab_size, config.dim
        if quant == "int8":
            self.embed = nnx.Param(jnp.zeros((V, D), jnp.int8), axes=("vocab", "embed"), quant_axes=(1,))
            self.embed_scale = nnx.Param(jnp.ones((V,), jnp.float32), axes=("vocab",))
        else:
            self.embed = nnx.Param(_INIT(rngs.params(), (V, D), param_dtype), axes=("vocab", "embed"))
            self.embed_scale = None
        if scan_layers:
            self.layers = stacked_blocks(config, param_dtype=param_dtype, dtype=dtype, quant=quant, rngs=rngs)
        else:
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
        return self.head(self.hidden(tokens_BT, AttentionMeta(positions_BT))[0])

    def hidden(
        self, tokens_BT: jax.Array, meta: AttentionMeta, cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-norm hidden states `[B, T, D]`, and the cache with the tokens' keys and values
        written where `meta` says (when a cache is given)."""
        x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(self.dtype)
        if self.embed_scale is not None:
            x_BTD = x_BTD * jnp.take(self.embed_scale[...], tokens_BT, axis=0)[..., None].astype(self.dtype)
        rope = rope_tables(meta.positions_BT, self.config, self.dtype)
        if isinstance(self.layers, nnx.List):
            for i, block in enumerate(self.layers):
                x_BTD, cache = block(x_BTD, rope, meta, cache, i)
            return self.norm(x_BTD), cache
        block_def, layers = nnx.split(self.layers)

        def layer(carry, params):
            x_BTD, cache, i = carry
            x_BTD, cache = nnx.merge(block_def, params)(x_BTD, rope, meta, cache, i)
            return (x_BTD, cache, i + 1), None

        (x_BTD, cache, _), _ = jax.lax.scan(layer, (x_BTD, cache, 0), layers)
        return self.norm(x_BTD), cache

    def head(self, x_BTD: jax.Array) -> jax.Array:
        """Float32 logits of hidden states (the tied embedding or lm_head)."""
        if self.lm_head is None:
            logits_BTV = jnp.einsum("BTD,VD->BTV", x_BTD, self.embed[...].astype(self.dtype))
            if self.embed_scale is not None:
                logits_BTV = logits_BTV * self.embed_scale[...].astype(self.dtype)
        else:
            logits_BTV = self.lm_head(x_BTD)
        return logits_BTV.astype(jnp.float32)


def abstract_model(
    config: LlamaConfig, *, param_dtype=jnp.float32, dtype=jnp.float32, quant: str | None = None, scan_layers: bool = True
) -> Llama:
    """The model's structure with `ShapeDtypeStruct` leaves: no memory is allocated."""
    return nnx.eval_shape(
        lambda: Llama(config, param_dtype=param_dtype, dtype=dtype, quant=quant, scan_layers=scan_layers, rngs=nnx.Rngs(0))
    )
