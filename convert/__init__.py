"""Readers for foreign checkpoint formats (HF safetensors directories, GGUF files) and the
`codellama-convert` command that turns them into our orbax checkpoints."""

from __future__ import annotations

from pathlib import Path

from codellama_jax.convert.gguf import GGUFCheckpoint
from codellama_jax.convert.hf import HFCheckpoint


def open_checkpoint(path: str | Path) -> HFCheckpoint | GGUFCheckpoint:
    """The reader for a HF directory or a `.gguf` file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return GGUFCheckpoint(path)
    if path.is_dir():
        return HFCheckpoint(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    raise ValueError(f"{path}: expected a Hugging Face checkpoint directory or a .gguf file")


__all__ = ["GGUFCheckpoint", "HFCheckpoint", "open_checkpoint"]
