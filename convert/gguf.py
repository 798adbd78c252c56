"""A llama.cpp GGUF file as a weight source: config from its metadata, tensors dequantized one at a
time and renamed to HF names, q/k un-permuted, and the tokenizer rebuilt from its vocabulary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import tokenizers
from sentencepiece import sentencepiece_model_pb2

from codellama_jax.config import LlamaConfig
from codellama_jax.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer

#  GGUF name ({i}: layer index)  HF name
GGUF_TO_HF = (
    ("token_embd.weight",         "model.embed_tokens.weight"),
    ("blk.{i}.attn_norm.weight",  "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.attn_q.weight",     "model.layers.{i}.self_attn.q_proj.weight"),
    ("blk.{i}.attn_k.weight",     "model.layers.{i}.self_attn.k_proj.weight"),
    ("blk.{i}.attn_v.weight",     "model.layers.{i}.self_attn.v_proj.weight"),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blk.{i}.ffn_norm.weight",   "model.layers.{i}.post_attention_layernorm.weight"),
    ("blk.{i}.ffn_gate.weight",   "model.layers.{i}.mlp.gate_proj.weight"),
    ("blk.{i}.ffn_up.weight",     "model.layers.{i}.mlp.up_proj.weight"),
    ("blk.{i}.ffn_down.weight",   "model.layers.{i}.mlp.down_proj.weight"),
    ("output_norm.weight",        "model.norm.weight"),
    ("output.weight",             "lm_head.weight"),
)  # fmt: skip

_RENAMES = [(re.compile("^" + re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), h) for g, h in GGUF_TO_HF]

# llama.cpp token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# the pre-tokenizer each llama.cpp `tokenizer.ggml.pre` names (byte-level BPE vocabularies)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_pre_tokenizer(pre: str) -> tokenizers.pre_tokenizers.PreTokenizer:
    pt = tokenizers.pre_tokenizers
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe"):
        return pt.Sequence(
            [pt.Split(tokenizers.Regex(_LLAMA3_SPLIT), behavior="isolated"), pt.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    if pre == "smollm":
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pt.ByteLevel(add_prefix_space=False, use_regex=True)


class GGUFCheckpoint:
    """Reads a `.gguf` file (architecture `llama`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the gguf package raises bare ValueErrors/AssertionErrors on bad files
            raise ValueError(f"{self.path}: not a readable GGUF file ({e})") from None
        self.meta = {k: f.contents() for k, f in self.reader.fields.items() if not k.startswith("tokenizer.ggml.")}
        arch = self.meta.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"{self.path}: unsupported architecture {arch!r}; only 'llama' GGUF files are supported")
        self._tensors = {}
        for t in self.reader.tensors:
            if t.name == "rope_freqs.weight":
                raise ValueError(f"{self.path}: tensor rope_freqs.weight (llama3 rope scaling) is not supported")
            hf = _hf_name(t.name)
            if hf is None:
                raise ValueError(f"{self.path}: unknown tensor {t.name}")
            self._tensors[hf] = t
        self.config = self._config()

    def _field(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def _config(self) -> LlamaConfig:
        m = self.meta
        try:
            heads = m["llama.attention.head_count"]
            dim = m["llama.embedding_length"]
            eos = self._field("tokenizer.ggml.eos_token_id")
            eot = self._field("tokenizer.ggml.eot_token_id")
            stops = tuple(dict.fromkeys(i for i in (eos, eot) if i is not None))
            return LlamaConfig(
                vocab_size=m.get("llama.vocab_size") or len(self._field("tokenizer.ggml.tokens", [])),
                dim=dim,
                ffn_dim=m["llama.feed_forward_length"],
                num_layers=m["llama.block_count"],
                num_heads=heads,
                num_kv_heads=m.get("llama.attention.head_count_kv", heads),
                head_dim=m.get("llama.attention.key_length") or dim // heads,
                rope_theta=float(m.get("llama.rope.freq_base", 10000.0)),
                rms_norm_eps=float(m.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
                max_seq_len=m.get("llama.context_length", 4096),
                tie_embeddings="lm_head.weight" not in self._tensors,
                bos_token_id=self._field("tokenizer.ggml.bos_token_id"),
                eos_token_id=eos,
                stop_token_ids=stops,
            )
        except KeyError as e:
            raise ValueError(f"{self.path}: missing metadata {e.args[0]!r}") from None

    def names(self) -> list[str]:
        return list(self._tensors)

    def where(self, name: str) -> str:
        t = self._tensors.get(name)
        return f"{self.path.name} ({t.name})" if t is not None else self.path.name

    def read(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32 in HF layout `[out, in]`, q/k un-permuted."""
        t = self._tensors.get(name)
        if t is None:
            raise KeyError(f"{self.path}: tensor {name} is missing from the file")
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except (NotImplementedError, ValueError, KeyError) as e:
            raise ValueError(
                f"{self.path}: tensor {t.name} uses quantization type {t.tensor_type.name}, which cannot be "
                f"dequantized ({e})"
            ) from None
        values = np.asarray(values, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        c = self.config
        if name.endswith("q_proj.weight"):
            values = _unpermute(values, c.num_heads)
        elif name.endswith("k_proj.weight"):
            values = _unpermute(values, c.num_kv_heads)
        return values

    def tokenizer(self) -> Tokenizer:
        kind = self._field("tokenizer.ggml.model")
        tokens = self._field("tokenizer.ggml.tokens")
        types = self._field("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        bos, eos = self._field("tokenizer.ggml.bos_token_id"), self._field("tokenizer.ggml.eos_token_id")
        if kind == "gpt2":
            vocab = {tok: i for i, tok in enumerate(tokens)}
            merges = [tuple(m.split(" ", 1)) for m in self._field("tokenizer.ggml.merges", [])]
            tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, ignore_merges=False))
            tok.pre_tokenizer = _byte_level_pre_tokenizer(self._field("tokenizer.ggml.pre", "default"))
            tok.decoder = tokenizers.decoders.ByteLevel()
            tok.add_special_tokens(
                [tokenizers.AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
            )
            return HFTokenizer(
                tok,
                tokens[bos] if bos is not None else None,
                tokens[eos] if eos is not None else None,
                add_bos=bool(self._field("tokenizer.ggml.add_bos_token", False)),
            )
        if kind == "llama":
            proto = self._sentencepiece_proto(tokens, types, bos, eos)
            return SentencePieceTokenizer(proto, add_bos=bool(self._field("tokenizer.ggml.add_bos_token", True)))
        raise ValueError(f"{self.path}: unsupported tokenizer model {kind!r} (supported: 'gpt2', 'llama')")

    def _sentencepiece_proto(self, tokens, types, bos, eos) -> bytes:
        """A SentencePiece BPE model with the file's pieces, scores and types (as llama.cpp reads them)."""
        proto = sentencepiece_model_pb2.ModelProto()
        scores = self._field("tokenizer.ggml.scores") or [0.0] * len(tokens)
        kinds = {
            _NORMAL: proto.SentencePiece.NORMAL,
            _UNKNOWN: proto.SentencePiece.UNKNOWN,
            _CONTROL: proto.SentencePiece.CONTROL,
            _USER_DEFINED: proto.SentencePiece.USER_DEFINED,
            _UNUSED: proto.SentencePiece.UNUSED,
            _BYTE: proto.SentencePiece.BYTE,
        }
        for text, score, kind in zip(tokens, scores, types):
            proto.pieces.add(piece=text, score=float(score), type=kinds.get(kind, proto.SentencePiece.NORMAL))
        proto.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
        proto.trainer_spec.byte_fallback = True
        proto.trainer_spec.unk_id = self._field("tokenizer.ggml.unknown_token_id", 0)
        proto.trainer_spec.bos_id = -1 if bos is None else bos
        proto.trainer_spec.eos_id = -1 if eos is None else eos
        proto.trainer_spec.pad_id = -1
        proto.normalizer_spec.name = "identity"
        proto.normalizer_spec.add_dummy_prefix = bool(self._field("tokenizer.ggml.add_space_prefix", True))
        proto.normalizer_spec.remove_extra_whitespaces = False
        proto.normalizer_spec.escape_whitespaces = True
        return proto.SerializeToString()

    def write_assets(self, dst: Path) -> None:
        tokenizer = self.tokenizer()
        tokenizer.save(dst)
        config_file = dst / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        template = self._field("tokenizer.chat_template")
        if template:
            config["chat_template"] = template
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))
        generation = {"bos_token_id": self.config.bos_token_id, "eos_token_id": list(self.config.stop_token_ids)}
        (dst / "generation_config.json").write_text(json.dumps(generation, indent=2))

    @property
    def chat_template(self) -> str | None:
        return self._field("tokenizer.chat_template")


def _hf_name(gguf_name: str) -> str | None:
    for pattern, hf in _RENAMES:
        m = pattern.match(gguf_name)
        if m:
            return hf.replace("{i}", m.group(1)) if m.groups() else hf
    return None


def _unpermute(w_OI: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of each head's rotary halves (back to HF's rotate-half rows)."""
    out, rest = w_OI.shape[0], w_OI.shape[1:]
    return w_OI.reshape(heads, out // heads // 2, 2, *rest).swapaxes(1, 2).reshape(w_OI.shape)
