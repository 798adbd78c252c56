"""The one table from Hugging Face weight names to our parameter paths, used by every loader.

HF stores linear weights PyTorch-style as `[out, in]`; our kernels are `[in..., out...]` with the
head structure kept (`q_proj` is `[D, N, H]`, `o_proj` is `[N, H, D]`), so a matrix is transposed
and reshaped to the parameter's shape; the table says how many leading axes of the kernel are its
input (0: copy as it is, for vectors and the embedding table).

Tensors are stored one per layer (`layers.{i}.attn.q_proj.kernel`), as HF stores them, so that
conversion streams one layer's tensor at a time; a model with scanned layers holds each as one
variable stacked over layers (`layers.attn.q_proj.kernel`, `[L, ...]`), one without as stored.
"""

from __future__ import annotations

import re
from typing import Iterator

import numpy as np
from flax import nnx

from codellama_jax.config import LlamaConfig

ParamPath = tuple[str | int, ...]

#  HF name ({i}: layer index)                      parameter path                      input axes
WEIGHT_TABLE: tuple[tuple[str, str, int], ...] = (
    ("model.embed_tokens.weight",                   "embed",                            0),
    ("model.layers.{i}.input_layernorm.weight",     "layers.{i}.attn_norm.scale",       0),
    ("model.layers.{i}.self_attn.q_proj.weight",    "layers.{i}.attn.q_proj.kernel",    1),
    ("model.layers.{i}.self_attn.k_proj.weight",    "layers.{i}.attn.k_proj.kernel",    1),
    ("model.layers.{i}.self_attn.v_proj.weight",    "layers.{i}.attn.v_proj.kernel",    1),
    ("model.layers.{i}.self_attn.o_proj.weight",    "layers.{i}.attn.o_proj.kernel",    2),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.scale",   0),
    ("model.layers.{i}.mlp.gate_proj.weight",       "layers.{i}.mlp.gate_proj.kernel",  1),
    ("model.layers.{i}.mlp.up_proj.weight",         "layers.{i}.mlp.up_proj.kernel",    1),
    ("model.layers.{i}.mlp.down_proj.weight",       "layers.{i}.mlp.down_proj.kernel",  1),
    ("model.norm.weight",                           "norm.scale",                       0),
    ("lm_head.weight",                              "lm_head.kernel",                   1),
)  # fmt: skip

_PATTERNS = [
    (re.compile("^" + re.escape(hf).replace(r"\{i\}", r"(\d+)") + "$"), path, in_axes)
    for hf, path, in_axes in WEIGHT_TABLE
]


def hf_names(config: LlamaConfig) -> Iterator[str]:
    """Every HF tensor name a checkpoint of this configuration must provide."""
    for hf, path, _ in WEIGHT_TABLE:
        if path.startswith("lm_head") and config.tie_embeddings:
            continue
        if "{i}" in hf:
            yield from (hf.format(i=i) for i in range(config.num_layers))
        else:
            yield hf


def param_path(hf_name: str) -> tuple[ParamPath, int] | None:
    """(parameter path, input axes) for an HF tensor name, or None for names we do not use."""
    for pattern, path, in_axes in _PATTERNS:
        m = pattern.match(hf_name)
        if m:
            parts = path.replace("{i}", m.group(1)) if m.groups() else path
            return tuple(int(p) if p.isdigit() else p for p in parts.split(".")), in_axes
    return None


def to_param(hf_name: str, array: np.ndarray, shape: tuple[int, ...], in_axes: int) -> np.ndarray:
    """An HF tensor in our layout, checked against the parameter's shape."""
    hf_shape = (int(np.prod(shape[in_axes:])), int(np.prod(shape[:in_axes]))) if in_axes else tuple(shape)
    if tuple(array.shape) != hf_shape:
        raise ValueError(f"tensor {hf_name} has shape {list(array.shape)}, the model expects {list(hf_shape)}")
    return (array.T if in_axes else array).reshape(shape)


def stored_tensors(state: nnx.State) -> Iterator[tuple[ParamPath, ParamPath, int | None, nnx.Variable]]:
    """Each tensor of a (possibly abstract) model state as it is stored: (stored path, the
    variable's path, its index along a stacked variable's leading axis or None when the variable
    is the tensor itself, the variable). A stacked variable is `L` tensors; with unrolled layers
    each layer's variable is stored as it is (`layers.{i}...`)."""
    for path, var in nnx.to_flat_state(state):
        if path[0] == "layers" and not isinstance(path[1], int):
            for i in range(var.shape[0]):
                yield ("layers", i, *path[1:]), path, i, var
        else:
            yield path, path, None, var
