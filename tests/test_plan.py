"""The memory planner against real allocations: its weight, KV-cache and state bytes per device
equal what a model and an engine on a mesh of fake devices hold; and its CLI."""

from __future__ import annotations

import asyncio
import collections
import gc

import jax
import jax.numpy as jnp
import pytest

from codellama_jax import generate, load, runner, sharding
from codellama_jax.config import LlamaConfig
from codellama_jax.engine import Engine
from codellama_jax.plan import kv_blocks, main, parse_bytes, plan
from codellama_jax.sampling import SamplingParams

from conftest import write_hf_checkpoint


def _bytes_per_device(arrays) -> collections.Counter:
    held = collections.Counter()
    for x in arrays:
        for shard in x.addressable_shards:
            held[shard.device] += shard.data.nbytes
    return held


def _live_bytes_per_device() -> collections.Counter:
    gc.collect()
    return _bytes_per_device(jax.live_arrays())


@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("mesh_shape", [(1, 8), (2, 4)])
def test_an_engine_holds_what_the_planner_says_from_the_start(tmp_path, sp_dir, dtype, mesh_shape):
    """Every device holds exactly the planner's share of weights, KV cache and per-row state,
    from the moment the engine is built and after it served requests; greedy answers equal one
    device's. (8 kv heads divide the model axis, so the cache is split, never replicated.)"""
    hf_dir = write_hf_checkpoint(tmp_path / "hf", sp_dir, num_attention_heads=8, num_key_value_heads=8)
    quantize = "int8" if dtype == "int8" else None
    model = load(hf_dir, dtype="float32", mesh=sharding.make_mesh(mesh_shape), quantize=quantize)
    expected = plan(model.config, devices=8, device_memory=parse_bytes("1GiB"), dtype=dtype, max_batch=4, max_len=64,
                    mesh_shape=mesh_shape, compute_dtype="float32")  # fmt: skip
    assert set(_bytes_per_device(jax.tree.leaves(model.params)).values()) == {expected.weight_bytes}
    before = _live_bytes_per_device()
    engine = Engine(model, max_batch=4, max_len=64, steps_per_call=3)
    state_bytes = expected.cache_bytes + expected.state_bytes
    small = 4096  # the runner's stop ids and the like

    def held_by_engine() -> set[int]:
        after = _live_bytes_per_device()
        return {after[d] - before[d] for d in jax.devices()}

    assert all(state_bytes <= held <= state_bytes + small for held in held_by_engine())
    engine.start()
    try:
        answers = asyncio.run(_greedy(engine, PROMPTS))
    finally:
        engine.stop()
    assert all(state_bytes <= held <= state_bytes + small for held in held_by_engine())
    alone = generate(load(hf_dir, dtype="float32", quantize=quantize), PROMPTS, temperature=0.0, max_tokens=8)
    assert answers == [c.token_ids for c in alone]


PROMPTS = [[1, 5, 6, 7], [1, *range(10, 30)], [1, 9], [1, *range(40, 51)], [1, 3, 3]]


async def _greedy(engine, prompts) -> list[list[int]]:
    handles = [engine.submit(p, SamplingParams(temperature=0.0, max_tokens=8))[0] for p in prompts]
    return [[t async for chunk in h for t in chunk.token_ids] for h in handles]


