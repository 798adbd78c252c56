"""The device side of generation: jitted prefill and decode over an explicit per-row state whose
layout on the mesh is pinned from the rule table, for the state's whole life.

A runner holds `max_batch` rows and a KV cache of `num_blocks` blocks of `block_size` positions
(kv_cache.py); which blocks a row's positions live in is the host's choice, passed with every
call as block tables. `prefill` runs some prompts, writes their keys and values into their
blocks and their sampling settings into chosen rows, and samples each row's first token
(so it reaches its client without waiting for a decode step); `launch` dispatches a decode call
that advances chosen rows up to `steps` tokens each, feeding the token sampled last and sampling
the next, and `collect` returns only those tokens (and their logprobs), never the history; a
verify call (speculative decoding) instead feeds each row's pending token and a draft of K
tokens in one pass and returns the tokens of the draft the row samples itself, and the one
after them. A row's last token is never fed. Every call takes and returns the state with its buffers donated
and `out_shardings` pinned, so the cache is created on its shards and never lands whole on one
device or gets replicated unless `sharding.RULES` says so. Which rows run, with which shapes, is
the scheduler's decision (scheduler.py); shapes come from buckets.py.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from codellama_jax import sharding, structured
from codellama_jax.attention import AttentionMeta, decode_kernel
from codellama_jax.kv_cache import AXES as CACHE_AXES
from codellama_jax.kv_cache import KVCache, blocks_for
from codellama_jax.loader import Model
from codellama_jax.sampling import MAX_TOP_LOGPROBS, SamplingArrays, SamplingParams, sample

log = logging.getLogger(__name__)


class RunnerState(NamedTuple):
    """The KV cache's blocks, and per row: the token it sampled last and has not fed yet, that
    token's position, how many tokens it may still produce (0: done), what it has produced
    (penalties), and its sampling settings."""

    cache: KVCache
    next_B: jax.Array
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


@dataclasses.dataclass(frozen=True, eq=False)
class Fill:
    """One prompt to prefill into its rows (n > 1 samples: several), each row with its block
    table (the samples share the prompt's full blocks; the prompt is written into the first
    row's blocks and a block the others hold alone is copied from it), sampling settings (a seed
    always set, so every process draws alike) and sample index, and the grammar bitmask of the
    first token (all ones: free). The prompt's last `generated` tokens are the rows' own output
    (a sequence preempted and admitted again): penalties count them.

    Only positions `start` to `stop` (default: the end) are run: those before `start` are in the
    first table's blocks already (a cached prefix, or an earlier chunk of a long prompt). A fill
    that stops short of the prompt's end is a chunk: no first token is sampled yet."""

    prompt: tuple[int, ...]
    rows: tuple[int, ...]
    tables: tuple[tuple[int, ...], ...]
    settings: tuple[tuple[SamplingParams, int], ...]
    max_new: int
    allowed_W: np.ndarray
    generated: int = 0
    start: int = 0
    stop: int | None = None

    @property
    def final(self) -> bool:
        return self.stop is None or self.stop == len(self.prompt)


# The scheduler's decisions are plain values: every process of a multi-host server plans alike
# and runs the same calls (SPMD; host values reach the devices through `sharding.put`).


