"""generate()/stream()/chat(): greedy parity with transformers' generate, stop strings, n, logprobs,
the context-window error, and a bounded number of compiles."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers

from codellama_jax import load
from codellama_jax import buckets
from codellama_jax.generation import chat, generate, stream
from codellama_jax.runner import Runner
from codellama_jax.sampling import SamplingParams
from codellama_jax.scheduler import Scheduler
from codellama_jax.speculative import Speculation
from jax._src.dispatch import BACKEND_COMPILE_EVENT

from conftest import SP_VOCAB, write_hf_checkpoint

NEW_TOKENS = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sp_dir):
    """An MHA checkpoint; stop ids (eos) as transformers uses them."""
    hf_dir = write_hf_checkpoint(tmp_path_factory.mktemp("gen") / "hf", sp_dir, rope_theta=1e4)
    reference = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return load(hf_dir, dtype="float32"), reference


def hf_greedy(reference, prompt: list[int], stop_ids, new_tokens=NEW_TOKENS) -> list[int]:
    """transformers' greedy continuation, cut at (and without) the first stop token."""
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens,
            eos_token_id=list(stop_ids), pad_token_id=0,
        )[0, len(prompt):].tolist()  # fmt: skip
    for i, t in enumerate(out):
        if t in stop_ids:
            return out[:i]
    return out


PROMPTS = [[1, 5, 9, 200, 37], [1, *range(40, 73)], [1, 17]]


def test_greedy_matches_transformers_batch_1_and_mixed_lengths(tiny):
    model, reference = tiny
    expected = [hf_greedy(reference, p, model.stop_token_ids) for p in PROMPTS]
    single = generate(model, PROMPTS[:1], temperature=0.0, max_tokens=NEW_TOKENS)[0]
    assert single.token_ids == expected[0]
    batch = generate(model, PROMPTS, temperature=0.0, max_tokens=NEW_TOKENS)
    for completion, want, prompt in zip(batch, expected, PROMPTS):
        assert completion.token_ids == want
        assert completion.prompt_tokens == len(prompt)
        assert completion.finish_reason == ("length" if len(want) == NEW_TOKENS else "stop")


def test_text_prompts_and_chat(tiny):
    model, _ = tiny
    by_text = generate(model, ["def add(a, b):"], temperature=0.0, max_tokens=8)[0]
    ids = model.tokenizer.encode("def add(a, b):", add_bos=True)
    assert by_text.token_ids == generate(model, [ids], temperature=0.0, max_tokens=8)[0].token_ids
    messages = [{"role": "user", "content": "hello"}]
    replied = chat(model, messages, temperature=0.0, max_tokens=8)
    assert replied.prompt_tokens == len(model.chat_template.encode(model.tokenizer, messages))


def test_n_samples_differ_and_a_seed_repeats(tiny):
    model, _ = tiny
    run = [generate(model, [PROMPTS[0]], n=4, seed=42, temperature=1.0, max_tokens=12) for _ in range(2)]
    assert [c.index for c in run[0]] == [0, 1, 2, 3]
    assert [c.token_ids for c in run[0]] == [c.token_ids for c in run[1]]
    assert len({tuple(c.token_ids) for c in run[0]}) > 1
    greedy = generate(model, PROMPTS[:2], n=3, temperature=0.0, max_tokens=12)  # prefilled once per prompt
    singles = generate(model, PROMPTS[:2], temperature=0.0, max_tokens=12)
    assert [(c.prompt_index, c.token_ids) for c in greedy] == [(s.prompt_index, s.token_ids) for s in singles for _ in range(3)]


