"""int8 weight-only quantization: the rounding itself, and logits close to float32 whether the
weights are quantized at conversion or at load time, on one device or sharded."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from codellama_jax import load, sharding
from codellama_jax.checkpoint import convert
from codellama_jax.convert import open_checkpoint
from codellama_jax.convert.__main__ import main as convert_cli
from codellama_jax.generation import chat
from codellama_jax.quantize import quantize_int8, scale_path

from conftest import write_hf_checkpoint

PROMPTS = [[1, 5, 9, 200, 37, 41, 2, 300], [1, 17, 18]]
# per-channel int8 rounds each weight by at most half a step (max|w|/254); through two layers
# and the head that stays within 2% of the logits' range on the random tiny models
TINY_BOUND = 0.02


def test_quantize_rounds_each_channel_within_half_a_step():
    w = np.random.default_rng(0).normal(size=(64, 4, 16)).astype(np.float32)
    w[:, 0, 0] = 0.0  # an all-zero output channel
    q, scale = map(np.asarray, quantize_int8(w, (0,)))
    assert q.dtype == np.int8 and scale.shape == (4, 16) and scale.dtype == np.float32
    np.testing.assert_allclose(scale, np.abs(w).max(axis=0) / 127 + (w[:1] == 0)[0], rtol=1e-6)
    assert np.all(np.abs(q.astype(np.float32) * scale - w) <= scale / 2 + 1e-7)
    assert q[:, 0, 0].tolist() == [0] * 64 and np.abs(q).max() == 127
    assert scale_path(("layers", 3, "attn", "o_proj", "kernel")) == ("layers", 3, "attn", "o_proj", "scale")
    assert scale_path(("embed",)) == ("embed_scale",)


@pytest.fixture(scope="module", params=["gqa", "tied"])
def tiny(request, tmp_path_factory, sp_dir):
    overrides = {"gqa": dict(num_attention_heads=8, num_key_value_heads=2), "tied": dict(tie_word_embeddings=True)}
    root = tmp_path_factory.mktemp(f"q-{request.param}")
    hf_dir = write_hf_checkpoint(root / "hf", sp_dir, **overrides[request.param])
    return root, hf_dir, load(hf_dir).logits(PROMPTS)


def _error(model, reference) -> float:
    return float(np.nanmax(np.abs(model.logits(PROMPTS) - reference)) / (np.nanmax(reference) - np.nanmin(reference)))


def test_int8_logits_close_to_float_by_every_path(tiny):
    root, hf_dir, reference = tiny
    converted_int8 = convert(open_checkpoint(hf_dir), root / "int8", dtype="float32", quantize="int8")
    converted_float = convert(open_checkpoint(hf_dir), root / "float", dtype="float32")
    assert json.loads((converted_int8 / "codellama_jax.json").read_text())["quantization"] == "int8"
    models = {
        "load-time from HF": load(hf_dir, quantize="int8"),
        "convert --quantize": load(converted_int8),
        "load-time from orbax": load(converted_float, quantize="int8"),
        "sharded (2, 4)": load(converted_int8, mesh=sharding.make_mesh((2, 4))),
    }
    errors = {name: _error(model, reference) for name, model in models.items()}
    print({k: f"{v:.2%}" for k, v in errors.items()})
    assert max(errors.values()) < TINY_BOUND
    assert len({round(e, 6) for e in errors.values()}) == 1  # the same int8 weights every way
    kernel = models["sharded (2, 4)"].module.layers.mlp.up_proj  # [L, D, F], stacked over layers
    assert kernel.kernel[...].dtype == np.int8 and kernel.scale[...].dtype == np.float32
    assert kernel.kernel[...].sharding.spec[2] == "model" and kernel.scale[...].sharding.spec[1] == "model"


def test_int8_with_unrolled_layers_is_refused(tiny):
    """XLA would dequantize every layer's weights at the start of each call (a float copy of the
    model); int8 runs scanned, one layer's weights dequantized at a time."""
    root, hf_dir, _ = tiny
    converted = convert(open_checkpoint(hf_dir), root / "int8-refused", dtype="float32", quantize="int8")
    for source, quantize in ((hf_dir, "int8"), (converted, None)):
        with pytest.raises(ValueError, match="int8 weights need scanned layers"):
            load(source, quantize=quantize, scan_layers=False)


def test_cli_quantize_flag(tiny, tmp_path):
    _, hf_dir, _ = tiny
    assert convert_cli([str(hf_dir), str(tmp_path / "q"), "--quantize", "int8", "--dtype", "float32", "--quiet"]) == 0
    assert load(tmp_path / "q").module.layers.attn.q_proj.kernel[...].dtype == np.int8


def test_unknown_quantization_is_refused(tiny):
    with pytest.raises(ValueError, match="unsupported quantization 'int4'; choose one of: None, int8"):
        load(tiny[1], quantize="int4")


def test_smollm2_int8_still_answers_paris_at_about_half_the_bytes(smollm2_gguf):
    float_model = load(smollm2_gguf, dtype="float32")
    int8_model = load(smollm2_gguf, dtype="float32", quantize="int8")
    ids = float_model.chat_template.encode(float_model.tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    reference = float_model.logits([ids])[0]
    diff = float(np.abs(int8_model.logits([ids])[0] - reference).max())
    logit_range = float(reference.max() - reference.min())
    print(f"SmolLM2 int8: max |Δlogits| = {diff:.3f} over a logit range of {logit_range:.1f}")
    assert diff < 0.05 * logit_range
    answer = chat(int8_model, [{"role": "user", "content": "What is the capital of France?"}], temperature=0.0, max_tokens=20)
    assert "Paris" in answer.text
    int8_bytes = sum(x.nbytes for x in jax.tree.leaves(int8_model.params))
    bf16_bytes = sum(x.size * 2 for x in jax.tree.leaves(float_model.params))
    print(f"parameter bytes: int8 {int8_bytes / 2**20:.1f} MiB, bfloat16 {bf16_bytes / 2**20:.1f} MiB")
    assert int8_bytes < 0.52 * bf16_bytes
