"""The continuous-batching engine of the server: a scheduler (scheduler.py) driven by one device
thread, fed from the event loop.

Requests are submitted from the event loop and come back as `Handle`s to async-iterate; the
device thread admits them into free rows and steps every live row, each step the scheduler's plans
for the runner. A request whose consumer cancels, or whose stop string appears, ends at the next step
and its row is freed.

    engine = Engine(model, max_batch=8)
    engine.start()
    for handle in engine.submit(prompt_ids, SamplingParams(max_tokens=64, n=2)):
        async for chunk in handle: ...
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator, Callable, Sequence

from codellama_jax import buckets, structured, tools
from codellama_jax.loader import Model
from codellama_jax.sampling import SamplingParams
from codellama_jax.scheduler import Chunk, Scheduler
from codellama_jax.speculative import Speculation

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the engine accepts; the server answers 429."""


class EngineStopped(RuntimeError):
    """The engine has stopped (or its device thread died): no request will be served; 503."""


class EngineDraining(EngineStopped):
    """The engine is draining: it finishes what is decoding and takes nothing new; 503."""


DRAINING = "the server is shutting down; send this request to another replica"


class Handle:
    """One sample of one request: async-iterate it for chunks; `cancel()` frees its row."""

    def __init__(self):
        self.sequence = None  # set by Engine.submit
        self._loop = asyncio.get_running_loop()
        self._chunks: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()

    def cancel(self) -> None:
        self.sequence.cancel()

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


class Engine:
    """Continuous batching over `max_batch` rows of up to `max_len` tokens each, their keys and
    values in `num_blocks` cache blocks of `block_size` positions, prompts reusing the blocks of
    a prefix computed before unless `prefix_caching` is off, drafting tokens to verify with
    `speculation` (see `Scheduler`)."""

    def __init__(self, model: Model, *, max_batch: int = 8, max_len: int | None = None, max_queue: int = 64,
                 steps_per_call: int = 4, num_blocks: int | None = None, block_size: int = 16,
                 prefix_caching: bool = True, prefill_chunk: int = 512, decode_attention: str = "auto",
                 speculation: Speculation | None = None):  # fmt: skip
        if model.tokenizer is None:
            raise ValueError("the engine serves text: this checkpoint has no tokenizer")
        self.model = model
        self.scheduler = Scheduler(model, max_batch=max_batch, max_len=max_len, steps_per_call=steps_per_call,
                                   num_blocks=num_blocks, block_size=block_size, prefix_caching=prefix_caching,
                                   prefill_chunk=prefill_chunk, decode_attention=decode_attention,
                                   speculation=speculation)  # fmt: skip
        self.max_batch, self.max_len = self.scheduler.max_batch, self.scheduler.max_len
        self.max_queue = max_queue
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._thread: threading.Thread | None = None
        self.on_failure: Callable[[Exception], None] | None = None  # a failed step is fatal: told why

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
        at once. With a `grammar`, every sample's output follows it (its row then decodes one
        step per call); with `offered` tools, an answer ends at a repeated call (tools.answer_end)."""
        if self._draining.is_set():
            raise EngineDraining(DRAINING)
        if self._stop.is_set():
            raise EngineStopped("the engine has stopped and serves no more requests")
        handles = [Handle() for _ in range(params.n)]
        sequences = self.scheduler.sequences(prompt_ids, params, lambda i: handles[i]._put, grammar, offered)
        if self.queue_depth >= self.max_queue:
            raise QueueFull(f"{self.queue_depth} requests are waiting; try again shortly")
        for handle, sequence in zip(handles, sequences):
            handle.sequence = sequence
        self.scheduler.add(sequences)
        self._wake.set()
        return handles

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def slots_in_use(self) -> int:
        return self.scheduler.busy_rows

    def stats(self) -> dict[str, int]:
        """The scheduler's figures for /metrics and /health (read from any thread)."""
        return self.scheduler.stats()

    # -- the device thread --

    def warm_up(self, stop: Callable[[], bool] = lambda: False) -> float:
        """Compiles every shape the engine can meet (buckets.py), before it serves, unless
        `stop()` says to give up; seconds taken."""
        return buckets.warm_up(self.scheduler, stop)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="codellama-engine", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Takes no new request (EngineDraining) and ends those still waiting for a row the same
        way, at once, so their clients can retry elsewhere; what is decoding goes on."""
        self._draining.set()
        self._wake.set()
        if self._thread is None or not self._thread.is_alive():
            self.scheduler.fail_waiting(EngineDraining(DRAINING))

    def stop(self) -> None:
        """Stops the device thread; requests still queued or decoding end with EngineStopped."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self.scheduler.fail_all(EngineStopped("the engine stopped"))

    def abort(self, error: BaseException) -> None:
        """Ends every request with `error` at once and takes no more, changing nothing the device
        thread works on: it may still run, or be stuck in a call that never finishes (a
        multi-host server whose worker is gone, which must exit soon after)."""
        self._stop.set()
        self._wake.set()
        for seq in self.scheduler.snapshot():
            seq.deliver(error)

    def _run(self) -> None:
        scheduler = self.scheduler
        try:
            while not self._stop.is_set():
                try:
                    if self._draining.is_set():  # here, so that no request is taken while it is failed
                        scheduler.fail_waiting(EngineDraining(DRAINING))
                    if not scheduler.has_work():
                        self._wake.wait(timeout=0.5)
                        self._wake.clear()
                        continue
                    scheduler.step()
                except Exception as e:  # a device failure ends the requests in flight, not the engine
                    log.exception("engine step failed")
                    if self.on_failure is not None:  # unless it cannot go on (multi-host: the processes differ)
                        self.on_failure(e)
                        return
                    scheduler.reset(RuntimeError(f"generation failed: {e}"))
        finally:  # the engine cannot go on (stopped, or even a reset failed): nobody waits forever
            self._stop.set()
            scheduler.fail_all(EngineStopped("the engine stopped"))
