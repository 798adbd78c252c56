"""LlamaConfig: presets, both transformers config layouts, and the round trip through to_hf()."""

from __future__ import annotations

import dataclasses
import json

import pytest
import transformers

from codellama_jax import LlamaConfig


def test_codellama_70b_preset_matches_the_model_card():
    c = LlamaConfig.preset("codellama-70b-instruct")
    assert (c.dim, c.ffn_dim, c.num_layers) == (8192, 28672, 80)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (64, 8, 128)
    assert (c.max_seq_len, c.rope_theta, c.vocab_size) == (4096, 10000.0, 32016)
    assert c.stop_token_ids == (2, 32015) and not c.tie_embeddings
    assert 68.9e9 < c.num_params < 69.1e9


@pytest.mark.parametrize("name", ["codellama-7b-instruct", "codellama-13b-instruct", "codellama-34b-instruct"])
def test_smaller_presets_use_long_context_rope(name):
    c = LlamaConfig.preset(name)
    assert c.rope_theta == 1e6 and c.max_seq_len == 16384


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="codellama-70b-instruct"):
        LlamaConfig.preset("llama-9000")


TRANSFORMERS4 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32016,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def test_from_hf_reads_transformers4_and_transformers5_layouts(tmp_path):
    v5 = {k: v for k, v in TRANSFORMERS4.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    v5.update(rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(v5))
    from4, from5 = LlamaConfig.from_hf(TRANSFORMERS4), LlamaConfig.from_hf(tmp_path)
    assert from4 == from5
    # config.json alone names eos 2; `<step>` (32015) comes from generation_config.json
    assert from4 == dataclasses.replace(LlamaConfig.preset("codellama-70b-instruct"), stop_token_ids=(2,))


@pytest.mark.parametrize("name", ["codellama-70b-instruct", "codellama-7b-instruct"])
def test_to_hf_round_trips_through_transformers(name):
    c = LlamaConfig.preset(name)
    assert LlamaConfig.from_hf(c.to_hf()) == c
    hf = transformers.LlamaConfig(**c.to_hf())
    assert LlamaConfig.from_hf(hf.to_dict()) == c


def test_llama3_rope_round_trips():
    c = LlamaConfig(
        vocab_size=10, dim=8, ffn_dim=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
        rope_type="llama3", rope_factor=8.0, rope_original_max_len=8192,
    )  # fmt: skip
    assert LlamaConfig.from_hf(c.to_hf()) == c


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "mistral"}, "unsupported architecture"),
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope type 'yarn'"),
        ({"num_key_value_heads": 7}, "multiple of num_kv_heads"),
    ],
)
def test_from_hf_rejects_what_it_cannot_run(change, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf({**TRANSFORMERS4, **change})


def test_from_hf_names_a_missing_field():
    hf = dict(TRANSFORMERS4)
    del hf["hidden_size"]
    with pytest.raises(ValueError, match="missing field 'hidden_size'"):
        LlamaConfig.from_hf(hf)
