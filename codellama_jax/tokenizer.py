"""Tokenizers behind one interface: SentencePiece (`tokenizer.model`) and HF `tokenizer.json`.

Special-token text is only ever turned into control tokens where the caller allows it (the
chat template's own text): `encode` treats its input as plain text, so a user who types
`<step>` or `<s>` gets those characters, not the control tokens.
"""

from __future__ import annotations

import bisect
import functools
import json
import re
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2

from codellama_jax.errors import ContextLengthExceeded

Span = tuple[int, int]


class Tokenizer:
    """Shared behaviour; backends implement `_encode_plain`, `_decode` and `save`."""

    def __init__(
        self, vocab_size: int, special_tokens: dict[str, int], bos_id: int | None, eos_id: int | None, add_bos: bool
    ):
        self.vocab_size = vocab_size
        self.add_bos = add_bos and bos_id is not None  # whether a plain-text prompt starts with BOS
        self.special_tokens = dict(special_tokens)  # text -> id, for the control tokens
        self.special_ids = frozenset(special_tokens.values())
        self._special_text = {i: t for t, i in special_tokens.items()}
        self.bos_id = bos_id
        self.eos_id = eos_id
        by_length = sorted(special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, by_length))) if by_length else None

    def token_text(self, token_id: int | None) -> str | None:
        """The text of a special token (None for other ids)."""
        return self._special_text.get(token_id)

    def token_id(self, piece: str) -> int | None:
        """The id of a whole token spelled `piece` (a control token's text, or a vocabulary
        piece such as `▁<PRE>`); None when the vocabulary has no such token."""
        return self.special_tokens.get(piece, self._piece_id(piece))

    def encode_continuation(self, text: str, *, limit: int | None = None) -> list[int]:
        """Ids of plain text that continues earlier text (no leading space added in front; a
        byte-level vocabulary adds none anyway); `limit` as for `encode`."""
        self._check_length(text, limit)
        return self._encode_plain(text) if text else []

    def encode(self, text: str, *, add_bos: bool = False, limit: int | None = None) -> list[int]:
        """Token ids of plain text; special-token text in it stays text. Text that surely has
        `limit` tokens or more is refused (ContextLengthExceeded) before it is tokenized."""
        self._check_length(text, limit)
        ids = self._encode_plain(text) if text else []
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def encode_with_specials(self, text: str, plain_spans: Sequence[Span] = (), limit: int | None = None) -> list[int]:
        """Token ids of template text: special-token text becomes control tokens, except inside
        `plain_spans` (character ranges of user content, in order, not overlapping), which is
        encoded as plain text; `limit` as for `encode`."""
        self._check_length(text, limit)
        ids: list[int] = []
        start = 0
        ends = [e for _, e in plain_spans]
        for m in self._special_re.finditer(text) if self._special_re else ():
            i = bisect.bisect_right(ends, m.start())  # the first span ending after the match starts
            if i < len(plain_spans) and plain_spans[i][0] < m.end():  # inside user content
                continue
            if m.start() > start:
                ids += self._encode_plain(text[start : m.start()])
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        if start < len(text):
            ids += self._encode_plain(text[start:])
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True, continuation: bool = False) -> str:
        """Text of token ids. `continuation=True` means the ids follow earlier text, so a leading
        space (SentencePiece's `▁` on the first piece) is kept rather than dropped."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        return self._decode(ids, continuation)

    def token_bytes(self) -> list[bytes]:
        """The bytes each id stands for inside text (control tokens as their text), indexed by id."""
        return list(self._token_bytes)

    def piece_bytes(self, token_id: int) -> bytes | None:
        """The bytes one token adds to the text (None for a control token, which adds none)."""
        return None if token_id in self.special_ids else self._token_bytes[token_id]

    def min_tokens(self, text: str) -> int:
        """A lower bound on the number of tokens of `text`, found without tokenizing it (linear
        and cheap, to refuse what cannot fit before paying for it): no token covers more
        characters of the text, as the tokenizer normalizes it, than its longest piece has. It
        holds where every character is spelled by vocabulary pieces (byte-level or byte-fallback
        vocabularies: Llama's, CodeLlama's, GPT-2-style ones); elsewhere a run of unknown
        characters can fuse into one `<unk>`, and the bound is 0."""
        length = self._normalized_length(text)
        return -(-length // self._longest_piece) if length else 0

    def _check_length(self, text: str, limit: int | None) -> None:
        if limit is not None and (at_least := self.min_tokens(text)) >= limit:
            raise ContextLengthExceeded(f"the prompt has at least {at_least} tokens; at most {limit - 1} fit "
                                        f"({limit} tokens per request, with at least one new one)")  # fmt: skip

    @functools.cached_property
    def _token_bytes(self) -> tuple[bytes, ...]:
        raise NotImplementedError

    @functools.cached_property
    def _longest_piece(self) -> int:
        raise NotImplementedError

    def _normalized_length(self, text: str) -> int:
        """The length of `text` as the tokenizer's pieces see it (0 where no sound bound is known)."""
        raise NotImplementedError

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def _piece_id(self, piece: str) -> int | None:
        raise NotImplementedError

    def _decode(self, ids: list[int], continuation: bool) -> str:
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError


