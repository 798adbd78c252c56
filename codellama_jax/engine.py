"""The continuous-batching engine: a fixed number of decode slots, a request queue, and one
device thread that keeps every live slot decoding while new requests are prefilled into free ones.

Each decode call advances all slots a few steps with their own sampling settings (the jitted
`decode_loop` of generation.py, not a second implementation), then the tokens go through each
request's text stream (stop strings, detokenization) to its consumer. A request whose consumer
cancels, or whose stop string appears, is ended at the next call and its slot freed.

    engine = Engine(model, max_batch=8)
    engine.start()
    for handle in engine.submit(prompt_ids, SamplingParams(max_tokens=64, n=2)):
        async for chunk in handle: ...
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from types import SimpleNamespace
from typing import AsyncIterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from codellama_jax import sharding, structured, tools
from codellama_jax.errors import ContextLengthExceeded, RequestError
from codellama_jax.generation import (
    FINISH_REASONS,
    RUNNING,
    STOPPED,
    DecodeState,
    TokenLogprob,
    decode_loop,
    max_new_tokens,
    prefill,
    token_logprob,
)
from codellama_jax.loader import Model, bucket
from codellama_jax.sampling import MAX_TOP_LOGPROBS, SamplingArrays, SamplingParams
from codellama_jax.tokenizer import TextStream

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the engine accepts; the server answers 429."""


class EngineStopped(RuntimeError):
    """The engine has stopped (or its device thread died): no request will be served; 503."""


class EngineDraining(EngineStopped):
    """The engine is draining: it finishes what is decoding and takes nothing new; 503."""


DRAINING = "the server is shutting down; send this request to another replica"


@dataclasses.dataclass
class Chunk:
    """What one decode call produced for a request; the last has `finish_reason` set."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Handle:
    """One sample of one request: async-iterate it for chunks; `cancel()` frees its slot."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, index: int, max_new: int, stream: TextStream,
                 constraint: structured.Constraint | None = None):  # fmt: skip
        self.prompt_ids, self.params, self.index, self.max_new, self.stream = prompt_ids, params, index, max_new, stream
        self.constraint = constraint
        self.cancelled = False
        self.completion_tokens = 0
        self._loop = asyncio.get_running_loop()
        self._chunks: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()

    def cancel(self) -> None:
        self.cancelled = True

    def _put(self, item: Chunk | BaseException) -> None:  # from the device thread
        self._loop.call_soon_threadsafe(self._chunks.put_nowait, item)

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        while True:
            item = await self._chunks.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


def _insert(state: DecodeState, row_state: DecodeState, row) -> DecodeState:
    """`state` with slot `row` replaced by a freshly prefilled one-row state."""

    def put(dst, src):
        return jax.lax.dynamic_update_slice(dst, src.astype(dst.dtype), (row,) + (0,) * (dst.ndim - 1))

    def clear(dst):
        return put(dst, jnp.zeros((1, *dst.shape[1:]), dst.dtype))

    return state._replace(
        cache=state.cache.insert(row_state.cache, row),
        **{name: put(getattr(state, name), getattr(row_state, name))
           for name in ("logits_BV", "positions_B", "counts_BV", "seen_BV", "generated_B", "max_new_B", "finish_B")},
        **{name: clear(getattr(state, name)) for name in ("tokens_BN", "logprobs_BN", "top_ids_BNK", "top_logprobs_BNK")},
    )  # fmt: skip


insert = jax.jit(_insert, donate_argnums=(0,))


