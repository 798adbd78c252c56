"""A Hugging Face checkpoint directory as a weight source: config, tensors (read lazily), assets.

Safetensors files are memory-mapped and parsed here (an 8-byte header length, a JSON header,
then raw little-endian data), so bfloat16 weights need neither torch nor a full read.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from codellama_jax.chat_template import read_chat_template
from codellama_jax.config import LlamaConfig
from codellama_jax.tokenizer import Tokenizer, load_tokenizer

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
}

# Files copied next to a converted checkpoint: the tokenizer and generation settings.
ASSET_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(tensor entries, byte offset where tensor data starts) of one safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path}: not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    return header, 8 + size


class HFCheckpoint:
    """Reads `config.json`, `generation_config.json` and safetensors weights (one file or sharded)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: not a directory")
        self.config = with_generation_config(LlamaConfig.from_hf(self.path), self.path)
        self._entries: dict[str, tuple[Path, dict, int]] = {}
        for shard in self._shard_files():
            header, data_start = read_safetensors_header(shard)
            for name, entry in header.items():
                self._entries[name] = (shard, entry, data_start)

    def _shard_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            shards = sorted({self.path / f for f in weight_map.values()})
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise FileNotFoundError(f"{index}: lists shards that do not exist: {', '.join(missing)}")
            return shards
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        shards = sorted(self.path.glob("*.safetensors"))
        if shards:
            return shards
        if list(self.path.glob("*.bin")) or list(self.path.glob("*.pth")):
            raise FileNotFoundError(
                f"{self.path}: only PyTorch pickle weights (*.bin/*.pth) found; save the model as safetensors "
                "first (model.save_pretrained(dir, safe_serialization=True))"
            )
        raise FileNotFoundError(f"{self.path}: no model.safetensors or model-*-of-*.safetensors files")

    def names(self) -> list[str]:
        return list(self._entries)

    def where(self, name: str) -> str:
        return self._entries[name][0].name if name in self._entries else str(self.path)

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory map (no copy until it is used)."""
        if name not in self._entries:
            raise KeyError(f"{self.path}: tensor {name} is missing from the checkpoint")
        shard, entry, data_start = self._entries[name]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{shard.name}: tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise ValueError(f"{shard.name}: tensor {name} has {end - begin} bytes, shape {list(shape)} needs more")
        return np.memmap(shard, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path)

    @property
    def chat_template(self) -> str | None:
        return read_chat_template(self.path)

    def write_assets(self, dst: Path) -> None:
        for name in ASSET_FILES:
            if (self.path / name).is_file():
                shutil.copyfile(self.path / name, dst / name)


def with_generation_config(config: LlamaConfig, path: Path) -> LlamaConfig:
    """The config with stop ids from `generation_config.json` (CodeLlama-70B: eos and `<step>`)."""
    gen_file = path / "generation_config.json"
    if not gen_file.is_file():
        return config
    eos = json.loads(gen_file.read_text()).get("eos_token_id")
    if eos is None:
        return config
    stops = tuple(eos) if isinstance(eos, list) else (eos,)
    return dataclasses.replace(config, stop_token_ids=tuple(dict.fromkeys(config.stop_token_ids + stops)))
