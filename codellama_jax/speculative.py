"""Speculative decoding with drafts that cost nothing to make: prompt lookup and grammar forcing.

A decode step of a large model reads every weight to produce one token per row; feeding a few
more positions in the same pass costs little more while the step is memory-bound. So a row that
is likely to go on with known tokens gets them as a draft: the tokens that followed the latest
earlier occurrence of its longest recurring suffix (an edit repeating the code it was given:
`propose`), or under a grammar, the tokens the grammar forces (structured.py). One verify call
(runner.py) then feeds the row's pending token and its draft and keeps the longest prefix of the
draft that the row samples itself, plus the token after it: greedy or sampled, the output is the
one decoding token by token would produce. Which rows draft, and when, is the scheduler's choice.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

METHODS = ("ngram",)


@dataclasses.dataclass(frozen=True)
class Speculation:
    """Prompt-lookup settings: drafts of up to `num_tokens` tokens, from suffixes of `ngram_min`
    to `ngram_max` tokens found earlier in the row's text, for calls of at most `max_rows` rows
    (a larger batch's step is closer to compute-bound: there a draft's positions cost their
    share, and a verify call gives up the decode call's several steps)."""

    num_tokens: int = 12
    ngram_min: int = 3
    ngram_max: int = 8
    max_rows: int = 4

    def __post_init__(self):
        if not 1 <= self.num_tokens <= 64:
            raise ValueError(f"num_tokens (--num-speculative-tokens) must be in [1, 64], got {self.num_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max (--ngram-min, --ngram-max), got {self.ngram_min} "
                             f"and {self.ngram_max}")  # fmt: skip
        if self.max_rows < 1:
            raise ValueError(f"max_rows (--speculative-max-rows) must be at least 1, got {self.max_rows}")


def speculation(method: str | Speculation | None, **settings: int) -> Speculation | None:
    """A `Speculation` from a method name ("ngram") and settings, or as given (None: off)."""
    if method is None or isinstance(method, Speculation):
        if settings:
            raise ValueError("speculative settings need speculative='ngram'")
        return method
    if method not in METHODS:
        raise ValueError(f"unknown speculative method {method!r}; choose one of {', '.join(METHODS)}")
    return Speculation(**settings)


def propose(context: Sequence[int], ngram_min: int, ngram_max: int, limit: int) -> list[int]:
    """Up to `limit` tokens that followed the latest earlier occurrence of the longest suffix of
    `context` (at most `ngram_max` tokens, at least `ngram_min`) that occurred before; [] when
    none did. Longer matches win because a short one recurs in the wrong places (`return`)."""
    c = np.asarray(context, np.int64)
    S = len(c)
    if limit <= 0 or S <= ngram_min:
        return []
    ends = np.flatnonzero(c[: S - 1] == c[S - 1])  # where an earlier occurrence ends (a token follows it)
    length = 1
    while ends.size and length < ngram_max:
        longer = ends[ends >= length]
        longer = longer[c[longer - length] == c[S - 1 - length]]
        if not longer.size:
            break
        ends, length = longer, length + 1
    if not ends.size or length < ngram_min:
        return []
    start = int(ends[-1]) + 1
    return c[start : start + limit].tolist()
