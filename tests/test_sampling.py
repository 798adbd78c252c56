"""Each logits processor against transformers' (or OpenAI's formula), seeded determinism, and the
sampled frequencies against the processed distribution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from transformers.generation import logits_process as hf

from codellama_jax.sampling import (
    SamplingArrays,
    SamplingParams,
    draw,
    apply_min_p,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    argmax,
    sample,
)

V = 64
ROWS = 4


@pytest.fixture(scope="module")
def logits():
    return np.random.default_rng(0).normal(0, 3, (ROWS, V)).astype(np.float32)


def _hf_rows(processor_for_row, logits, input_ids=None):
    ids = torch.zeros((1, 1), dtype=torch.long) if input_ids is None else None
    out = []
    for b in range(ROWS):
        row_ids = ids if input_ids is None else torch.tensor(input_ids[b : b + 1])
        out.append(processor_for_row(b)(row_ids, torch.tensor(logits[b : b + 1])).numpy()[0])
    return np.stack(out)


def _assert_same(ours, expected):
    ours = np.asarray(ours)
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(ours[finite], expected[finite], rtol=1e-5, atol=1e-5)


# processor, the transformers warper for one row's value (None: transformers has no neutral value), values per row
WARPERS = {
    "temperature": (apply_temperature, lambda v: hf.TemperatureLogitsWarper(float(v)), np.array([0.5, 1.0, 1.7, 0.2], np.float32)),
    "top_k": (apply_top_k, lambda v: hf.TopKLogitsWarper(int(v)) if v else None, np.array([1, 5, 0, 63], np.int32)),
    "top_p": (apply_top_p, lambda v: hf.TopPLogitsWarper(float(v)), np.array([0.1, 0.5, 0.9, 1.0], np.float32)),
    "min_p": (apply_min_p, lambda v: hf.MinPLogitsWarper(float(v)) if v else None, np.array([0.0, 0.05, 0.3, 1.0], np.float32)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(WARPERS))
def test_warper_matches_transformers(name, logits):
    ours, warper_for, values = WARPERS[name]
    expected = _hf_rows(lambda b: warper_for(values[b]) or (lambda ids, scores: scores), logits)
    _assert_same(ours(jnp.asarray(logits), jnp.asarray(values)), expected)


def test_repetition_penalty(logits):
    penalty = np.array([1.0, 1.3, 0.7, 5.0], np.float32)
    history = np.random.default_rng(1).integers(0, V, (ROWS, 12))
    seen = np.zeros((ROWS, V), bool)
    np.put_along_axis(seen, history, True, axis=1)
    expected = _hf_rows(lambda b: hf.RepetitionPenaltyLogitsProcessor(float(penalty[b])), logits, history)
    _assert_same(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), jnp.asarray(penalty)), expected)


def test_presence_and_frequency_follow_openai_formula(logits):
    counts = np.random.default_rng(2).integers(0, 4, (ROWS, V))
    presence = np.array([0.0, 0.5, -1.0, 2.0], np.float32)
    frequency = np.array([0.0, 0.3, 1.5, -2.0], np.float32)
    # https://platform.openai.com/docs/advanced-usage: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
    expected = logits - counts * frequency[:, None] - (counts > 0) * presence[:, None]
    ours = apply_presence_frequency(jnp.asarray(logits), jnp.asarray(counts), jnp.asarray(presence), jnp.asarray(frequency))
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-6, atol=1e-5)


_jit_sample = jax.jit(sample)


def _sample(logits, params_per_row, position=0):
    s = SamplingArrays.build([(p, 0) for p in params_per_row], V)
    zeros = jnp.zeros((len(params_per_row), V), jnp.int32)
    return np.asarray(_jit_sample(jnp.asarray(logits), s, zeros, zeros.astype(bool), jnp.full(len(params_per_row), position)))


def test_top_k_1_is_greedy(logits):
    rows = [SamplingParams(temperature=1.5, top_k=1, seed=i) for i in range(ROWS)]
    np.testing.assert_array_equal(_sample(logits, rows), logits.argmax(-1))
    np.testing.assert_array_equal(_sample(logits, [SamplingParams(temperature=0.0)] * ROWS), logits.argmax(-1))


def test_seeded_sampling_repeats_and_unseeded_varies(logits):
    flat = np.zeros((ROWS, V), np.float32)  # uniform: any two runs differing shows fresh randomness
    seeded = [SamplingParams(seed=1234)] * ROWS
    runs = [np.concatenate([_sample(flat, seeded, pos) for pos in range(8)]) for _ in range(2)]
    np.testing.assert_array_equal(runs[0], runs[1])
    unseeded = [np.concatenate([_sample(flat, [SamplingParams()] * ROWS, pos) for pos in range(8)]) for _ in range(2)]
    assert not np.array_equal(unseeded[0], unseeded[1])


def test_sample_frequencies_match_processed_distribution():
    logits = np.random.default_rng(3).normal(0, 1.5, (1, V)).astype(np.float32)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.02, seed=7)
    s = SamplingArrays.build([(params, 0)], V)
    zeros = jnp.zeros((1, V), jnp.int32)
    draws = 20000
    draw = jax.jit(jax.vmap(lambda pos: sample(jnp.asarray(logits), s, zeros, zeros.astype(bool), pos[None])[0]))
    tokens = np.asarray(draw(jnp.arange(draws)))
    processed = apply_min_p(
        apply_top_p(apply_top_k(apply_temperature(jnp.asarray(logits), s.temperature), s.top_k), s.top_p), s.min_p
    )
    probs = np.asarray(jax.nn.softmax(processed, axis=-1))[0]
    kept = probs > 0
    observed = np.bincount(tokens, minlength=V)
    assert observed[~kept].sum() == 0, "sampled a token the processors removed"
    expected = probs[kept].astype(np.float64)
    _, p_value = scipy.stats.chisquare(observed[kept], expected / expected.sum() * draws)
    assert p_value > 1e-3, f"chi-square p = {p_value:.2e}"


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", 2.5, r"temperature must be in \[0.0, 2.0\]"),
        ("top_p", 0.0, r"top_p must be in \(0.0, 1.0\]"),
        ("top_k", 1000, r"top_k must be in \[0, 999\]"),
        ("min_p", -0.1, "min_p"),
        ("repetition_penalty", 0.0, "repetition_penalty"),
        ("presence_penalty", 3, "presence_penalty"),
        ("frequency_penalty", float("nan"), "frequency_penalty must be a number"),
        ("n", 5, r"n must be in \[1, 4\]"),
        ("seed", -1, "seed"),
        ("seed", 2**63, "seed"),
        ("max_tokens", -1, "max_tokens"),
        ("top_logprobs", 21, "top_logprobs"),
        ("stop", ["x"] * 17, "at most 16"),
        ("stop", [""], "non-empty"),
        ("logit_bias", {5: 101.0}, r"logit_bias\[5\]"),
        ("temperature", "hot", "temperature must be a number"),
        ("stop", 5, "stop must be a string or a list"),
        ("logit_bias", [1], "logit_bias must map token ids"),
    ],
)
def test_out_of_range_settings_are_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})


def test_numpy_numbers_and_null_stop_are_accepted():
    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), stop=None)
    assert p.stop == () and p.top_k == 3


def test_inverse_cdf_draw_follows_the_probabilities_across_chunks():
    """`draw` on evenly spaced uniforms reproduces each probability to the grid's resolution,
    rare tokens in any chunk included, and never returns a token of probability 0."""
    rng = np.random.default_rng(0)
    probs = rng.exponential(1.0, 1000) ** 4  # heavy tail: many tokens of tiny probability
    probs[rng.choice(1000, 300, replace=False)] = 0.0
    probs[-5:] = 0.0  # the last tokens (and the padding of the last chunk) cannot be drawn
    probs /= probs.sum()
    grid = 200_000
    u = (np.arange(grid) + 0.5) / grid
    rows = jnp.broadcast_to(jnp.asarray(probs, jnp.float32), (grid, 1000))
    tokens = np.asarray(jax.jit(draw)(rows, jnp.asarray(u, jnp.float32)))
    counts = np.bincount(tokens, minlength=1000)
    assert counts[probs == 0].sum() == 0
    np.testing.assert_allclose(counts / grid, probs, atol=3 / grid)
    edge = np.asarray(draw(jnp.asarray(probs[None], jnp.float32), jnp.asarray([np.nextafter(np.float32(1), 0)])))
    assert edge[0] == np.flatnonzero(probs)[-1]


def test_argmax_is_numpys_first_maximum():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, (6, 300)).astype(np.float32)  # many ties: the first maximum wins
    x[1] = -np.inf
    x[2, 299] = np.inf
    np.testing.assert_array_equal(np.asarray(argmax(jnp.asarray(x))), np.argmax(x, axis=-1))
