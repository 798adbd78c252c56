"""The device side of generation: jitted prefill and decode over an explicit per-row state whose
layout on the mesh is pinned from the rule table, for the state's whole life.

A runner holds `max_batch` rows of up to `max_len` tokens. `prefill` runs some prompts and
writes their keys and values, next-token logits and sampling settings into chosen rows;
`decode` advances chosen rows up to `steps` tokens each and returns only those tokens (and
their logprobs, when asked), never the history. Both take and return the state with its
buffers donated and `out_shardings` pinned, so the cache is created on its shards and never
lands whole on one device or gets replicated unless `sharding.RULES` says so. Which rows run,
with which shapes, is the scheduler's decision (scheduler.py); shapes come from buckets.py.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from codellama_jax import sharding, structured
from codellama_jax.attention import AttentionMeta
from codellama_jax.kv_cache import AXES as CACHE_AXES
from codellama_jax.kv_cache import KVCache
from codellama_jax.loader import Model
from codellama_jax.sampling import SamplingArrays, SamplingParams, sample

log = logging.getLogger(__name__)


class RunnerState(NamedTuple):
    """Per row: its KV cache, the logits of its next token, where that token goes, how many
    tokens it may still produce (0: done), what it has produced (penalties), and its sampling
    settings."""

    cache: KVCache
    logits_BV: jax.Array
    positions_B: jax.Array
    remaining_B: jax.Array
    counts_BV: jax.Array  # how often each token was produced (presence/frequency penalties)
    seen_BV: jax.Array  # tokens in prompt or output (repetition penalty)
    sampling: SamplingArrays


def _state_axes(state: RunnerState) -> RunnerState:
    """Logical axes of every state array: rows on 'batch'; vocabulary-wide rows are split over
    rows only, since sampling sorts over the whole vocabulary."""
    per_row = lambda x: ("batch",) + (None,) * (x.ndim - 1)  # noqa: E731
    return RunnerState(
        cache=KVCache(CACHE_AXES, CACHE_AXES),
        **{name: jax.tree.map(per_row, getattr(state, name)) for name in RunnerState._fields if name != "cache"},
    )


@dataclasses.dataclass(frozen=True)
class Fill:
    """One prompt to prefill into its rows (n > 1 samples: several), each row with its sampling
    settings (a seed always set, so every process draws alike) and sample index."""

    prompt: tuple[int, ...]
    rows: tuple[int, ...]
    settings: tuple[tuple[SamplingParams, int], ...]
    max_new: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """One step, as the scheduler decided it: plain values (a multi-host server sends it from
    process 0 to the others, which run the same calls). Prefill calls first (each a group of
    prompts of one length bucket, with its shape), then one decode call of `rows` padded to `b`,
    attending to `window` positions, up to `max_steps` of `steps` steps, `top_k` alternatives
    per token, under a grammar bitmask per row (all ones for free rows)."""

    fills: tuple[tuple[Fill, ...], ...]
    prefill_shapes: tuple[tuple[int, int], ...]
    rows: tuple[int, ...]
    b: int
    steps: int
    max_steps: int
    window: int
    top_k: int
    allowed_bW: np.ndarray


@dataclasses.dataclass(frozen=True)
class Output:
    """What one decode call produced, on the host: `tokens_bN[i, j]` is row `rows[i]`'s j-th
    token this call (-1 after it ended); a stop token is reported, then the row ends."""

    rows: tuple[int, ...]
    tokens_bN: np.ndarray
    logprobs_bN: np.ndarray
    top_ids_bNK: np.ndarray  # K is 0 unless a row asked for top logprobs
    top_logprobs_bNK: np.ndarray
    failed: dict[int, Exception] = dataclasses.field(default_factory=dict)  # rows whose prefill failed: why


def state_shardings(config, mesh, max_batch: int, max_len: int, dtype) -> RunnerState:
    """Where every array of a runner's state lives (`sharding.RULES` applied to `_state_axes`)."""
    return _shardings(mesh, _abstract(config, max_batch, max_len, dtype))


def _abstract(config, max_batch: int, max_len: int, dtype) -> RunnerState:
    return jax.eval_shape(functools.partial(_empty, config, max_batch, max_len, dtype))


def _shardings(mesh, abstract: RunnerState) -> RunnerState:
    return jax.tree.map(
        lambda a, x: sharding.named(mesh, a, x.shape), _state_axes(abstract), abstract,
        is_leaf=lambda a: isinstance(a, tuple) and all(isinstance(n, (str, type(None))) for n in a),
    )


