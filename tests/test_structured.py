"""Constrained decoding against its references: the bitmask as llguidance's own numpy kernel applies
it, and every output checked by `jsonschema`, from a random tiny model (garbage unless constrained)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import jsonschema
import llguidance.numpy
import numpy as np
import pytest

from codellama_jax import generate, load, stream, structured
from codellama_jax.errors import RequestError
from codellama_jax.sampling import apply_token_bitmask

from conftest import write_hf_checkpoint

# every string, number and array bounded, so that even a random model must finish
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "owner": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                                        "admin": {"type": "boolean"}},
                      "required": ["id", "admin"], "additionalProperties": False},
        },
        "required": ["name", "owner"],
        "additionalProperties": False,
    },
    "array": {
        "type": "array", "minItems": 1, "maxItems": 3,
        "items": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}},
                  "required": ["x"], "additionalProperties": False},
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"type": "integer", "minimum": 1, "maximum": 99},
                       "note": {"anyOf": [{"type": "null"}, {"const": "ok"}]}},
        "required": ["color", "size", "note"],
        "additionalProperties": False,
    },
    "pattern-ref": {
        "$defs": {"point": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 2}},
        "type": "object",
        "properties": {"id": {"type": "string", "pattern": "^[a-z]{2,5}$"}, "at": {"$ref": "#/$defs/point"}},
        "required": ["id", "at"],
        "additionalProperties": False,
    },
}  # fmt: skip


def as_response_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "test", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def model(tmp_path_factory, sp_dir):
    return load(write_hf_checkpoint(tmp_path_factory.mktemp("structured") / "hf", sp_dir, max_position_embeddings=512))


def test_the_bitmask_masks_as_llguidance_does():
    rng = np.random.default_rng(0)
    V = 1000
    logits = rng.normal(size=(4, V)).astype(np.float32)
    bitmask = rng.integers(-(2**31), 2**31, size=(4, structured.bitmask_words(V))).astype(np.int32)
    bitmask[2] = -1  # a free row
    expected = logits.copy()
    llguidance.numpy.apply_token_bitmask_inplace(expected, bitmask)
    np.testing.assert_array_equal(np.asarray(apply_token_bitmask(jnp.asarray(logits), jnp.asarray(bitmask))), expected)


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_output_validates_against_its_schema(model, name):
    schema = SCHEMAS[name]
    outputs = generate(model, ["Hello", "def f(x):"], n=2, seed=0, max_tokens=300, response_format=as_response_format(schema))
    for c in outputs:
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), schema)


def test_json_object_outputs_are_objects_or_cut_off_inside_one(model):
    """Any object is unbounded (a random model may write one key for ever); what ends is an
    object, what max_tokens cuts off is the beginning of one."""
    outputs = generate(model, ["Hello", "x = 1"], n=3, seed=0, max_tokens=100, response_format={"type": "json_object"})
    assert {c.finish_reason for c in outputs} == {"stop", "length"}
    grammar = structured.compile_grammar(model, structured.json_schema_grammar({"type": "object"}))
    for c in outputs:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
        else:
            prefix = grammar.constraint()
            for token in c.token_ids:
                prefix.advance(token)
            assert not prefix.complete


def test_max_tokens_inside_an_object_ends_with_length(model):
    (c,) = generate(model, ["Hello"], seed=1, max_tokens=4, response_format=as_response_format(SCHEMAS["nested"]))
    assert c.finish_reason == "length" and c.completion_tokens == 4
    with pytest.raises(json.JSONDecodeError):
        json.loads(c.text)


def test_a_stream_follows_the_grammar_as_generate_does(model):
    kwargs = dict(seed=5, max_tokens=300, response_format=as_response_format(SCHEMAS["enum"]))
    streamed = "".join(stream(model, "Hello", **kwargs))
    assert streamed == generate(model, ["Hello"], **kwargs)[0].text
    jsonschema.validate(json.loads(streamed), SCHEMAS["enum"])


@pytest.mark.parametrize(
    "response_format, message",
    [
        (as_response_format({"type": "array", "uniqueItems": True}), "uniqueItems"),
        (as_response_format({"type": "string", "format": "colour"}), "colour"),
        (as_response_format({"$ref": "#/$defs/missing"}), "missing"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, "name"),
        ({"type": "yaml"}, "yaml"),
    ],
)
def test_what_cannot_be_enforced_is_refused_by_name(model, response_format, message):
    with pytest.raises(ValueError, match=message):
        generate(model, ["Hello"], max_tokens=4, response_format=response_format)


def test_text_format_is_unconstrained(model):
    free = generate(model, ["Hello"], temperature=0.0, max_tokens=8)
    assert generate(model, ["Hello"], temperature=0.0, max_tokens=8, response_format={"type": "text"}) == free


@pytest.mark.parametrize("tokenizer_of", ["sentencepiece", "smollm2"])
def test_the_vocabulary_accepts_the_tokenizers_own_encoding(tokenizer_of, model, smollm2_gguf):
    """The tokenizer's own tokens of a valid document pass the grammar; of an invalid one, do not."""
    m = model if tokenizer_of == "sentencepiece" else load(smollm2_gguf)
    tokenizer = m.tokenizer
    encode = tokenizer.encode_continuation if tokenizer_of == "sentencepiece" else tokenizer.encode
    grammar = structured.compile_grammar(m, structured.json_schema_grammar(SCHEMAS["enum"]))
    good = grammar.constraint()
    for token in encode('{"color": "green", "size": 42, "note": null}'):
        good.advance(token)
    assert good.complete
    bad = grammar.constraint()
    with pytest.raises(RequestError, match="refused"):
        for token in encode('{"color": "purple"'):
            bad.advance(token)
