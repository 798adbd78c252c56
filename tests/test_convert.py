"""Conversion: HF directories and GGUF files to our orbax checkpoint, the CLI, and every bad input
stopping with a message that names the file and tensor, leaving no half-written destination."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from safetensors.numpy import load_file, save_file

from codellama_jax import load
from codellama_jax.checkpoint import convert
from codellama_jax.convert import open_checkpoint

from conftest import SP_VOCAB, write_hf_checkpoint


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, sp_dir):
    return write_hf_checkpoint(tmp_path_factory.mktemp("conv") / "hf", sp_dir, num_key_value_heads=2, rope_theta=1e4)


def _run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "codellama_jax.convert", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_cli_converts_and_copies_assets(hf_dir, tmp_path):
    dst = tmp_path / "out"
    result = _run_cli(hf_dir, dst, "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr and "converting" in result.stderr  # summary and progress bar
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json", "codellama_jax.json", "params"):
        assert (dst / name).exists(), name
    model = load(dst)
    assert model.params["layers"]["attn"]["q_proj"]["kernel"].value.shape[1:] == (64, 4, 16)  # [L, D, N, H]
    assert model.tokenizer.encode("hello") == load(hf_dir).tokenizer.encode("hello")


def test_cli_help_explains_every_flag():
    result = _run_cli("--help")
    assert result.returncode == 0
    for flag in ("--dtype", "--quantize", "--quiet", "src", "dst"):
        assert flag in result.stdout


def _break(hf_dir, tmp_path, mutate):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in hf_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    mutate(broken)
    return broken


def _drop_tensor(d):
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors")


def _wrong_shape(d):
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    save_file(tensors, d / "model.safetensors")


def _edit_config(**changes):
    def mutate(d):
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **changes}))

    return mutate


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: (d / "config.json").unlink(), "config.json: no such file"),
        (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 4), "not a safetensors file"),
        (_drop_tensor, "tensors missing from the checkpoint: model.layers.1.mlp.up_proj.weight"),
        (_wrong_shape, r"model.safetensors: tensor model.layers.0.self_attn.k_proj.weight has shape \[16, 64\], the model expects \[32, 64\]"),
        (_edit_config(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "unsupported architecture"),
    ],
    ids=["no-config", "no-weights", "corrupt-weights", "missing-tensor", "shape-mismatch", "unknown-architecture"],
)
def test_bad_input_names_the_problem_and_leaves_nothing(hf_dir, tmp_path, mutate, message):
    broken = _break(hf_dir, tmp_path, mutate)
    dst = tmp_path / "dst"
    result = _run_cli(broken, dst)
    assert result.returncode == 1
    assert "codellama-convert: error:" in result.stderr
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert not dst.exists() and not list(tmp_path.glob(".dst*"))


def test_existing_destination_is_refused(hf_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert(open_checkpoint(hf_dir), tmp_path / "taken")


def _permute(w, heads):
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (what our reader must undo)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip


def _gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
    return f"blk.{m.group(1)}.{GGUF_NAMES[m.group(2)]}.weight"


def write_gguf(path, hf_model, sp_dir, *, q8_1_tensor: str | None = None):
    """A llama.cpp-layout GGUF of a transformers model, with the SentencePiece vocabulary."""
    c = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    n = sp.get_piece_size()
    types = [3 if sp.is_control(i) else 6 if sp.is_byte(i) else 2 if sp.is_unknown(i) else 1 for i in range(n)]
    types[sp.piece_to_id("<step>")] = 4
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, tensor in hf_model.state_dict().items():
        values = tensor.numpy().astype(np.float32)
        if "q_proj" in name:
            values = _permute(values, c.num_attention_heads)
        elif "k_proj" in name:
            values = _permute(values, c.num_key_value_heads)
        gname = _gguf_name(name)
        if gname == q8_1_tensor:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
            raw = np.zeros((values.shape[0], values.shape[1] // block * size), np.uint8)
            w.add_tensor(gname, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        else:
            w.add_tensor(gname, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_case(hf_dir, sp_dir, tmp_path_factory):
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return hf_model, write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", hf_model, sp_dir)


def test_gguf_is_unpermuted_and_matches_transformers(gguf_case, tmp_path):
    hf_model, path = gguf_case
    rows = [np.random.default_rng(1).integers(0, SP_VOCAB, 24).tolist()]
    with torch.no_grad():
        expected = hf_model(torch.tensor(rows)).logits.numpy()
    assert np.abs(load(path, dtype="float32").logits(rows) - expected).max() <= 1e-4
    converted = load(convert(open_checkpoint(path), tmp_path / "from-gguf", dtype="float32"))
    assert np.abs(converted.logits(rows) - expected).max() <= 1e-4


def test_gguf_sentencepiece_vocabulary_tokenizes_like_the_model_file(gguf_case, sp_dir):
    _, path = gguf_case
    tokenizer = open_checkpoint(path).tokenizer()
    reference = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    for text in ("def add(a, b):\n    return a + b", "Hello world 123", "emoji 😀"):
        assert tokenizer.encode(text) == reference.encode(text)
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_gguf_with_unsupported_quant_type_is_refused(hf_dir, sp_dir, tmp_path):
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    path = write_gguf(tmp_path / "q81.gguf", hf_model, sp_dir, q8_1_tensor="blk.1.ffn_up.weight")
    result = _run_cli(path, tmp_path / "dst")
    assert result.returncode == 1
    assert "tensor blk.1.ffn_up.weight uses quantization type Q8_1" in result.stderr
    assert not (tmp_path / "dst").exists()


def _conversion_rss_growth(hf: Path, dst: Path) -> int:
    """Peak RSS growth (bytes) of converting `hf` in a fresh process, over its RSS after imports;
    the least of two conversions (the writer's threads move a single peak by +-25 MiB here)."""
    return min(_one_conversion_rss_growth(hf, dst / str(i)) for i in range(2))


def _one_conversion_rss_growth(hf: Path, dst: Path) -> int:
    code = (
        "import re\n"
        "from codellama_jax.checkpoint import convert\n"
        "from codellama_jax.convert import open_checkpoint\n"
        "def hwm(): return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # reset the peak to the current RSS\n"
        "base = hwm()\n"
        f"convert(open_checkpoint({str(hf)!r}), {str(dst)!r}, dtype='float32')\n"
        "print(base, hwm())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    base_kib, peak_kib = map(int, out.stdout.split())
    return (peak_kib - base_kib) * 1024


def test_conversion_streams_with_bounded_memory(tmp_path, sp_dir):
    """Peak RSS converting a 6-layer multi-shard checkpoint stays within the fixed overhead (the
    growth for 1 layer of the same shapes: runtime buffers, one batch) plus 2x the largest tensor."""
    shapes = dict(vocab_size=SP_VOCAB, hidden_size=768, intermediate_size=6144, num_attention_heads=8,
                  num_key_value_heads=8, max_shard_size="40MB")  # fmt: skip
    largest = 768 * 6144 * 4
    small = write_hf_checkpoint(tmp_path / "small", sp_dir, num_hidden_layers=1, **shapes)
    big = write_hf_checkpoint(tmp_path / "big", sp_dir, num_hidden_layers=6, **shapes)
    total = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    fixed = _conversion_rss_growth(small, tmp_path / "small-out")
    growth = _conversion_rss_growth(big, tmp_path / "big-out")
    print(
        f"checkpoint {total / 2**20:.0f} MiB in {len(list(big.glob('*.safetensors')))} shards, largest tensor "
        f"{largest / 2**20:.0f} MiB: RSS growth {growth / 2**20:.0f} MiB, fixed overhead {fixed / 2**20:.0f} MiB"
    )
    assert growth < fixed + 2 * largest


def test_checkpoint_of_another_format_version_is_refused(hf_dir, tmp_path):
    dst = convert(open_checkpoint(hf_dir), tmp_path / "ck", dtype="float32")
    marker = dst / "codellama_jax.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        load(dst)