@dataclasses.dataclass(frozen=True)
class Prefill:
    """Prompts to admit: prefill calls, each a group of prompts of one length bucket, with its
    shape (P prompts of T tokens attending to J blocks of the cache each; J 0: a fresh prompt
    attends to itself alone). A call's fills are all final or all chunks."""

    calls: tuple[tuple[Fill, ...], ...]
    shapes: tuple[tuple[int, int, int], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Decode:
    """One decode call of `rows` padded to `b`, up to `max_steps` of `steps` steps, `top_k`
    alternatives per token (0: no logprobs at all), under a grammar bitmask per row (all ones
    for free rows), each row attending to the blocks its table lists (`[b, J]`, J blocks
    enough for every row's positions after the call; padding: `num_blocks`, no block)."""

    rows: tuple[int, ...]
    b: int
    steps: int
    max_steps: int
    top_k: int
    allowed_bW: np.ndarray
    tables_bJ: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Verify:
    """One verify call (speculative decoding) of `rows` padded to `b`: each row's pending token
    and its draft (`drafts_bK`, -1 past the row's draft) fed in one pass at the positions after
    it, under a grammar bitmask per position (`allowed_bTW`, T = K + 1), `top_k` and
    `tables_bJ` as in `Decode` (the tables cover the draft's positions too)."""

    rows: tuple[int, ...]
    b: int
    top_k: int
    drafts_bK: np.ndarray
    allowed_bTW: np.ndarray
    tables_bJ: np.ndarray


@dataclasses.dataclass(frozen=True)
class Output:
    """What a call produced, on the host: `tokens_bN[i, j]` is row `rows[i]`'s j-th token this
    call (-1 after it ended); a stop token is reported, then the row ends."""

    rows: tuple[int, ...]
    tokens_bN: np.ndarray
    logprobs_bN: np.ndarray
    top_ids_bNK: np.ndarray  # K is 0 unless a row asked for logprobs
    top_logprobs_bNK: np.ndarray
    failed: dict[int, Exception] = dataclasses.field(default_factory=dict)  # rows whose prefill failed: why


class Launched(NamedTuple):
    """A decode or verify call dispatched to the device: its rows and its outputs, not yet computed."""

    rows: tuple[int, ...]
    out: tuple[jax.Array, ...]


def state_shardings(config, mesh, max_batch: int, num_blocks: int, block_size: int, dtype) -> RunnerState:
    """Where every array of a runner's state lives (`sharding.RULES` applied to `_state_axes`)."""
    return _shardings(mesh, _abstract(config, max_batch, num_blocks, block_size, dtype))


def _abstract(config, max_batch: int, num_blocks: int, block_size: int, dtype) -> RunnerState:
    return jax.eval_shape(functools.partial(_empty, config, max_batch, num_blocks, block_size, dtype))


def _shardings(mesh, abstract: RunnerState) -> RunnerState:
    return jax.tree.map(
        lambda a, x: sharding.named(mesh, a, x.shape), _state_axes(abstract), abstract,
        is_leaf=lambda a: isinstance(a, tuple) and all(isinstance(n, (str, type(None))) for n in a),
    )


def block_bytes(config, mesh, block_size: int, dtype) -> int:
    """Bytes of one KV cache block (keys and values, every layer) on its fullest device."""
    return state_bytes(config, mesh, 1, 1, block_size, dtype)[0]


def state_bytes(config, mesh, max_batch: int, num_blocks: int, block_size: int, dtype) -> tuple[int, int]:
    """Bytes of a runner's state on its fullest device: (KV cache, everything else), exactly,
    without allocating (the memory planner's figures)."""
    abstract = _abstract(config, max_batch, num_blocks, block_size, dtype)
    shardings = _shardings(mesh, abstract)

    def on_device(tree, tree_shardings) -> int:
        return sum(
            math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
            for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(tree_shardings))
        )

    cache = on_device(abstract.cache, shardings.cache)
    return cache, on_device(abstract, shardings) - cache


