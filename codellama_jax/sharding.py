"""Device meshes, and the one table that maps logical axis names to mesh axes.

Parameters carry logical axis names (`axes` metadata in model.py); activations and the KV cache
are named here. Megatron-style tensor parallelism follows from the table alone: q/k/v/gate/up
are split by output columns (heads, kv_heads, mlp on 'model'), o/down by input rows (the same
names on their input side), embedding and lm_head by vocab; rows of a batch go to 'data'. A
dimension that does not divide evenly over its mesh axis is replicated instead, as the 8 kv
heads of CodeLlama-70B are on a 16-way model axis.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"

RULES: dict[str, str | None] = {
    "layers": None,
    "batch": DATA,
    "vocab": MODEL,
    "heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "embed": None,
    "head_dim": None,
    "norm": None,
    "blocks": None,  # KV cache blocks: any row may hold any block
    "block": None,
}


def make_mesh(shape: Sequence[int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'model') mesh over `devices` (default: all of them, every process's), by default
    all on 'model': tensor parallelism first, as a model too large for one device needs."""
    devices = list(devices if devices is not None else jax.devices())
    shape = tuple(shape) if shape is not None else (1, len(devices))
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"a mesh shape is (data, model), two positive sizes; got {shape}")
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices; {len(devices)} are available")
    grid = np.array(devices, dtype=object).reshape(shape)
    return Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def single_device_mesh(device: jax.Device | None = None) -> Mesh:
    return make_mesh((1, 1), [device or jax.devices()[0]])


def spec(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec:
    """The partition spec of an array with these logical axes: each goes to its mesh axis when
    its size divides evenly and the mesh axis is not already used by an earlier dimension."""
    if len(axes) != len(shape):
        raise ValueError(f"{len(axes)} axis names {tuple(axes)} for an array of shape {tuple(shape)}")
    parts, used = [], set()
    for name, size in zip(axes, shape):
        mesh_axis = RULES[name] if name is not None else None
        if mesh_axis is None or mesh_axis in used or size % mesh.shape[mesh_axis]:
            parts.append(None)
        else:
            parts.append(mesh_axis)
            used.add(mesh_axis)
    return PartitionSpec(*parts)


def named(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, spec(mesh, axes, shape))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def param_sharding(mesh: Mesh, variable, layer: int | None = None) -> NamedSharding:
    """Where a parameter lives, from its `axes` metadata; with a `layer`, where one layer's
    slice of a stacked parameter lives (the same split without the leading layers axis)."""
    if layer is not None:
        return named(mesh, variable.axes[1:], variable.shape[1:])
    return named(mesh, variable.axes, variable.shape)


def put(tree, mesh: Mesh, agreed: bool = False):
    """Host values (numpy or single-device arrays) as arrays replicated over the mesh. When the
    mesh spans several processes, process 0's values are used on all of them, so that values
    drawn per process (fresh random seeds) cannot disagree, unless `agreed`: every process holds
    the same values already (a multi-host server publishes each call's inputs), and no collective
    is needed."""
    tree = jax.tree.map(np.asarray, tree)
    if jax.process_count() > 1 and not agreed:
        tree = multihost_utils.broadcast_one_to_all(tree)
    return jax.tree.map(functools.partial(place, where=replicated(mesh)), tree)


def place(x, where: NamedSharding) -> jax.Array:
    """`x` laid out as `where` says. A host array, the same on every process, becomes each
    process's own shards of it: `jax.device_put` would first compare the processes' copies, with
    a collective per array (an all-gather of every weight of a model loaded on several hosts)."""
    if jax.process_count() > 1 and isinstance(x, np.ndarray):
        return jax.make_array_from_callback(x.shape, where, x.__getitem__)
    return jax.device_put(x, where)
