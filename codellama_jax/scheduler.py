"""The host side of generation: requests in, plans for the runner, chunks out.

A `Sequence` is one sample of one request: its prompt, settings, text stream (detokenizing, stop
strings, the end of a tools answer), grammar, the KV cache blocks it holds, and where its chunks
go. The `Scheduler` keeps the waiting requests and which row each running sequence holds; each
`step()` admits waiting requests while rows and cache blocks are free (prompts of one length
bucket prefilled together; the prefill samples each row's first token, delivered at once), gives
every live row the blocks its next call writes (when they run out, the sequence admitted last
is preempted: its blocks are freed and it waits at the head of the queue to be prefilled again
with what it has produced, unseen by its client), then plans one decode call over the live rows only
(their count padded to a bucket, so one request on a 16-row server runs at batch-1 cost), and
turns each row's new tokens into a `Chunk` for its sequence; a lone row's next call is launched
before the last one is collected, so the host's work overlaps the device's. `generate()` and the
server's engine both drive this class.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Callable, Sequence as Seq

import numpy as np

from codellama_jax import buckets, structured, tools
from codellama_jax.blocks import BlockPool
from codellama_jax.kv_cache import blocks_for
from codellama_jax.errors import ContextLengthExceeded, RequestError
from codellama_jax.loader import Model
from codellama_jax.runner import Decode, Fill, Launched, Output, Prefill, Runner, Verify
from codellama_jax.sampling import MAX_SEED, MAX_TOP_LOGPROBS, SamplingParams
from codellama_jax.speculative import Speculation, propose
from codellama_jax.tokenizer import TextStream

log = logging.getLogger(__name__)

# Speculative decoding: a row that finds no draft looks again BACKOFF tokens later (a copy may
# resume any time); one whose draft is rejected at its first token waits BACKOFF tokens, doubling
# with each rejection in a row up to MAX_BACKOFF; plain decode calls meanwhile run until the
# first live row may draft again.
BACKOFF, MAX_BACKOFF = 4, 32


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    token: str  # the token's text on its own ("\ufffd" for part of a character)
    bytes: bytes | None  # what it adds to the output text, exactly (None for a control token)
    logprob: float
    top: list[TokenLogprob] = dataclasses.field(default_factory=list)  # alternatives, most likely first


@dataclasses.dataclass
class Chunk:
    """What one step produced for a sequence; the last has `finish_reason` set."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


