"""The host side of generation: requests in, plans for the runner, chunks out.

A `Sequence` is one sample of one request: its prompt, settings, text stream (detokenizing, stop
strings, the end of a tools answer), grammar, and where its chunks go. The `Scheduler` keeps the
waiting requests and which row each running sequence holds; each `step()` admits waiting
requests into free rows (prompts of one length bucket prefilled together; the prefill samples
each row's first token, delivered at once), then plans one decode call over the live rows only
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
from codellama_jax.errors import ContextLengthExceeded, RequestError
from codellama_jax.loader import Model
from codellama_jax.runner import Decode, Fill, Launched, Output, Prefill, Runner
from codellama_jax.sampling import MAX_SEED, MAX_TOP_LOGPROBS, SamplingParams
from codellama_jax.tokenizer import TextStream

log = logging.getLogger(__name__)


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


class Sequence:
    """One sample of one request. `deliver` receives its chunks (the last with a finish reason)
    or the exception that ended it; `cancel()` ends it at the next step."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, index: int, max_new: int,
                 stream: TextStream | None, constraint: structured.Constraint | None,
                 deliver: Callable[[Chunk | BaseException], None]):  # fmt: skip
        self.prompt_ids, self.params, self.index, self.max_new = prompt_ids, params, index, max_new
        self.stream, self.constraint, self.deliver = stream, constraint, deliver
        self.cancelled = False
        self.completion_tokens = 0

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
        self.completion_tokens += len(new_ids)
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
                     len(self.prompt_ids), self.completion_tokens)  # fmt: skip


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
    """Requests over `max_batch` rows of up to `max_len` tokens (the model's context at most;
    exactly the sizes the memory planner counts), `steps_per_call` decode steps per step."""

    def __init__(self, model: Model, *, max_batch: int = 8, max_len: int | None = None, steps_per_call: int = 4):
        if max_batch < 1 or (max_len is not None and max_len < 2):
            raise ValueError(f"max_batch must be at least 1 and max_len at least 2, got {max_batch} and {max_len}")
        self.model = model
        self.max_batch = max_batch
        self.max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
        self.steps_per_call = steps_per_call
        self.runner = Runner(model, self.max_batch, self.max_len)
        self.waiting: collections.deque[list[Sequence]] = collections.deque()
        self.rows: list[Sequence | None] = [None] * self.max_batch
        self._stop_ids = set(model.stop_token_ids)
        self._top_k = min(MAX_TOP_LOGPROBS, model.config.vocab_size)
        self._free_mask = structured.fill_bitmask([None], model.config.vocab_size)[0]
        self._in_flight: tuple[Launched, list[Sequence]] | None = None  # a decode call not collected yet

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

    def has_work(self) -> bool:
        return bool(self.waiting) or self.busy_rows > 0 or self._in_flight is not None

    def step(self) -> None:
        """Admits what fits (their first tokens come from the prefill and are delivered at once),
        then launches one decode call over every live row and delivers the chunks of the call
        before it while the device runs this one (see `_may_run_ahead`); else each call is
        collected before the next is planned."""
        if not self._may_run_ahead():
            self._collect()
        admitted = self.prefill_plan()
        if admitted is not None:
            self._deliver(self.runner.admit(admitted))
        plan = self.decode_plan()
        launched = None if plan is None else (self.runner.launch(plan), [self.rows[row] for row in plan.rows])
        self._collect()
        self._in_flight = launched
        if not self._may_run_ahead():
            self._collect()

    def _may_run_ahead(self) -> bool:
        """Whether the next call may be launched before the one in flight is collected: it hides
        the host's share of a call (dispatch, detokenizing), largest at one row, but a request
        arriving meanwhile waits a call longer for its row (16 clients here: time to first token
        0.44 s against 0.30), and so does a row the host ends (a stop string) for the call made
        for nothing. So only for a lone row, while nothing waits, and not under a grammar (its
        next mask needs the token before)."""
        live = [seq for seq in self.rows if seq is not None]
        return not self.waiting and len(live) <= 1 and all(seq.constraint is None for seq in live)

    def _collect(self) -> None:
        """Waits for the decode call in flight, if any, and delivers its chunks; a call whose
        sequences have all ended meanwhile (a stop string) is not waited for."""
        if self._in_flight is not None:
            (launched, sequences), self._in_flight = self._in_flight, None
            if any(self.rows[row] is seq for row, seq in zip(launched.rows, sequences)):
                self._deliver(self.runner.collect(launched), sequences)

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
                self.rows[row] = None
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
        """Waiting requests admitted into free rows, as prefill calls of prompts grouped by
        length bucket; None when none is admitted."""
        fills = self._admit()
        if not fills:
            return None
        by_shape: dict[int, list[list[Fill]]] = {}  # prompt bucket -> prefill calls
        for fill in fills:
            T = buckets.prompt_bucket(len(fill.prompt), self.max_len)
            groups = by_shape.setdefault(T, [[]])
            if len(groups[-1]) == buckets.prompts_per_call(T, self.max_batch, self.max_len):
                groups.append([])
            groups[-1].append(fill)
        calls = [(tuple(g), (buckets.rows_bucket(len(g), self.max_batch), T)) for T, gs in by_shape.items() for g in gs]
        return Prefill(calls=tuple(c[0] for c in calls), shapes=tuple(c[1] for c in calls))

    def decode_plan(self) -> Decode | None:
        """One decode call over every live row; None when no row is live."""
        grammar_failed = True
        while grammar_failed:  # a row whose grammar cannot go on fails; the others are planned
            live = [(row, seq) for row, seq in enumerate(self.rows) if seq is not None]
            if not live:
                return None
            try:
                allowed = structured.fill_bitmask([seq.constraint for _, seq in live], self.model.config.vocab_size)
                grammar_failed = False
            except structured.ConstraintError as e:
                for i, error in e.errors.items():
                    row, seq = live[i]
                    self.rows[row] = None
                    seq.deliver(error)
        b = buckets.rows_bucket(len(live), self.max_batch)
        allowed_bW = np.tile(self._free_mask, (b, 1))
        allowed_bW[: len(live)] = allowed
        steps = self.steps_per_call
        ahead = steps if self._in_flight is not None else 0  # tokens the call in flight may add
        furthest = max(len(seq.prompt_ids) + seq.completion_tokens for _, seq in live) + ahead
        return Decode(
            rows=tuple(row for row, _ in live),
            b=b,
            steps=steps,
            max_steps=1 if any(seq.constraint is not None for _, seq in live) else steps,  # a grammar's mask holds for one token
            window=buckets.window_bucket(furthest + steps, self.max_len),
            top_k=self._top_k if any(seq.params.logprobs for _, seq in live) else 0,  # 0: no logprobs at all
            allowed_bW=allowed_bW,
        )

    def _admit(self) -> list[Fill]:
        """Waiting requests into free rows, in order, while their samples fit. A request whose
        grammar allows no first token ends here."""
        fills = []
        while self.waiting:
            sequences = self.waiting[0]
            if all(s.cancelled for s in sequences):  # its client left while it waited
                self.waiting.popleft()
                continue
            free = [row for row, s in enumerate(self.rows) if s is None]
            if len(free) < len(sequences):
                break
            self.waiting.popleft()
            first = sequences[0]
            try:  # every sample's grammar starts alike
                allowed_W = structured.fill_bitmask([first.constraint], self.model.config.vocab_size)[0]
            except structured.ConstraintError as e:
                for seq in sequences:
                    seq.deliver(e.errors[0])
                continue
            rows = free[: len(sequences)]
            for row, seq in zip(rows, sequences):
                self.rows[row] = seq
            settings = tuple((s.params, s.index) for s in sequences)
            fills.append(Fill(tuple(first.prompt_ids), tuple(rows), settings, first.max_new, allowed_W))
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

    def _fail_running(self, error: BaseException) -> None:
        self._in_flight = None  # its rows' sequences end here; what it produced is dropped
        for row, seq in enumerate(self.rows):
            if seq is not None:
                seq.deliver(error)
                self.rows[row] = None
