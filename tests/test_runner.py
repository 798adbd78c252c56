"""The runner's per-row plumbing and its calls against transformers (the runner under load is
exercised through the scheduler in test_generation.py and test_engine.py)."""

import jax
import numpy as np
import torch
import transformers

from codellama_jax import load, structured
from codellama_jax.runner import Decode, Fill, Prefill, Runner, rows_sampling
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


def test_the_prefill_samples_each_rows_first_token_and_a_last_token_is_never_fed(tiny_gqa_tied):
    """A prefill returns each row's first token (transformers' greedy choice) with no decode
    call; a row whose budget is one token, or whose first token is a stop token, is done; a
    decode call feeds the pending token and returns the next ones."""
    model = load(tiny_gqa_tied, dtype="float32")
    reference = transformers.LlamaForCausalLM.from_pretrained(tiny_gqa_tied, dtype=torch.float32).eval()
    V = model.config.vocab_size
    free_W = structured.fill_bitmask([None], V)[0]
    prompts = [[1, 5, 9, 200, 37], [1, 17, 23]]
    with torch.no_grad():
        want = [reference.generate(torch.tensor([p]), do_sample=False, max_new_tokens=3, pad_token_id=0)[0, len(p):].tolist()
                for p in prompts]  # fmt: skip
    stop = model.stop_token_ids[0]
    greedy = SamplingParams(temperature=0.0, seed=0)
    forced_stop = SamplingParams(temperature=0.0, seed=0, logit_bias={stop: 100.0})
    runner = Runner(model, max_batch=4, num_blocks=8, block_size=2)  # blocks in no order: the tables say where
    fills = (Fill(tuple(prompts[0]), (2,), ((6, 1, 4),), ((greedy, 0),), 3, free_W),
             Fill(tuple(prompts[1]), (0,), ((0, 7),), ((greedy, 0),), 1, free_W),
             Fill(tuple(prompts[1]), (3,), ((2, 3),), ((forced_stop, 0),), 5, free_W))  # fmt: skip
    output = runner.admit(Prefill((fills,), ((4, 8, 0),)))
    assert output.rows == (2, 0, 3)
    assert output.tokens_bN[:, 0].tolist() == [want[0][0], want[1][0], stop]
    assert np.asarray(runner.state.remaining_B).tolist() == [0, 0, 2, 0]  # row 1 never filled
    tables_bJ = np.array([[6, 1, 4, 5], [0, 7, 8, 8], [2, 3, 8, 8], [8] * 4], np.int32)  # 8: no block
    decoded = runner.collect(runner.launch(Decode((2, 0, 3), 4, 4, 4, 0, structured.fill_bitmask([None] * 4, V), tables_bJ)))
    assert decoded.tokens_bN[0].tolist() == [*want[0][1:], -1, -1]
    assert decoded.tokens_bN[1:].tolist() == [[-1] * 4] * 2
    assert int(runner.state.positions_B[2]) == len(prompts[0]) + 2  # two tokens fed, the third never
