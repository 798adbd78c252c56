"""The continuous-batching engine: concurrent requests, more than there are slots, return exactly
what `generate()` returns for each alone (greedy and seeded sampling, stop strings, logprobs);
cancelling frees a slot; a full queue is refused at once."""

from __future__ import annotations

import asyncio
import json

import llguidance
import pytest

from codellama_jax import generate, load, structured
from codellama_jax.engine import Engine, EngineStopped, QueueFull
from codellama_jax.errors import RequestError
from codellama_jax.generation import output_grammar
from codellama_jax.runner import Runner
from codellama_jax.sampling import SamplingParams
from codellama_jax.scheduler import Sequence

from conftest import write_hf_checkpoint

PROMPTS = [[1, *range(5, 5 + n)] for n in (3, 17, 9, 30, 1, 12)]


@pytest.fixture(scope="module")
def model(tmp_path_factory, sp_dir):
    hf_dir = write_hf_checkpoint(tmp_path_factory.mktemp("engine") / "hf", sp_dir, num_key_value_heads=2)
    return load(hf_dir)


@pytest.fixture(scope="module")
def engine(model):
    engine = Engine(model, max_batch=4, max_len=64, steps_per_call=3)
    engine.start()
    yield engine
    engine.stop()


async def _collect(handle):
    chunks = [chunk async for chunk in handle]
    return chunks, "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids]


async def _outcome(handle):
    """A request's tokens, or the text of the error that ended it."""
    try:
        return (await _collect(handle))[2]
    except RuntimeError as e:
        return str(e)


def _run_all(engine, requests, grammars=None):
    async def main():
        grammar_of = grammars or [None] * len(requests)
        handles = [h for (prompt, params), g in zip(requests, grammar_of) for h in engine.submit(prompt, params, g)]
        return await asyncio.gather(*(_collect(h) for h in handles))

    return asyncio.run(main())


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.0, max_tokens=20),
        dict(temperature=0.9, top_p=0.9, seed=11, max_tokens=16),
        dict(temperature=0.0, max_tokens=24, stop=["e", "a"], logprobs=True, top_logprobs=3),
    ],
    ids=["greedy", "seeded", "stop-logprobs"],
)

def test_concurrent_requests_equal_generate_one_at_a_time(engine, model, settings):
    params = SamplingParams(**settings)
    results = _run_all(engine, [(p, params) for p in PROMPTS])  # 6 requests, 4 slots
    for prompt, (chunks, text, ids) in zip(PROMPTS, results):
        alone = generate(model, [prompt], **settings)[0]
        assert ids == alone.token_ids and text == alone.text
        assert chunks[-1].finish_reason == alone.finish_reason
        assert chunks[-1].completion_tokens == alone.completion_tokens and chunks[-1].prompt_tokens == len(prompt)
        if params.logprobs:
            got = [lp for c in chunks for lp in c.logprobs]
            assert [(g.token_id, round(g.logprob, 4)) for g in got] == [
                (w.token_id, round(w.logprob, 4)) for w in alone.logprobs
            ]
    assert engine.slots_in_use == 0


def test_n_samples_share_one_prefill(engine, model):
    params = SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=10)
    results = _run_all(engine, [(PROMPTS[1], params)])
    expected = generate(model, [PROMPTS[1]], temperature=1.0, seed=3, n=2, max_tokens=10)
    assert [ids for _, _, ids in results] == [c.token_ids for c in expected]


def test_cancel_frees_the_slot(engine):
    async def main():
        handle = engine.submit(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=40))[0]
        async for chunk in handle:
            handle.cancel()
            last = chunk
        return last

    last = asyncio.run(main())
    assert last.finish_reason is not None and last.completion_tokens < 40
    assert engine.slots_in_use == 0


def test_full_queue_and_oversized_requests_are_refused_at_once(model):
    engine = Engine(model, max_batch=1, max_len=64, max_queue=2)  # not started: nothing drains the queue

    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=4)
        engine.submit(PROMPTS[0], params)
        engine.submit(PROMPTS[0], params)
        with pytest.raises(QueueFull):
            engine.submit(PROMPTS[0], params)
        with pytest.raises(ValueError, match="at most 64 tokens per request"):
            engine.submit(list(range(1, 60)), SamplingParams(max_tokens=10))
        with pytest.raises(ValueError, match="n=2 exceeds the server's 1 decode slots"):
            Engine(model, max_batch=1, max_len=64).submit(PROMPTS[0], SamplingParams(n=2))

    asyncio.run(main())


