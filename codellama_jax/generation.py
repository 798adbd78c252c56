"""Generation: jitted prefill and decode steps over a KV cache, and the library API.

`prefill` runs a batch of right-padded prompts (length padded to a power-of-two bucket) and
fills a cache; `decode_step` samples one token per row, records it, and runs the model on it;
`decode_loop` repeats the step inside `jax.lax.while_loop` until every row is done or a step
budget is spent, so a batch generates without a host round trip per token. The cache and state
buffers are donated to each decode call. A batch with grammar-constrained rows (structured.py)
runs one step per call instead: each step's token mask depends on the tokens before it.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from codellama_jax import chat_template, sharding, structured
from codellama_jax import tools as tool_calls
from codellama_jax.errors import ContextLengthExceeded, RequestError
from codellama_jax.kv_cache import KVCache
from codellama_jax.loader import Model, bucket
from codellama_jax.sampling import MAX_TOP_LOGPROBS, SamplingArrays, SamplingParams, sample
from codellama_jax.tokenizer import TextStream

Prompt = str | Sequence[int] | Sequence[Mapping[str, Any]]

RUNNING, STOPPED, LENGTH = 0, 1, 2
FINISH_REASONS = {STOPPED: "stop", LENGTH: "length"}
STOP_STRING_CHUNK = 16  # decode steps between host checks of stop strings


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    token: str  # the token's text on its own ("\ufffd" for part of a character)
    bytes: bytes | None  # what it adds to the output text, exactly (None for a control token)
    logprob: float
    top: list[TokenLogprob] = dataclasses.field(default_factory=list)  # alternatives, most likely first


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length", or "tool_calls"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    index: int = 0  # which of the n samples of its prompt
    prompt_index: int = 0
    tool_calls: list[tool_calls.ToolCall] | None = None  # when tools were offered and called; `text` is then ""


class DecodeState(NamedTuple):
    """Everything that changes from one decode step to the next, per row."""

    cache: KVCache
    logits_BV: jax.Array  # model logits for the next token
    positions_B: jax.Array  # cache position of the next token
    counts_BV: jax.Array  # how often each token was generated (presence/frequency penalties)
    seen_BV: jax.Array  # tokens in prompt or output (repetition penalty)
    generated_B: jax.Array
    max_new_B: jax.Array
    finish_B: jax.Array  # RUNNING, STOPPED or LENGTH
    tokens_BN: jax.Array
    logprobs_BN: jax.Array
    top_ids_BNK: jax.Array  # K is 0 when no row asked for top logprobs
    top_logprobs_BNK: jax.Array

    @classmethod
    def empty(cls, config, batch: int, cache_len: int, max_new: int, top_k: int, dtype) -> DecodeState:
        """Every row finished and every array zero: what prefill fills in, and free engine slots."""
        B, N, V = batch, max_new, config.vocab_size
        return cls(
            cache=KVCache.zeros(config, B, cache_len, dtype),
            logits_BV=jnp.zeros((B, V), jnp.float32),
            positions_B=jnp.zeros(B, jnp.int32),
            counts_BV=jnp.zeros((B, V), jnp.int32),
            seen_BV=jnp.zeros((B, V), bool),
            generated_B=jnp.zeros(B, jnp.int32),
            max_new_B=jnp.zeros(B, jnp.int32),
            finish_B=jnp.full(B, STOPPED, jnp.int32),
            tokens_BN=jnp.zeros((B, N), jnp.int32),
            logprobs_BN=jnp.zeros((B, N), jnp.float32),
            top_ids_BNK=jnp.zeros((B, N, top_k), jnp.int32),
            top_logprobs_BNK=jnp.zeros((B, N, top_k), jnp.float32),
        )

    def results(self) -> SimpleNamespace:
        """Host copies of what the rows produced (not the cache): the arrays every host can read."""
        names = ("generated_B", "finish_B", "tokens_BN", "logprobs_BN", "top_ids_BNK", "top_logprobs_BNK")
        return SimpleNamespace(**jax.device_get({name: getattr(self, name) for name in names}))


def token_logprob(tokenizer, results: SimpleNamespace, row: int, j: int, top: int) -> TokenLogprob:
    """The `j`-th generated token of `row`, with its logprob and `top` alternatives, from `results()`."""

    def entry(token, logprob, top=()) -> TokenLogprob:
        token = int(token)
        text = tokenizer.decode([token], skip_special_tokens=False, continuation=True)
        return TokenLogprob(token, text, tokenizer.piece_bytes(token), float(logprob), list(top))

    alternatives = [entry(k, lp) for k, lp in zip(results.top_ids_BNK[row, j], results.top_logprobs_BNK[row, j])]
    return entry(results.tokens_BN[row, j], results.logprobs_BN[row, j], alternatives[:top])


def lay_out(state: DecodeState, mesh: Mesh) -> DecodeState:
    """The state's place on the mesh: the cache split over rows ('data') and kv heads ('model'),
    per-row vocabulary arrays over rows, and the small per-row results replicated, so that every
    host can read them without a gather."""
    by_row = ("logits_BV", "counts_BV", "seen_BV")
    cache = jax.tree.map(lambda x: sharding.constrain(x, mesh, sharding.CACHE_AXES), state.cache)
    fields = {
        name: sharding.constrain(value, mesh, ("batch",) if name in by_row else ())
        for name, value in state._asdict().items()
        if name != "cache"
    }
    return DecodeState(cache=cache, **fields)


def _prefill(graphdef, cache_len, top_k, max_new, mesh, params, tokens_BT, lengths_B, max_new_B):
    """Runs the prompts and returns the initial decode state."""
    model = nnx.merge(graphdef, params)
    B, T = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x_BTD, prompt_kv = model.hidden(tokens_BT, positions_BT)
    last_BD = x_BTD[jnp.arange(B), lengths_B - 1]
    logits_BV = model.head(last_BD[:, None])[:, 0]
    V = logits_BV.shape[-1]
    state_cache = KVCache.zeros(model.config, B, cache_len, model.dtype).insert(prompt_kv)
    in_prompt_BT = jnp.arange(T)[None, :] < lengths_B[:, None]
    seen_BV = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], tokens_BT].max(in_prompt_BT)
    state = DecodeState.empty(model.config, B, cache_len, max_new, top_k, model.dtype)._replace(
        cache=state_cache,
        logits_BV=logits_BV,
        positions_B=lengths_B.astype(jnp.int32),
        seen_BV=seen_BV,
        max_new_B=max_new_B,
        finish_B=jnp.where(max_new_B > 0, RUNNING, LENGTH).astype(jnp.int32),
    )
    return lay_out(state, mesh)


def decode_step(
    model, mesh: Mesh, state: DecodeState, sampling: SamplingArrays, stop_ids, allowed_BW, window: int | None = None
) -> DecodeState:
    """Samples a token for every running row among those `allowed_BW` allows (a grammar's
    bitmask, all ones for free rows), records it, and runs the model on it, attending to the first
    `window` cache positions (all by default; running rows must stay below it)."""
    B, N = state.tokens_BN.shape
    rows_B = jnp.arange(B)
    token_B = sample(state.logits_BV, sampling, state.counts_BV, state.seen_BV, state.positions_B, allowed_BW)
    logprobs_BV = jax.nn.log_softmax(state.logits_BV, axis=-1)
    running_B = state.finish_B == RUNNING
    is_stop_B = jnp.isin(token_B, stop_ids)
    keep_B = running_B & ~is_stop_B  # stop tokens end a row without becoming part of its output
    slot_B = jnp.where(keep_B, state.generated_B, N)  # out of bounds: the write is dropped
    generated_B = state.generated_B + keep_B
    finish_B = jnp.where(running_B & is_stop_B, STOPPED, state.finish_B)
    finish_B = jnp.where((finish_B == RUNNING) & (generated_B >= state.max_new_B), LENGTH, finish_B)
    top_ids_BNK, top_logprobs_BNK = state.top_ids_BNK, state.top_logprobs_BNK
    if top_ids_BNK.shape[-1]:
        top_lp_BK, top_id_BK = jax.lax.top_k(logprobs_BV, top_ids_BNK.shape[-1])
        top_ids_BNK = top_ids_BNK.at[rows_B, slot_B].set(top_id_BK, mode="drop")
        top_logprobs_BNK = top_logprobs_BNK.at[rows_B, slot_B].set(top_lp_BK, mode="drop")
    positions_B = jnp.minimum(state.positions_B, state.cache.length - 1)
    x_B1D, cache = model.hidden(token_B[:, None], positions_B[:, None], state.cache, window)
    state = DecodeState(
        cache=cache,
        logits_BV=model.head(x_B1D)[:, 0],
        positions_B=state.positions_B + keep_B,
        counts_BV=state.counts_BV.at[rows_B, token_B].add(keep_B.astype(jnp.int32)),
        seen_BV=state.seen_BV.at[rows_B, token_B].max(keep_B),
        generated_B=generated_B,
        max_new_B=state.max_new_B,
        finish_B=finish_B,
        tokens_BN=state.tokens_BN.at[rows_B, slot_B].set(token_B, mode="drop"),
        logprobs_BN=state.logprobs_BN.at[rows_B, slot_B].set(logprobs_BV[rows_B, token_B], mode="drop"),
        top_ids_BNK=top_ids_BNK,
        top_logprobs_BNK=top_logprobs_BNK,
    )
    return lay_out(state, mesh)


def _decode_loop(graphdef, mesh, window, params, state, sampling, stop_ids, allowed_BW, max_steps):
    model = nnx.merge(graphdef, params)

    def running(carry):
        state, step = carry
        return (step < max_steps) & jnp.any(state.finish_B == RUNNING)

    def step(carry):
        state, step = carry
        return decode_step(model, mesh, state, sampling, stop_ids, allowed_BW, window), step + 1

    return lay_out(jax.lax.while_loop(running, step, (state, jnp.int32(0)))[0], mesh)


prefill = jax.jit(_prefill, static_argnums=(0, 1, 2, 3, 4))
decode_loop = jax.jit(_decode_loop, static_argnums=(0, 1, 2), donate_argnums=(4,))


def prompt_ids(model: Model, prompt: Prompt, tools: tool_calls.Tools | None = None, limit: int | None = None) -> list[int]:
    """Token ids of a prompt: text (BOS added as the tokenizer does), chat messages (the model's
    chat template, see `ChatTemplate.prompt`, with `tools` described and tool calls and results
    rendered as tools.py says), or token ids as they are. Text that surely holds more than
    `limit` tokens (default: the context) is refused before it is tokenized."""
    limit = model.config.max_seq_len if limit is None else limit
    is_chat = not isinstance(prompt, str) and len(prompt) and isinstance(prompt[0], Mapping)
    if tools is not None and not is_chat:
        raise RequestError("tools need chat messages as the prompt", param="messages")
    if is_chat:
        messages = tool_calls.render_messages(chat_template.plain_messages(prompt), tools)
        return model.chat_template.encode(_tokenizer(model), messages, limit=limit)
    if isinstance(prompt, str):
        tokenizer = _tokenizer(model)
        return tokenizer.encode(prompt, add_bos=tokenizer.add_bos, limit=limit)
    array = np.asarray(prompt)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise RequestError("a prompt must be text, a list of token ids (integers), or a list of chat messages",
                           param="prompt")  # fmt: skip
    ids = array.tolist()
    bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
    if bad:
        raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {model.config.vocab_size})",
                           param="prompt")  # fmt: skip
    return ids


def output_grammar(
    model: Model, response_format: Mapping[str, Any] | None = None, tools: tool_calls.Tools | None = None
) -> structured.Grammar | None:
    """The grammar the output must follow (None: free text), compiled for the model."""
    param = "tools" if tools is not None else "response_format"  # the field a grammar failure names
    try:
        asked = structured.response_format_grammar(response_format)
        if tools is not None and asked is not None:
            raise RequestError("response_format cannot be combined with tools; give one or the other", param="response_format")
        source = tools.grammar() if tools is not None else asked
        return None if source is None else structured.compile_grammar(model, source, param)
    except RequestError:
        raise
    except ValueError as e:
        raise RequestError(str(e), param=param) from None


def _tokenizer(model: Model):
    if model.tokenizer is None:
        raise RequestError("this checkpoint has no tokenizer (tokenizer.model or tokenizer.json); pass token ids",
                           param="prompt")  # fmt: skip
    return model.tokenizer


def max_new_tokens(model: Model, prompt_len: int, max_tokens: int | None) -> int:
    """Tokens a request may generate; a request that cannot fit the context window is refused."""
    context = model.config.max_seq_len
    if prompt_len == 0:
        raise RequestError("the prompt is empty", param="prompt")
    if prompt_len >= context:
        raise ContextLengthExceeded(f"the prompt has {prompt_len} tokens, the model's context window is {context} tokens")
    if max_tokens is None:
        return context - prompt_len
    if prompt_len + max_tokens > context:
        raise ContextLengthExceeded(
            f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: {prompt_len + max_tokens} "
            f"tokens exceed the model's context window of {context} tokens"
        )
    return max_tokens


class Batch:
    """A batch of rows (prompt x sample), prefilled on construction, decoded by `decode(steps)`.

    What `generate()` and `stream()` drive; the benchmark times its two phases separately."""

    def __init__(
        self, model: Model, prompts: Sequence[list[int]], params: SamplingParams, grammar: structured.Grammar | None = None
    ):
        if not prompts:
            raise ValueError("no prompts given")
        self.model = model
        self.params = params
        self.rows = [(p, ids, i) for p, ids in enumerate(prompts) for i in range(params.n)]
        max_new = [max_new_tokens(model, len(ids), params.max_tokens) for ids in prompts]
        context = model.config.max_seq_len
        P, B = bucket(len(prompts), minimum=1), bucket(len(self.rows), minimum=1)
        T = min(bucket(max(map(len, prompts))), context)
        cache_len = max(T, min(bucket(max(len(ids) + n for ids, n in zip(prompts, max_new))), context))
        tokens_PT = np.zeros((P, T), np.int32)
        lengths_P = np.ones(P, np.int32)
        max_new_P = np.zeros(P, np.int32)  # padding rows: nothing to generate, finished from the start
        for p, (ids, n) in enumerate(zip(prompts, max_new)):
            tokens_PT[p, : len(ids)] = ids
            lengths_P[p], max_new_P[p] = len(ids), n
        top_k = min(MAX_TOP_LOGPROBS, model.config.vocab_size) if params.top_logprobs else 0
        max_new_bucket = min(bucket(max(max_new)), context)
        inputs = sharding.put((tokens_PT, lengths_P, max_new_P), model.mesh)
        self.state = prefill(model.graphdef, cache_len, top_k, max_new_bucket, model.mesh, model.params, *inputs)
        if params.n > 1:  # each prompt is prefilled once and its state copied to its n rows
            source_B = np.array([p for p, _, _ in self.rows] + [0] * (B - len(self.rows)))
            state = jax.tree.map(lambda x: x[source_B], self.state)
            self.state = state._replace(finish_B=state.finish_B.at[len(self.rows) :].set(LENGTH))
        padding = [(SamplingParams(temperature=0.0), 0)] * (B - len(self.rows))
        sampling_rows = [(params, i) for _, _, i in self.rows] + padding
        self.sampling = sharding.put(SamplingArrays.build(sampling_rows, model.config.vocab_size), model.mesh)
        self.stop_ids = sharding.put(np.array(model.stop_token_ids or (-1,), np.int32), model.mesh)
        self.constraints = None if grammar is None else [grammar.constraint() for _ in self.rows] + [None] * (B - len(self.rows))
        self.all_allowed = sharding.put(structured.fill_bitmask([None] * B, model.config.vocab_size), model.mesh)
        self._fed = [0] * len(self.rows)  # tokens of each row already pushed to its text stream
        self.stopped_at: dict[int, int] = {}  # row -> output length, for rows ended by a stop string

    def decode(self, max_steps: int) -> None:
        """Up to `max_steps` steps (one when a grammar constrains the rows)."""
        model, allowed = self.model, self.all_allowed
        if self.constraints is not None:
            max_steps = 1
            try:
                allowed = sharding.put(structured.fill_bitmask(self.constraints, model.config.vocab_size), model.mesh)
            except structured.ConstraintError as e:  # the request's grammar cannot be followed
                raise next(iter(e.errors.values())) from None
        self.state = decode_loop(
            model.graphdef, model.mesh, None, model.params, self.state, self.sampling, self.stop_ids, allowed, max_steps
        )

    def stop_rows(self, rows: Sequence[int]) -> None:
        """Ends rows on the host's word (a stop string was found)."""
        self.state = self.state._replace(finish_B=self.state.finish_B.at[np.asarray(rows)].set(STOPPED))

    def running(self) -> bool:
        return bool(jnp.any(self.state.finish_B == RUNNING))

    def feed(self, streams: Sequence[TextStream]) -> list[int]:
        """Pushes the tokens generated since the last call into each row's text stream; returns
        the rows whose stream has just found a stop string."""
        tokens_BN, generated_B = jax.device_get((self.state.tokens_BN, self.state.generated_B))
        stopped = []
        for r, stream in enumerate(streams):
            if stream is None:  # no tokenizer: token ids only
                continue
            while self._fed[r] < generated_B[r] and not stream.stopped:
                token = int(tokens_BN[r, self._fed[r]])
                if self.constraints is not None:
                    self.constraints[r].advance(token)
                stream.push(token)
                self._fed[r] += 1
            if stream.stopped and r not in self.stopped_at:
                self.stopped_at[r] = self._fed[r]  # the output ends with the token that completed the stop string
                stopped.append(r)
        return stopped


