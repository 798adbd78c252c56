"""Compile policy: which shapes the jitted runner is ever called with, warm-up over all of them,
and JAX's persistent compilation cache.

Every size a call depends on is padded: prompts per prefill call (while prompts x length stays
within a token budget), decode rows (from 1) and the cache window a decode call attends to (from
64) to a power of two; prompt lengths (from 16) to a power of two or three quarters of one, since
prefill compute grows with the padding (a 40-token prompt runs as 48 tokens, not 64; it costs
about 1.5x the prefill shapes). So a server of `max_batch` rows and `max_len` tokens meets a
known set of shapes (109 for 16 rows of 1024 tokens: prefill, first-token and decode calls;
with speculation, 30 verify calls more), and `warm_up` compiles them all before serving, decode
and verify with logprobs included. Left lazy:
prefill (and its first-token call) of a prompt with n > 1 samples (compiled by the first such
request of each prompt bucket, stalling the engine meanwhile; it would double the prefill
shapes for a rare request).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Callable

import jax

from codellama_jax.sampling import MAX_TOP_LOGPROBS

log = logging.getLogger(__name__)

PROMPT_MIN, WINDOW_MIN = 16, 64
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "codellama-jax" / "xla"


def bucket(n: int, minimum: int = 16) -> int:
    """Sizes are padded to powers of two so that the number of compiles stays small."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def prompt_bucket(length: int, max_len: int) -> int:
    """The padded length of a prompt: a power of two or three quarters of one, from 16."""
    size = bucket(length, PROMPT_MIN)
    if size > PROMPT_MIN and length <= size * 3 // 4:
        size = size * 3 // 4
    return min(size, max_len)


def rows_bucket(rows: int, max_batch: int) -> int:
    return min(bucket(rows, 1), max_batch)


def window_bucket(positions: int, max_len: int) -> int:
    """Cache positions a decode call attends to when its rows reach `positions`."""
    return min(bucket(positions, WINDOW_MIN), max_len)


def prompts_per_call(T: int, max_batch: int, max_len: int) -> int:
    """How many prompts of bucket `T` one prefill call takes: the most, a power of two, that fit
    `max_len` tokens (one long prompt per call; many short ones together) and `max_batch` rows."""
    fit = max(1, min(max_batch, max_len // T))
    return 1 << (fit.bit_length() - 1)


def prefill_shapes(
    max_batch: int, max_len: int, cached_blocks: int = 0, chunk: int | None = None
) -> list[tuple[int, int, int]]:
    """Every (prompts, prompt length, blocks attended) a prefill call can have, no call running
    more than `chunk` tokens of a prompt: fresh prompts attend to themselves (0 blocks); with
    `cached_blocks`, one prompt at a time also runs after a cached prefix or an earlier chunk,
    attending to that many blocks."""
    lengths = sorted({prompt_bucket(n, max_len) for n in range(1, min(chunk or max_len, max_len) + 1)})
    shapes = [(1 << i, T, 0) for T in lengths for i in range(prompts_per_call(T, max_batch, max_len).bit_length())]
    return shapes + [(1, T, cached_blocks) for T in lengths if cached_blocks]


def decode_shapes(max_batch: int, max_len: int) -> list[tuple[int, int]]:
    """Every (rows, window) a decode call can have."""
    rows = sorted({min(1 << i, max_batch) for i in range(max_batch.bit_length() + 1)})
    windows, W = [], WINDOW_MIN
    while True:
        windows.append(min(W, max_len))
        if W >= max_len:
            break
        W *= 2
    return [(b, W) for b in rows for W in windows]


def use_compile_cache(directory: str | Path | None = DEFAULT_CACHE_DIR) -> None:
    """Keeps every compiled program in `directory` (None: off), so that a restart loads what an
    earlier run compiled instead of compiling it again."""
    if directory is None:
        jax.config.update("jax_compilation_cache_dir", None)
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def warm_up(scheduler, stop: Callable[[], bool] = lambda: False) -> float:
    """Compiles every prefill and decode shape the scheduler can meet (nothing runs), unless
    `stop()` says to give up (a shutdown asked for meanwhile); returns the seconds it took."""
    start = time.perf_counter()
    runner, steps = scheduler.runner, scheduler.steps_per_call
    top_k = min(MAX_TOP_LOGPROBS, scheduler.model.config.vocab_size)
    prefills = prefill_shapes(scheduler.max_batch, scheduler.max_len, scheduler.cached_prefill_blocks,
                              scheduler.prefill_chunk)  # fmt: skip
    compiles = [functools.partial(runner.compile_prefill, P, T, J) for P, T, J in prefills]
    compiles += [functools.partial(runner.compile_first, P) for P in sorted({P for P, _, _ in prefills})]
    compiles += [functools.partial(runner.compile_decode, b, W, steps, k)
                 for b, W in decode_shapes(scheduler.max_batch, scheduler.max_len) for k in (0, top_k)]  # fmt: skip
    spec = scheduler.speculation
    if spec is not None:  # verify calls, for as many rows as speculate
        compiles += [functools.partial(runner.compile_verify, b, W, spec.num_tokens, k)
                     for b, W in decode_shapes(rows_bucket(spec.max_rows, scheduler.max_batch), scheduler.max_len)
                     for k in (0, top_k)]  # fmt: skip
    for compile_one in compiles:
        if stop():
            break
        compile_one()
    seconds = time.perf_counter() - start
    log.info("warm-up: %d shapes compiled in %.1f s", len(compiles), seconds)
    return seconds