class Runner:
    """Jitted prefill and decode over `max_batch` rows and a KV cache of `num_blocks` blocks of
    `block_size` positions on `model.mesh`.

    `announce`, when set, is told of every call that changes the device state (`CALLS`) before
    it runs, as `announce(name, args)`: a multi-host server's process 0 publishes them for the
    other processes to run the same calls (multihost.py). Such a runner is `mirrored`: every
    process holds the same inputs, so they are not broadcast from process 0 (`sharding.put`), and
    a call that fails raises even when the state survived it, since the other processes may have
    run it."""

    CALLS = ("admit", "launch", "reset")

    def __init__(self, model: Model, max_batch: int, num_blocks: int, block_size: int, decode_attention: str = "auto"):
        self.model, self.max_batch, self.num_blocks, self.block_size = model, max_batch, num_blocks, block_size
        mesh, config, dtype = model.mesh, model.config, model.module.dtype
        self.shardings = state_shardings(config, mesh, max_batch, num_blocks, block_size, dtype)
        self.kernel = decode_kernel(mesh, block_size, config.head_dim, decode_attention)
        jitted = _jitted(model.graphdef, config, max_batch, num_blocks, block_size, dtype, self.shardings, self.kernel)
        self._empty, self._prefill, self._first, self._decode, self._verify = jitted
        self.announce: Callable[[str, tuple], None] | None = None
        self.mirrored = False
        self.stop_ids = self._put(np.array(model.stop_token_ids or (-1,), np.int32))
        self.state = self._empty()

    def _announce(self, call: str, *args) -> None:
        if self.announce is not None:
            self.announce(call, args)

    def reset(self) -> None:
        """Every row empty again (after a failure left the state unknown)."""
        self._announce("reset")
        self.state = self._empty()

    def _put(self, tree):
        return sharding.put(tree, self.model.mesh, agreed=self.mirrored)

    def _shaped(self, tree):
        """What `_put` would make of these host values, abstract: a compile needs no data (and
        on several processes, no collective)."""
        replicated = sharding.replicated(self.model.mesh)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=replicated), tree)

    def admit(self, plan: Prefill) -> Output:
        """Runs a scheduler's prefill calls: the first token of every row they fill. A call
        refused with the state intact fails only its own rows (`Output.failed`); one that took
        the state with it raises, and so does any failure once the calls are dispatched (it
        happened on the device, and the state went with it)."""
        self._announce("admit", plan)
        rows, dispatched, failed = [], [], {}
        for fills, (P, T, J) in zip(plan.calls, plan.shapes):
            try:
                out = self.prefill(fills, P, T, J)
            except Exception as e:
                if self.mirrored or any(x.is_deleted() for x in jax.tree.leaves(self.state)):
                    raise
                log.exception("prefill failed")
                failed.update({row: RuntimeError(f"prefill failed: {e}") for fill in fills for row in fill.rows})
                continue
            if out is not None:
                dispatched.append(out)
                rows.append(tuple(row for fill in fills for row in fill.rows))
        outputs = [tuple(x[: len(r)] for x in out) for r, out in zip(rows, jax.device_get(dispatched))]
        if not outputs:
            outputs = [(np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float32), np.zeros((0, 1, 0), np.int32),
                        np.zeros((0, 1, 0), np.float32))]  # fmt: skip
        return Output(tuple(row for r in rows for row in r), *(np.concatenate(x) for x in zip(*outputs)), failed=failed)

    def prefill(self, fills: Sequence[Fill], P: int, T: int, J: int = 0) -> tuple[jax.Array, ...] | None:
        """Dispatches one prefill call: each `Fill`'s tokens (padded to `T`) into its blocks, then
        each row's first token; `P` prompts in all, the padding ones filling no row, each
        attending to `J` blocks (0: to itself alone). Returns the first tokens `[A, 1]` (and
        logprobs, top alternatives) on the device, rows in order; None for chunks."""
        prefill_args, first_args = self._prefill_args(fills, P, T, J)
        self.state, logits_AV = self._prefill(*prefill_args)
        if not all(fill.final for fill in fills):
            return None
        self.state, out = self._first(self.state, self.stop_ids, logits_AV, *first_args)
        return out

    def compile_prefill(self, P: int, T: int, J: int = 0) -> None:
        """Compiles the prefill call of this shape without running it (warm-up)."""
        self._prefill.lower(*self._prefill_args([], P, T, J, self._shaped)[0]).compile()

    def compile_first(self, P: int) -> None:
        """Compiles the first-token call after a prefill of `P` prompts (warm-up)."""
        first_args = self._prefill_args([], P, 1, 0, self._shaped)[1]
        logits_AV = jax.ShapeDtypeStruct((P, self.model.config.vocab_size), jnp.float32,
                                         sharding=sharding.replicated(self.model.mesh))  # as the prefill returns them
        self._first.lower(self.state, self.stop_ids, logits_AV, *first_args).compile()

    def _prefill_args(self, fills: Sequence[Fill], P: int, T: int, J: int, put=None) -> tuple[tuple, tuple]:
        """The arguments of the prefill call and of the first-token call after it (host values
        through `put`, by default `_put`). Each prompt's seen tokens and the counts of its own
        output (penalties) come from the host: a call runs only part of a prompt when the rest
        is cached."""
        B, M, V = self.max_batch, self.num_blocks, self.model.config.vocab_size
        A = P * max((len(f.rows) for f in fills), default=1)
        tokens_PT, start_P, last_P = np.zeros((P, T), np.int32), np.zeros(P, np.int32), np.zeros(P, np.int32)
        seen_PV, counts_PV = np.zeros((P, V), bool), np.zeros((P, V), np.int32)
        table_PJ = np.full((P, J or blocks_for(T, self.block_size)), M, np.int32)  # M: no block (a padding prompt)
        rows_A, prompt_A, max_new_A = np.full(A, B, np.int32), np.zeros(A, np.int32), np.zeros(A, np.int32)
        src_A, dst_A = np.zeros(A, np.int32), np.full(A, M, np.int32)  # a block some sample holds alone
        allowed_AW = structured.fill_bitmask([None] * A, V)
        settings = [(SamplingParams(temperature=0.0, seed=0), 0)] * A
        a = 0
        for p, fill in enumerate(fills):
            stop = len(fill.prompt) if fill.stop is None else fill.stop
            tokens_PT[p, : stop - fill.start], start_P[p], last_P[p] = fill.prompt[fill.start : stop], fill.start, stop - 1
            seen_PV[p, list(fill.prompt)] = True
            counts_PV[p] = np.bincount(fill.prompt[len(fill.prompt) - fill.generated :], minlength=V)
            table = fill.tables[0]
            table_PJ[p, : len(table)] = table
            for row, own, setting in zip(fill.rows, fill.tables, fill.settings):
                rows_A[a], prompt_A[a], max_new_A[a], settings[a], allowed_AW[a] = row, p, fill.max_new, setting, fill.allowed_W
                copied = [j for j, block in enumerate(own) if block != table[j]]
                if copied and fill.final:
                    if len(copied) > 1:
                        raise ValueError(f"a sample of a prompt holds {len(copied)} blocks of its own; one at most")
                    src_A[a], dst_A[a] = table[copied[0]], own[copied[0]]
                a += 1
        args = (put or self._put)((tokens_PT, start_P, last_P, seen_PV, counts_PV, table_PJ, rows_A, prompt_A,
                                   max_new_A, SamplingArrays.build(settings, V), src_A, dst_A, allowed_AW))  # fmt: skip
        forks = any(len(f.rows) > 1 for f in fills)
        return (forks, J > 0, self.state, self.model.params, *args[:-1]), (args[6], args[-1])

    def compile_decode(self, b: int, window: int, steps: int, top_k: int = 0):
        """Compiles the decode call of `b` rows attending to `window` positions without running it
        (warm-up); returns the compiled program (for its memory analysis)."""
        m = self.model
        free_bW = structured.fill_bitmask([None] * b, m.config.vocab_size)
        tables_bJ = np.full((b, blocks_for(window, self.block_size)), self.num_blocks, np.int32)
        args = self._shaped((np.full(b, self.max_batch, np.int32), free_bW, tables_bJ, np.int32(steps)))
        return self._decode.lower(steps, top_k, m.params, self.state, self.stop_ids, *args).compile()

    def compile_verify(self, b: int, window: int, draft: int, top_k: int = 0) -> None:
        """Compiles the verify call of `b` rows with drafts of `draft` tokens attending to
        `window` positions without running it (warm-up)."""
        W = structured.bitmask_words(self.model.config.vocab_size)
        tables_bJ = np.full((b, blocks_for(window, self.block_size)), self.num_blocks, np.int32)
        args = self._shaped((np.full(b, self.max_batch, np.int32), np.full((b, draft), -1, np.int32),
                             np.full((b, draft + 1, W), -1, np.int32), tables_bJ))  # fmt: skip
        self._verify.lower(top_k, self.model.params, self.state, self.stop_ids, *args).compile()

    def launch(self, plan: Decode | Verify) -> Launched:
        """Dispatches a decode call of up to `plan.max_steps` tokens for each of the plan's rows,
        or a verify call, without waiting for it: the device runs it after the calls dispatched
        before, while the host goes on (`collect` waits for its tokens)."""
        self._announce("launch", plan)
        rows_b = np.full(plan.b, self.max_batch, np.int32)
        rows_b[: len(plan.rows)] = plan.rows
        if isinstance(plan, Verify):
            inputs = self._put((rows_b, plan.drafts_bK, plan.allowed_bTW, plan.tables_bJ))
            self.state, out = self._verify(plan.top_k, self.model.params, self.state, self.stop_ids, *inputs)
        else:
            inputs = self._put((rows_b, plan.allowed_bW, plan.tables_bJ, np.int32(plan.max_steps)))
            self.state, out = self._decode(plan.steps, plan.top_k, self.model.params, self.state, self.stop_ids, *inputs)
        return Launched(tuple(plan.rows), out)

    @staticmethod
    def collect(launched: Launched) -> Output:
        """What a launched decode or verify call produced, once the device has run it."""
        n = len(launched.rows)
        return Output(launched.rows, *(x[:n] for x in jax.device_get(launched.out)))