INFILL_PIECES = ("▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>")  # CodeLlama's infilling tokens (infill.py)
_MARKER = "☺"  # a character no piece joins to the next: text after it starts a new piece (Meta's choice)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model plus the added tokens of `tokenizer_config.json` (CodeLlama's `<step>`).
    CodeLlama's infilling pieces are control tokens however the model types them (some GGUF
    conversions make them ordinary pieces): text never becomes one, and they decode to nothing."""

    def __init__(
        self, model_proto: bytes, added_tokens: dict[str, tuple[int, bool]] | None = None, add_bos: bool = True
    ):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        spec = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
        self._dummy_prefix = spec.normalizer_spec.add_dummy_prefix
        self._identity = spec.normalizer_spec.name == "identity" and not spec.normalizer_spec.remove_extra_whitespaces
        self._byte_fallback = spec.trainer_spec.byte_fallback
        spec.normalizer_spec.add_dummy_prefix = False
        self._sp_continuation = spm.SentencePieceProcessor(model_proto=spec.SerializeToString())
        self._user_defined = {i for i, p in enumerate(spec.pieces) if p.type == p.USER_DEFINED}
        n = self.sp.get_piece_size()
        self.added_tokens = dict(added_tokens or {})  # text -> (id, special)
        self._added_text = {i: t for t, (i, _) in self.added_tokens.items()}
        specials = {self.sp.id_to_piece(i): i for i in range(n) if self.sp.is_control(i) and self.sp.id_to_piece(i)}
        specials.update({t: i for t, (i, special) in self.added_tokens.items() if special})
        infill = {p: i for p in INFILL_PIECES if self.sp.id_to_piece(i := self.sp.piece_to_id(p)) == p}
        specials.update(infill)
        # user-defined pieces (and infilling ones) can come out of SentencePiece for plain text;
        # those that are control tokens for us must be spelled out instead
        self._spell_out = (self._user_defined | set(infill.values())) & set(specials.values())
        size = max([n - 1, *(i for i, _ in self.added_tokens.values())]) + 1
        bos, eos = self.sp.bos_id(), self.sp.eos_id()
        super().__init__(size, specials, bos if bos >= 0 else None, eos if eos >= 0 else None, add_bos)

    @classmethod
    def from_directory(cls, path: Path) -> SentencePieceTokenizer:
        added: dict[str, tuple[int, bool]] = {}
        config = _read_json(path / "tokenizer_config.json")
        for token_id, entry in config.get("added_tokens_decoder", {}).items():
            added[entry["content"]] = (int(token_id), bool(entry.get("special", False)))
        added_file = path / "added_tokens.json"
        if added_file.is_file():
            for text, token_id in json.loads(added_file.read_text()).items():
                added.setdefault(text, (int(token_id), True))
        return cls((path / "tokenizer.model").read_bytes(), added, bool(config.get("add_bos_token", True)))

    def _encode_plain(self, text: str, processor: spm.SentencePieceProcessor | None = None) -> list[int]:
        ids: list[int] = []
        for i in (processor or self.sp).encode(text):
            ids += self._spelled(self.sp.id_to_piece(i)) if i in self._spell_out else [i]
        return ids

    def encode_continuation(self, text: str, *, limit: int | None = None) -> list[int]:
        """Ids of plain text that continues earlier text: no dummy-prefix space in front."""
        self._check_length(text, limit)
        return self._encode_plain(text, self._sp_continuation) if text else []

    def _piece_id(self, piece: str) -> int | None:
        if piece in self.added_tokens:
            return self.added_tokens[piece][0]
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    @functools.cached_property
    def _token_bytes(self) -> tuple[bytes, ...]:
        """`▁` as a space, byte pieces as their byte, control and added tokens as their text,
        nothing for `<unk>` (it stands for no text in particular)."""
        n = self.sp.get_piece_size()
        out = [b""] * self.vocab_size
        for i in range(n):
            if self.sp.is_unknown(i):
                continue
            piece = self.sp.id_to_piece(i)
            out[i] = bytes([int(piece[3:5], 16)]) if self.sp.is_byte(i) else piece.replace("\u2581", " ").encode()
        for text, (i, _) in self.added_tokens.items():
            out[i] = text.encode()
        return tuple(out)

    @functools.cached_property
    def _longest_piece(self) -> int:
        pieces = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size()) if not self.sp.is_byte(i)]
        return max(map(len, [*pieces, *self.added_tokens]))

    def _normalized_length(self, text: str) -> int:
        if not self._byte_fallback:
            return 0
        return len(text) if self._identity else len(self.sp.normalize(text))

    def _spelled(self, piece: str) -> list[int]:
        """A user-defined piece as ordinary pieces, character by character (bytes as fallback)."""
        ids = []
        for ch in piece:
            i = self.sp.piece_to_id(ch)
            if i != self.sp.unk_id() and i not in self._user_defined:
                ids.append(i)
            else:
                ids += [self.sp.piece_to_id(f"<0x{b:02X}>") for b in ch.encode()]
        return ids

    def _decode(self, ids: list[int], continuation: bool) -> str:
        out = bytearray()
        n = self.sp.get_piece_size()
        for i in ids:
            if i in self._added_text or i >= n:
                out += self._added_text.get(i, "").encode()
            elif self.sp.is_byte(i):
                out.append(int(self.sp.id_to_piece(i)[3:5], 16))
            elif self.sp.is_control(i) or self.sp.is_unknown(i):
                out += (self.token_text(i) or (" \u2047 " if self.sp.is_unknown(i) else "")).encode()
            else:
                out += self.sp.id_to_piece(i).replace("\u2581", " ").encode()
        text = out.decode("utf-8", errors="replace")
        if not continuation and self._dummy_prefix and text.startswith(" "):
            text = text[1:]
        return text

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        (directory / "tokenizer.model").write_bytes(self.proto)
        _merge_json(
            directory / "tokenizer_config.json",
            {
                "add_bos_token": self.add_bos,
                "added_tokens_decoder": {
                    str(i): {"content": t, "special": special} for t, (i, special) in self.added_tokens.items()
                },
            },
        )


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (a `tokenizer.json`, or one built from a GGUF vocabulary)."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        add_bos: bool = False,
    ):
        self.tok = tok
        self.tok.encode_special_tokens = True  # we split special tokens ourselves
        added = tok.get_added_tokens_decoder()
        specials = {t.content: i for i, t in added.items() if t.special}
        super().__init__(
            tok.get_vocab_size(with_added_tokens=True),
            specials,
            tok.token_to_id(bos_token) if bos_token else None,
            tok.token_to_id(eos_token) if eos_token else None,
            add_bos,
        )

    @classmethod
    def from_directory(cls, path: Path) -> HFTokenizer:
        config = _read_json(path / "tokenizer_config.json")
        return cls(
            tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")),
            _token_content(config.get("bos_token")),
            _token_content(config.get("eos_token")),
            bool(config.get("add_bos_token", False)),
        )

    @functools.cached_property
    def _token_bytes(self) -> tuple[bytes, ...]:
        """Byte-level vocabularies (GPT-2's byte-to-character table) or `▁`-and-`<0xNN>` ones
        (Llama's tokenizer.json); added tokens as their text."""
        byte_level = "ByteLevel" in json.dumps(self._spec.get("decoder"))
        from_char = {c: b for b, c in _bytes_to_unicode().items()}
        out = [b""] * self.vocab_size
        for piece, i in self.tok.get_vocab(with_added_tokens=False).items():
            if byte_level and all(c in from_char for c in piece):
                out[i] = bytes(from_char[c] for c in piece)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                out[i] = bytes([int(piece[3:5], 16)])
            else:
                out[i] = piece.replace("\u2581", " ").encode()
        for i, token in self.tok.get_added_tokens_decoder().items():
            out[i] = token.content.encode()
        return tuple(out)

    @functools.cached_property
    def _longest_piece(self) -> int:
        return max(map(len, self.tok.get_vocab(with_added_tokens=True)))

    @functools.cached_property
    def _spec(self) -> dict:
        """The tokenizer's own description (tokenizer.json's content), read once."""
        return json.loads(self.tok.to_str())

    @functools.cached_property
    def _bounded(self) -> bool:
        """A BPE whose every character has pieces (byte-level, or byte fallback) and whose
        pre-tokenizer keeps every character (BERT's whitespace splitting does not)."""
        found = set(re.findall(r'"(?:type|behavior)": ?"(\w+)"', json.dumps(self._spec.get("pre_tokenizer"))))
        drops = {"Whitespace", "WhitespaceSplit", "BertPreTokenizer", "CharDelimiterSplit", "Removed"} & found
        model = self._spec.get("model") or {}
        return model.get("type") == "BPE" and (model.get("byte_fallback") or "ByteLevel" in found) and not drops

    def _normalized_length(self, text: str) -> int:
        if not self._bounded:
            return 0
        return len(self.tok.normalizer.normalize_str(text)) if self.tok.normalizer is not None else len(text)

    def _piece_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def encode_continuation(self, text: str, *, limit: int | None = None) -> list[int]:
        """Ids of plain text that continues earlier text. A vocabulary that puts `▁` in front of
        text (Llama's tokenizer.json) encodes it after a marker character whose tokens are then
        dropped, as Meta's `encode_infilling` does with SentencePiece."""
        if not self._adds_space:
            return super().encode_continuation(text, limit=limit)
        self._check_length(text, limit)
        head = self._encode_plain(_MARKER)
        ids = self._encode_plain(_MARKER + text) if text else head
        return ids[len(head) :] if ids[: len(head)] == head else self._encode_plain(text)

    @functools.cached_property
    def _adds_space(self) -> bool:
        return self.tok.encode_batch(["a"], add_special_tokens=False)[0].tokens[0].startswith("\u2581")

    def _encode_plain(self, text: str) -> list[int]:
        # encode_batch lets go of the GIL while it works (encode holds it: 0.25 s for 600 kB), so a
        # long prompt tokenized in a worker thread does not stall the server's event loop
        return self.tok.encode_batch([text], add_special_tokens=False)[0].ids

    def _decode(self, ids: list[int], continuation: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.tok.save(str(directory / "tokenizer.json"))
        _merge_json(
            directory / "tokenizer_config.json",
            {
                "bos_token": self.token_text(self.bos_id),
                "eos_token": self.token_text(self.eos_id),
                "add_bos_token": self.add_bos,
            },
        )


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer stored in a checkpoint directory (`tokenizer.model` preferred)."""
    path = Path(path)
    if (path / "tokenizer.model").is_file():
        return SentencePieceTokenizer.from_directory(path)
    if (path / "tokenizer.json").is_file():
        return HFTokenizer.from_directory(path)
    raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json")


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas for streaming.

    The prefix/read-offset method: decode a short window of already-emitted tokens with and
    without the new ones and emit the difference, holding it back while it ends in an incomplete
    UTF-8 sequence (U+FFFD), so byte-fallback pieces of one character come out together.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-4:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        # a prompt that ends inside a character: that character is completed, and emitted, by the output
        while self.read_offset and tokenizer.decode(self.ids[: self.read_offset], continuation=True).endswith("\ufffd"):
            self.read_offset -= 1

    def push(self, token_id: int) -> str:
        """Text made complete by this token ("" while a character is still incomplete)."""
        self.ids.append(int(token_id))
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is held back, at the end of a stream."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], continuation=True)
        full_text = decode(self.ids[self.prefix_offset :], continuation=True)
        if len(full_text) <= len(prefix_text) or (full_text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full_text[len(prefix_text) :]


class OutputEnd(Protocol):
    """A rule, beside stop strings, that ends an output from its text (`tools.RepeatedCall`): fed
    the text in order, it says where the output ends (`end`) and from where text must be held
    back until it knows (`hold`; dropped if the output ends first), offsets into all the text
    fed, or None."""

    end: int | None
    hold: int | None

    def feed(self, text: str) -> None: ...


class TextStream:
    """Generated tokens to text with stop strings applied, for streaming and for final text.

    Text is released only once no stop string can begin in it, so a stream never shows part of a
    stop string; a matched stop string and everything after it are dropped, as OpenAI does. An
    `end` rule (`OutputEnd`) can end the text too, and hold it back the same way.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), stop: Sequence[str] = (),
                 end: OutputEnd | None = None):  # fmt: skip
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop = tuple(stop)
        self.end = end
        self.text = ""  # released so far
        self.stopped = False  # a stop string was found, or the end rule ended the text
        self._pending = ""
        self._ended = 0  # text fed to the end rule, counted from the start of `text`

    def push(self, token_id: int) -> str:
        """Text released by this token."""
        if self.stopped:
            return ""
        self._pending += self.detokenizer.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text, at the end of generation."""
        if not self.stopped:
            self._pending += self.detokenizer.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        found = [i for i in (self._pending.find(s) for s in self.stop) if i >= 0]
        keep = min(found, default=len(self._pending))  # what the output may hold of the pending text
        release = keep if found or final else keep - self._stop_prefix_length()  # what it surely holds
        if self.end is not None:
            start = len(self.text)
            if start + release > self._ended:
                self.end.feed(self._pending[self._ended - start : release])
                self._ended = start + release
            if self.end.end is not None and self.end.end - start <= release:  # the rule ends the output here
                release = max(self.end.end - start, 0)
                found = [release]
            elif self.end.hold is not None:  # held until known; never shown if the output ends first
                release = min(release, max(self.end.hold - start, 0))
        out = self._pending[:release]
        self._pending = "" if found else self._pending[release:]
        self.stopped = self.stopped or bool(found)
        self.text += out
        return out

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of the pending text that could begin a stop string."""
        for k in range(min(len(self._pending), max(map(len, self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(self._pending[-k:]) for s in self.stop):
                return k
        return 0


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from bytes to the printable characters byte-level vocabularies spell them with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _merge_json(path: Path, values: dict) -> None:
    path.write_text(json.dumps({**_read_json(path), **values}, indent=2, ensure_ascii=False))


def _token_content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token
