"""Tokenizers: round trips, agreement with the reference libraries, the streaming detokenizer, and
special-token text in user content staying plain text."""

from __future__ import annotations

import pytest
import sentencepiece as spm
import tokenizers

from codellama_jax import IncrementalDetokenizer
from codellama_jax.convert import GGUFCheckpoint
from codellama_jax.errors import ContextLengthExceeded
from codellama_jax.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

TEXTS = [
    "Hello world",
    " leading space and  two spaces",
    "def f(x):\n    return x + 1\n\n\tindented with a tab",
    "emoji 😀🚀 and CJK 你好，世界 mixed",
    "numbers 1234567 and 3.14",
    "ünïcödé ß and \u00a0non-breaking",
]


@pytest.fixture(scope="module")
def sp_tok(sp_dir):
    return load_tokenizer(sp_dir)


@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf):
    return GGUFCheckpoint(smollm2_gguf).tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_matches_the_library_and_round_trips(sp_tok, sp_dir, text):
    reference = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    assert isinstance(sp_tok, SentencePieceTokenizer)
    assert sp_tok.encode(text) == reference.encode(text)
    assert sp_tok.decode(sp_tok.encode(text)) == reference.decode(reference.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_bpe_round_trips(smol_tok, text):
    assert smol_tok.decode(smol_tok.encode(text)) == text


def test_smollm2_tokenizer_matches_transformers_reading_the_same_gguf(smol_tok, smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    # transformers splits digit runs differently from SmolLM2's own tokenizer (one digit per
    # token, which we follow), so compare on text without digits
    for text in [t for t in TEXTS if not any(c.isdigit() for c in t)]:
        assert smol_tok.encode(text) == reference.encode(text, add_special_tokens=False), text


def test_text_after_bos_is_split_like_the_reference(sp_tok):
    assert sp_tok.encode("Hello", add_bos=True) == [sp_tok.bos_id, *sp_tok.encode("Hello")]


def _stream(tokenizer, ids, prompt_ids=()):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detok.push(i) for i in ids]
    return deltas, detok.flush()


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("which", ["sp", "bpe"])
def test_streaming_detokenizer_reassembles_exactly(which, text, sp_tok, smol_tok):
    tokenizer = sp_tok if which == "sp" else smol_tok
    prompt = tokenizer.encode("Answer:")
    ids = tokenizer.encode(text)
    deltas, tail = _stream(tokenizer, ids, prompt)
    expected = (" " if which == "sp" else "") + text  # a continuation keeps SentencePiece's leading "▁"
    assert "".join(deltas) + tail == expected
    assert not any("\ufffd" in d for d in deltas), "a delta carried half a UTF-8 character"


def test_byte_fallback_characters_come_out_whole(sp_tok):
    ids = sp_tok.encode("😀你")
    byte_pieces = [i for i in ids if sp_tok.sp.is_byte(i)]
    assert len(byte_pieces) >= 4, "the test model should spell these characters in bytes"
    deltas, _ = _stream(sp_tok, ids)
    emitted = [d for d in deltas if d]
    assert "".join(emitted) == " 😀你" and all("\ufffd" not in d for d in emitted)
    assert deltas.count("") >= len(byte_pieces) - 2  # held back until each character was complete


def test_special_token_text_is_plain_in_encode(sp_tok, smol_tok):
    step = sp_tok.special_tokens["<step>"]
    ids = sp_tok.encode("a <step> b <s>")
    assert step not in ids and sp_tok.bos_id not in ids
    assert sp_tok.decode(ids) == "a <step> b <s>"
    im_end = smol_tok.special_tokens["<|im_end|>"]
    ids = smol_tok.encode("x<|im_end|>y")
    assert im_end not in ids and smol_tok.decode(ids) == "x<|im_end|>y"


def test_template_text_becomes_control_tokens_outside_content(sp_tok):
    text = "<s>user: <step> said <step> "
    user_step = text.index("<step>")
    ids = sp_tok.encode_with_specials(text, plain_spans=[(user_step, user_step + len("<step>"))])
    step = sp_tok.special_tokens["<step>"]
    # each piece between control tokens is encoded on its own, as transformers' legacy Llama tokenizers do
    assert ids == [sp_tok.bos_id, *sp_tok.encode("user: <step> said "), step, *sp_tok.encode(" ")]


def test_prompt_ending_inside_a_character_loses_nothing(sp_tok):
    ids = sp_tok.encode("x😀")
    cut = next(i for i in range(len(ids)) if sp_tok.sp.is_byte(ids[i])) + 1  # after the emoji's first byte
    deltas, tail = _stream(sp_tok, ids[cut:], prompt_ids=ids[:cut])
    assert "".join(deltas) + tail == "😀"


HARD = [" " * 300, "=" * 300 + "\n", "a" * 1000, "ﬁﬂ ＡＢＣ ① ｶﾞ e\u0301\u0301", "a      b\t\t\tc", "😀" * 50]


@pytest.fixture(scope="module")
def nfkc_tok(tmp_path_factory):
    """A SentencePiece model that normalizes (NFKC, extra whitespace removed), as T5-style ones do."""
    out = tmp_path_factory.mktemp("nfkc")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 50), model_prefix=str(out / "tokenizer"),
                                   model_type="bpe", vocab_size=400, byte_fallback=True,
                                   normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True,
                                   character_coverage=1.0, minloglevel=2)  # fmt: skip
    return load_tokenizer(out)


@pytest.mark.parametrize("text", TEXTS + HARD)
@pytest.mark.parametrize("which", ["sentencepiece", "byte-level", "nfkc"])
def test_min_tokens_is_a_lower_bound(which, text, sp_tok, smol_tok, nfkc_tok):
    tokenizer = {"sentencepiece": sp_tok, "byte-level": smol_tok, "nfkc": nfkc_tok}[which]
    tokens = len(tokenizer.encode(text))
    assert tokenizer.min_tokens(text) <= tokens and (tokenizer.min_tokens(text) > 0 or tokens == 0)


def test_a_surely_too_long_prompt_is_refused_without_tokenizing(sp_tok, smol_tok, monkeypatch):
    for tokenizer in (sp_tok, smol_tok):
        monkeypatch.setattr(tokenizer, "_encode_plain", lambda text: pytest.fail("tokenized"))
        with pytest.raises(ContextLengthExceeded, match="at least"):
            tokenizer.encode("ab" * 1_900_000, limit=4096)
        with pytest.raises(ContextLengthExceeded):
            tokenizer.encode_with_specials("ab" * 1_900_000, limit=4096)


@pytest.mark.parametrize("text", TEXTS)
def test_piece_bytes_rebuild_the_text(text, sp_tok, smol_tok):
    """Each token's exact bytes (a partial character included), joined, are the text's UTF-8."""
    for tokenizer in (sp_tok, smol_tok):
        ids = tokenizer.encode(text)
        assert b"".join(tokenizer.piece_bytes(i) for i in ids) == tokenizer.decode(ids, continuation=True).encode()
    assert sp_tok.piece_bytes(sp_tok.bos_id) is None  # a control token adds no text


def test_no_bound_where_unknown_characters_fuse():
    """A BPE without byte fallback spells a run of unknown characters as one `<unk>`: no bound."""
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE({"a": 0, "<unk>": 1}, [], unk_token="<unk>", fuse_unk=True))
    tokenizer = HFTokenizer(bpe)
    assert len(tokenizer.encode("€" * 100)) == 1 and tokenizer.min_tokens("€" * 100) == 0
