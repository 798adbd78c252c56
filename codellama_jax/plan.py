"""Memory planner: what a model needs on each device, before anything is allocated.

    codellama-plan --model codellama-70b-instruct --devices 8 --device-memory 16GiB \\
                   --dtype bfloat16 --max-batch 8 --max-len 4096

Weights, KV cache and the rest of the runner's per-row state are exact: they come from the
model's abstract parameters and the runner's abstract state laid out by the same rule table as a
real run (`sharding.py`), so replication (kv heads on a model axis larger than their count) is
counted. Working memory adds an estimate of one prefill of `max_len` tokens (attention scores,
MLP activations, one layer's keys and values) to that per-row state. A plan fits when the sum stays within `usable` of device memory,
the rest being left to XLA's own buffers. The command exits 0 when the plan fits, 2 when not.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from codellama_jax import runner, sharding
from codellama_jax.checkpoint import DTYPES
from codellama_jax.config import PRESETS, LlamaConfig
from codellama_jax.kv_cache import blocks_for
from codellama_jax.model import abstract_model

WEIGHT_DTYPES = (*DTYPES, "int8")  # int8: int8 weights, bfloat16 compute
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes per device (the fullest one) for one deployment."""

    config: LlamaConfig
    mesh_shape: tuple[int, int]
    device_memory: int
    dtype: str
    compute_dtype: str
    max_batch: int
    max_len: int
    usable: float
    weight_bytes: int
    cache_bytes: int
    state_bytes: int  # the runner's other per-row state (pending token, penalties, sampling settings), exact
    work_bytes: int  # that state and one prefill's activations (an estimate)
    largest_batch: int  # at max_len; 0 when not even one row fits
    block_size: int
    block_bytes: int  # one cache block, every layer's keys and values, on the fullest device
    seq_len: int  # the length of a typical conversation, for the paged figures
    paged_rows: int  # conversations of seq_len tokens that run at once, each row holding only their blocks
    paged_blocks: int  # the cache blocks those rows need (at least one max_len sequence's)

    @property
    def paged_memory(self) -> int:
        """`--kv-cache-memory` for `paged_rows` rows, in whole MiB (rounded up)."""
        return -(-self.paged_blocks * self.block_bytes // 2**20) * 2**20

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.cache_bytes + self.work_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.usable * self.device_memory

    def report(self, name: str = "model") -> str:
        devices = math.prod(self.mesh_shape)
        lines = [
            f"{name}: {self.config.num_params / 1e9:.2f}B parameters, {self.dtype} weights, {self.compute_dtype} "
            f"compute, {devices} device(s) "
            f"as mesh {self.mesh_shape[0]}x{self.mesh_shape[1]} (data x model), {_gib(self.device_memory)} each",
            f"  weights         {_gib(self.weight_bytes):>12} per device",
            f"  KV cache        {_gib(self.cache_bytes):>12} per device "
            f"(batch {self.max_batch} x {self.max_len} tokens, {self.compute_dtype})",
            f"  working memory  {_gib(self.work_bytes):>12} per device (estimate: a {self.max_len}-token prefill "
            "and the decode state)",
            f"  total           {_gib(self.total_bytes):>12} of {_gib(self.usable * self.device_memory)} usable "
            f"({self.usable:.0%}): {'fits' if self.fits else 'does NOT fit'}",
            f"  largest batch that fits at {self.max_len} tokens: {self.largest_batch}",
            f"  paged KV cache: {self.paged_rows} concurrent {self.seq_len}-token conversations, against "
            f"{self.largest_batch} when every row reserves {self.max_len} tokens"
            + (f": {self.paged_blocks} blocks of {self.block_size} tokens, serve with --max-batch {self.paged_rows} "
               f"--max-len {self.max_len} --kv-cache-memory {self.paged_memory // 2**20}MiB" if self.paged_rows else ""),
        ]
        return "\n".join(lines)


def plan(
    config: LlamaConfig,
    *,
    devices: int,
    device_memory: int,
    dtype: str = "bfloat16",
    max_batch: int = 1,
    max_len: int | None = None,
    mesh_shape: tuple[int, int] | None = None,
    usable: float = 0.9,
    compute_dtype: str | None = None,
    block_size: int = 16,
    seq_len: int = 1000,
) -> Plan:
    """The memory plan of `config` on `devices` devices of `device_memory` bytes each.

    `compute_dtype` (that of activations, KV cache and unquantized parameters) is `dtype` for
    float weights and bfloat16 for int8 ones unless given."""
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of: {', '.join(WEIGHT_DTYPES)}")
    max_len = max_len or config.max_seq_len
    if not 1 <= max_len <= config.max_seq_len:
        raise ValueError(f"max_len {max_len} is outside [1, {config.max_seq_len}] (the model's context)")
    if min(max_batch, devices, device_memory, block_size, seq_len) < 1 or not 0 < usable <= 1:
        raise ValueError("max_batch, devices, device_memory, block_size and seq_len must be positive, usable in (0, 1]")
    mesh_shape = tuple(mesh_shape or (1, devices))
    if len(mesh_shape) != 2 or math.prod(mesh_shape) != devices:
        raise ValueError(f"mesh {mesh_shape} does not hold {devices} devices")
    mesh = jax.sharding.AbstractMesh(mesh_shape, (sharding.DATA, sharding.MODEL))
    quant = "int8" if dtype == "int8" else None
    compute = DTYPES[compute_dtype or ("bfloat16" if quant else dtype)]
    weights = _weight_bytes(config, mesh, compute, quant)

    prefill = _prefill_bytes(config, mesh, max_len, compute)

    def paged_blocks(rows: int) -> int:  # rows of seq_len tokens, and room for one max_len sequence
        # a row holds the blocks of two decode calls ahead too (one in flight, one planned; 4 steps each)
        return max(rows * blocks_for(min(seq_len + 8, max_len), block_size), blocks_for(max_len, block_size))

    def need(rows: int, num_blocks: int) -> tuple[int, int]:
        cache, state = runner.state_bytes(config, mesh, rows, num_blocks, block_size, compute)
        return cache, state + prefill

    budget = usable * device_memory
    largest = _largest(lambda rows: sum(need(rows, rows * blocks_for(max_len, block_size))) + weights <= budget)
    paged = _largest(lambda rows: sum(need(rows, paged_blocks(rows))) + weights <= budget)
    cache, work = need(max_batch, max_batch * blocks_for(max_len, block_size))
    block = runner.block_bytes(config, mesh, block_size, compute)
    return Plan(
        config, mesh_shape, device_memory, dtype, np.dtype(compute).name, max_batch, max_len, usable,
        weights, cache, work - prefill, work, largest, block_size, block, seq_len, paged, paged_blocks(paged),
    )  # fmt: skip


def _largest(fits) -> int:
    """The largest number of rows `fits` accepts (0 when not even one): doubling, then halving."""
    largest, step = 0, 1
    while fits(largest + step):
        largest, step = largest + step, step * 2
    while step > 1:
        step //= 2
        if fits(largest + step):
            largest += step
    return largest


def _shard_bytes(mesh, axes, shape, itemsize: int) -> int:
    spec = sharding.spec(mesh, axes, shape)
    return itemsize * math.prod(n // (mesh.shape[s] if s else 1) for n, s in zip(shape, spec))


def _weight_bytes(config: LlamaConfig, mesh, param_dtype, quant) -> int:
    state = nnx.state(abstract_model(config, param_dtype=param_dtype, quant=quant), nnx.Param)
    return sum(
        _shard_bytes(mesh, var.axes, var.shape, np.dtype(var.dtype).itemsize) for _, var in nnx.to_flat_state(state)
    )


def _prefill_bytes(config: LlamaConfig, mesh, length: int, dtype) -> int:
    """One prompt's prefill at `length`, one layer at a time: float32 attention scores, the
    MLP's three activations, the layer's keys and values before they enter the cache."""
    itemsize = np.dtype(dtype).itemsize
    scores = _shard_bytes(mesh, ("heads", None, None), (config.num_heads, length, length), 4)
    mlp = 3 * _shard_bytes(mesh, (None, "mlp"), (length, config.ffn_dim), itemsize)
    kv = 2 * _shard_bytes(mesh, (None, "kv_heads", None), (length, config.num_kv_heads, config.head_dim), itemsize)
    return scores + mlp + kv


def parse_bytes(text: str) -> int:
    """'16GiB', '80GB', '141 GiB', '1.5TiB' or a plain number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m and m.group(2).upper()
    if not m or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 16GiB, 80GB or 141GiB")
    return int(float(m.group(1)) * _UNITS[unit])


def kv_blocks(model, memory: str, block_size: int) -> int:
    """Cache blocks of `block_size` positions in `memory`: bytes ('24GiB', or a plain number of
    at least 1) on each device, or a fraction below 1 ('0.5') of the memory the least free device
    has left (once the weights are loaded; the rest of the runner's state and its working memory
    come out of what remains; on several hosts, the least free of this host's devices)."""
    if block_size < 1:
        raise ValueError(f"block size {block_size}: a block holds at least one position")
    per_block = runner.block_bytes(model.config, model.mesh, block_size, model.module.dtype)
    try:
        fraction = float(memory)
    except ValueError:  # a size with a unit
        fraction = None
    if fraction is None or not 0 < fraction < 1:
        return parse_bytes(memory) // per_block
    # this process's devices (the only ones it can ask): a multi-host server's workers take process 0's figure
    stats = [device.memory_stats() for device in model.mesh.devices.flat if device.process_index == jax.process_index()]
    if any(s is None or "bytes_limit" not in s for s in stats):
        raise ValueError(f"--kv-cache-memory {memory!r}: this backend ({jax.default_backend()}) does not report "
                         "device memory, so a fraction of it cannot be taken; give bytes, e.g. 4GiB")  # fmt: skip
    free = min(s["bytes_limit"] - s["bytes_in_use"] for s in stats)
    return int(fraction * free) // per_block


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _config(model: str) -> LlamaConfig:
    if model in PRESETS:
        return PRESETS[model]
    if Path(model).suffix == ".gguf" and Path(model).is_file():
        from codellama_jax.convert.gguf import GGUFCheckpoint

        return GGUFCheckpoint(model).config
    if Path(model).exists():
        return LlamaConfig.from_hf(model)
    raise ValueError(f"{model!r} is neither a preset ({', '.join(sorted(PRESETS))}), a .gguf file nor a checkpoint directory")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="codellama-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a preset name, a .gguf file or a checkpoint directory with config.json")
    parser.add_argument("--devices", type=int, default=1, help="number of accelerators (default 1)")
    parser.add_argument("--device-memory", required=True, help="memory of one device, e.g. 16GiB, 80GB, 141GiB")
    parser.add_argument("--dtype", default="bfloat16", choices=WEIGHT_DTYPES, help="weight dtype (int8: int8 weights, bfloat16 compute)")
    parser.add_argument("--max-batch", type=int, default=1, help="decode rows held at once (default 1)")
    parser.add_argument("--max-len", type=int, help="tokens per row, prompt and output (default: the context)")
    parser.add_argument("--mesh", help="DATAxMODEL, e.g. 2x4 (default: every device on the model axis)")
    parser.add_argument("--usable", type=float, default=0.9, help="fraction of device memory to plan for (default 0.9)")
    parser.add_argument("--block-size", type=int, default=16, help="positions per KV cache block (default 16)")
    parser.add_argument("--seq-len", type=int, default=1000,
                        help="tokens of a typical conversation (prompt and answer): how many run at once when each "
                        "holds only the cache blocks it uses (default 1000)")
    args = parser.parse_args(argv)
    try:
        mesh_shape = None
        if args.mesh:
            if not re.fullmatch(r"\d+x\d+", args.mesh):
                raise ValueError(f"--mesh {args.mesh!r}: write DATAxMODEL, e.g. 2x4")
            mesh_shape = tuple(map(int, args.mesh.split("x")))
        result = plan(
            _config(args.model), devices=args.devices, device_memory=parse_bytes(args.device_memory),
            dtype=args.dtype, max_batch=args.max_batch, max_len=args.max_len, mesh_shape=mesh_shape,
            usable=args.usable, block_size=args.block_size, seq_len=args.seq_len,
        )  # fmt: skip
    except (ValueError, OSError) as e:
        print(f"codellama-plan: error: {e}", file=sys.stderr)
        return 1
    print(result.report(args.model))
    return 0 if result.fits else 2


if __name__ == "__main__":
    sys.exit(main())
