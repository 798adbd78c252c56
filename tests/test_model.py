"""Logits parity with transformers' LlamaForCausalLM on random tiny checkpoints, through the direct
HF load and through convert -> orbax -> load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from codellama_jax import load
from codellama_jax.checkpoint import convert
from codellama_jax.convert import open_checkpoint

from conftest import SP_VOCAB, write_hf_checkpoint

TOLERANCE = 1e-4  # float32 max |Δlogits|

CASES = {
    "mha-theta1e4": dict(rope_theta=1e4),
    "gqa-tied-theta1e6": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    "mqa-llama3-rope": dict(
        num_key_value_heads=1,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mha-multishard": dict(rope_theta=1e4, max_shard_size="100KB"),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, sp_dir):
    overrides = dict(CASES[request.param])
    hf_dir = write_hf_checkpoint(tmp_path_factory.mktemp(request.param) / "hf", sp_dir, **overrides)
    reference = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return request.param, hf_dir, reference


def _rows():
    rng = np.random.default_rng(0)
    return [rng.integers(0, SP_VOCAB, size=n).tolist() for n in (37, 11)]


def _assert_parity(model, reference):
    rows = _rows()
    ours = model.logits(rows)
    worst = 0.0
    for b, row in enumerate(rows):
        with torch.no_grad():
            expected = reference(torch.tensor([row])).logits[0].numpy()
        diff = np.abs(ours[b, : len(row)] - expected).max()
        worst = max(worst, float(diff))
        assert np.isnan(ours[b, len(row) :]).all()
    assert worst <= TOLERANCE, f"max |Δlogits| = {worst:.2e}"


def test_direct_hf_load_matches_transformers(case):
    name, hf_dir, reference = case
    if name == "mha-multishard":
        assert len(list(hf_dir.glob("model-*-of-*.safetensors"))) > 1
    _assert_parity(load(hf_dir, dtype="float32"), reference)


def test_converted_checkpoint_matches_transformers(case, tmp_path):
    _, hf_dir, reference = case
    dst = convert(open_checkpoint(hf_dir), tmp_path / "converted", dtype="float32")
    _assert_parity(load(dst), reference)


def test_unrolled_layers_match_transformers(case, tmp_path):
    """scan_layers=False: one variable per layer, read from HF files and from our checkpoints."""
    _, hf_dir, reference = case
    dst = convert(open_checkpoint(hf_dir), tmp_path / "converted", dtype="float32")
    for model in (load(hf_dir, dtype="float32", scan_layers=False), load(dst, scan_layers=False)):
        assert model.module.layers[0].attn.q_proj.kernel[...].ndim == 3  # [D, N, H]: no layers axis
        _assert_parity(model, reference)


def test_bfloat16_load_is_close(tiny_gqa_tied):
    reference = load(tiny_gqa_tied, dtype="float32").logits(_rows()[:1])
    model = load(tiny_gqa_tied, dtype="bfloat16")
    assert model.params["embed"].value.dtype == np.dtype("bfloat16")
    ours = model.logits(_rows()[:1])
    assert np.abs(ours - reference).max() < 0.05 * np.abs(reference).max()


def test_logits_rejects_bad_input(tiny_gqa_tied):
    model = load(tiny_gqa_tied, dtype="float32")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.logits([[1, SP_VOCAB]])
    with pytest.raises(ValueError, match="non-empty"):
        model.logits([[]])
    with pytest.raises(ValueError, match="context is 128"):
        model.logits([[1] * 129])