@functools.lru_cache(maxsize=8)
def _jitted(graphdef, config, max_batch: int, num_blocks: int, block_size: int, dtype, shardings: RunnerState, kernel: str):
    """The runner's jitted functions for one model structure and one state shape and layout,
    shared by every runner of them (so a `generate()` call compiles nothing an earlier one did).
    The model's structure is bound here, not passed as a static argument: jit would hash it on
    every call (~1 ms for 30 unrolled layers). The first token is sampled by a call of its own,
    whose shape depends only on the number of rows: inside the prefill, sampling would be
    compiled again for every prompt shape (~0.7 s each here). It always returns the token's
    top alternatives (once per request, cheap)."""
    replicated = sharding.replicated(shardings.next_B.mesh)  # every host reads what a call produced
    empty = jax.jit(functools.partial(_empty, config, max_batch, num_blocks, block_size, dtype), out_shardings=shardings)
    prefill = jax.jit(functools.partial(_prefill, graphdef), static_argnums=(0, 1), donate_argnums=(2,),
                      out_shardings=(shardings, replicated))  # fmt: skip
    first = jax.jit(functools.partial(_first, min(MAX_TOP_LOGPROBS, config.vocab_size)), donate_argnums=(0,),
                    out_shardings=(shardings, replicated))  # fmt: skip
    decode = jax.jit(functools.partial(_decode, graphdef, kernel), static_argnums=(0, 1), donate_argnums=(3,),
                     out_shardings=(shardings, replicated))  # fmt: skip
    verify = jax.jit(functools.partial(_verify, graphdef), static_argnums=(0,), donate_argnums=(2,),
                     out_shardings=(shardings, replicated))  # fmt: skip
    return empty, prefill, first, decode, verify