class Engine:
    """Continuous batching over `max_batch` slots of up to `max_len` tokens each."""

    def __init__(
        self, model: Model, *, max_batch: int = 8, max_len: int | None = None, max_queue: int = 64, steps_per_call: int = 4
    ):
        if model.tokenizer is None:
            raise ValueError("the engine serves text: this checkpoint has no tokenizer")
        self.model = model
        self.max_batch = bucket(max_batch, minimum=1)
        self.max_len = min(bucket(max_len or model.config.max_seq_len), model.config.max_seq_len)
        self.max_queue = max_queue
        self.steps_per_call = steps_per_call
        self._waiting: queue.Queue[list[Handle]] = queue.Queue()
        self._slots: list[Handle | None] = [None] * self.max_batch
        self._fed = [0] * self.max_batch
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = self._empty_state()
        self._sampling = self._sampling_arrays()
        self._stop_ids = sharding.put(np.array(model.stop_token_ids or (-1,), np.int32), model.mesh)
        free = structured.fill_bitmask([None] * self.max_batch, model.config.vocab_size)
        self._all_allowed = sharding.put(free, model.mesh)

    # -- the consumer side (event loop) --

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        grammar: structured.Grammar | None = None,
        offered: tools.Tools | None = None,
    ) -> list[Handle]:
        """Queues a request and returns its `n` handles; a request that cannot be served is a
        RequestError (ContextLengthExceeded when it does not fit), a full queue `QueueFull`, both
        at once. With a `grammar`, every sample's output follows it (its slot then decodes one
        step per call); with `offered` tools, an answer ends at a repeated call (tools.answer_end)."""
        if self._draining.is_set():
            raise EngineDraining(DRAINING)
        if self._stop.is_set():
            raise EngineStopped("the engine has stopped and serves no more requests")
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
        if self._waiting.qsize() >= self.max_queue:
            raise QueueFull(f"{self._waiting.qsize()} requests are waiting; try again shortly")
        tokenizer = self.model.tokenizer
        handles = [
            Handle(prompt_ids, params, i, max_new, TextStream(tokenizer, prompt_ids, params.stop, tools.answer_end(offered)),
                   grammar.constraint() if grammar is not None else None)
            for i in range(params.n)
        ]  # fmt: skip
        self._waiting.put(handles)
        self._wake.set()
        return handles

    @property
    def queue_depth(self) -> int:
        return self._waiting.qsize()

    @property
    def slots_in_use(self) -> int:
        return sum(s is not None for s in self._slots)

    # -- the device thread --

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="codellama-engine", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Takes no new request (EngineDraining) and ends those still waiting for a slot the same
        way, at once, so their clients can retry elsewhere; what is decoding goes on."""
        self._draining.set()
        self._wake.set()
        if self._thread is None or not self._thread.is_alive():
            self._fail_waiting(EngineDraining(DRAINING))

    def stop(self) -> None:
        """Stops the device thread; requests still queued or decoding end with EngineStopped."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self._fail_all(EngineStopped("the engine stopped"))

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    if self._draining.is_set():  # here, so that no request is taken while it is failed
                        self._fail_waiting(EngineDraining(DRAINING))
                    self._admit()
                    if self.slots_in_use == 0:
                        self._wake.wait(timeout=0.5)
                        self._wake.clear()
                        continue
                    self._step()
                except Exception as e:  # a device failure ends the requests in flight, not the engine
                    log.exception("engine step failed")
                    self._reset(RuntimeError(f"generation failed: {e}"))
        finally:  # the engine cannot go on (stopped, or even a reset failed): nobody waits forever
            self._stop.set()
            self._fail_all(EngineStopped("the engine stopped"))

    def _reset(self, error: Exception) -> None:
        """Fails every decoding request and starts over from empty slots and a fresh state."""
        for handle in self._slots:
            if handle is not None:
                handle._put(error)
        self._slots = [None] * self.max_batch
        self._fed = [0] * self.max_batch
        self._state = self._empty_state()
        self._sampling = self._sampling_arrays()

    def _fail_all(self, error: Exception) -> None:
        for row, handle in enumerate(self._slots):
            if handle is not None:
                handle._put(error)
                self._slots[row] = None
        self._fail_waiting(error)

    def _fail_waiting(self, error: Exception) -> None:
        while True:
            try:
                handles = self._waiting.get_nowait()
            except queue.Empty:
                return
            for handle in handles:
                handle._put(error)

    def _admit(self) -> None:
        """Prefills waiting requests into free slots (a request with n samples needs n)."""
        while True:
            free = [row for row, h in enumerate(self._slots) if h is None]
            try:
                handles = self._waiting.queue[0]
            except IndexError:
                return
            if all(h.cancelled for h in handles):  # its client left while it waited
                self._waiting.get_nowait()
                continue
            if len(free) < len(handles):
                return
            self._waiting.get_nowait()
            try:
                row_state = self._prefill(handles[0])
                for row, handle in zip(free, handles):
                    self._state = insert(self._state, row_state, row)
                    self._slots[row], self._fed[row] = handle, 0
            except Exception as e:  # this request fails, the others go on
                log.exception("prefill failed")
                for handle in handles:
                    handle._put(RuntimeError(f"prefill failed: {e}"))
                for row in free:
                    if self._slots[row] in handles:
                        self._free(row)
            self._sampling = self._sampling_arrays()

    def _prefill(self, handle: Handle) -> DecodeState:
        ids = handle.prompt_ids
        T = min(bucket(len(ids)), self.max_len)
        tokens = np.zeros((1, T), np.int32)
        tokens[0, : len(ids)] = ids
        inputs = sharding.put((tokens, np.array([len(ids)], np.int32), np.array([handle.max_new], np.int32)), self.model.mesh)
        return prefill(self.model.graphdef, T, 0, 1, self.model.mesh, self.model.params, *inputs)

    def _step(self) -> None:
        m = self.model
        steps, allowed = self.steps_per_call, self._all_allowed
        constraints = [h.constraint if h is not None else None for h in self._slots]
        if any(c is not None for c in constraints):  # a grammar's mask holds for one step
            steps = 1
            try:
                allowed = sharding.put(structured.fill_bitmask(constraints, m.config.vocab_size), m.mesh)
            except structured.ConstraintError as e:  # those requests fail (their grammar's doing), the others go on
                for row, error in e.errors.items():
                    handle = self._slots[row]
                    self._free(row)
                    handle._put(error)
                self._sampling = self._sampling_arrays()
                return
        self._state = decode_loop(
            m.graphdef, m.mesh, self._window(steps), m.params, self._state, self._sampling, self._stop_ids, allowed, steps
        )
        host = self._state.results()
        ended, outgoing = [], []
        for row, handle in enumerate(self._slots):
            if handle is None:
                continue
            try:
                chunk = self._advance(row, handle, host)
            except RequestError as e:  # the request's own doing (its grammar): it fails, the others go on
                chunk = e
            except Exception as e:  # this request fails, the others go on
                log.exception("request failed")
                chunk = RuntimeError(f"request failed: {e}")
            if chunk is None:
                continue
            outgoing.append((handle, chunk))
            if not isinstance(chunk, Chunk) or chunk.finish_reason is not None:  # ended or failed
                ended.append(row)
        try:
            for row in ended:  # freed before the consumers hear of the end
                self._free(row)
            if ended:
                self._sampling = self._sampling_arrays()
        finally:
            for handle, chunk in outgoing:
                handle._put(chunk)

    def _window(self, steps: int) -> int:
        """Cache positions a call of `steps` steps attends to: a bucket above the furthest live
        row's position after it, so a short request in a long-context server reads little."""
        furthest = max(len(h.prompt_ids) + self._fed[row] for row, h in enumerate(self._slots) if h is not None)
        return min(bucket(furthest + steps + 1), self.max_len)

    def _advance(self, row: int, handle: Handle, host: SimpleNamespace) -> Chunk | None:
        """The row's new tokens through its text stream, as a chunk for its consumer (None when
        there is nothing to say); the chunk has a finish_reason when the request has ended."""
        stream, start = handle.stream, self._fed[row]
        generated = int(host.generated_B[row])
        released = len(stream.text)
        new_ids, logprobs = [], []
        for j in range(start, generated):
            if stream.stopped:
                break
            token = int(host.tokens_BN[row, j])
            if handle.constraint is not None:
                handle.constraint.advance(token)
            stream.push(token)
            new_ids.append(token)
            if handle.params.logprobs:
                logprobs.append(token_logprob(self.model.tokenizer, host, row, j, handle.params.top_logprobs))
        self._fed[row] = start + len(new_ids)
        handle.completion_tokens = self._fed[row]
        finish = int(host.finish_B[row])
        reason = None
        if stream.stopped or handle.cancelled or finish != RUNNING:
            stream.finish()
            reason = "stop" if stream.stopped else FINISH_REASONS.get(finish, "stop")
        text = stream.text[released:]
        if not (new_ids or text or reason):
            return None
        return Chunk(text, new_ids, logprobs if handle.params.logprobs else None, reason,
                     len(handle.prompt_ids), handle.completion_tokens)  # fmt: skip

    def _free(self, row: int) -> None:
        self._slots[row] = None
        self._state = self._state._replace(finish_B=self._state.finish_B.at[row].set(STOPPED))

    def _empty_state(self) -> DecodeState:
        """All slots free: a state of the full batch shape, every row finished."""
        m = self.model
        top_k = min(MAX_TOP_LOGPROBS, m.config.vocab_size)
        state = DecodeState.empty(m.config, self.max_batch, self.max_len, self.max_len, top_k, m.module.dtype)
        return jax.device_put(state, sharding.replicated(m.mesh))

    def _sampling_arrays(self) -> SamplingArrays:
        rows = [(h.params, h.index) if h is not None else (SamplingParams(temperature=0.0), 0) for h in self._slots]
        return sharding.put(SamplingArrays.build(rows, self.model.config.vocab_size), self.model.mesh)
