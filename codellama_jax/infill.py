"""Fill-in-the-middle: the code before and after a gap, laid out in the checkpoint's own infilling
tokens, so that the model writes what goes between (`/v1/completions` with `suffix`,
`generate(..., suffix=...)`).

Two layouts, found by their tokens in the vocabulary:
- CodeLlama's, exactly as Meta's reference builds it (codellama `llama/generation.py`,
  `infilling_prompt_tokens`, prefix first): `<s> ▁<PRE>` prefix `▁<SUF>` suffix `▁<MID>`, the
  prefix encoded as any text (SentencePiece's dummy-prefix space in front) and the suffix
  without that space (Meta's `encode_infilling`); the middle ends at `▁<EOT>`.
- StarCoder's: `<fim_prefix>` prefix `<fim_suffix>` suffix `<fim_middle>`, ending at
  `<|endoftext|>` (the end-of-sequence token where the vocabulary has no such token).

Meta's README says it trained CodeLlama 7B and 13B to infill, not 34B and 70B (its model card
counts 70B in); 34B's vocabulary has no infilling tokens, 70B's has them, and both are refused,
as are checkpoints without such tokens, with a RequestError naming `suffix`.
"""

from __future__ import annotations

import dataclasses

from codellama_jax.config import LlamaConfig
from codellama_jax.errors import RequestError
from codellama_jax.tokenizer import INFILL_PIECES as CODELLAMA
from codellama_jax.tokenizer import Tokenizer

STARCODER = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")


@dataclasses.dataclass(frozen=True)
class Layout:
    """A checkpoint's infilling tokens; `end_id` ends the middle."""

    name: str
    prefix_id: int
    suffix_id: int
    middle_id: int
    end_id: int | None


def layout(tokenizer: Tokenizer) -> Layout | None:
    """The infilling layout the vocabulary has tokens for, CodeLlama's first (None: neither)."""
    ids = [tokenizer.token_id(piece) for piece in CODELLAMA]
    if None not in ids:
        return Layout("codellama", *ids)
    ids = [tokenizer.token_id(piece) for piece in STARCODER]
    if None not in ids:
        end = tokenizer.token_id("<|endoftext|>")
        return Layout("starcoder", *ids, tokenizer.eos_id if end is None else end)
    return None


def end_ids(tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """The token that ends an infilled middle (CodeLlama's `▁<EOT>`, StarCoder's end of text), as
    a stop token for every request: it ends a middle or a document, and being a control token
    it is never part of a text or a grammar's output."""
    found = layout(tokenizer) if tokenizer is not None else None
    return (found.end_id,) if found is not None and found.end_id in tokenizer.special_ids else ()


def trained_to_infill(config: LlamaConfig) -> bool:
    """False for CodeLlama 34B and 70B (8192 wide), which Meta did not train to infill."""
    return config.dim < 8192


def prompt_ids(tokenizer: Tokenizer, config: LlamaConfig, prefix: str, suffix: str, limit: int | None = None) -> list[int]:
    """The infilling prompt of the text before (`prefix`) and after (`suffix`) the gap; text that
    surely holds `limit` tokens or more is refused before it is tokenized (tokenizer.py)."""
    found = layout(tokenizer)
    if found is None:
        raise RequestError("suffix (fill-in-the-middle) needs a checkpoint with infilling tokens (CodeLlama's "
                           "<PRE>/<SUF>/<MID> or StarCoder's <fim_prefix>/<fim_suffix>/<fim_middle>); this one "
                           "has none", param="suffix")  # fmt: skip
    if found.name == "codellama" and not trained_to_infill(config):
        raise RequestError("suffix (fill-in-the-middle): Meta trained CodeLlama 7B and 13B to infill, not 34B and "
                           "70B; this checkpoint is one of those", param="suffix")  # fmt: skip
    if max(found.prefix_id, found.suffix_id, found.middle_id) >= config.vocab_size:
        raise RequestError(f"suffix (fill-in-the-middle): the tokenizer's infilling tokens lie past the model's "
                           f"{config.vocab_size}-token vocabulary", param="suffix")  # fmt: skip
    bos = [tokenizer.bos_id] if found.name == "codellama" and tokenizer.bos_id is not None else []
    return [*bos, found.prefix_id, *tokenizer.encode(prefix, limit=limit), found.suffix_id,
            *tokenizer.encode_continuation(suffix, limit=limit), found.middle_id]  # fmt: skip