def state_bytes(config, mesh, max_batch: int, max_len: int, dtype) -> tuple[int, int]:
    """Bytes of a runner's state on its fullest device: (KV cache, everything else), exactly,
    without allocating (the memory planner's figures)."""
    abstract = _abstract(config, max_batch, max_len, dtype)
    shardings = _shardings(mesh, abstract)

    def on_device(tree, tree_shardings) -> int:
        return sum(
            math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
            for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(tree_shardings))
        )

    cache = on_device(abstract.cache, shardings.cache)
    return cache, on_device(abstract, shardings) - cache


class Runner:
    """Jitted prefill and decode over `max_batch` rows of `max_len` positions on `model.mesh`."""

    def __init__(self, model: Model, max_batch: int, max_len: int):
        self.model, self.max_batch, self.max_len = model, max_batch, max_len
        mesh, config, dtype = model.mesh, model.config, model.module.dtype
        self.shardings = state_shardings(config, mesh, max_batch, max_len, dtype)
        jitted = _jitted(model.graphdef, config, max_batch, max_len, dtype, self.shardings)
        self._empty, self._prefill, self._decode = jitted
        self.stop_ids = self._put(np.array(model.stop_token_ids or (-1,), np.int32))
        self.state = self._empty()

    def reset(self) -> None:
        """Every row empty again (after a failure left the state unknown)."""
        self.state = self._empty()

    def _put(self, tree):
        return sharding.put(tree, self.model.mesh)

    def prefill(self, fills: Sequence[Fill], P: int, T: int) -> None:
        """One prefill call: each `Fill`'s prompt (padded to `T` tokens) into its rows; `P`
        prompts in all, the padding ones filling no row."""
        self.state = self._prefill(*self._prefill_args(fills, P, T))

    def compile_prefill(self, P: int, T: int) -> None:
        """Compiles the prefill call of this shape without running it (warm-up)."""
        self._prefill.lower(*self._prefill_args([], P, T)).compile()

    def _prefill_args(self, fills: Sequence[Fill], P: int, T: int) -> tuple:
        B, V = self.max_batch, self.model.config.vocab_size
        A = P * max((len(f.rows) for f in fills), default=1)
        tokens_PT, lengths_P = np.zeros((P, T), np.int32), np.ones(P, np.int32)
        first_P = np.full(P, B, np.int32)  # out of range: a padding prompt, written nowhere
        rows_A, prompt_A, max_new_A = np.full(A, B, np.int32), np.zeros(A, np.int32), np.zeros(A, np.int32)
        settings = [(SamplingParams(temperature=0.0, seed=0), 0)] * A
        a = 0
        for p, fill in enumerate(fills):
            tokens_PT[p, : len(fill.prompt)], lengths_P[p], first_P[p] = fill.prompt, len(fill.prompt), fill.rows[0]
            for row, setting in zip(fill.rows, fill.settings):
                rows_A[a], prompt_A[a], max_new_A[a], settings[a] = row, p, fill.max_new, setting
                a += 1
        args = (tokens_PT, lengths_P, first_P, rows_A, prompt_A, max_new_A, SamplingArrays.build(settings, V))
        forks = any(len(f.rows) > 1 for f in fills)
        return (forks, self.state, self.model.params, *self._put(args))

    def execute(self, plan: Plan) -> Output:
        """Runs a scheduler's plan for one step: its prefill calls, then its decode call. A prefill
        call that fails with the state intact fails only its own rows (`Output.failed`); one that
        took the state with it raises."""
        failed = {}
        for fills, (P, T) in zip(plan.fills, plan.prefill_shapes):
            try:
                self.prefill(fills, P, T)
            except Exception as e:
                if any(x.is_deleted() for x in jax.tree.leaves(self.state)):
                    raise
                log.exception("prefill failed")
                failed.update({row: RuntimeError(f"prefill failed: {e}") for fill in fills for row in fill.rows})
        output = self.decode(plan.rows, plan.b, plan.steps, plan.window, plan.top_k, plan.allowed_bW, plan.max_steps)
        return dataclasses.replace(output, failed=failed)

    def compile_decode(self, b: int, window: int, steps: int, top_k: int = 0):
        """Compiles the decode call of this shape without running it (warm-up); returns the
        compiled program (for its memory analysis)."""
        m = self.model
        free_bW = structured.fill_bitmask([None] * b, m.config.vocab_size)
        args = self._put((np.full(b, self.max_batch, np.int32), free_bW, np.int32(steps)))
        return self._decode.lower(steps, window, top_k, m.params, self.state, self.stop_ids, *args).compile()

    def decode(self, rows: Sequence[int], b: int, steps: int, window: int, top_k: int, allowed_bW, max_steps: int) -> Output:
        """Up to `max_steps` (<= `steps`) tokens for each of `rows` (padded to `b` rows),
        attending to `window` cache positions; `top_k` alternatives per token (0 or
        MAX_TOP_LOGPROBS); `allowed_bW` a grammar bitmask per row (see structured.py)."""
        m = self.model
        rows_b = np.full(b, self.max_batch, np.int32)
        rows_b[: len(rows)] = rows
        inputs = self._put((rows_b, allowed_bW, np.int32(max_steps)))
        self.state, out = self._decode(steps, window, top_k, m.params, self.state, self.stop_ids, *inputs)
        host = jax.device_get(out)
        n = len(rows)
        return Output(tuple(rows), *(x[:n] for x in host))


