"""Constrained decoding: output that follows a JSON schema or a grammar by construction (llguidance).

A grammar is compiled once per request (`compile_grammar`); each constrained row of a batch gets a
`Constraint`, an llguidance matcher built on the model's own vocabulary. Before a decode step,
`fill_bitmask` writes every row's allowed tokens into a `[B, ceil(V/32)]` int32 bitmask (free rows:
all ones); the jitted sampling step masks the logits with it (`sampling.apply_token_bitmask`), so
constrained and free rows share a batch. After the step each constraint consumes its row's token.
The model's stop tokens are the grammar's end: they are allowed only where the grammar is complete.
"""

from __future__ import annotations

import collections
import re
import threading
import urllib.parse
import weakref
from typing import Any, Mapping, Sequence

import llguidance
import llguidance.numpy
import numpy as np

from codellama_jax.errors import RequestError
from codellama_jax.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer

# JSON as json.dumps writes it: ", " and ": " between items, no other whitespace (a model cannot
# then stall in endless whitespace); schema keywords that are not enforced are errors, not ignored.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": False}
SPECIAL = b"\xff"  # llguidance's mark on the bytes of a special (control) token

_vocabularies: weakref.WeakKeyDictionary[Tokenizer, dict[tuple, llguidance.LLTokenizer]] = weakref.WeakKeyDictionary()
_vocabularies_lock = threading.Lock()
_executor = llguidance.LLExecutor()


def json_schema_grammar(schema: Mapping[str, Any]) -> str:
    """The grammar of JSON that validates against `schema` (a ValueError if no value can)."""
    if not isinstance(schema, Mapping):
        raise ValueError("a JSON schema must be an object")
    check_satisfiable(schema)
    return llguidance.LLMatcher.grammar_from_json_schema(dict(schema), overrides=JSON_OPTIONS)


def check_satisfiable(schema: Mapping[str, Any]) -> None:
    """A ValueError when no JSON value satisfies `schema` because a value it requires cannot be
    built (`false`, or a definition only built from itself: `{"$ref": "#/$defs/a"}` as `a`, an
    object that requires a property of its own type): llguidance accepts such grammars and fails
    only while decoding. A least fixpoint, linear in the schema: a definition is satisfiable once
    some finite value of it is known; each is looked at again only when one it refers to is."""
    defs = {"#": schema}
    for where in ("$defs", "definitions"):
        if isinstance(schema.get(where), Mapping):
            defs.update({f"#/{where}/{name}": node for name, node in schema[where].items()})
    known = dict.fromkeys(defs, False)

    def ref(node: Mapping) -> str | None:  # a JSON pointer as a key of `defs`: ~1 is "/", ~0 is "~"
        target = node.get("$ref")
        return urllib.parse.unquote(target).replace("~1", "/").replace("~0", "~") if isinstance(target, str) else None

    def satisfiable(node: Any) -> bool:
        if not isinstance(node, Mapping):
            return node is not False
        if not known.get(ref(node), True):
            return False
        if not all(satisfiable(x) for x in node.get("allOf", [])):
            return False
        if any(key in node and not any(satisfiable(x) for x in node[key]) for key in ("anyOf", "oneOf")):
            return False
        kinds = [node["type"]] if isinstance(node.get("type"), str) else node.get("type")
        if kinds == ["object"]:
            properties = node.get("properties") or {}
            return all(satisfiable(properties.get(name, True)) for name in node.get("required", []))
        if kinds == ["array"]:
            prefix, needed = node.get("prefixItems", []), node.get("minItems", 0)
            return all(map(satisfiable, prefix[:needed])) and (needed <= len(prefix) or satisfiable(node.get("items", True)))
        return True

    def refs_in(node: Any):
        if isinstance(node, Mapping):
            yield ref(node)
            for value in node.values():
                yield from refs_in(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs_in(value)

    body = {k: v for k, v in schema.items() if k not in ("$defs", "definitions")}
    try:
        dependants: dict[str, set[str]] = {name: set() for name in defs}
        for name, node in defs.items():
            for target in refs_in(body if name == "#" else node):
                if target in dependants:
                    dependants[target].add(name)
        pending = collections.deque(defs)
        while pending:
            name = pending.popleft()
            if not known[name] and satisfiable(defs[name]):
                known[name] = True
                pending.extend(dependants[name])
    except (TypeError, AttributeError, RecursionError):  # malformed: llguidance's validation says what is wrong
        return
    if not known["#"]:
        needed = sorted({t for t in refs_in(body) if t in known and not known[t] and t != "#"})
        raise ValueError("no JSON value satisfies this schema" + (f": no value of {', '.join(needed)} can be built "
                         "(false, or only from itself)" if needed else ""))  # fmt: skip


def lark_grammar(source: str) -> str:
    """A grammar in llguidance's Lark syntax (which may inline schemas with `%json {...}`)."""
    return llguidance.LLMatcher.grammar_from_lark(source)


def response_format_grammar(response_format: Mapping[str, Any] | None) -> str | None:
    """The grammar OpenAI's `response_format` asks for: None for text, any JSON object for
    `json_object`, and JSON valid against the schema for `json_schema`."""
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise ValueError("response_format must be an object with a 'type'")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"})
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise ValueError("response_format.json_schema must be an object with a 'name' and a 'schema'")
        try:
            source = json_schema_grammar(spec.get("schema", {}))
            check_grammar(source)
        except ValueError as e:
            raise ValueError(f"response_format.json_schema.schema: {e}") from None
        return source
    raise ValueError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")


def vocabulary(tokenizer: Tokenizer, vocab_size: int, stop_ids: Sequence[int]) -> llguidance.LLTokenizer:
    """The tokenizer as llguidance sees it (built once per tokenizer, ~1 s for 32k tokens)."""
    key = (vocab_size, tuple(stop_ids))
    with _vocabularies_lock:
        built = _vocabularies.setdefault(tokenizer, {})
        if key not in built:
            built[key] = _build_vocabulary(tokenizer, vocab_size, list(stop_ids))
        return built[key]


def _build_vocabulary(tokenizer: Tokenizer, vocab_size: int, stop_ids: list[int]) -> llguidance.LLTokenizer:
    if isinstance(tokenizer, HFTokenizer):
        return llguidance.LLTokenizer(tokenizer.tok.to_str(), n_vocab=vocab_size, eos_token=stop_ids)
    if isinstance(tokenizer, SentencePieceTokenizer):
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_SentencePieceVocabulary(tokenizer, vocab_size)),
                                      n_vocab=vocab_size, eos_token=stop_ids)  # fmt: skip
    raise TypeError(f"constrained decoding does not know tokenizers of type {type(tokenizer).__name__}")


