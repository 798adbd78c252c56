"""The runner's per-row plumbing (the runner end to end is exercised through the scheduler in
test_generation.py and test_engine.py)."""

import jax
import numpy as np

from codellama_jax.runner import rows_sampling
from codellama_jax.sampling import SamplingArrays, SamplingParams


def test_padding_rows_sample_with_neutral_settings():
    """Out-of-range rows pad a decode call; zeros would be top_p 0 and repetition penalty 0 (a
    whole-vocabulary sort every step, and a division by zero)."""
    V = 64
    rows = [(SamplingParams(temperature=0.7, top_p=0.5, top_k=5, repetition_penalty=1.3, seed=i), 0) for i in range(3)]
    state = SamplingArrays.build(rows, V)
    picked = rows_sampling(state, np.array([2, 0, 3, 3], np.int32))  # two live rows, two padding
    neutral = SamplingArrays.neutral(2, V)
    for name, got, want, live in zip(SamplingArrays._fields, picked, neutral, state):
        np.testing.assert_array_equal(np.asarray(got)[:2], np.asarray(live)[[2, 0]], err_msg=name)
        np.testing.assert_array_equal(np.asarray(got)[2:], np.asarray(want), err_msg=name)
    assert jax.tree.structure(picked) == jax.tree.structure(state)