def _empty(config, B: int, M: int, Z: int, dtype) -> RunnerState:
    V = config.vocab_size
    return RunnerState(
        cache=KVCache.zeros(config, M, Z, dtype),
        next_B=jnp.zeros(B, jnp.int32),
        positions_B=jnp.zeros(B, jnp.int32),
        remaining_B=jnp.zeros(B, jnp.int32),
        counts_BV=jnp.zeros((B, V), jnp.int32),
        seen_BV=jnp.zeros((B, V), bool),
        sampling=SamplingArrays.neutral(B, V),
    )


class Picked(NamedTuple):
    """One token per row, as recorded (-1 for a row that had ended), and the row's budget and
    penalty counts after it; `token_b` is the token to feed next (valid for every row)."""

    token_b: jax.Array
    out: tuple[jax.Array, jax.Array, jax.Array, jax.Array]  # token (-1: none), its logprob, top ids, top logprobs
    remaining_b: jax.Array
    counts_bV: jax.Array
    seen_bV: jax.Array


def _pick(logits_bV, sampling, counts_bV, seen_bV, positions_b, allowed_bW, remaining_b, stop_ids, top_k: int) -> Picked:
    """Samples the next token of every row that may still produce one (`remaining_b` > 0) at
    `positions_b`, among those `allowed_bW` allows. A stop token ends its row (reported, never
    fed); so does a spent budget. With `top_k` 0 no logprob is computed (reported as 0)."""
    b = logits_bV.shape[0]
    token_b = sample(logits_bV, sampling, counts_bV, seen_bV, positions_b, allowed_bW)
    live_b = remaining_b > 0
    keep_b = live_b & ~jnp.isin(token_b, stop_ids)
    if top_k:
        logprobs_bV = jax.nn.log_softmax(logits_bV, axis=-1)
        top_lps_bK, top_ids_bK = jax.lax.top_k(logprobs_bV, top_k)
        logprob_b = jnp.take_along_axis(logprobs_bV, token_b[:, None], axis=-1)[:, 0]
    else:  # no row asked for logprobs: a vocabulary-wide pass less per row and step
        top_lps_bK, top_ids_bK = jnp.zeros((b, 0), jnp.float32), jnp.zeros((b, 0), jnp.int32)
        logprob_b = jnp.zeros(b, jnp.float32)
    out = (jnp.where(live_b, token_b, -1), logprob_b, top_ids_bK, top_lps_bK)
    rows = jnp.arange(b)
    return Picked(
        token_b,
        out,
        jnp.where(keep_b, remaining_b - 1, 0),
        counts_bV.at[rows, token_b].add(keep_b.astype(jnp.int32)),
        seen_bV.at[rows, token_b].max(keep_b),
    )