def generate(
    model: Model,
    prompts: Sequence[Prompt],
    *,
    response_format: Mapping[str, Any] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
    parallel_tool_calls: bool = True,
    **sampling: Any,
) -> list[Completion]:
    """Completions of a batch of prompts (text, token ids, or chat messages), `n` per prompt,
    in prompt order. Sampling settings are those of `SamplingParams` (the contract's fields).

    `response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema": {"name",
    "schema"}}) makes every output valid JSON of that kind; `tools` (OpenAI's function tools, with
    `tool_choice` "auto", "required", "none" or {"type": "function", "function": {"name"}})
    lets the model answer with calls, returned in `Completion.tool_calls` (tools.py's format).

    The decode loop runs on the device until every row is done; with stop strings it returns to
    the host every few steps to look for them in the text, and under a grammar after every step.
    """
    params = SamplingParams(**sampling)
    if isinstance(prompts, (str, Mapping)) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
        raise ValueError("prompts must be a list of prompts (each text, token ids, or chat messages)")
    offered = tool_calls.parse_tools(tools, tool_choice, parallel_tool_calls)
    grammar = output_grammar(model, response_format, offered)
    batch = Batch(model, [prompt_ids(model, p, offered) for p in prompts], params, grammar)
    if params.stop or params.logprobs:
        _tokenizer(model)
    streams = [TextStream(model.tokenizer, ids, params.stop, tool_calls.answer_end(offered)) if model.tokenizer else None
               for _, ids, _ in batch.rows]  # fmt: skip
    steps = STOP_STRING_CHUNK if params.stop else batch.state.tokens_BN.shape[1]
    while batch.running():
        batch.decode(steps)
        stopped = batch.feed(streams)
        if stopped:
            batch.stop_rows(stopped)
    batch.feed(streams)
    completions = _completions(model, batch, streams)
    if offered is not None:
        for c in completions:
            answer = tool_calls.parse(c.text)
            c.text, c.tool_calls = answer.content, answer.calls or None
            c.finish_reason = tool_calls.finish_reason(c.finish_reason, answer)
    return completions


