"""Our checkpoint format: an orbax pytree of the model's parameters plus the HF-style files
(config, tokenizer, generation settings) beside it, written one tensor at a time.

    DST/codellama_jax.json   format marker, parameter dtype and quantization (null or "int8")
    DST/config.json          LlamaConfig.to_hf()
    DST/tokenizer.*, tokenizer_config.json, generation_config.json
    DST/params/              orbax checkpoint, paths as in `weights.WEIGHT_TABLE`
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from orbax.checkpoint import v1 as ocp
from tqdm import tqdm

from codellama_jax import quantize as quantization
from codellama_jax import weights
from codellama_jax.config import LlamaConfig
from codellama_jax.model import abstract_model

FORMAT_FILE = "codellama_jax.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(name: str | None):
    if name is None or name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / FORMAT_FILE).is_file()


def param_shapes(config: LlamaConfig) -> dict[weights.ParamPath, tuple[int, ...]]:
    """Shape of every stored tensor (one per layer), by stored path, without allocating anything."""
    state = nnx.state(abstract_model(config), nnx.Param)
    return {
        stored: tuple(var.shape[1:] if layer is not None else var.shape)
        for stored, _, layer, var in weights.stored_tensors(state)
    }


def read_params(source, dtype, *, progress: str | None = None) -> Iterator[tuple[weights.ParamPath, np.ndarray]]:
    """Yields (parameter path, array in `dtype`) one tensor at a time from a HF or GGUF reader,
    under a progress bar labelled `progress` when given.

    Every tensor the configuration needs is checked to exist before the first one is read, so a
    checkpoint with missing tensors fails at once, naming them.
    """
    shapes = param_shapes(source.config)
    needed = list(weights.hf_names(source.config))
    missing = sorted(set(needed) - set(source.names()))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{source.path}: tensors missing from the checkpoint: {shown}")
    np_dtype = np.dtype(dtype)
    for name in tqdm(needed, desc=progress, unit="tensor", disable=progress is None):
        path, in_axes = weights.param_path(name)
        try:
            value = weights.to_param(name, source.read(name), shapes[path], in_axes)
        except ValueError as e:
            raise ValueError(f"{source.where(name)}: {e}") from None
        yield path, np.ascontiguousarray(value, dtype=np_dtype)


def convert(
    source, dst: str | Path, *, dtype: str = "bfloat16", quantize: str | None = None, progress: bool = False
) -> Path:
    """Writes `source` (an HF or GGUF reader) as our checkpoint at `dst`, streaming; with
    `quantize="int8"` the matmul weights and embedding are stored int8 (`quantize.py`).

    Host memory stays near twice the largest tensor: tensors are buffered until they add up to
    the largest one, then appended to the orbax checkpoint. Work happens in a temporary sibling
    directory that replaces `dst` only when complete; on any error it is removed.
    """
    dst = Path(dst).absolute()
    if dst.exists():
        raise FileExistsError(f"{dst}: already exists; remove it or choose another destination")
    param_dtype = parse_dtype(dtype)
    int8 = quantization.int8_axes(nnx.state(abstract_model(source.config, quant=quantize), nnx.Param))
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        params_dir = tmp / PARAMS_DIR
        itemsize = np.dtype(param_dtype).itemsize
        budget = max(int(np.prod(s)) for s in param_shapes(source.config).values()) * itemsize
        batch: dict = {}
        batch_bytes = 0
        for path, value in read_params(source, param_dtype, progress="converting" if progress else None):
            for p, v in jax.device_get(quantization.stored(path, value, int8)).items():
                _nest(batch, p, v)
                batch_bytes += v.nbytes
            if batch_bytes >= budget:
                ocp.partial.save(params_dir, batch)
                batch, batch_bytes = {}, 0
        if batch:
            ocp.partial.save(params_dir, batch)
        ocp.partial.finalize(params_dir)
        source.write_assets(tmp)
        (tmp / "config.json").write_text(json.dumps(source.config.to_hf(), indent=2))
        (tmp / FORMAT_FILE).write_text(
            json.dumps(
                {"format_version": FORMAT_VERSION, "dtype": dtype, "quantization": quantize, "source": str(source.path)},
                indent=2,
            )
        )
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(Path(f"{tmp / PARAMS_DIR}.partial_save"), ignore_errors=True)
        raise
    return dst


def check_format(path: str | Path) -> str | None:
    """The checkpoint's quantization (None or "int8"); refuses another version of our format."""
    info = json.loads((Path(path) / FORMAT_FILE).read_text())
    if info.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {info.get('format_version')}, this library reads {FORMAT_VERSION}; "
            "convert the source checkpoint again"
        )
    return info.get("quantization")


def iter_params(path: str | Path, abstract_state: nnx.State, sharding) -> Iterator[tuple[weights.ParamPath, jax.Array]]:
    """(stored path, array) for every stored tensor, each restored straight into
    `sharding(variable, layer)` in the abstract variable's dtype; one read per layer (its tensors
    together) and one for the rest, so that beyond what a loader has placed only one layer's
    tensors are held while it places or transforms them."""
    context = ocp.Context()
    context.pytree.loading.partial_load = True
    by_layer: dict = {}
    for stored, _, layer, var in weights.stored_tensors(abstract_state):
        by_layer.setdefault(stored[1] if stored[0] == "layers" else None, []).append((stored, layer, var))
    for tensors in by_layer.values():
        target: dict = {}
        for stored, layer, var in tensors:
            shape = var.shape[1:] if layer is not None else var.shape
            _nest(target, stored, jax.ShapeDtypeStruct(shape, var.dtype, sharding=sharding(var, layer)))
        with context:
            restored = ocp.load_pytree(Path(path).absolute() / PARAMS_DIR, target)
        for stored, _, _ in tensors:
            value = restored
            for key in stored:
                value = value[key]
            yield stored, value


def _nest(tree: dict, path: weights.ParamPath, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