def _prefill(graphdef, forks, cached, state: RunnerState, params, tokens_PT, start_P, last_P, seen_PV, counts_PV, table_PJ,
             rows_A, prompt_A, max_new_A, sampling_A, src_A, dst_A):  # fmt: skip
    """Runs each prompt's positions `start_P` on into the blocks of `table_PJ` (with `cached`,
    attending to the positions before them there too); with `forks`, copies block `src_A` to
    `dst_A` for a sample that holds one alone; sets every filled row's position, budget, seen
    and produced tokens and sampling settings. Returns the state and each filled row's logits at
    its prompt's position `last_P` (its next token's, once the prompt is whole)."""
    model = nnx.merge(graphdef, params)
    P, T = tokens_PT.shape
    positions_PT = start_P[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    x_PTD, cache = model.hidden(tokens_PT, AttentionMeta(positions_PT, table_PJ, cached=cached), state.cache)
    if forks:
        cache = cache.copy_blocks(src_A, dst_A)
    logits_PV = model.head(x_PTD[jnp.arange(P), last_P - start_P][:, None])[:, 0]

    put = functools.partial(_scatter, rows_b=rows_A)

    state = RunnerState(
        cache=cache,
        next_B=state.next_B,
        positions_B=put(state.positions_B, last_P[prompt_A] + 1),
        remaining_B=put(state.remaining_B, max_new_A),
        counts_BV=put(state.counts_BV, counts_PV[prompt_A]),
        seen_BV=put(state.seen_BV, seen_PV[prompt_A]),
        sampling=jax.tree.map(put, state.sampling, sampling_A),
    )
    return state, logits_PV[prompt_A]


def _first(top_k, state: RunnerState, stop_ids, logits_AV, rows_A, allowed_AW):
    """Samples the first token of rows `rows_A` from their prompts' logits. Returns the state
    and the tokens `[A, 1]` (with logprobs and top alternatives)."""
    get = functools.partial(_gather, rows_b=rows_A)
    picked = _pick(logits_AV, rows_sampling(state.sampling, rows_A), get(state.counts_BV), get(state.seen_BV),
                   get(state.positions_B), allowed_AW, get(state.remaining_B), stop_ids, top_k)  # fmt: skip

    put = functools.partial(_scatter, rows_b=rows_A)

    state = state._replace(
        next_B=put(state.next_B, picked.token_b),
        remaining_B=put(state.remaining_B, picked.remaining_b),
        counts_BV=put(state.counts_BV, picked.counts_bV),
        seen_BV=put(state.seen_BV, picked.seen_bV),
    )
    return state, tuple(x[:, None] for x in picked.out)


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


def _scatter(x: jax.Array, values_b: jax.Array, rows_b: jax.Array) -> jax.Array:
    """`x` with rows `rows_b` set to `values_b`; a row out of range (padding) is written nowhere."""
    return x.at[rows_b].set(values_b.astype(x.dtype), mode="drop")


def _decode(graphdef, kernel, steps, top_k, params, state: RunnerState, stop_ids, rows_b, allowed_bW, tables_bJ, max_steps):
    """Up to `max_steps` steps for rows `rows_b`: feed each running row's pending token into its
    blocks (`tables_bJ`), attending with `kernel` (attention.decode_kernel), then sample its next
    (among those `allowed_bW` allows) and record it."""
    model = nnx.merge(graphdef, params)
    b, M = rows_b.shape[0], state.cache.num_blocks
    sampling = rows_sampling(state.sampling, rows_b)
    out = (
        jnp.full((b, steps), -1, jnp.int32),
        jnp.zeros((b, steps), jnp.float32),
        jnp.zeros((b, steps, top_k), jnp.int32),
        jnp.zeros((b, steps, top_k), jnp.float32),
    )
    local = tuple(_gather(x, rows_b) for x in (state.next_B, state.positions_B, state.remaining_B, state.counts_BV, state.seen_BV))

    def running(carry):
        _, local, _, step = carry
        return (step < max_steps) & jnp.any(local[2] > 0)

    def step(carry):
        cache, (next_b, positions_b, remaining_b, counts_bV, seen_bV), out, j = carry
        live_b = remaining_b > 0
        meta = AttentionMeta(positions_b[:, None], jnp.where(live_b[:, None], tables_bJ, M), cached=True, kernel=kernel)
        x_b1D, cache = model.hidden(next_b[:, None], meta, cache)
        positions_b = positions_b + live_b
        picked = _pick(model.head(x_b1D)[:, 0], sampling, counts_bV, seen_bV, positions_b, allowed_bW, remaining_b,
                       stop_ids, top_k)  # fmt: skip
        out = tuple(x.at[:, j].set(new) for x, new in zip(out, picked.out))
        local = (picked.token_b, positions_b, picked.remaining_b, picked.counts_bV, picked.seen_bV)
        return cache, local, out, j + 1

    cache, local, out, _ = jax.lax.while_loop(running, step, (state.cache, local, out, jnp.int32(0)))

    put = functools.partial(_scatter, rows_b=rows_b)

    next_b, positions_b, remaining_b, counts_bV, seen_bV = local
    state = RunnerState(
        cache=cache,
        next_B=put(state.next_B, next_b),
        positions_B=put(state.positions_B, positions_b),
        remaining_B=put(state.remaining_B, remaining_b),
        counts_BV=put(state.counts_BV, counts_bV),
        seen_BV=put(state.seen_BV, seen_bV),
        sampling=state.sampling,
    )
    return state, out


def _verify(graphdef, top_k, params, state: RunnerState, stop_ids, rows_b, drafts_bK, allowed_bTW, tables_bJ):
    """Feeds each row's pending token and its K-token draft at the positions after it in one
    pass, then keeps the tokens `_pick_drafted` samples. The keys and values written at a
    rejected draft token's position are overwritten before anything reads them."""
    model = nnx.merge(graphdef, params)
    b, K = drafts_bK.shape
    M = state.cache.num_blocks
    next_b, positions_b, remaining_b, counts_bV, seen_bV = (
        _gather(x, rows_b) for x in (state.next_B, state.positions_B, state.remaining_B, state.counts_BV, state.seen_BV)
    )
    tokens_bT = jnp.concatenate([next_b[:, None], jnp.maximum(drafts_bK, 0)], axis=1)
    positions_bT = positions_b[:, None] + jnp.arange(K + 1, dtype=jnp.int32)[None, :]
    meta = AttentionMeta(positions_bT, jnp.where(remaining_b[:, None] > 0, tables_bJ, M), cached=True)
    x_bTD, cache = model.hidden(tokens_bT, meta, state.cache)
    picked, emitted_b, out = _pick_drafted(model.head(x_bTD), drafts_bK, rows_sampling(state.sampling, rows_b), counts_bV,
                                           seen_bV, positions_b, allowed_bTW, remaining_b, stop_ids, top_k)  # fmt: skip

    put = functools.partial(_scatter, rows_b=rows_b)

    state = RunnerState(
        cache=cache,
        next_B=put(state.next_B, picked.token_b),
        positions_B=put(state.positions_B, positions_b + emitted_b),
        remaining_B=put(state.remaining_B, picked.remaining_b),
        counts_BV=put(state.counts_BV, picked.counts_bV),
        seen_BV=put(state.seen_BV, picked.seen_bV),
        sampling=state.sampling,
    )
    return state, out


def _pick_drafted(logits_bTV, drafts_bK, sampling, counts_bV, seen_bV, positions_b, allowed_bTW, remaining_b, stop_ids,
                  top_k: int) -> tuple[Picked, jax.Array, tuple[jax.Array, ...]]:  # fmt: skip
    """A verify call's tokens from its logits `[b, K+1, V]` (those after the pending token at
    `positions_b`, then after each draft token): sampled in order as `_decode` samples them (same
    processors, penalty counts and random draw per position), kept while each equals the draft
    token fed after it, so a row's output is exactly what decoding one token at a time gives.
    The first token that differs from the draft (or follows all of it) is kept too and ends the
    row's call. A drafted token d is thus kept with the probability p(d) that the processed
    distribution gives it, and otherwise the token is drawn from p without d, renormalized: the
    speculative sampling rule for a draft that is a point mass. Returns each row's last token
    and budget and counts after them, how many tokens it kept, and the tokens `[b, K+1]`."""
    b, K = drafts_bK.shape
    drafts_Tb = jnp.concatenate([drafts_bK.T, jnp.full((1, b), -1, jnp.int32)])  # nothing drafted after the last

    def pick(carry, inputs):
        going_b, last = carry
        logits_bV, allowed_bW, draft_b, j = inputs
        picked = _pick(logits_bV, sampling, last.counts_bV, last.seen_bV, positions_b + j + 1, allowed_bW,
                       jnp.where(going_b, last.remaining_b, 0), stop_ids, top_k)  # fmt: skip
        last = Picked(
            jnp.where(going_b, picked.token_b, last.token_b),
            (),
            jnp.where(going_b, picked.remaining_b, last.remaining_b),
            picked.counts_bV,
            picked.seen_bV,
        )
        return (going_b & (picked.remaining_b > 0) & (picked.token_b == draft_b), last), (picked.out, going_b)

    inputs = (jnp.moveaxis(logits_bTV, 1, 0), jnp.moveaxis(allowed_bTW, 1, 0), drafts_Tb, jnp.arange(K + 1, dtype=jnp.int32))
    start = Picked(jnp.zeros(b, jnp.int32), (), remaining_b, counts_bV, seen_bV)
    (_, last), (out_T, kept_Tb) = jax.lax.scan(pick, (remaining_b > 0, start), inputs)
    return last, kept_Tb.sum(axis=0, dtype=jnp.int32), tuple(jnp.moveaxis(x, 0, 1) for x in out_T)
