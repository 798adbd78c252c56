"""Sharding on 8 fake CPU devices (see conftest): meshes, the rule table, checkpoints restored
straight into their shards, and logits and greedy tokens equal to the single-device ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from codellama_jax import generate, load, sharding
from codellama_jax.checkpoint import convert
from codellama_jax.convert import open_checkpoint
from codellama_jax.scheduler import Scheduler
from codellama_jax.sampling import SamplingParams

from conftest import write_hf_checkpoint

MESHES = [(1, 8), (2, 4), (8, 1)]
PROMPTS = [[1, *range(5, 5 + n)] for n in (3, 17, 9, 30, 1, 12, 25, 6)]  # 8 rows, assorted lengths
NEW_TOKENS = 12
CONFIGS = {
    "mha": dict(num_attention_heads=8, num_key_value_heads=8),
    # fewer kv heads (2) than the model axis (4 or 8): kv heads are replicated, q heads split
    "gqa-tied": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory, sp_dir):
    """Per config, made once: a converted checkpoint and its single-device logits and greedy tokens."""
    made = {}

    def make(name):
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            hf_dir = write_hf_checkpoint(root / "hf", sp_dir, **CONFIGS[name])
            path = convert(open_checkpoint(hf_dir), root / "converted", dtype="float32")
            single = load(path)
            greedy = [c.token_ids for c in generate(single, PROMPTS, temperature=0.0, max_tokens=NEW_TOKENS)]
            made[name] = name, path, single.logits(PROMPTS), greedy
        return made[name]

    return make


@pytest.fixture(params=list(CONFIGS))
def case(request, cases):
    return cases(request.param)


def test_make_mesh_shapes_and_errors():
    assert jax.device_count() == 8
    mesh = sharding.make_mesh((2, 4))
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 2, "model": 4}
    assert dict(sharding.make_mesh().shape) == {"data": 1, "model": 8}
    with pytest.raises(ValueError, match=r"mesh shape \(3, 3\) needs 9 devices; 8 are available"):
        sharding.make_mesh((3, 3))
    with pytest.raises(ValueError, match="two positive sizes"):
        sharding.make_mesh((8,))


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"mesh{s[0]}x{s[1]}")
def test_sharded_logits_and_greedy_tokens_equal_single_device(case, shape):
    _, path, logits, greedy = case
    model = load(path, mesh=sharding.make_mesh(shape))
    np.testing.assert_allclose(model.logits(PROMPTS), logits, atol=2e-5, rtol=1e-5)
    sharded = generate(model, PROMPTS, temperature=0.0, max_tokens=NEW_TOKENS)
    assert [c.token_ids for c in sharded] == greedy


def test_unrolled_layers_sharded_equal_single_device(case):
    """scan_layers=False on a (2, 4) mesh: each layer's weights split as the rules say, the same
    logits and greedy tokens."""
    _, path, logits, greedy = case
    mesh = sharding.make_mesh((2, 4))
    model = load(path, mesh=mesh, scan_layers=False)
    assert laid_out(model.module.layers[1].mlp.up_proj.kernel[...], mesh, P(None, "model"))
    np.testing.assert_allclose(model.logits(PROMPTS), logits, atol=2e-5, rtol=1e-5)
    assert [c.token_ids for c in generate(model, PROMPTS, temperature=0.0, max_tokens=NEW_TOKENS)] == greedy


def test_parameters_and_cache_are_laid_out_by_the_rules(case):
    name, path, _, _ = case
    mesh = sharding.make_mesh((2, 4))
    model = load(path, mesh=mesh)
    layer = model.module.layers  # stacked: a leading layers axis, never split
    kv_heads = None if name == "gqa-tied" else "model"  # 2 kv heads do not divide 4
    expected = {
        "embed": (model.module.embed, P("model", None)),
        "q_proj": (layer.attn.q_proj.kernel, P(None, None, "model", None)),
        "k_proj": (layer.attn.k_proj.kernel, P(None, None, kv_heads, None)),
        "o_proj": (layer.attn.o_proj.kernel, P(None, "model", None, None)),
        "gate_proj": (layer.mlp.gate_proj.kernel, P(None, None, "model")),
        "down_proj": (layer.mlp.down_proj.kernel, P(None, "model", None)),
        "norm": (layer.attn_norm.scale, P(None, None)),
    }
    if model.module.lm_head is not None:
        expected["lm_head"] = (model.module.lm_head.kernel, P(None, "model"))
    for what, (param, spec) in expected.items():
        array = param[...]
        assert laid_out(array, mesh, spec), what
        shard_shape = tuple(n // (4 if s == "model" else 1) for n, s in zip(array.shape, spec))
        assert {s.data.shape for s in array.addressable_shards} == {shard_shape}, what

    scheduler = Scheduler(model, max_batch=4, max_len=64)
    for when in ("built", "after a request"):
        state = scheduler.runner.state
        for cache in state.cache:  # [K, L, M, Z, H]: any row may hold any block
            assert laid_out(cache, mesh, P(kv_heads, None, None, None, None)), when
        assert laid_out(state.next_B, mesh, P("data")) and laid_out(state.positions_B, mesh, P("data")), when
        done = []
        scheduler.add(scheduler.sequences(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4), lambda i: done.append))
        while scheduler.has_work():
            scheduler.step()
        assert done[-1].finish_reason == "length"


def laid_out(array: jax.Array, mesh, spec: P) -> bool:
    return array.sharding.is_equivalent_to(NamedSharding(mesh, spec), array.ndim)


def test_hf_directory_loads_sharded(tmp_path, sp_dir):
    hf_dir = write_hf_checkpoint(tmp_path / "hf", sp_dir, **CONFIGS["mha"])
    single, sharded = load(hf_dir), load(hf_dir, mesh=sharding.make_mesh((2, 4)))
    assert laid_out(sharded.module.layers.mlp.up_proj.kernel[...], sharded.mesh, P(None, None, "model"))
    np.testing.assert_allclose(sharded.logits(PROMPTS[:3]), single.logits(PROMPTS[:3]), atol=2e-5, rtol=1e-5)


def test_two_processes_agree_with_one(cases, tmp_path):
    """Two processes joined by jax.distributed on 127.0.0.1, 4 fake devices each, one (2, 4) mesh."""
    _, path, logits, greedy = cases("gqa-tied")
    worker = Path(__file__).with_name("multihost_worker.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    port = 20000 + os.getpid() % 20000
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(path), str(tmp_path / f"out{i}.json"), json.dumps(PROMPTS), str(NEW_TOKENS)],
            env={**env, "CODELLAMA_COORDINATOR": f"127.0.0.1:{port}", "CODELLAMA_NUM_PROCESSES": "2",
                 "CODELLAMA_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    for i in range(2):
        result = json.loads((tmp_path / f"out{i}.json").read_text())
        assert result["devices"] == [8, 4]
        np.testing.assert_allclose(np.array(result["logits"]), np.nan_to_num(logits, nan=0.0), atol=2e-5, rtol=1e-5)
        assert result["greedy"] == greedy