@pytest.mark.parametrize("top_logprobs", [5, 0])
def test_logprobs_add_up_to_the_sequence_likelihood(tiny, top_logprobs):
    model, _ = tiny
    completion = generate(model, [PROMPTS[0]], temperature=0.9, seed=3, max_tokens=10, logprobs=True, top_logprobs=top_logprobs)[0]
    tokens = PROMPTS[0] + completion.token_ids
    logits = model.logits([tokens])[0].astype(np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    n = len(PROMPTS[0])
    expected = [log_probs[n - 1 + j, t] for j, t in enumerate(completion.token_ids)]
    ours = [lp.logprob for lp in completion.logprobs]
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    for lp in completion.logprobs:
        tops = [t.logprob for t in lp.top]
        assert len(tops) == top_logprobs and tops == sorted(tops, reverse=True)
        assert not tops or lp.logprob <= tops[0] + 1e-6


def test_context_overflow_names_both_lengths(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match=r"100 tokens and max_tokens is 40: 140 tokens exceed .* 128 tokens"):
        generate(model, [[1] * 100], max_tokens=40)
    with pytest.raises(ValueError, match="prompt has 130 tokens, the model's context window is 128"):
        generate(model, [[1] * 130])


def test_max_tokens_zero_and_default(tiny):
    model, _ = tiny
    assert generate(model, [PROMPTS[2]], max_tokens=0)[0].token_ids == []
    default = generate(model, [[1] * 120], temperature=0.0)[0]
    assert default.completion_tokens <= 8  # the rest of the 128-token context


def test_no_compile_after_warm_up_for_every_prompt_length(tiny):
    """Warm-up covers every shape a server of this size meets: prompts of every length up to
    max_len, alone and together, some with top logprobs, some after a cached prefix, decode and
    verify calls (speculation), then compile nothing."""
    model, _ = tiny  # a 128-token context
    scheduler = Scheduler(model, max_batch=4, max_len=128, steps_per_call=3, speculation=Speculation(3, 1, 4))
    buckets.warm_up(scheduler)
    compiles = []

    def listener(event, seconds, **_):
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        rng = np.random.default_rng(5)
        done, last = [], []
        for length in range(1, 125):
            ids = rng.integers(3, SP_VOCAB, length).tolist()
            if length % 3 == 0:  # begins as the prompt before: its full blocks are cached
                ids = (last + ids)[:length]
            last = ids
            top = 2 if length % 7 == 0 else 0  # some ask for top logprobs: decode shapes of their own
            params = SamplingParams(temperature=0.0, max_tokens=int(rng.integers(1, 129 - length)),
                                    logprobs=bool(top), top_logprobs=top)  # fmt: skip
            scheduler.add(scheduler.sequences(ids, params, lambda i: done.append))
            if length % 5 == 0:  # several prompts at once, several decoding rows
                while scheduler.has_work():
                    scheduler.step()
        while scheduler.has_work():
            scheduler.step()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert sum(c.finish_reason is not None for c in done) == 124
    assert compiles == [] and scheduler.drafts > 0


def test_stop_strings_across_tokens_in_generate_and_stream(tiny):
    model, _ = tiny
    prompt = PROMPTS[1]
    free = generate(model, [prompt], temperature=0.0, max_tokens=40)[0]
    pieces = [model.tokenizer.decode([t], continuation=True) for t in free.token_ids]
    # a stop string that starts inside one token and ends inside a later one
    start = next(i for i in range(2, len(pieces) - 2) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 1)
    before = "".join(pieces[:start])
    stop = pieces[start][1:] + pieces[start + 1][:1]
    cut = free.text.find(stop)
    assert cut >= 0
    stopped = generate(model, [prompt], temperature=0.0, max_tokens=40, stop=[stop, "never-matches"])[0]
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:cut]
    assert len(stopped.text) >= len(before)
    deltas = list(stream(model, prompt, temperature=0.0, max_tokens=40, stop=stop))
    assert "".join(deltas) == stopped.text
    # the output ends with the token that completed the stop string: ids, count and text agree
    assert stopped.completion_tokens == len(stopped.token_ids) < free.completion_tokens
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
    assert stop in model.tokenizer.decode(stopped.token_ids, continuation=True)
    assert stop not in model.tokenizer.decode(stopped.token_ids[:-1], continuation=True)
    assert all(stop[:2] not in d for d in deltas if len(stop) > 1)


def test_the_host_runs_a_call_ahead_and_drops_what_an_ended_row_made_meanwhile(tiny, monkeypatch):
    """While a lone row decodes, each call is launched before the one before it is collected; a
    sequence the host ends (a stop string) while its row's next call runs gets nothing of that
    call, which is not waited for, and a request admitted into the row at once (its prefill
    queued behind that call on the device) comes out as if alone."""
    model, _ = tiny
    free = generate(model, [PROMPTS[1]], temperature=0.0, max_tokens=40)[0]
    stop = free.text[len(free.text) // 3 :][:3]
    stopped = generate(model, [PROMPTS[1]], temperature=0.0, max_tokens=40, stop=[stop])[0]
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) < 38
    alone = generate(model, [PROMPTS[0]], temperature=0.0, max_tokens=12)[0]
    events = []
    launch, collect = Runner.launch, Runner.collect
    monkeypatch.setattr(Runner, "launch", lambda self, plan: events.append("launch") or launch(self, plan))
    monkeypatch.setattr(Runner, "collect", staticmethod(lambda launched: events.append("collect") or collect(launched)))
    scheduler = Scheduler(model, max_batch=1, max_len=128, steps_per_call=2)
    first, second, launched_before_stop = [], [], []

    def deliver_first(chunk):
        first.append(chunk)
        if chunk.finish_reason is not None:  # the next request arrives at once
            launched_before_stop.append(events.count("launch"))
            scheduler.add(scheduler.sequences(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12),
                                              lambda _: second.append))  # fmt: skip

    scheduler.add(scheduler.sequences(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=40, stop=[stop]),
                                      lambda _: deliver_first))  # fmt: skip
    while scheduler.has_work():
        scheduler.step()
    assert launched_before_stop[0] >= 3 and "launch,launch,collect" in ",".join(events)  # ran ahead
    assert events.count("launch") == events.count("collect") + 2  # each request's call after its end: not waited for
    for got, want in ((first, stopped), (second, alone)):
        assert [c.finish_reason for c in got].index(want.finish_reason) == len(got) - 1  # nothing after the end
        assert sum((c.token_ids for c in got), []) == want.token_ids


def test_stream_reassembles_generate(tiny):
    model, _ = tiny
    full = generate(model, [PROMPTS[0]], temperature=0.7, seed=9, max_tokens=20)[0]
    assert "".join(stream(model, PROMPTS[0], temperature=0.7, seed=9, max_tokens=20)) == full.text


@pytest.mark.parametrize(
    "prompts, message",
    [("hello", "list of prompts"), ([1, 2, 3], "list of prompts"), ([[1.5, 2.0]], "integers"), ([[1, 9999]], "outside the vocabulary")],
)
def test_malformed_prompts_are_clear_errors(tiny, prompts, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny[0], prompts, max_tokens=2)
