"""`load()`: a converted checkpoint, a HF directory or a GGUF file, ready to run."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from codellama_jax import checkpoint, infill, sharding, weights
from codellama_jax.buckets import bucket
from codellama_jax import quantize as quantization
from codellama_jax.chat_template import ChatTemplate, chat_template_for, read_chat_template
from codellama_jax.config import LlamaConfig
from codellama_jax.convert import open_checkpoint
from codellama_jax.convert.hf import with_generation_config
from codellama_jax.model import Llama, abstract_model
from codellama_jax.tokenizer import Tokenizer, load_tokenizer


class Model:
    """A loaded model: configuration, the NNX module with its parameters laid out on `mesh`,
    tokenizer and chat template (both None when the checkpoint has no tokenizer files)."""

    def __init__(
        self,
        config: LlamaConfig,
        module: Llama,
        tokenizer: Tokenizer | None,
        chat_template: ChatTemplate | None,
        mesh: Mesh,
    ):
        self.config = config
        self.module = module
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.mesh = mesh
        self.graphdef, self.params = nnx.split(module)
        self._forward = jax.jit(
            functools.partial(_forward, self.graphdef), out_shardings=sharding.replicated(mesh)
        )

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The config's, and the token that ends an infilled middle (infill.py)."""
        return tuple(dict.fromkeys((*self.config.stop_token_ids, *infill.end_ids(self.tokenizer))))

    def logits(self, token_ids: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Float32 logits `[B, T, V]` for a batch of token-id lists (or a `[B, T]` array).

        Shorter rows are right-padded; their logits past the row's own length are NaN.
        """
        rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in token_ids]
        if not rows or any(r.size == 0 for r in rows):
            raise ValueError("logits() needs at least one non-empty row of token ids")
        lengths = [r.size for r in rows]
        longest = max(lengths)
        if longest > self.config.max_seq_len:
            raise ValueError(f"a row has {longest} tokens, the model's context is {self.config.max_seq_len}")
        bad = [int(t) for r in rows for t in r if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")
        padded = min(bucket(longest), self.config.max_seq_len)
        tokens_BT = np.zeros((len(rows), padded), np.int32)
        for b, r in enumerate(rows):
            tokens_BT[b, : r.size] = r
        positions_BT = np.broadcast_to(np.arange(padded, dtype=np.int32), tokens_BT.shape)
        inputs = sharding.put((tokens_BT, positions_BT), self.mesh)
        logits_BTV = np.array(self._forward(self.params, *inputs))[:, :longest]
        for b, n in enumerate(lengths):
            logits_BTV[b, n:] = np.nan
        return logits_BTV


def _forward(graphdef, params, tokens_BT, positions_BT):
    return nnx.merge(graphdef, params)(tokens_BT, positions_BT)


def default_dtype() -> str:
    """bfloat16 on accelerators; float32 on CPU, where XLA's bfloat16 matmuls are slow."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def load(
    path: str | Path,
    *,
    dtype: str | None = None,
    mesh: Mesh | None = None,
    quantize: str | None = None,
    scan_layers: bool = True,
    progress: bool = False,
) -> Model:
    """Loads a converted checkpoint directory, a HF checkpoint directory or a `.gguf` file.

    `dtype` ("float32", "bfloat16", "float16") is the compute dtype and that of the parameters;
    by default bfloat16 on accelerators and float32 on CPU. `quantize="int8"` keeps the matmul
    weights and embedding int8 (a checkpoint converted with `--quantize int8` is int8 anyway);
    each weight is quantized on its devices as it arrives, so the full-precision model is never
    held. `mesh` (see `sharding.make_mesh`) spreads the model over several devices, each
    receiving only its shards. Without a mesh the model lives on the first device.
    `scan_layers` stacks the layers' weights and scans them: compile time independent of depth.
    Without it each layer keeps its own weights and the layers are unrolled: on CPU decoding is
    faster (XLA:CPU copies a layer's weights out of the stack before its matmuls) and compiling
    slower. `progress` shows a progress bar while a HF or GGUF checkpoint's tensors are read.
    """
    path = Path(path)
    param_dtype = checkpoint.parse_dtype(dtype or default_dtype())
    quantization.check(quantize)
    mesh = mesh or sharding.single_device_mesh()
    place = functools.partial(sharding.param_sharding, mesh)
    layout = functools.partial(abstract_model, param_dtype=param_dtype, dtype=param_dtype, scan_layers=scan_layers)
    if checkpoint.is_checkpoint(path):
        stored = checkpoint.check_format(path)
        config = with_generation_config(LlamaConfig.from_hf(path), path)
        graphdef, state = nnx.split(layout(config, quant=stored or quantize))
        # a full-precision checkpoint loaded as int8 is read as stored and quantized one tensor at a time
        as_stored = state if stored or not quantize else nnx.split(layout(config))[1]
        _fill(state, mesh, checkpoint.iter_params(path, as_stored, place))
        tokenizer, template = _optional_tokenizer(lambda: load_tokenizer(path)), read_chat_template(path)
    else:
        source = open_checkpoint(path)
        config = source.config
        graphdef, state = nnx.split(layout(config, quant=quantize))
        _fill(state, mesh, checkpoint.read_params(source, param_dtype, progress="loading" if progress else None))
        tokenizer, template = _optional_tokenizer(source.tokenizer), source.chat_template
    module = nnx.merge(graphdef, state)
    return Model(config, module, tokenizer, tokenizer and chat_template_for(tokenizer, template), mesh)


def _fill(state: nnx.State, mesh: Mesh, tensors) -> None:
    """Sets the abstract state's variables from (stored path, array) pairs, each placed on its
    shards; a layer's tensor goes into its variable, or its slot of a stacked variable (allocated
    on its shards when its first layer arrives); an int8 variable gets the weight
    quantized there, and its scale beside it."""
    int8 = quantization.int8_axes(state)
    where = {stored: (p, layer, var) for stored, p, layer, var in weights.stored_tensors(state)}
    stacks: dict = {}  # variable path -> (stack being filled, layers in it)
    for stored, value in tensors:
        _, layer, var = where[stored]
        placed = sharding.place(value, sharding.param_sharding(mesh, var, layer))
        # a full-precision weight of an int8 variable is quantized; a stored int8 one is as it was saved
        parts = quantization.stored(stored, placed, int8) if placed.dtype != var.dtype else {stored: placed}
        for q, array in parts.items():
            p, layer, var = where[q]
            array = sharding.place(array, sharding.param_sharding(mesh, var, layer))
            if layer is None:
                var.value = array
                continue
            stack, filled = stacks.get(p) or (_zeros(var.shape, var.dtype, sharding.param_sharding(mesh, var)), 0)
            stacks[p] = _set_layer(stack, array.astype(var.dtype), layer), filled + 1
            if filled + 1 == var.shape[0]:
                var.value = stacks.pop(p)[0]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _zeros(shape, dtype, where):
    return jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), where)


@functools.partial(jax.jit, donate_argnums=(0,))
def _set_layer(stack: jax.Array, value: jax.Array, layer) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stack, value, layer, 0)


def _optional_tokenizer(read) -> Tokenizer | None:
    """A checkpoint without tokenizer files still loads, for logits; text APIs then say why they fail."""
    try:
        return read()
    except FileNotFoundError:
        return None