def test_a_failing_request_fails_alone_and_a_failed_step_is_recovered(model, monkeypatch):
    engine = Engine(model, max_batch=4, max_len=64, steps_per_call=2)
    advance = Sequence.advance

    def poisoned(self, *args):
        if self.params.seed == 666:
            raise RuntimeError("injected")
        return advance(self, *args)

    monkeypatch.setattr(Sequence, "advance", poisoned)
    engine.start()

    async def main(requests):
        handles = [h for prompt, params in requests for h in engine.submit(prompt, params)]
        return await asyncio.gather(*(_outcome(h) for h in handles))

    try:
        good = SamplingParams(temperature=0.0, max_tokens=8)
        results = asyncio.run(main([(PROMPTS[0], good), (PROMPTS[1], SamplingParams(seed=666, max_tokens=8)),
                                    (PROMPTS[2], good)]))  # fmt: skip
        assert results[1] == "request failed: injected"
        assert results[0] == generate(model, [PROMPTS[0]], temperature=0.0, max_tokens=8)[0].token_ids
        collect = Runner.collect
        calls = []

        def failing_once(launched):
            if not calls:
                calls.append(1)
                raise RuntimeError("device lost")
            return collect(launched)

        monkeypatch.setattr(Runner, "collect", staticmethod(failing_once))
        assert asyncio.run(main([(PROMPTS[0], good)])) == ["generation failed: device lost"]
        assert asyncio.run(main([(PROMPTS[0], good)]))[0] == results[0]  # the engine serves on
    finally:
        engine.stop()


def test_a_failed_prefill_fails_its_request_only(model, monkeypatch):
    """A prefill call that fails and leaves the state intact (here: refused before it runs)
    ends the requests it carried; the rows decoding meanwhile go on and stay right."""
    prefill = Runner.prefill

    def failing(self, fills, *shape):
        if any(list(f.prompt) == PROMPTS[1] for f in fills):
            raise RuntimeError("out of memory")
        return prefill(self, fills, *shape)

    monkeypatch.setattr(Runner, "prefill", failing)
    engine = Engine(model, max_batch=4, max_len=64, steps_per_call=2)
    engine.start()

    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=8)
        handles = [engine.submit(p, params)[0] for p in (PROMPTS[0], PROMPTS[1], PROMPTS[2])]
        return await asyncio.gather(*(_outcome(h) for h in handles))

    try:
        first, failed, third = asyncio.run(main())
    finally:
        engine.stop()
    assert failed == "prefill failed: out of memory"
    for prompt, got in ((PROMPTS[0], first), (PROMPTS[2], third)):
        assert got == generate(model, [prompt], temperature=0.0, max_tokens=8)[0].token_ids


def test_a_stopped_engine_refuses_and_ends_what_waited(model):
    engine = Engine(model, max_batch=1, max_len=64)

    async def main():
        waiting = engine.submit(PROMPTS[0], SamplingParams(max_tokens=4))[0]  # never started: it waits
        engine.stop()
        with pytest.raises(EngineStopped):
            async for _ in waiting:
                pass
        with pytest.raises(EngineStopped):
            engine.submit(PROMPTS[0], SamplingParams(max_tokens=4))

    asyncio.run(main())


def test_constrained_and_free_requests_share_the_batch(engine, model):
    """Schema-constrained requests decode beside free ones: each equals `generate()` alone."""
    response_format = {"type": "json_schema", "json_schema": {"name": "point", "schema": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["x"], "additionalProperties": False}}}  # fmt: skip
    grammar = output_grammar(model, response_format)
    params = SamplingParams(temperature=0.0, max_tokens=20)
    grammars = [grammar if i % 2 else None for i in range(len(PROMPTS))]
    results = _run_all(engine, [(p, params) for p in PROMPTS], grammars)
    for prompt, g, (_, text, ids) in zip(PROMPTS, grammars, results):
        alone = generate(model, [prompt], temperature=0.0, max_tokens=20,
                         response_format=response_format if g else None)[0]  # fmt: skip
        assert (text, ids) == (alone.text, alone.token_ids)
        if g:
            assert set(json.loads(text)) == {"x"}


def test_a_failing_grammar_fails_only_its_request(engine, model):
    vocab = structured.vocabulary(model.tokenizer, model.config.vocab_size, model.stop_token_ids)

    class Broken:  # a matcher in its error state, as llguidance leaves one it cannot go on with
        def constraint(self):
            return structured.Constraint(llguidance.LLMatcher(vocab, "start: (", log_level=0), "response_format")

    params = SamplingParams(temperature=0.0, max_tokens=12)

    async def main():
        (broken,) = engine.submit(PROMPTS[0], params, Broken())
        (free,) = engine.submit(PROMPTS[1], params)
        failed, done = await asyncio.gather(_collect(broken), _collect(free), return_exceptions=True)
        return failed, done

    failed, (_, text, ids) = asyncio.run(main())
    assert isinstance(failed, RequestError) and failed.param == "response_format"  # the request's own grammar: a 400
    assert "constrained decoding failed" in str(failed) and "<state>" not in str(failed)
    alone = generate(model, [PROMPTS[1]], temperature=0.0, max_tokens=12)[0]
    assert (text, ids) == (alone.text, alone.token_ids)
    assert engine.slots_in_use == 0