class _SentencePieceVocabulary:
    """What `llguidance.TokenizerWrapper` reads: each id's bytes, and a tokenize function for text
    that continues a sequence (no dummy-prefix space)."""

    def __init__(self, tokenizer: SentencePieceTokenizer, vocab_size: int):
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(tokenizer.special_ids)
        tokens = tokenizer.token_bytes()[:vocab_size]
        for i in tokenizer.special_ids:
            if i < vocab_size:
                tokens[i] = SPECIAL + tokens[i]
        self.tokens = tokens + [b""] * (vocab_size - len(tokens))
        self._tokenizer = weakref.ref(tokenizer)  # the cache entry must not keep its key alive

    def __call__(self, text: str | bytes) -> list[int]:
        return self._tokenizer().encode_continuation(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


def check_grammar(source: str, vocab: llguidance.LLTokenizer | None = None) -> None:
    """A ValueError with llguidance's message when the grammar (or a schema in it) uses what
    cannot be enforced: an unknown keyword or format, a dangling `$ref`, a bad regex."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, vocab)
    if is_error:
        raise ValueError(_short(messages[0]))


class Grammar:
    """A grammar checked against a model's vocabulary; `constraint()` starts one row's matcher
    (a copy of one built here, so that requests do not rebuild the grammar). `param` is the
    request field it comes from, named when the grammar cannot be followed."""

    def __init__(self, source: str, vocab: llguidance.LLTokenizer, param: str):
        check_grammar(source, vocab)
        self.source, self.param = source, param
        self._start = llguidance.LLMatcher(vocab, source, log_level=0)
        try:  # a grammar with no sentence at all fails its very first mask
            first = fill_bitmask([self.constraint()], vocab.vocab_size)
        except ConstraintError as e:
            raise ValueError(f"the grammar admits no output at all ({e})") from None
        if not first.any():
            raise ValueError("the grammar admits no output at all")

    def constraint(self) -> Constraint:
        return Constraint(self._start.deep_copy(), self.param)


def compile_grammar(model, source: str, param: str = "response_format") -> Grammar:
    """`source` (from `json_schema_grammar`, `lark_grammar`, ...) for `model`'s vocabulary; a
    schema feature or grammar construct llguidance cannot enforce is a ValueError naming it."""
    if model.tokenizer is None:
        raise ValueError("constrained decoding needs the model's tokenizer; this checkpoint has none")
    if not model.stop_token_ids:
        raise ValueError("constrained decoding needs the model's stop tokens; its config names none")
    return Grammar(source, vocabulary(model.tokenizer, model.config.vocab_size, model.stop_token_ids), param)


class Constraint:
    """One row's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, param: str):
        self.matcher, self.param = matcher, param

    def advance(self, token_id: int) -> None:
        """Consumes the row's sampled token (one the mask allowed; llguidance may still give up on
        a grammar past its limits, which is the request's to hear about)."""
        if not self.matcher.consume_token(int(token_id)):
            raise RequestError(f"constrained decoding: token {token_id} refused: {_short(self.matcher.get_error())}",
                               param=self.param)  # fmt: skip

    def forced(self) -> list[int]:
        """The tokens the grammar forces from here (a JSON schema's fixed keys), in the
        tokenization llguidance prefers: a draft that costs no guessing."""
        return list(self.matcher.compute_ff_tokens())

    def valid_prefix(self, tokens: Sequence[int]) -> list[int]:
        """The longest prefix of `tokens` the grammar allows from here."""
        return list(tokens[: self.matcher.validate_tokens(list(tokens))])

    @property
    def complete(self) -> bool:
        """The output so far is a whole sentence of the grammar."""
        return self.matcher.is_accepting()


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class ConstraintError(RuntimeError):
    """Matchers that failed computing their mask (`errors`: each one's row and the RequestError
    its request gets, naming the grammar's field); the other rows are fine."""

    def __init__(self, errors: dict[int, RequestError]):
        super().__init__(str(next(iter(errors.values()))))
        self.errors = errors


def fill_bitmask(constraints: Sequence[Constraint | None], vocab_size: int) -> np.ndarray:
    """The next step's allowed tokens, `[len(constraints), ceil(V/32)]` int32, bit `t % 32` of
    word `t // 32` for token t; rows without a constraint allow everything."""
    return fill_draft_bitmasks(constraints, [()] * len(constraints), vocab_size, 1)[:, 0]


def fill_draft_bitmasks(constraints: Sequence[Constraint | None], drafts: Sequence[Sequence[int]], vocab_size: int,
                        positions: int) -> np.ndarray:  # fmt: skip
    """Allowed tokens at each of `positions` positions of a verify call, `[len(constraints),
    positions, ceil(V/32)]`: row b's next token, then the token after each of its draft tokens
    in turn (drafts the grammar allows, shorter than `positions`); past a row's draft, and for
    rows without a constraint, every token."""
    bitmask_BTW = np.full((len(constraints), positions, bitmask_words(vocab_size)), -1, np.int32)
    flat = bitmask_BTW.reshape(-1, bitmask_BTW.shape[-1])
    rows = [(b, c.matcher, list(map(int, drafts[b]))) for b, c in enumerate(constraints) if c is not None]
    drafted = [(m, b * positions, draft) for b, m, draft in rows if draft]  # llguidance refuses an empty draft
    if drafted:
        llguidance.numpy.fill_next_token_bitmask_par_with_draft_tokens(_executor, drafted, flat)
    undrafted = [(m, b * positions) for b, m, draft in rows if not draft]
    if undrafted:
        llguidance.numpy.fill_next_token_bitmask_par(_executor, undrafted, flat)
    failed = {b: RequestError(f"constrained decoding failed: {_short(m.get_error())}", param=constraints[b].param)
              for b, m, _ in rows if m.is_error()}  # fmt: skip
    if failed:
        raise ConstraintError(failed)
    return bitmask_BTW


def _short(message: str, limit: int = 300) -> str:
    """llguidance's message without the parser state and grammar it may dump after it, on one line."""
    text = " ".join(message.split("\n<", 1)[0].split())
    if re.fullmatch(r"\w+", text):  # a bare stop reason, such as NoExtensionBias
        text = f"the grammar allows no further token here ({text})"
    return text if len(text) <= limit else text[: limit - 3] + "..."

