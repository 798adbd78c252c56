"""One frozen dataclass describes a Llama-family model; presets, and HF config.json both ways."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama model. Hashable, so it can be a static argument of `jax.jit`."""

    vocab_size: int
    dim: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    stop_token_ids: tuple[int, ...] = (2,)
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192

    def __post_init__(self):
        for name in ("vocab_size", "dim", "ffn_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_type not in _ROPE_TYPES:
            raise ValueError(f"unsupported rope type {self.rope_type!r}; supported: {', '.join(_ROPE_TYPES)}")

    @property
    def num_params(self) -> int:
        """Parameter count (embedding and lm_head counted separately unless tied)."""
        D, F, N, K, H = self.dim, self.ffn_dim, self.num_heads, self.num_kv_heads, self.head_dim
        per_layer = D * (N * H) * 2 + D * (K * H) * 2 + 3 * D * F + 2 * D
        head = 0 if self.tie_embeddings else self.vocab_size * D
        return self.vocab_size * D + self.num_layers * per_layer + D + head

    @classmethod
    def preset(cls, name: str) -> LlamaConfig:
        """A named configuration, e.g. ``LlamaConfig.preset("codellama-70b-instruct")``."""
        try:
            return PRESETS[name]
        except KeyError:
            raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None

    @classmethod
    def from_hf(cls, source: str | Path | Mapping[str, Any]) -> LlamaConfig:
        """Reads a transformers `config.json` (a dict, the file, or its directory).

        Both layouts are accepted: transformers 4 (`rope_theta`, `rope_scaling` at the top level)
        and transformers 5 (`rope_parameters`).
        """
        hf = _read_json_source(source, "config.json")
        origin = str(source) if not isinstance(source, Mapping) else "config dict"
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        if model_type != "llama" or any(a != "LlamaForCausalLM" for a in archs):
            raise ValueError(
                f"{origin}: unsupported architecture (model_type={model_type!r}, architectures={archs}); "
                "only Llama models (LlamaForCausalLM) are supported"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"{origin}: {flag}=true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{origin}: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
        try:
            num_heads = hf["num_attention_heads"]
            dim = hf["hidden_size"]
            rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
            rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            eos = hf.get("eos_token_id", 2)
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            return cls(
                vocab_size=hf["vocab_size"],
                dim=dim,
                ffn_dim=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=num_heads,
                num_kv_heads=hf.get("num_key_value_heads") or num_heads,
                head_dim=hf.get("head_dim") or dim // num_heads,
                rope_theta=float(rope_theta),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                max_seq_len=hf.get("max_position_embeddings", 4096),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=eos_ids[0] if eos_ids else None,
                stop_token_ids=eos_ids,
                rope_type=rope_type,
                rope_factor=float(rope.get("factor", 1.0)),
                rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                rope_original_max_len=int(rope.get("original_max_position_embeddings", 8192)),
            )
        except KeyError as e:
            raise ValueError(f"{origin}: missing field {e.args[0]!r}") from None

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers 4 and 5 both read back to this configuration."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type != "default":
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_len,
            )
        stops = list(self.stop_token_ids)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope if self.rope_type != "default" else None,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": stops if len(stops) > 1 else self.eos_token_id,
        }


def _read_json_source(source: str | Path | Mapping[str, Any], filename: str) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if path.is_dir():
        path = path / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def _codellama(dim: int, ffn_dim: int, layers: int, heads: int, kv_heads: int, **kw: Any) -> LlamaConfig:
    return LlamaConfig(
        dim=dim, ffn_dim=ffn_dim, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=128, **kw
    )


_LONG_CONTEXT = dict(rope_theta=1e6, max_seq_len=16384)

PRESETS: dict[str, LlamaConfig] = {
    "codellama-7b-instruct": _codellama(4096, 11008, 32, 32, 32, vocab_size=32016, **_LONG_CONTEXT),
    "codellama-13b-instruct": _codellama(5120, 13824, 40, 40, 40, vocab_size=32016, **_LONG_CONTEXT),
    "codellama-34b-instruct": _codellama(8192, 22016, 48, 64, 8, vocab_size=32000, **_LONG_CONTEXT),
    "codellama-70b-instruct": _codellama(
        8192, 28672, 80, 64, 8, vocab_size=32016, rope_theta=10000.0, max_seq_len=4096, stop_token_ids=(2, 32015)
    ),
}
