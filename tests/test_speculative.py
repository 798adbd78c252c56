"""Speculative decoding: prompt-lookup drafts, and verify calls that keep exactly what decoding
one token at a time produces (greedy and seeded, with penalties, stop strings, logprobs, n > 1,
grammars, paged blocks and preemption), the processed distribution intact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from codellama_jax import load, structured
from codellama_jax.generation import generate, stream
from codellama_jax.runner import Decode, Verify, _pick_drafted
from codellama_jax.sampling import SamplingArrays, SamplingParams, process
from codellama_jax.scheduler import Scheduler
from codellama_jax.speculative import Speculation, propose, speculation
from test_scheduler import run as run_all

SPEC = Speculation(num_tokens=4, ngram_min=1, ngram_max=4)
PROMPTS = [[1, 5, 9, 200, 37, 5, 9, 200], [1, *range(40, 60), *range(40, 50)], [1, 17], [1, 90, 91, 92, 93, 90, 91]]


@pytest.fixture(scope="module")
def model(tiny_gqa_tied):
    return load(tiny_gqa_tied, dtype="float32")


def test_propose_copies_what_followed_the_longest_latest_earlier_match():
    assert propose([1, 2, 3, 9, 9, 1, 2, 3], 2, 8, 4) == [9, 9, 1, 2]
    assert propose([1, 2, 3, 8, 5, 2, 3, 7, 0, 1, 2, 3], 2, 8, 4) == [8, 5, 2, 3]  # "1 2 3" beats the later "2 3"
    assert propose([1, 2, 9, 1, 2, 8, 1, 2], 2, 2, 3) == [8, 1, 2]  # equally long: the latest
    assert propose([1, 2, 3, 4, 5, 3], 2, 8, 4) == []  # "3" alone is shorter than ngram_min
    assert propose([1, 2, 3, 4, 5, 3], 1, 8, 4) == [4, 5, 3]
    assert propose([1, 2, 1, 2], 1, 8, 0) == [] and propose([7], 1, 8, 4) == []


def test_settings_are_checked():
    assert speculation("ngram", num_tokens=3) == Speculation(num_tokens=3)
    assert speculation(None) is None and speculation(SPEC) is SPEC
    with pytest.raises(ValueError, match="unknown speculative method 'eagle'"):
        speculation("eagle")
    with pytest.raises(ValueError, match=r"ngram_min <= ngram_max.*got 5 and 2"):
        Speculation(ngram_min=5, ngram_max=2)
    with pytest.raises(ValueError, match=r"num-speculative-tokens\) must be in \[1, 64\], got 0"):
        Speculation(num_tokens=0)


def run(model, requests, spec, **sizes) -> tuple[list[list], Scheduler]:
    """Every request's chunks (each sample's) from a fresh scheduler, and the scheduler."""
    scheduler = Scheduler(model, **{"max_batch": 4, "max_len": 128, "block_size": 4, "speculation": spec, **sizes})
    chunks = run_all(scheduler, requests)
    assert scheduler.pool.num_free == scheduler.pool.num_blocks and scheduler.busy_rows == 0
    return chunks, scheduler


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_speculation_changes_no_token_alone_or_in_a_mixed_batch(model, sampled):
    """One request alone, then four of different lengths at once (n = 2 for one): the same tokens
    with and without speculation, many of them from accepted drafts, blocks of 4 positions
    (drafts cross them)."""
    # a random model's output repeats only when sampled cold: 0.1 here keeps drafts coming, and rejects some
    settings = dict(temperature=0.1, top_p=0.95, seed=11, frequency_penalty=0.05, repetition_penalty=1.02) if sampled \
        else dict(temperature=0.0)  # fmt: skip
    requests = [(p, SamplingParams(max_tokens=30 + 10 * i, n=2 if i == 1 else 1, **settings)) for i, p in enumerate(PROMPTS)]
    for batch in (requests[:1], requests):
        want, _ = run(model, batch, None)
        got, scheduler = run(model, batch, SPEC)
        assert [tokens(c) for c in got] == [tokens(c) for c in want]
        assert [c[-1].finish_reason for c in got] == [c[-1].finish_reason for c in want]
        stats = scheduler.stats()
        assert stats["speculative_accepted_tokens"] > 0, stats
        assert stats["speculative_accepted_tokens"] < stats["speculative_draft_tokens"] or not sampled


def test_stop_strings_logprobs_and_max_tokens_cut_a_verified_run_where_decoding_would(model):
    text_prompt = model.tokenizer.encode("def add(a, b): return a + b\ndef add(a, b):")
    params = [SamplingParams(temperature=0.0, max_tokens=m, logprobs=True, top_logprobs=2, stop=s)
              for m, s in ((7, ()), (40, ("b", "\n")), (25, ("zz",)))]  # fmt: skip
    requests = [(text_prompt, p) for p in params]
    want, _ = run(model, requests, None)
    got, scheduler = run(model, requests, SPEC)
    assert scheduler.stats()["speculative_accepted_tokens"] > 0
    for g, w in zip(got, want):
        assert tokens(g) == tokens(w) and "".join(c.text for c in g) == "".join(c.text for c in w)
        assert g[-1].finish_reason == w[-1].finish_reason and g[-1].completion_tokens == w[-1].completion_tokens
        lg, lw = [x for c in g for x in c.logprobs], [x for c in w for x in c.logprobs]
        assert [(x.token_id, [t.token_id for t in x.top]) for x in lg] == [(x.token_id, [t.token_id for t in x.top]) for x in lw]
        np.testing.assert_allclose([x.logprob for x in lg], [x.logprob for x in lw], atol=1e-4)


def test_preemption_and_prefix_caching_under_speculation(model):
    """Four requests of up to 61 tokens on a cache of one 64-token sequence, one prompt repeated (its blocks come
    from the prefix cache): preempted and resumed mid-answer, answered as without speculation."""
    requests = [(p, SamplingParams(temperature=0.0, max_tokens=30)) for p in PROMPTS[:3] + PROMPTS[:1]]
    want = [generate(model, [p], **params.__dict__)[0].token_ids for p, params in requests]
    got, scheduler = run(model, requests, SPEC, max_len=64, num_blocks=16)
    assert scheduler.preemptions > 0 and scheduler.prefix_hit_tokens > 0
    assert [tokens(c) for c in got] == want


def launches(scheduler: Scheduler) -> list[Decode | Verify]:
    """Records the plan of each call the scheduler launches."""
    plans, launch = [], scheduler.runner.launch
    scheduler.runner.launch = lambda plan: plans.append(plan) or launch(plan)
    return plans


def test_grammar_forced_tokens_are_drafted_and_verified(model):
    """A JSON schema with fixed keys: the first draft is llguidance's forced tokens (the opening
    and first key), a draft the grammar refuses is cut where it does, and the output is the one
    decoding step by step gives."""
    schema = {"type": "object", "properties": {"alpha_key": {"type": "integer"}, "beta_key": {"type": "boolean"}},
              "required": ["alpha_key", "beta_key"], "additionalProperties": False}  # fmt: skip
    grammar = structured.compile_grammar(model, structured.json_schema_grammar(schema))
    forced = grammar.constraint().forced()
    assert model.tokenizer.decode(forced) == '{"alpha_key":'  # the space may begin the value's token
    assert grammar.constraint().valid_prefix(forced + model.tokenizer.encode_continuation("zz")) == forced
    params = SamplingParams(temperature=0.0, max_tokens=60)
    prompt = model.tokenizer.encode("JSON:")
    results = []
    for spec in (None, SPEC):
        scheduler = Scheduler(model, max_batch=2, max_len=128, speculation=spec)
        got, plans = [], launches(scheduler)
        scheduler.add(scheduler.sequences(prompt, params, lambda i: got.append, grammar))
        while scheduler.has_work():
            scheduler.step()
        results.append((tokens(got), scheduler.stats(), plans))
    (want, _, _), (ids, stats, plans) = results
    assert ids == want and model.tokenizer.decode(ids).startswith('{"alpha_key": ')
    first = [int(t) for t in plans[0].drafts_bK[0] if t >= 0]
    after_first = grammar.constraint()  # the prefill sampled the first token itself
    after_first.advance(ids[0])
    assert first == after_first.forced()[: SPEC.num_tokens] and first[:2] == forced[1:3]
    assert stats["speculative_accepted_tokens"] >= len(first), stats


def test_only_few_rows_speculate_and_a_row_that_misses_backs_off(model):
    """With `max_rows` 2, calls of more live rows decode; a lone row whose drafts are rejected
    waits longer after each rejection in a row, decoding meanwhile in longer calls."""
    requests = [(p, SamplingParams(temperature=1.0, top_k=2, seed=4, max_tokens=40)) for p in PROMPTS]  # drafts, some rejected
    scheduler = Scheduler(model, max_batch=4, max_len=128, block_size=4, speculation=Speculation(4, 1, 4, max_rows=2))
    plans = launches(scheduler)
    run_all(scheduler, requests)
    assert all(len(p.rows) <= 2 for p in plans if isinstance(p, Verify))
    assert any(len(p.rows) > 2 for p in plans if isinstance(p, Decode))
    lone = Scheduler(model, max_batch=1, max_len=128, steps_per_call=16, speculation=Speculation(4, 1, 4))
    plans = launches(lone)
    chunks = run_all(lone, requests[:1])
    assert len(tokens(chunks[0])) == 40
    steps = [p.max_steps for p in plans if isinstance(p, Decode)]
    assert any(isinstance(p, Verify) for p in plans) and min(steps) == 4 and max(steps) > 4, steps


def test_generate_and_stream_take_speculative_by_name(model):
    prompt = "def add(a, b): return a + b\ndef add(a, b):"
    want = generate(model, [prompt], temperature=0.0, max_tokens=20)[0]
    assert generate(model, [prompt], temperature=0.0, max_tokens=20, speculative="ngram")[0].token_ids == want.token_ids
    assert "".join(stream(model, prompt, temperature=0.0, max_tokens=20, speculative=SPEC)) == want.text
    with pytest.raises(ValueError, match="speculative settings need speculative='ngram'"):
        speculation(None, num_tokens=3)


def test_a_drafted_token_is_kept_with_its_probability_and_the_rest_renormalized():
    """The verify rule on fixed logits: with draft d at the first position, the first token
    follows the processed distribution p (d kept with probability p(d), anything else drawn
    from p without d); after a kept d, the second token follows the second position's p."""
    V, draws = 64, 8192
    rng = np.random.default_rng(5)
    logits_TV = rng.normal(0, 1.5, (2, V)).astype(np.float32)
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=30)
    s = SamplingArrays.build([(params, 0)] * draws, V)
    s = s._replace(key=jnp.asarray(np.stack([np.asarray(jax.random.key_data(jax.random.key(i))) for i in range(draws)])))
    counts_bV, seen_bV = jnp.zeros((draws, V), jnp.int32), jnp.zeros((draws, V), bool)
    p_TV = np.asarray(jax.nn.softmax(process(jnp.asarray(logits_TV), s._replace(**{f: x[:2] for f, x in s._asdict().items()}),
                                             counts_bV[:2], seen_bV[:2]), axis=-1))  # fmt: skip
    d = int(np.argsort(p_TV[0])[-2])  # the second most likely token: kept about p(d) of the time
    _, kept_b, (tokens_bT, *_) = jax.jit(_pick_drafted, static_argnums=(9,))(
        jnp.broadcast_to(logits_TV, (draws, 2, V)), jnp.full((draws, 1), d, jnp.int32), s, counts_bV, seen_bV,
        jnp.zeros(draws, jnp.int32), jnp.full((draws, 2, 2), -1, jnp.int32), jnp.full(draws, 100, jnp.int32),
        jnp.array([-1], jnp.int32), 0)  # fmt: skip
    tokens_bT, kept_b = np.asarray(tokens_bT), np.asarray(kept_b)
    accepted = tokens_bT[:, 0] == d
    np.testing.assert_array_equal(kept_b, np.where(accepted, 2, 1))
    assert (tokens_bT[~accepted, 1] == -1).all()
    for observed_tokens, p in ((tokens_bT[:, 0], p_TV[0]), (tokens_bT[accepted, 1], p_TV[1])):
        observed, kept = np.bincount(observed_tokens, minlength=V), p > 0
        assert observed[~kept].sum() == 0
        expected = p[kept].astype(np.float64) / p[kept].astype(np.float64).sum() * len(observed_tokens)
        _, p_value = scipy.stats.chisquare(observed[kept], expected)
        assert p_value > 1e-3, f"chi-square p = {p_value:.2e}"


def test_a_row_holding_blocks_past_a_plain_calls_window_decodes(model):
    """A verify call grows a row's blocks for its whole draft; a plain decode call after it
    (the draft rejected) may attend to a smaller window than those blocks reach: its table
    lists the blocks the window covers, the rest stay held."""
    spec = Speculation(num_tokens=12, ngram_min=1, ngram_max=4)
    prompts = [[1, *([5, 9, 200, 37] * n)] for n in range(12, 16)]  # drafts near the 64-position window's end
    requests = [(p, SamplingParams(temperature=1.0, top_k=3, seed=s, max_tokens=24)) for s, p in enumerate(prompts)]
    for request in requests:  # one at a time: a lone row drafts
        chunks, _ = run(model, [request], spec)
        assert len(tokens(chunks[0])) == 24