@functools.lru_cache(maxsize=8)
def _jitted(graphdef, config, max_batch: int, max_len: int, dtype, shardings: RunnerState):
    """The runner's jitted functions for one model structure and one state shape and layout,
    shared by every runner of them (so a `generate()` call compiles nothing an earlier one did).
    The model's structure is bound here, not passed as a static argument: jit would hash it on
    every call (~1 ms for 30 unrolled layers)."""
    empty = jax.jit(functools.partial(_empty, config, max_batch, max_len, dtype), out_shardings=shardings)
    prefill = jax.jit(functools.partial(_prefill, graphdef), static_argnums=(0,), donate_argnums=(1,),
                      out_shardings=shardings)  # fmt: skip
    replicated = sharding.replicated(shardings.logits_BV.mesh)  # every host reads what the call produced
    decode = jax.jit(functools.partial(_decode, graphdef), static_argnums=(0, 1, 2), donate_argnums=(4,),
                     out_shardings=(shardings, replicated))  # fmt: skip
    return empty, prefill, decode


def _empty(config, B: int, S: int, dtype) -> RunnerState:
    V = config.vocab_size
    return RunnerState(
        cache=KVCache.zeros(config, B, S, dtype),
        logits_BV=jnp.zeros((B, V), jnp.float32),
        positions_B=jnp.zeros(B, jnp.int32),
        remaining_B=jnp.zeros(B, jnp.int32),
        counts_BV=jnp.zeros((B, V), jnp.int32),
        seen_BV=jnp.zeros((B, V), bool),
        sampling=SamplingArrays.neutral(B, V),
    )


def _prefill(graphdef, forks, state: RunnerState, params, tokens_PT, lengths_P, first_P, rows_A, prompt_A, max_new_A, sampling_A):
    """Runs the prompts, writing their keys and values into the first row of each; with `forks`,
    copies them to the prompt's other rows; sets every filled row's logits, position, budget,
    seen tokens and sampling settings."""
    model = nnx.merge(graphdef, params)
    P, T = tokens_PT.shape
    positions_PT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (P, T))
    x_PTD, cache = model.hidden(tokens_PT, AttentionMeta(positions_PT, first_P), state.cache)
    if forks:
        cache = cache.copy_rows(first_P[prompt_A], rows_A, T)
    logits_PV = model.head(x_PTD[jnp.arange(P), lengths_P - 1][:, None])[:, 0]
    V = logits_PV.shape[-1]
    in_prompt_PT = jnp.arange(T)[None, :] < lengths_P[:, None]
    seen_PV = jnp.zeros((P, V), bool).at[jnp.arange(P)[:, None], tokens_PT].max(in_prompt_PT)

    def put(dst, src):
        return dst.at[rows_A].set(src.astype(dst.dtype), mode="drop")

    return RunnerState(
        cache=cache,
        logits_BV=put(state.logits_BV, logits_PV[prompt_A]),
        positions_B=put(state.positions_B, lengths_P[prompt_A]),
        remaining_B=put(state.remaining_B, max_new_A),
        counts_BV=put(state.counts_BV, jnp.zeros_like(seen_PV[prompt_A], jnp.int32)),
        seen_BV=put(state.seen_BV, seen_PV[prompt_A]),
        sampling=jax.tree.map(put, state.sampling, sampling_A),
    )