class Sequence:
    """One sample of one request. `deliver` receives its chunks (the last with a finish reason)
    or the exception that ended it; `cancel()` ends it at the next step."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, index: int, max_new: int,
                 stream: TextStream | None, constraint: structured.Constraint | None,
                 deliver: Callable[[Chunk | BaseException], None]):  # fmt: skip
        self.prompt_ids, self.params, self.index, self.max_new = prompt_ids, params, index, max_new
        self.stream, self.constraint, self.deliver = stream, constraint, deliver
        self.cancelled = False
        self.output_ids: list[int] = []  # what it has produced (a stop token not included)
        self.blocks: list[int] = []  # its block table: the KV cache blocks of its positions, in order
        self.prefilled = False  # its prompt's keys and values are in its blocks
        self.admitted = 0  # when it was last admitted (preemption takes the latest first)
        self.cached_tokens = 0  # prompt tokens found in the prefix cache when it was first admitted
        self.draft_after = 0  # speculative decoding: no copied draft before this many output tokens
        self.draft_backoff = 0  # how long it waits after a miss (no draft, or one rejected at once)

    @property
    def context(self) -> list[int]:
        """Its prompt and what it has produced: what a prefill after a preemption runs."""
        return self.prompt_ids + self.output_ids

    @property
    def completion_tokens(self) -> int:
        return len(self.output_ids)

    def cancel(self) -> None:
        self.cancelled = True

    def advance(self, tokens: Seq[int], logprobs: Seq[TokenLogprob] | None, stop_ids: Seq[int]) -> Chunk | None:
        """This step's tokens (a stop token last, when one ended the row) through the text stream,
        as a chunk (None when there is nothing to say); the chunk has a finish reason when the
        sequence has ended."""
        stream = self.stream
        released = len(stream.text) if stream else 0
        new_ids, kept_logprobs, reason = [], [], None
        for j, token in enumerate(tokens):
            if token in stop_ids:
                reason = "stop"
                break
            if stream is not None and stream.stopped:
                break
            if self.constraint is not None:
                self.constraint.advance(token)
            if stream is not None:
                stream.push(token)
            new_ids.append(token)
            if logprobs is not None:
                kept_logprobs.append(logprobs[j])
        self.output_ids += new_ids
        if stream is not None and stream.stopped:
            reason = "stop"
        elif reason is None and self.completion_tokens >= self.max_new:
            reason = "length"
        elif reason is None and self.cancelled:
            reason = "stop"
        if reason is not None and stream is not None:
            stream.finish()
        text = stream.text[released:] if stream else ""
        if not (new_ids or text or reason):
            return None
        return Chunk(text, new_ids, kept_logprobs if self.params.logprobs else None, reason,
                     len(self.prompt_ids), self.completion_tokens, self.cached_tokens)  # fmt: skip


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


class Scheduler:
    """Requests over `max_batch` rows of up to `max_len` tokens each (the model's context at
    most), whose keys and values share a cache of `num_blocks` blocks of `block_size` positions
    (by default enough for every row at `max_len`: exactly the sizes the memory planner counts;
    at least one sequence of `max_len`), `steps_per_call` decode steps per step, at most
    `prefill_chunk` prompt tokens prefilled per step (a longer prompt is prefilled in chunks,
    between decode calls), decoding with `decode_attention` (attention.decode_kernel), and with
    `speculation` verifying each row's draft (speculative.py) instead of decoding, while at most
    `speculation.max_rows` rows are live and some row has a draft."""

    def __init__(self, model: Model, *, max_batch: int = 8, max_len: int | None = None, steps_per_call: int = 4,
                 num_blocks: int | None = None, block_size: int = 16, prefix_caching: bool = True,
                 prefill_chunk: int = 512, decode_attention: str = "auto", speculation: Speculation | None = None):  # fmt: skip
        if max_batch < 1 or (max_len is not None and max_len < 2) or block_size < 1 or prefill_chunk < 1:
            raise ValueError(f"max_batch, block_size and prefill_chunk must be at least 1 and max_len at least 2, "
                             f"got {max_batch}, {block_size}, {prefill_chunk} and {max_len}")  # fmt: skip
        self.model = model
        self.max_batch = max_batch
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.steps_per_call = steps_per_call
        self.speculation = speculation
        self._lookahead = max(steps_per_call, speculation.num_tokens if speculation else 0)  # positions a call writes
        self.prefill_chunk = prefill_chunk
        per_sequence = blocks_for(self.max_len, block_size)
        num_blocks = max_batch * per_sequence if num_blocks is None else num_blocks
        if num_blocks < per_sequence:
            raise ValueError(f"{num_blocks} cache blocks of {block_size} positions cannot hold one sequence of "
                             f"max_len {self.max_len} tokens ({per_sequence} blocks)")  # fmt: skip
        self.pool = BlockPool(num_blocks, block_size, prefix_caching)
        self.runner = Runner(model, self.max_batch, num_blocks, block_size, decode_attention)
        self.preemptions = 0
        self.prefix_queried_tokens = self.prefix_hit_tokens = 0  # prompt tokens looked up in the prefix cache, found
        self.drafts = self.draft_tokens = self.accepted_draft_tokens = 0  # speculative decoding: drafts, their tokens, kept
        self._admissions = 0
        self.waiting: collections.deque[list[Sequence]] = collections.deque()
        self.resuming: collections.deque[list[Sequence]] = collections.deque()  # preempted: admitted before `waiting`
        self.rows: list[Sequence | None] = [None] * self.max_batch
        self._stop_ids = set(model.stop_token_ids)
        self._top_k = min(MAX_TOP_LOGPROBS, model.config.vocab_size)
        self._in_flight: tuple[Launched, list[Sequence], Decode | Verify] | None = None  # a call not collected yet
        self._chunking: Fill | None = None  # the last chunk run of a long prompt, while more remain

    def sequences(
        self,
        prompt_ids: Seq[int],
        params: SamplingParams,
        deliver: Callable[[int], Callable[[Chunk | BaseException], None]],
        grammar: structured.Grammar | None = None,
        offered: tools.Tools | None = None,
    ) -> list[Sequence]:
        """The `n` sequences of a request (not yet queued; see `add`), `deliver(i)` receiving
        sample i's chunks. A request that cannot be served is a RequestError
        (ContextLengthExceeded when it does not fit). A seedless request gets a seed here, so
        its samples are drawn alike wherever the plan runs."""
        prompt_ids = list(prompt_ids)
        max_new = max_new_tokens(self.model, len(prompt_ids), params.max_tokens)
        if len(prompt_ids) + max_new > self.max_len:
            max_new = self.max_len - len(prompt_ids)
            if max_new <= 0 or params.max_tokens is not None:
                raise ContextLengthExceeded(
                    f"the prompt has {len(prompt_ids)} tokens and at most {self.max_len} tokens per request "
                    f"are served (--max-len); max_tokens {params.max_tokens} does not fit"
                )
        if params.n > self.max_batch:
            raise RequestError(f"n={params.n} exceeds the server's {self.max_batch} decode slots", param="n")
        if self._blocks_to_admit(len(prompt_ids), params.n) > self.pool.num_blocks:
            raise RequestError(f"n={params.n} samples of a {len(prompt_ids)}-token prompt need more than the "
                               f"server's {self.pool.num_blocks} KV cache blocks", param="n")  # fmt: skip
        vocab = self.model.config.vocab_size
        for token in params.logit_bias or {}:
            if not 0 <= token < vocab:
                raise RequestError(f"logit_bias names token {token}, outside the vocabulary [0, {vocab})",
                                   param="logit_bias")  # fmt: skip
        if params.seed is None:
            params = dataclasses.replace(params, seed=int.from_bytes(os.urandom(8), "little") & MAX_SEED)
        tokenizer = self.model.tokenizer
        return [
            Sequence(prompt_ids, params, i, max_new,
                     TextStream(tokenizer, prompt_ids, params.stop, tools.answer_end(offered)) if tokenizer else None,
                     grammar.constraint() if grammar is not None else None, deliver(i))
            for i in range(params.n)
        ]  # fmt: skip

    def add(self, sequences: list[Sequence]) -> None:
        """Queues a request's sequences; they are admitted together (thread-safe)."""
        self.waiting.append(sequences)

    @property
    def busy_rows(self) -> int:
        return sum(s is not None for s in self.rows)

    def stats(self) -> dict[str, int]:
        """KV cache blocks (all, held, free), sequences running and waiting, preemptions so far."""
        pool = self.pool
        return {"kv_cache_blocks": pool.num_blocks, "kv_cache_blocks_used": pool.num_blocks - pool.num_free,
                "kv_cache_blocks_free": pool.num_free, "sequences_running": self.busy_rows,
                "sequences_waiting": sum(len(group) for queue in (self.resuming, self.waiting) for group in list(queue)),
                "preemptions": self.preemptions,
                "prefix_cache_queried_tokens": self.prefix_queried_tokens, "prefix_cache_hit_tokens": self.prefix_hit_tokens,
                "speculative_drafts": self.drafts, "speculative_draft_tokens": self.draft_tokens, "speculative_accepted_tokens": self.accepted_draft_tokens}  # fmt: skip

    def has_work(self) -> bool:
        return bool(self.waiting or self.resuming) or self.busy_rows > 0 or self._in_flight is not None

    def step(self) -> None:
        """Admits what fits (their first tokens come from the prefill and are delivered at once),
        then launches one decode call over every live row (preempting when the cache is full)
        and delivers the chunks of the call
        before it while the device runs this one (see `_may_run_ahead`); else each call is
        collected before the next is planned."""
        if not self._may_run_ahead():
            self._collect()
        admitted = self.prefill_plan()
        if admitted is not None:
            self._deliver(self._prefill(admitted))
        plan = self.decode_plan()
        launched = None if plan is None else (self.runner.launch(plan), [self.rows[row] for row in plan.rows], plan)
        self._collect()
        self._in_flight = launched
        if not self._may_run_ahead():
            self._collect()

    def _prefill(self, plan: Prefill) -> Output:
        """Runs a prefill plan; the full blocks it wrote are registered for reuse."""
        output = self.runner.admit(plan)
        for fill in (fill for call in plan.calls for fill in call):
            if fill.rows[0] in output.failed:
                if fill is self._chunking:
                    self._chunking = None
                continue
            self.pool.register(fill.prompt[: fill.stop], fill.tables[0])
            for row in fill.rows:
                self.rows[row].prefilled = fill.final
        return output

    def _may_run_ahead(self) -> bool:
        """Whether the next call may be launched before the one in flight is collected: it hides
        the host's share of a call (dispatch, detokenizing), largest at one row, but a request
        arriving meanwhile waits a call longer for its row (16 clients here: time to first token
        0.44 s against 0.30), and so does a row the host ends (a stop string) for the call made
        for nothing. So only for a lone row, while nothing waits, not under a grammar (its next
        mask needs the token before) and, when speculating, only while the row cannot draft
        before the call after next (a draft needs the newest tokens too)."""
        live = [seq for seq in self.rows if seq is not None]
        backing_off = all(seq.draft_after - seq.completion_tokens > 2 * self.steps_per_call for seq in live)
        return (not self.waiting and not self.resuming and self._chunking is None and len(live) <= 1
                and (self.speculation is None or backing_off) and all(seq.constraint is None for seq in live))  # fmt: skip

    def _collect(self) -> None:
        """Waits for the call in flight, if any, and delivers its chunks; a call whose
        sequences have all ended meanwhile (a stop string) is not waited for."""
        if self._in_flight is not None:
            (launched, sequences, plan), self._in_flight = self._in_flight, None
            if any(self.rows[row] is seq for row, seq in zip(launched.rows, sequences)):
                output = self.runner.collect(launched)
                if isinstance(plan, Verify):
                    self._count_accepted(plan, output, sequences)
                self._deliver(output, sequences)

    def _deliver(self, output: Output, sequences: list[Sequence] | None = None) -> None:
        """Each row's new tokens through its sequence (`sequences`: those the rows held when the
        call was launched; a row whose sequence has ended since is skipped); rows that ended are
        freed before their consumers hear of the end."""
        held = [self.rows[row] for row in output.rows] if sequences is None else sequences
        chunks = list(output.failed.items()) + [
            (row, self._chunk(seq, output, i)) for i, (row, seq) in enumerate(zip(output.rows, held))
            if seq is not None and self.rows[row] is seq
        ]  # fmt: skip
        outgoing = [(row, self.rows[row], chunk) for row, chunk in chunks if chunk is not None]
        for row, _, chunk in outgoing:
            if not isinstance(chunk, Chunk) or chunk.finish_reason is not None:
                self._free(row)
        for _, seq, chunk in outgoing:
            seq.deliver(chunk)

    def _chunk(self, seq: Sequence, output: Output, i: int) -> Chunk | BaseException | None:
        """Row `i` of the output through its sequence; an exception ends this request only."""
        try:
            tokens = [int(t) for t in output.tokens_bN[i] if t >= 0]
            logprobs = self._logprobs(output, i, len(tokens), seq.params) if seq.params.logprobs else None
            return seq.advance(tokens, logprobs, self._stop_ids)
        except RequestError as e:  # the request's own doing (its grammar)
            return e
        except Exception as e:
            log.exception("request failed")
            return RuntimeError(f"request failed: {e}")

    def prefill_plan(self) -> Prefill | None:
        """This step's prefill work, at most `prefill_chunk` tokens of it so that decoding rows
        wait for no more: the next chunk of a long prompt, then waiting requests admitted into
        free rows. As prefill calls: fresh prompts grouped by length bucket, and a call of its own
        for each chunk and each prompt that reads a cached prefix (attending to the blocks of
        the longest sequence); None when there is nothing to prefill."""
        fills, budget = [], self.prefill_chunk
        if self._chunking is not None:
            fill, self._chunking = self._chunking, None
            sequences = [self.rows[row] for row in fill.rows]
            if all(seq.cancelled for seq in sequences):  # its client left: the rest is not prefilled
                for row in fill.rows:
                    self._free(row)
                for seq in sequences:
                    seq.deliver(seq.advance([], None, self._stop_ids))
            else:
                fills.append(self._chunk_of(fill, fill.stop, budget))
                budget -= fills[0].stop - fills[0].start
        fills += self._admit(budget)
        if not fills:
            return None
        by_shape: dict[int, list[list[Fill]]] = {}  # prompt bucket -> prefill calls of fresh prompts
        for fill in fills:
            if fill.start == 0 and fill.final:
                T = buckets.prompt_bucket(len(fill.prompt), self.max_len)
                groups = by_shape.setdefault(T, [[]])
                if len(groups[-1]) == buckets.prompts_per_call(T, self.max_batch, self.max_len):
                    groups.append([])
                groups[-1].append(fill)
        calls = [(tuple(g), (buckets.rows_bucket(len(g), self.max_batch), T, 0)) for T, gs in by_shape.items() for g in gs]
        calls += [((fill,), (1, buckets.prompt_bucket(fill.stop - fill.start, self.max_len), self.cached_prefill_blocks))
                  for fill in fills if fill.start > 0 or not fill.final]  # fmt: skip
        return Prefill(calls=tuple(c[0] for c in calls), shapes=tuple(c[1] for c in calls))

    @property
    def cached_prefill_blocks(self) -> int:
        """Blocks a prefill call of a prompt's later part (after a cached prefix, or a chunk)
        attends to: those of a whole `max_len` sequence, one shape per length; 0 when this
        scheduler never makes such calls (no prefix caching, no prompt long enough to chunk)."""
        cached = self.pool.prefix_caching or self.prefill_chunk < self.max_len
        return self.pool.blocks_for(self.max_len) if cached else 0

    def decode_plan(self) -> Decode | Verify | None:
        """One decode call over every live row (prefilled: not a long prompt still in chunks), or
        a verify call when speculating and some row has a draft; None when no row is live."""
        V = self.model.config.vocab_size
        while True:  # a row whose grammar cannot go on fails, a preempted one waits: plan the others again
            live = [(row, seq) for row, seq in enumerate(self.rows) if seq is not None and seq.prefilled]
            if not live:
                return None
            drafts = self._drafts(live)
            verify = drafts is not None and any(drafts)
            constraints = [seq.constraint for _, seq in live]
            try:
                if verify:
                    allowed = structured.fill_draft_bitmasks(constraints, drafts, V, self.speculation.num_tokens + 1)
                else:
                    allowed = structured.fill_bitmask(constraints, V)
            except structured.ConstraintError as e:
                for i, error in e.errors.items():
                    row, seq = live[i]
                    self._free(row)
                    seq.deliver(error)
                continue
            positions = self.speculation.num_tokens if verify else self.steps_per_call  # what the call may write
            if self._grow(live, positions):
                break
        for (_, seq), draft in zip(live, drafts or ()):
            if not draft and seq.completion_tokens >= seq.draft_after:
                seq.draft_after = seq.completion_tokens + BACKOFF
        b = buckets.rows_bucket(len(live), self.max_batch)
        window = buckets.window_bucket(max(self._positions_after_call(seq, positions) for _, seq in live), self.max_len)
        J = self.pool.blocks_for(window)
        tables_bJ = np.full((b, J), self.pool.num_blocks, np.int32)
        for i, (_, seq) in enumerate(live):  # blocks past the window (grown for a longer verify call) stay held
            tables_bJ[i, : len(seq.blocks[:J])] = seq.blocks[:J]
        rows = tuple(row for row, _ in live)
        top_k = self._top_k if any(seq.params.logprobs for _, seq in live) else 0  # 0: no logprobs at all
        allowed_b = np.full((b, *allowed.shape[1:]), -1, np.int32)  # padding rows: free
        allowed_b[: len(live)] = allowed
        if verify:
            drafts_bK = np.full((b, self.speculation.num_tokens), -1, np.int32)
            for i, draft in enumerate(drafts):
                drafts_bK[i, : len(draft)] = draft
            return Verify(rows=rows, b=b, top_k=top_k, drafts_bK=drafts_bK, allowed_bTW=allowed_b, tables_bJ=tables_bJ)
        return Decode(
            rows=rows,
            b=b,
            steps=self.steps_per_call,
            max_steps=1 if any(c is not None for c in constraints) else self._plain_steps(live, drafts is not None),
            top_k=top_k,
            allowed_bW=allowed_b,
            tables_bJ=tables_bJ,
        )

    def _drafts(self, live: list[tuple[int, Sequence]]) -> list[list[int]] | None:
        """Each live row's draft (speculative.py; [] for none), or None when this call cannot
        verify: speculation off, more rows than it pays for, or a call in flight."""
        spec = self.speculation
        if spec is None or len(live) > spec.max_rows or self._in_flight is not None:
            return None
        return [self._draft(seq, spec) for _, seq in live]

    @staticmethod
    def _draft(seq: Sequence, spec: Speculation) -> list[int]:
        """A row's draft: the tokens its grammar forces, else (unless it is backing off) what
        followed its latest suffix's earlier occurrence, as far as its grammar allows; never
        more than its budget can keep (a verify call keeps one token past the draft)."""
        limit = min(spec.num_tokens, seq.max_new - seq.completion_tokens - 1)
        if limit <= 0:
            return []
        if seq.constraint is not None:
            forced = seq.constraint.forced()
            if forced:
                return forced[:limit]
        if seq.completion_tokens < seq.draft_after:
            return []
        draft = propose(seq.context, spec.ngram_min, spec.ngram_max, limit)
        return seq.constraint.valid_prefix(draft) if seq.constraint is not None and draft else draft

    @staticmethod
    def _back_off(seq: Sequence) -> None:
        """A row's draft was rejected at its first token: a verify call costs a forward pass of
        more positions, and text with nothing to copy (prose) gets few drafts, almost all
        spurious, so it waits longer after each rejection in a row."""
        seq.draft_backoff = min(max(2 * seq.draft_backoff, BACKOFF), MAX_BACKOFF)
        seq.draft_after = seq.completion_tokens + seq.draft_backoff

    def _plain_steps(self, live: list[tuple[int, Sequence]], speculating: bool) -> int:
        """Steps of a plain decode call: all of them, unless rows may draft: then until the
        first of them may draft again (a draft may appear after any token), `BACKOFF` at least."""
        if not speculating:
            return self.steps_per_call
        wait = min(seq.draft_after - seq.completion_tokens for _, seq in live)
        return min(self.steps_per_call, max(wait, BACKOFF))

    def _count_accepted(self, plan: Verify, output: Output, sequences: list[Sequence]) -> None:
        """Counts a verify call's drafts, their tokens, and those kept (each row's leading tokens
        equal to its draft); a row whose draft was rejected at once backs off, one whose draft
        was (partly) kept drafts again at once."""
        n, K = len(plan.rows), plan.drafts_bK.shape[1]
        drafts_nK = plan.drafts_bK[:n]
        accepted_n = np.cumprod((output.tokens_bN[:, :K] == drafts_nK) & (drafts_nK >= 0), axis=1).sum(axis=1)
        self.drafts += int((drafts_nK[:, 0] >= 0).sum())
        self.draft_tokens += int((drafts_nK >= 0).sum())
        self.accepted_draft_tokens += int(accepted_n.sum())
        for seq, draft, accepted in zip(sequences, drafts_nK[:, 0], accepted_n):
            if draft >= 0 and accepted == 0 and seq.constraint is None:
                self._back_off(seq)
            elif accepted:
                seq.draft_backoff = 0

    def _positions_after_call(self, seq: Sequence, positions: int | None = None) -> int:
        """Positions a live sequence may have written after the next call, of `positions`
        (default: as many as any call writes; its pending token's position is one less than its
        prompt and output; a call in flight may add as many more)."""
        ahead = self._lookahead if self._in_flight is not None else 0
        return min(len(seq.prompt_ids) + seq.completion_tokens + ahead + (positions or self._lookahead), self.max_len)

    def _wanted(self, seq: Sequence, positions: int | None = None) -> int:
        """Blocks a live sequence needs beyond those it holds for the next call (of `positions`)."""
        return max(0, self.pool.blocks_for(self._positions_after_call(seq, positions)) - len(seq.blocks))

    def _grow(self, live: list[tuple[int, Sequence]], positions: int) -> bool:
        """Gives every live row the blocks the next call (of `positions`) writes, the earliest
        admitted first.
        When they run out, collects the call in flight (what it ends frees blocks, and a
        preempted sequence must have all it produced), or else preempts the sequence admitted
        last. False when the rows changed (plan again)."""
        for _, seq in sorted(live, key=lambda item: item[1].admitted):
            wanted = self._wanted(seq, positions)
            if wanted > self.pool.num_free:
                if self._in_flight is not None:
                    self._collect()
                else:
                    self._preempt(*max(live, key=lambda item: item[1].admitted))
                return False
            seq.blocks += self.pool.allocate(wanted)
        return True

    def _preempt(self, row: int, seq: Sequence) -> None:
        """Frees a running sequence's row and blocks; it waits first in line (before new requests,
        and still running for a drain) to be prefilled again with its prompt and what it has
        produced so far."""
        log.info("preempting a sequence of %d tokens: the KV cache is full", len(seq.prompt_ids) + seq.completion_tokens)
        self._free(row)
        self.resuming.appendleft([seq])
        self.preemptions += 1

    def _free(self, row: int) -> None:
        """Row `row` and the blocks its sequence held are free; the full blocks of the tokens it
        fed are registered for reuse (a conversation's next turn starts with them)."""
        seq, self.rows[row] = self.rows[row], None
        if seq.prefilled:
            self.pool.register(seq.context[:-1], seq.blocks)  # its last token was never fed
        self.pool.release(seq.blocks)
        seq.blocks, seq.prefilled = [], False

    def _chunk_of(self, fill: Fill, start: int, budget: int) -> Fill:
        """The piece of a prompt from `start` that fits `budget` tokens: the whole rest, or a chunk
        (the long prompt then goes on at the next step)."""
        piece = dataclasses.replace(fill, start=start, stop=min(start + budget, len(fill.prompt)))
        if not piece.final:
            self._chunking = piece
        return piece

    def _blocks_to_admit(self, length: int, samples: int) -> int:
        """Blocks that `samples` samples of a `length`-token prompt hold after their first decode
        call: the prompt's full blocks once, and the rest for each sample."""
        shared = length // self.pool.block_size
        first_call = self.pool.blocks_for(min(length + 1 + self._lookahead, self.max_len))
        return shared + (first_call - shared) * samples

    def _admit(self, budget: int) -> list[Fill]:
        """Waiting requests into free rows, in order, while their samples fit and `budget`
        prefill tokens remain: a row each, and blocks for the prompt (its full blocks shared by
        the samples) with the next decode call's blocks of every running row still free. A
        prompt longer than what remains is prefilled in chunks, one long prompt at a time; where
        no later part of a prompt is ever prefilled on its own (no prefix caching, `prefill_chunk`
        at `max_len`: no shapes for it) such a prompt waits for the next step whole. A request
        whose grammar allows no first token ends here."""
        fills = []
        reserved = sum(self._wanted(seq) for seq in self.rows if seq is not None)
        while (self.resuming or self.waiting) and budget > 0:
            queue = self.resuming or self.waiting
            sequences = queue[0]
            if all(s.cancelled for s in sequences):  # its client left while it waited
                queue.popleft()
                continue
            first = sequences[0]
            context = first.context  # a preempted sequence: what it had produced too
            hit = self.pool.cached_prefix(context)
            self.pool.share(hit)  # held before counting what is free: an idle cached block counts as free
            shared, partial = divmod(len(context), self.pool.block_size)
            wanted = self._blocks_to_admit(len(context), len(sequences)) - len(hit)
            free = [row for row, s in enumerate(self.rows) if s is None]
            remaining = len(context) - len(hit) * self.pool.block_size
            chunked = remaining > budget  # split, unless there are no shapes for a later part: then it waits a step
            if (len(free) < len(sequences) or wanted + reserved > self.pool.num_free
                    or (chunked and (self._chunking or not self.cached_prefill_blocks))):  # fmt: skip
                self.pool.release(hit)
                break
            queue.popleft()
            try:  # every sample's grammar starts alike
                allowed_W = structured.fill_bitmask([first.constraint], self.model.config.vocab_size)[0]
            except structured.ConstraintError as e:
                self.pool.release(hit)
                for seq in sequences:
                    seq.deliver(e.errors[0])
                continue
            self.prefix_queried_tokens += len(context)
            self.prefix_hit_tokens += len(hit) * self.pool.block_size
            rows = free[: len(sequences)]
            full = hit + self.pool.allocate(shared - len(hit))
            for row, seq in zip(rows, sequences):
                self.rows[row] = seq
                if not seq.admitted:  # a resumed sequence's usage keeps what its request found
                    seq.cached_tokens = len(hit) * self.pool.block_size
                self._admissions += 1
                seq.admitted = self._admissions
                seq.blocks = full + self.pool.allocate(1 if partial else 0)
                if seq is not first:
                    self.pool.share(full)
            reserved += sum(self._wanted(seq) for seq in sequences)
            settings = tuple((s.params, s.index) for s in sequences)
            tables = tuple(tuple(s.blocks) for s in sequences)
            fill = Fill(tuple(context), tuple(rows), tables, settings, first.max_new - first.completion_tokens, allowed_W,
                        generated=first.completion_tokens)  # fmt: skip
            fills.append(self._chunk_of(fill, len(hit) * self.pool.block_size, budget))
            budget -= fills[-1].stop - fills[-1].start
        return fills

    def _logprobs(self, output: Output, i: int, count: int, params: SamplingParams) -> list[TokenLogprob]:
        tokenizer = self.model.tokenizer

        def entry(token, logprob, top=()) -> TokenLogprob:
            token = int(token)
            text = tokenizer.decode([token], skip_special_tokens=False, continuation=True)
            return TokenLogprob(token, text, tokenizer.piece_bytes(token), float(logprob), list(top))

        entries = []
        for j in range(count):
            top = [entry(t, lp) for t, lp in
                   zip(output.top_ids_bNK[i, j, : params.top_logprobs], output.top_logprobs_bNK[i, j, : params.top_logprobs])]  # fmt: skip
            entries.append(entry(output.tokens_bN[i, j], output.logprobs_bN[i, j], top))
        return entries

    def fail_all(self, error: BaseException) -> None:
        """Ends every running and waiting sequence with `error`."""
        self._fail_running(error)
        self.fail_waiting(error)

    def snapshot(self) -> list[Sequence]:
        """Every sequence running, preempted or waiting, read without changing anything (from
        another thread than the one stepping: each container is copied at once)."""
        running = [seq for seq in self.rows.copy() if seq is not None]
        return running + [seq for group in (*self.resuming.copy(), *self.waiting.copy()) for seq in group]

    def fail_waiting(self, error: BaseException) -> None:
        while True:
            try:
                sequences = self.waiting.popleft()
            except IndexError:  # empty (checked this way: requests are added from another thread)
                return
            for seq in sequences:
                seq.deliver(error)

    def reset(self, error: BaseException) -> None:
        """Fails the running sequences and starts over from an empty state (after a device
        failure left it unknown); waiting requests stay queued."""
        self._fail_running(error)
        self.runner.reset()
        self.pool.reset()

    def _fail_running(self, error: BaseException) -> None:
        """Ends every sequence admitted (running, or preempted and waiting to resume)."""
        self._in_flight = None  # its rows' sequences end here; what it produced is dropped
        self._chunking = None
        while self.resuming:
            for seq in self.resuming.popleft():
                seq.deliver(error)
        for row, seq in enumerate(self.rows):
            if seq is not None:
                self._free(row)
                seq.deliver(error)