def test_70b_figures():
    config = LlamaConfig.preset("codellama-70b-instruct")
    gib = 2**30
    v5e = plan(config, devices=8, device_memory=16 * gib, dtype="bfloat16", max_batch=8, max_len=4096)
    assert not v5e.fits and v5e.largest_batch == 0  # 140 GB of weights cannot fit 8 x 16 GiB
    assert v5e.paged_rows == 0 and "serve with" not in v5e.report()  # no recipe that cannot run
    assert abs(v5e.weight_bytes - config.num_params * 2 / 8) < 0.001 * v5e.weight_bytes
    h100x8 = plan(config, devices=8, device_memory=80 * gib, dtype="bfloat16", max_batch=8, max_len=4096)
    assert h100x8.fits and h100x8.cache_bytes == 80 * 2 * 8 * 4096 * 8 * 128 * 2 // 8
    h200 = plan(config, devices=1, device_memory=141 * gib, dtype="int8", max_batch=8, max_len=4096)
    assert h200.fits and h200.weight_bytes < 0.51 * config.num_params * 2
    # paged: rows of 1000-token conversations, each holding 63 blocks of 16 tokens of 80 layers' keys and values,
    # the most whose blocks and state fit beside the weights (the plan of exactly that many rows fits, one more not)
    paged = plan(config, devices=1, device_memory=141 * gib, dtype="int8", max_len=4096, seq_len=1000)
    block = 80 * 2 * 8 * 16 * 128 * 2
    assert paged.block_bytes == block and paged.paged_blocks == 63 * paged.paged_rows
    assert paged.paged_rows > 4 * paged.largest_batch == 4 * 46
    assert paged.paged_memory >= paged.paged_blocks * block > paged.paged_memory - 2**20

    def with_pool(rows: int) -> int:  # bytes of `rows` rows' state and a pool of 63 blocks each, as the server holds
        cache, state = runner.state_bytes(config, jax.sharding.AbstractMesh((1, 1), ("data", "model")), rows,
                                          63 * rows, 16, jnp.bfloat16)  # fmt: skip
        return paged.weight_bytes + cache + state + paged.work_bytes - paged.state_bytes

    assert with_pool(paged.paged_rows) <= 0.9 * 141 * gib < with_pool(paged.paged_rows + 1)
    # 16 devices on the model axis: the 8 kv heads are replicated, so the cache is not split
    v5e16 = plan(config, devices=16, device_memory=16 * gib, dtype="bfloat16", max_batch=8, max_len=4096)
    assert v5e16.cache_bytes == h100x8.cache_bytes * 8


def test_the_cache_memory_flag_in_blocks(tiny_gqa_tied):
    model = load(tiny_gqa_tied, dtype="float32")
    block = 2 * model.config.num_layers * model.config.num_kv_heads * 16 * model.config.head_dim * 4
    assert kv_blocks(model, "3MiB", 16) == 3 * 2**20 // block
    with pytest.raises(ValueError, match=r"does not report device memory"):
        kv_blocks(model, "0.5", 16)  # CPU devices
    assert kv_blocks(model, str(5 * block), 16) == 5  # a plain number of bytes
    with pytest.raises(ValueError, match="cannot read 'lots'"):
        kv_blocks(model, "lots", 16)


def test_cli(capsys):
    args = ["--model", "codellama-70b-instruct", "--devices", "1", "--device-memory", "141GiB", "--dtype", "int8",
            "--max-batch", "8", "--max-len", "4096"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "int8 weights" in out and "fits" in out and "largest batch that fits at 4096 tokens" in out
    assert "concurrent 1000-token conversations, against" in out and "--kv-cache-memory" in out
    assert main([*args[:5], "80GB", "--dtype", "bfloat16"]) == 2
    assert "does NOT fit" in capsys.readouterr().out


def test_cli_plans_a_gguf_file(capsys, smollm2_gguf):
    assert main(["--model", str(smollm2_gguf), "--device-memory", "8GiB", "--dtype", "float32", "--max-len", "4096"]) == 0
    assert "0.13B parameters" in capsys.readouterr().out  # SmolLM2-135M


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device-memory", "lots"], "cannot read 'lots' as a memory size"),
        (["--device-memory", "16GiB", "--max-len", "9999"], "max_len 9999 is outside [1, 4096]"),
        (["--device-memory", "16GiB", "--devices", "8", "--mesh", "3x3"], "does not hold 8 devices"),
        (["--device-memory", "16GiB", "--mesh", "two"], "write DATAxMODEL"),
    ],
)
def test_cli_errors_are_readable(capsys, args, message):
    assert main(["--model", "codellama-70b-instruct", *args]) == 1
    assert message in capsys.readouterr().err


def test_unknown_model_is_named(capsys):
    assert main(["--model", "llama-9000", "--device-memory", "16GiB"]) == 1
    assert "'llama-9000' is neither a preset" in capsys.readouterr().err