def rows_sampling(sampling: SamplingArrays, rows_b: jax.Array) -> SamplingArrays:
    """The sampling settings of rows `rows_b`; a padding row (out of range) gets neutral ones,
    not zeros: `top_p` 0 would make every step sort the whole vocabulary for it."""
    B, V = sampling.logit_bias.shape
    b = rows_b.shape[0]
    valid_b = rows_b < B

    def get(x, neutral):
        return jnp.where(valid_b.reshape(b, *(1,) * (x.ndim - 1)), _gather(x, rows_b), neutral)

    return jax.tree.map(get, sampling, SamplingArrays.neutral(b, V))


def _gather(x: jax.Array, rows_b: jax.Array) -> jax.Array:
    """Rows `rows_b` of a per-row array; zeros for a row out of range (padding)."""
    return x.at[rows_b].get(mode="fill", fill_value=0)


def _decode(graphdef, steps, window, top_k, params, state: RunnerState, stop_ids, rows_b, allowed_bW, max_steps):
    """Up to `max_steps` steps for rows `rows_b`: sample each running row's next token (among
    those `allowed_bW` allows), record it, and run the model on it. A stop token ends its row
    (reported, not fed); a row ends when its budget is spent."""
    model = nnx.merge(graphdef, params)
    b = rows_b.shape[0]

    sampling = rows_sampling(state.sampling, rows_b)
    out = (
        jnp.full((b, steps), -1, jnp.int32),
        jnp.zeros((b, steps), jnp.float32),
        jnp.zeros((b, steps, top_k), jnp.int32),
        jnp.zeros((b, steps, top_k), jnp.float32),
    )
    local = tuple(_gather(x, rows_b) for x in (state.logits_BV, state.positions_B, state.remaining_B, state.counts_BV, state.seen_BV))

    def running(carry):
        _, local, _, step = carry
        return (step < max_steps) & jnp.any(local[2] > 0)

    def step(carry):
        cache, (logits_bV, positions_b, remaining_b, counts_bV, seen_bV), out, j = carry
        token_b = sample(logits_bV, sampling, counts_bV, seen_bV, positions_b, allowed_bW)
        logprobs_bV = jax.nn.log_softmax(logits_bV, axis=-1)
        live_b = remaining_b > 0
        keep_b = live_b & ~jnp.isin(token_b, stop_ids)  # a stop token ends the row, not part of its output
        tokens_bN, logprobs_bN, top_ids_bNK, top_lps_bNK = out
        tokens_bN = tokens_bN.at[:, j].set(jnp.where(live_b, token_b, -1))
        logprobs_bN = logprobs_bN.at[:, j].set(jnp.take_along_axis(logprobs_bV, token_b[:, None], axis=-1)[:, 0])
        if top_k:
            top_lps_bK, top_ids_bK = jax.lax.top_k(logprobs_bV, top_k)
            top_ids_bNK, top_lps_bNK = top_ids_bNK.at[:, j].set(top_ids_bK), top_lps_bNK.at[:, j].set(top_lps_bK)
        meta = AttentionMeta(positions_b[:, None], jnp.where(keep_b, rows_b, state.remaining_B.shape[0]), window)
        x_b1D, cache = model.hidden(token_b[:, None], meta, cache)
        rows = jnp.arange(b)
        local = (
            jnp.where(keep_b[:, None], model.head(x_b1D)[:, 0], logits_bV),
            positions_b + keep_b,
            jnp.where(keep_b, remaining_b - 1, 0),
            counts_bV.at[rows, token_b].add(keep_b.astype(jnp.int32)),
            seen_bV.at[rows, token_b].max(keep_b),
        )
        return cache, local, (tokens_bN, logprobs_bN, top_ids_bNK, top_lps_bNK), j + 1

    cache, local, out, _ = jax.lax.while_loop(running, step, (state.cache, local, out, jnp.int32(0)))

    def put(dst, src):
        return dst.at[rows_b].set(src, mode="drop")

    logits_bV, positions_b, remaining_b, counts_bV, seen_bV = local
    state = RunnerState(
        cache=cache,
        logits_BV=put(state.logits_BV, logits_bV),
        positions_B=put(state.positions_B, positions_b),
        remaining_B=put(state.remaining_B, remaining_b),
        counts_BV=put(state.counts_BV, counts_bV),
        seen_BV=put(state.seen_BV, seen_bV),
        sampling=state.sampling,
    )
    return state, out
