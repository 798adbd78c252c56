"""int8 weight-only quantization: symmetric, one float32 scale per output channel.

A weight `w` becomes `q = round(w / scale)` in [-127, 127] with `scale = max|w| / 127` over the
weight's input axes, so `w ≈ q * scale` and a matmul dequantizes as `(x @ q) * scale`. The
model (`quant="int8"`) marks each int8 parameter with its input axes (`quant_axes`); its scale
is the sibling parameter `scale_path(path)`. Weights are quantized one at a time, where they
already are (host or device), so no full-precision copy of the model is ever held.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from codellama_jax.weights import ParamPath, stored_tensors

QUANTIZATIONS = (None, "int8")


def check(quant: str | None) -> None:
    if quant not in QUANTIZATIONS:
        raise ValueError(f"unsupported quantization {quant!r}; choose one of: {', '.join(map(str, QUANTIZATIONS))}")


def scale_path(path: ParamPath) -> ParamPath:
    """Where the scale of an int8 parameter lives: `...kernel` -> `...scale`, `embed` -> `embed_scale`."""
    return (*path[:-1], "scale") if path[-1] == "kernel" else (*path[:-1], f"{path[-1]}_scale")


@functools.partial(jax.jit, static_argnames="in_axes")
def quantize_int8(w: jax.Array, in_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(int8 weight, float32 scale over the other axes). Run where `w` lies, the results keep
    its sharding on the axes they share."""
    w32 = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w32), axis=in_axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return q, jnp.squeeze(scale, axis=in_axes)


def int8_axes(state: nnx.State) -> dict[ParamPath, tuple[int, ...]]:
    """The int8 tensors of a (possibly abstract) state by stored path (one per layer, see
    weights.py), with the input axes of each."""
    return {
        stored: tuple(a - 1 for a in var.quant_axes) if layer is not None else var.quant_axes
        for stored, _, layer, var in stored_tensors(state)
        if var.dtype == jnp.int8
    }


def stored(path: ParamPath, weight, int8: dict[ParamPath, tuple[int, ...]]) -> dict[ParamPath, jax.Array]:
    """What a full-precision weight is kept as: itself, or int8 with its scale beside it."""
    if path not in int8:
        return {path: weight}
    q, scale = quantize_int8(weight, int8[path])
    return {path: q, scale_path(path): scale}