def _completions(model: Model, batch: Batch, streams: list[TextStream]) -> list[Completion]:
    state = batch.state.results()
    out = []
    for r, ((p, ids, i), stream) in enumerate(zip(batch.rows, streams)):
        n = batch.stopped_at.get(r, int(state.generated_B[r]))
        tokens = [int(t) for t in state.tokens_BN[r, :n]]
        if stream is not None:
            stream.finish()
        logprobs = None
        if batch.params.logprobs:
            logprobs = [token_logprob(model.tokenizer, state, r, j, batch.params.top_logprobs) for j in range(n)]
        stopped_by_text = stream is not None and stream.stopped
        reason = "stop" if stopped_by_text else FINISH_REASONS[int(state.finish_B[r])]
        text = stream.text if stream is not None else ""
        out.append(Completion(text, tokens, reason, len(ids), n, logprobs, index=i, prompt_index=p))
    return out


def stream(model: Model, prompt: Prompt, *, response_format: Mapping[str, Any] | None = None, **sampling: Any) -> Iterator[str]:
    """Text deltas of one completion as they are decoded (stop strings never shown in part),
    optionally constrained by `response_format` as in `generate()`."""
    params = SamplingParams(**sampling)
    if params.n != 1:
        raise ValueError("stream() produces one completion; use generate() for n > 1")
    ids = prompt_ids(model, prompt)
    batch = Batch(model, [ids], params, output_grammar(model, response_format))
    text = TextStream(_tokenizer(model), ids, params.stop)
    while batch.running() and not text.stopped:
        batch.decode(1)
        released = len(text.text)
        batch.feed([text])
        if len(text.text) > released:
            yield text.text[released:]
    if tail := text.finish():
        yield tail


def chat(model: Model, messages: Sequence[Mapping[str, Any]], **sampling: Any) -> Completion:
    """One completion of a conversation, with the model's chat template (`response_format`,
    `tools` and `tool_choice` as in `generate()`)."""
    if sampling.get("n", 1) != 1:
        raise ValueError("chat() returns one completion; use generate([messages], n=...) for several")
    return generate(model, [messages], **sampling)[0]
