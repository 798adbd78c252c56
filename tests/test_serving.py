"""The server, live on 127.0.0.1 and a random port, through the official `openai` client and raw
HTTP: the contract's examples, every sampling field, streaming, errors, concurrency."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jsonschema
import openai
import pytest

from codellama_jax import chat, generate, load
from codellama_jax.checkpoint import convert
from codellama_jax.convert import open_checkpoint
from codellama_jax.serving.__main__ import served_name
from codellama_jax.speculative import Speculation

from conftest import KEY, NAME, PRICES, running_server, write_hf_checkpoint
from openai_spec import validator

HELLO = [{"role": "user", "content": "Hello!"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                          "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}}  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory, sp_dir):
    hf_dir = write_hf_checkpoint(tmp_path_factory.mktemp("serve") / "hf", sp_dir, num_key_value_heads=2,
                                 max_position_embeddings=1024)  # fmt: skip
    return load(hf_dir)


@pytest.fixture(scope="module")
def server(model):
    with running_server(model) as (url, engine, _):
        yield url, engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1/openai", api_key=KEY, max_retries=0)


SAMPLING = dict(temperature=0.7, top_p=0.9, max_tokens=12, presence_penalty=0.5, frequency_penalty=0.3, seed=5,
                logit_bias={"7": 5.0, "11": -100.0})  # fmt: skip
EXTRA = dict(top_k=40, min_p=0.05, repetition_penalty=1.2)  # the contract's fields beyond OpenAI's


def test_chat_with_every_sampling_field_equals_the_library(client, model):
    reply = client.chat.completions.create(model=NAME, messages=HELLO, **SAMPLING, extra_body=EXTRA, user="alice")
    expected = chat(model, HELLO, **{**SAMPLING, "logit_bias": {7: 5.0, 11: -100.0}}, **EXTRA)
    assert reply.choices[0].message.content == expected.text and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == NAME
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected.prompt_tokens, expected.completion_tokens)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    cost = (usage.prompt_tokens * PRICES[0] + usage.completion_tokens * PRICES[1]) / 1e6
    assert usage.model_extra["estimated_cost"] == pytest.approx(cost)


def test_streaming_equals_non_streaming_with_usage(client):
    kwargs = dict(model=NAME, messages=HELLO, temperature=0.0, max_tokens=16)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_usage_counts_the_prompt_tokens_the_prefix_cache_served(client, server):
    """The same prompt again is served from the cache but for its last, partial block (once per
    request, however many samples), streamed or not."""
    block_size = server[1].scheduler.pool.block_size
    messages = [{"role": "user", "content": "Count the blocks of this prompt, which no other test sends. " * 3}]
    kwargs = dict(model=NAME, messages=messages, temperature=0.0, max_tokens=2)
    first = client.chat.completions.create(**kwargs)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = (first.usage.prompt_tokens - 1) // block_size * block_size
    assert cached > 0
    assert client.chat.completions.create(**kwargs, n=2).usage.prompt_tokens_details.cached_tokens == cached
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached


def test_n_seed_stop_and_logprobs(client, model):
    kwargs = dict(model=NAME, messages=HELLO, temperature=1.0, n=2, seed=9, max_tokens=10, logprobs=True, top_logprobs=2)
    first, again = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    expected = generate(model, [HELLO], temperature=1.0, n=2, seed=9, max_tokens=10)
    assert [c.message.content for c in first.choices] == [c.text for c in expected]
    lps = first.choices[0].logprobs.content
    assert len(lps) == first.usage.completion_tokens // 2 or len(lps) == expected[0].completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in lps)
    stopped = client.chat.completions.create(model=NAME, messages=HELLO, temperature=0.0, max_tokens=30, stop=["e"])
    assert "e" not in stopped.choices[0].message.content


def test_n_streams_interleave_by_index(client):
    kwargs = dict(model=NAME, messages=HELLO, temperature=1.0, n=2, seed=4, max_tokens=10)
    whole = client.chat.completions.create(**kwargs)
    texts, reasons = ["", ""], [None, None]
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [c.message.content for c in whole.choices]
    assert reasons == [c.finish_reason for c in whole.choices]


TODAYS_MESSAGES = {  # what current clients send, and the plain messages it means
    "parts": ([{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there!"}]}],
              [{"role": "user", "content": "Hello\nthere!"}]),
    "developer": ([{"role": "developer", "content": "Be brief."}, *HELLO], [{"role": "system", "content": "Be brief."}, *HELLO]),
    "name": ([{"role": "user", "name": "alice", "content": "Hello!"}], HELLO),
    "two-systems": ([{"role": "system", "content": "Be brief."}, *HELLO,  # the 70B template takes these as sent
                     {"role": "developer", "content": [{"type": "text", "text": "Use Python."}]},
                     {"role": "user", "content": "Sort a list."}],
                    [{"role": "system", "content": "Be brief."}, *HELLO, {"role": "system", "content": "Use Python."},
                     {"role": "user", "content": "Sort a list."}]),
    "two-users": ([*HELLO, {"role": "user", "content": "Sort a list."}],  # these it cannot: merged
                  [{"role": "user", "content": "Hello!\n\nSort a list."}]),
    "continue": ([*HELLO, {"role": "assistant", "content": [{"type": "text", "text": "Hi! I am"}]}],
                 [*HELLO, {"role": "assistant", "content": "Hi! I am"}]),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(TODAYS_MESSAGES))
def test_messages_as_todays_clients_send_them(client, model, kind):
    """Through the openai client: content parts, developer, name, any order, a final assistant
    message (continued), max_completion_tokens; each answered as the plain messages it means."""
    sent, plain = TODAYS_MESSAGES[kind]
    reply = client.chat.completions.create(model=NAME, messages=sent, temperature=0.0, max_completion_tokens=8)
    expected = chat(model, plain, temperature=0.0, max_tokens=8)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.prompt_tokens


def test_known_openai_fields_that_change_nothing_are_accepted(server):
    body = {"model": NAME, "messages": HELLO, "temperature": 0.0, "max_tokens": 6}
    ignored = {"store": True, "metadata": {"team": "a"}, "service_tier": "auto", "reasoning_effort": "low",
               "verbosity": "low", "modalities": ["text"], "audio": None, "user": "u1", "safety_identifier": "s",
               "prompt_cache_key": "k", "prediction": {"type": "content", "content": "Hi"},
               "stream_options": None, "n": None, "top_p": None, "seed": None, "logit_bias": None}  # fmt: skip
    plain = _post(server[0], json.dumps(body)).json()
    loaded = _post(server[0], json.dumps({**body, **ignored})).json()
    assert loaded["choices"][0]["message"] == plain["choices"][0]["message"]
    streamed = _post(server[0], json.dumps({**body, "stream": True, "stream_options": {"include_usage": None,
                                                                                      "include_obfuscation": True}}))  # fmt: skip
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")


def test_bearer_is_case_insensitive_and_bodies_must_be_json(server):
    url = server[0]
    body = json.dumps({"model": NAME, "messages": HELLO, "max_tokens": 2})
    for scheme in ("bearer", "BEARER", "Bearer "):
        ok = httpx.post(f"{url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json",
                        "Authorization": f"{scheme} {KEY}"}, timeout=60)  # fmt: skip
        assert ok.status_code == 200, ok.text
    plain = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=60,
                       headers={"Content-Type": "text/plain", "Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert plain.status_code == 400 and "Content-Type: application/json" in plain.json()["error"]["message"]
    broken = _post(url, '{"model": "x",')
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    docs = httpx.get(f"{url}/docs")
    assert docs.status_code == 404 and "/openapi.json" in docs.json()["error"]["message"]


def test_completions_of_several_prompts_and_token_ids(client, model):
    prompts = ["def add(a, b):", "class Stack:"]
    reply = client.completions.create(model=NAME, prompt=prompts, n=2, seed=4, max_tokens=6)
    expected = generate(model, prompts, n=2, seed=4, max_tokens=6)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text for c in reply.choices] == [c.text for c in expected]
    assert reply.usage.prompt_tokens == sum(c.prompt_tokens for c in expected if c.index == 0)
    with pytest.raises(openai.BadRequestError) as too_many:  # more prompts than the queue holds could never be queued
        client.completions.create(model=NAME, prompt=["x"] * 65, max_tokens=1)
    assert too_many.value.body["param"] == "prompt"
    ids = model.tokenizer.encode("def add(a, b):", add_bos=True)
    by_ids = client.completions.create(model=NAME, prompt=ids, temperature=0.0, max_tokens=6)
    assert by_ids.choices[0].text == generate(model, [ids], temperature=0.0, max_tokens=6)[0].text


def test_logprobs_carry_each_tokens_real_bytes(client, model):
    """Emoji the tiny vocabulary spells in byte tokens: each token's bytes, joined, are the text's
    UTF-8, and partial characters are `bytes:` tokens, all distinct keys in completions' top_logprobs."""
    emoji = {"type": "json_schema", "json_schema": {"name": "e", "schema": {"const": "😀🚀 é"}}}
    reply = client.chat.completions.create(model=NAME, messages=HELLO, response_format=emoji, logprobs=True,
                                           top_logprobs=5, max_tokens=40)  # fmt: skip
    choice = reply.choices[0]
    assert choice.message.content == '"😀🚀 é"'
    tokens = choice.logprobs.content
    assert b"".join(bytes(t.bytes) for t in tokens) == choice.message.content.encode()
    assert any(t.token.startswith("bytes:\\x") for t in tokens)
    text = client.completions.create(model=NAME, prompt="😀", max_tokens=12, logprobs=5, seed=2)
    tops = text.choices[0].logprobs.top_logprobs
    assert all(len(top) == 5 for top in tops)  # partial characters no longer collide on one "\ufffd" key
    assert all(not t.endswith("\ufffd") for top in tops for t in top)


def test_a_system_message_is_rendered_where_the_template_allows(client, model):
    """CodeLlama-70B's template (the test model's) takes a system message after the question as
    sent, and one in mid-conversation, which it cannot express, moved first and merged."""
    system = {"role": "system", "content": "Be brief."}
    for messages in ([*HELLO, system], [*HELLO, {"role": "assistant", "content": "Hi."}, system, *HELLO]):
        reply = client.chat.completions.create(model=NAME, messages=messages, temperature=0.0, max_tokens=6)
        expected = chat(model, messages, temperature=0.0, max_tokens=6)
        assert (reply.choices[0].message.content, reply.usage.prompt_tokens) == (expected.text, expected.prompt_tokens)


def test_models_and_completions(client, model):
    assert [m.id for m in client.models.list().data] == [NAME]
    text = client.completions.create(model=NAME, prompt="def add(a, b):", temperature=0.0, max_tokens=8)
    assert text.object == "text_completion"
    assert text.choices[0].text == generate(model, ["def add(a, b):"], temperature=0.0, max_tokens=8)[0].text
    streamed = client.completions.create(model=NAME, prompt="def add(a, b):", temperature=0.0, max_tokens=8, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text


def test_error_classes(client, server):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=NAME, messages=HELLO, temperature=3)
    assert bad.value.body["param"] == "temperature" and bad.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=HELLO)
    assert missing.value.body["param"] == "model"
    wrong = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "word " * 800}])
    assert "tokens" in long.value.body["message"]


def test_full_queue_is_429_and_n_beyond_the_slots_400(model):
    with running_server(model, max_batch=2, max_queue=0, start_engine=False) as (url, _, _):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError) as full:
            c.chat.completions.create(model=NAME, messages=HELLO)
        assert full.value.response.headers["Retry-After"] == "1"
        with pytest.raises(openai.BadRequestError) as too_many:
            c.chat.completions.create(model=NAME, messages=HELLO, n=4)
        assert too_many.value.body["param"] == "n"


def _post(url, body, key=KEY, **kw):
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    return httpx.post(f"{url}/v1/openai/chat/completions", headers=headers, content=body, timeout=60, **kw)


def test_the_contract_examples_as_raw_http(server):
    url = server[0]
    conversation = {"model": NAME, "messages": [
        {"role": "system", "content": "Respond like a michelin starred chef."},
        {"role": "user", "content": "Can you name at least two different techniques to cook lamb?"},
        {"role": "assistant", "content": "Bonjour! Let me tell you, my friend, cooking lamb is an art form, and I'm "
         "more than happy to share with you not two, but three of my favorite techniques to coax out the rich, "
         "unctuous flavors and tender textures of this majestic protein. First, we have the classic \"Sous Vide\" "
         "method. Next, we have the ancient art of \"Sous le Sable\". And finally, we have the more modern technique "
         "of \"Hot Smoking.\""},
        {"role": "user", "content": "Tell me more about the second method."},
    ], "max_tokens": 8}  # fmt: skip
    body = _post(url, json.dumps(conversation)).json()
    assert "error" not in body, body
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["object"] == "chat.completion" and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details", "estimated_cost"}
    streamed = _post(url, json.dumps({"model": NAME, "stream": True, "messages": HELLO, "max_tokens": 6}))
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = streamed.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    payloads = [json.loads(e[6:]) for e in events[:-2]]
    assert all(p["object"] == "chat.completion.chunk" and p["model"] == NAME for p in payloads)
    assert payloads[0]["choices"][0]["delta"]["role"] == "assistant"
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")


POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "label": {"enum": ["a", "b"]}},
         "required": ["x", "label"], "additionalProperties": False}  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_response_format_through_the_openai_client(client, model):
    response_format = {"type": "json_schema", "json_schema": {"name": "point", "schema": POINT, "strict": True}}
    reply = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=100, seed=1, n=2,
                                           response_format=response_format)  # fmt: skip
    expected = generate(model, [HELLO], max_tokens=100, seed=1, n=2, response_format=response_format)
    assert [c.message.content for c in reply.choices] == [c.text for c in expected]
    for choice in reply.choices:
        jsonschema.validate(json.loads(choice.message.content), POINT)
    whole = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=100, temperature=0.0,
                                           response_format={"type": "json_object"})  # fmt: skip
    assert whole.choices[0].finish_reason == "stop" and isinstance(json.loads(whole.choices[0].message.content), dict)


def _accumulate(chunks) -> list[tuple[str, str, str]]:
    """(id, name, arguments) per call from streamed tool-call deltas, as clients assemble them."""
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, ["", "", ""])
            call[0] += delta.id or ""
            call[1] += delta.function.name or ""
            call[2] += delta.function.arguments or ""
    return [tuple(calls[i]) for i in sorted(calls)]


def test_tool_calls_whole_and_streamed(client, model):
    kwargs = dict(model=NAME, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0.0)
    whole = client.chat.completions.create(**kwargs, max_tokens=200, parallel_tool_calls=False)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    expected = chat(model, ASK, tools=[WEATHER], tool_choice="required", temperature=0.0, max_tokens=200,
                    parallel_tool_calls=False)  # fmt: skip
    assert call.function.arguments == expected.tool_calls[0].arguments
    assert whole.usage.completion_tokens == expected.completion_tokens

    chunks = list(client.chat.completions.create(**kwargs, max_tokens=200, parallel_tool_calls=False, stream=True))
    ((call_id, name, arguments),) = _accumulate(chunks)
    assert call_id.startswith("call_") and (name, arguments) == (call.function.name, call.function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)

    parallel = client.chat.completions.create(**kwargs, max_tokens=60)  # several calls, the last cut off
    streamed = _accumulate(client.chat.completions.create(**kwargs, max_tokens=60, stream=True))
    calls = parallel.choices[0].message.tool_calls
    assert parallel.choices[0].finish_reason == "length" and calls
    assert [(c.function.name, c.function.arguments) for c in calls] == [(n, a) for _, n, a in streamed]


def test_a_tool_result_sent_back_through_the_openai_client(client, model):
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(model=NAME, messages=ASK, tools=[WEATHER], tool_choice=named,
                                           temperature=0.0, max_tokens=200)  # fmt: skip
    message = first.choices[0].message
    assert [c.function.name for c in message.tool_calls][:1] == ["get_weather"]
    history = [*ASK, message, {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "21 C, sunny"}]
    second = client.chat.completions.create(model=NAME, messages=history, tools=[WEATHER], tool_choice="none",
                                            temperature=0.0, max_tokens=12)  # fmt: skip
    library_history = [*ASK, message.model_dump(exclude_none=True), history[-1]]
    expected = chat(model, library_history, tools=[WEATHER], tool_choice="none", temperature=0.0, max_tokens=12)
    assert second.choices[0].message.content == expected.text and second.choices[0].message.tool_calls is None


@pytest.mark.parametrize(
    "body, status, param",
    [
        ("{not json", 400, None),
        ("[1, 2]", 400, None),
        (json.dumps({"model": NAME}), 400, "messages"),
        (json.dumps({"model": NAME, "messages": []}), 400, "messages"),
        (json.dumps({"model": NAME, "messages": HELLO, "temperature": "hot"}), 400, "temperature"),
        (json.dumps({"model": NAME, "messages": HELLO, "top_k": 1000}), 400, "top_k"),
        (json.dumps({"model": NAME, "messages": HELLO, "n": 5}), 400, "n"),
        (json.dumps({"model": NAME, "messages": HELLO, "stream_options": {"include_usage": True}}), 400, "stream_options"),
        (json.dumps({"model": NAME, "messages": HELLO, "stop": ["x"] * 17}), 400, "stop"),
        (json.dumps({"model": NAME, "messages": HELLO, "logit_bias": {"5": 101}}), 400, "logit_bias"),
        (json.dumps({"model": NAME, "messages": HELLO, "logit_bias": {"99999": 1}}), 400, "logit_bias"),
        (json.dumps({"model": NAME, "messages": HELLO, "logit_bias": {"a": 1}}), 400, "logit_bias"),
        (json.dumps({"model": NAME, "messages": HELLO, "surprise": 1}), 400, "surprise"),
        ('{"model": "%s", "messages": %s, "top_p": NaN}' % (NAME, json.dumps(HELLO)), 400, "top_p"),
        (json.dumps({"model": NAME, "messages": [{"role": "assistant", "content": "hi"}]}), 400, "messages"),
        (json.dumps({"model": NAME, "messages": HELLO, "tools": [{"type": "function"}]}), 400, "tools.0"),
        (json.dumps({"model": NAME, "messages": HELLO, "tools": [WEATHER], "tool_choice": {"type": "function",
                     "function": {"name": "nope"}}}), 400, "tool_choice"),  # fmt: skip
        (json.dumps({"model": NAME, "messages": HELLO, "tool_choice": "required"}), 400, "tool_choice"),
        (json.dumps({"model": NAME, "messages": HELLO, "response_format": {"type": "yaml"}}), 400, "response_format"),
        (json.dumps({"model": NAME, "messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {
                     "name": "x", "schema": {"type": "array", "uniqueItems": True}}}}), 400, "response_format"),  # fmt: skip
        (json.dumps({"model": NAME, "messages": HELLO + [{"role": "tool", "content": "1", "tool_call_id": "c"}]}),
         400, "messages.1.tool_call_id"),
        (json.dumps({"model": NAME, "messages": [{"role": "user"}]}), 400, "messages.0.content"),
        (json.dumps({"model": NAME, "messages": [{"role": "user", "content": "x" * 2**20}]}), 413, None),
        (json.dumps({"model": NAME, "messages": HELLO, "logit_bias": {"\u00b2": 1}}), 400, "logit_bias"),
        (json.dumps({"model": NAME, "messages": HELLO, "logit_bias": {"9" * 5000: 1}}), 400, "logit_bias"),
        (json.dumps({"model": NAME, "messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {
                     "name": "loop", "schema": {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}}}}),
         400, "response_format"),  # fmt: skip
        (json.dumps({"model": NAME, "messages": HELLO, "max_tokens": 5, "max_completion_tokens": 6}), 400,
         "max_completion_tokens"),
        (json.dumps({"model": NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, {
                     "type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}), 400,
         "messages.0.content.1"),  # fmt: skip
        (json.dumps({"model": NAME, "messages": HELLO, "web_search_options": {}}), 400, "web_search_options"),
        (json.dumps({"model": NAME, "messages": HELLO, "functions": [{"name": "f"}]}), 400, "functions"),
        (json.dumps({"model": NAME, "messages": HELLO, "modalities": ["text", "audio"]}), 400, "modalities"),
        (json.dumps({"model": NAME, "messages": HELLO, "tools": [{"type": "custom", "custom": {"name": "x"}}]}), 400,
         "tools.0.type"),
        (json.dumps({"model": NAME, "messages": "Hello!"}), 400, "messages"),
        (json.dumps({"model": None, "messages": HELLO}), 400, "model"),
        (json.dumps({"model": NAME, "messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {
                     "name": "loop", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/b"}}, "required": [
                         "a"], "$defs": {"b": {"type": "object", "properties": {"c": {"$ref": "#/$defs/b"}},
                                               "required": ["c"]}}}}}}), 400, "response_format"),
        (json.dumps({"model": NAME, "messages": HELLO, "tool_choice": "required", "tools": [{"type": "function",
                     "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#"}},
                                                              "required": ["a"]}}}]}), 400, "tools.0.function.parameters"),
        (json.dumps({"model": NAME, "messages": [*HELLO, {"role": "assistant", "tool_calls": [{"id": "c", "type":
                     "function", "function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}]},
                     {"role": "tool", "tool_call_id": "c", "content": "1"}]}), 400, "messages.1.tool_calls.0.function.arguments"),
        (json.dumps({"model": NAME, "messages": [*HELLO, {"role": "assistant", "tool_calls": [{"id": "c", "type":
                     "function", "function": {"name": "f", "arguments": "{}"}}]}]}), 400, "messages.1"),
        (json.dumps({"model": NAME, "messages": [{"role": "assistant", "content": ""}]}), 400, "messages"),
        (json.dumps({"model": NAME, "messages": [{"role": "user", "content": 5}]}), 400, "messages.0.content"),
    ],
    ids=["malformed", "array", "no-messages", "empty-messages", "wrong-type", "top_k-range", "n-range",
         "stream_options-without-stream", "17-stops", "bias-range", "bias-vocab", "bias-key",
         "unknown-field", "nan", "order", "tools", "tool_choice-unknown", "tool_choice-without-tools",
         "response_format-type", "schema-unsupported", "tool-without-call", "no-content", "too-large",
         "bias-superscript-two", "bias-5000-digits", "schema-refers-to-itself", "two-max-tokens", "image-part",
         "web-search", "functions", "audio-out", "custom-tool", "messages-string", "model-null",
         "schema-requires-itself", "tool-requires-itself", "deep-arguments", "continue-a-call", "nothing-to-answer",
         "content-number"],  # fmt: skip
)
def test_bad_input_is_a_clear_openai_error(server, body, status, param):
    url, engine = server
    try:
        as_stream = json.loads(body)
    except ValueError:
        as_stream = None
    bodies = [body]
    if isinstance(as_stream, dict) and "stream_options" not in as_stream:  # refused before a stream starts too
        bodies.append(json.dumps({**as_stream, "stream": True}))
    for sent in bodies:
        response = _post(url, sent)
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param and len(error["message"]) < 400, error  # short: no library's dump
        assert engine.slots_in_use == 0 and engine.queue_depth == 0  # no slot taken


def test_cors_only_for_the_allowed_origins(model):
    with running_server(model, allowed_origins=["https://app.example"]) as (url, _, _):
        preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}  # fmt: skip
        answer = httpx.options(f"{url}/v1/chat/completions", headers=preflight)  # no key: browsers send none here
        assert answer.status_code == 204 and answer.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "POST" in answer.headers["Access-Control-Allow-Methods"]
        assert "authorization" in answer.headers["Access-Control-Allow-Headers"]
        headers = {"Origin": "https://app.example", "Authorization": f"Bearer {KEY}"}
        reply = httpx.post(f"{url}/v1/chat/completions", headers=headers, json={"model": NAME, "messages": HELLO,
                           "max_tokens": 2}, timeout=60)  # fmt: skip
        assert reply.status_code == 200 and reply.headers["Access-Control-Allow-Origin"] == "https://app.example"
        other = httpx.options(f"{url}/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in other.headers and other.status_code == 401
    with running_server(model) as (url, _, _):  # off by default
        answer = httpx.options(f"{url}/v1/chat/completions", headers=preflight)
        assert "Access-Control-Allow-Origin" not in answer.headers


def test_requests_still_waiting_are_answered_at_once_when_draining(model):
    """On SIGTERM (engine.drain) a request waiting for a slot gets a 503 with Retry-After, or an
    error event then [DONE] for a stream already open, while the one decoding finishes."""
    with running_server(model, max_batch=1) as (url, engine, _):
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
        long = {"model": NAME, "messages": HELLO, "max_tokens": 400, "temperature": 0.0, "stream": True,
                "logit_bias": {"2": -100}}  # fmt: skip
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=long, headers=headers, timeout=60) as decoding:
            lines = decoding.iter_lines()
            while '"content": "' not in next(lines) or engine.slots_in_use == 0:
                pass
            answers: dict[str, httpx.Response] = {}

            def send(kind):
                body = {"model": NAME, "messages": HELLO, "max_tokens": 4, "stream": kind == "stream"}
                answers[kind] = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)

            waiting = [threading.Thread(target=send, args=(kind,)) for kind in ("whole", "stream")]
            for t in waiting:
                t.start()
            while engine.queue_depth < 2:
                time.sleep(0.01)
            started = time.monotonic()
            engine.drain()
            for t in waiting:
                t.join(timeout=30)
            waited = time.monotonic() - started
            rest = [line for line in lines if line]
        assert answers["whole"].status_code == 503 and answers["whole"].headers["Retry-After"] == "5"
        validator("ErrorResponse").validate(answers["whole"].json())
        events = answers["stream"].text.split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""] and "another replica" in events[-3]
        validator("ErrorResponse").validate(json.loads(events[-3].removeprefix("data: ")))
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in "".join(rest)  # the decoding one finished
        print(f"\nwaiting requests answered {waited:.2f} s after the drain began")


def test_missing_key_and_openapi(server):
    url = server[0]
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    spec = httpx.get(f"{url}/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"]
    metrics = httpx.get(f"{url}/metrics").text
    assert "codellama_requests_total" in metrics and "codellama_time_to_first_token_seconds" in metrics
    blocks = server[1].stats()["kv_cache_blocks"]
    assert f"codellama_kv_cache_blocks {blocks:.1f}" in metrics and "codellama_preemptions_total 0.0" in metrics
    assert httpx.get(f"{url}/health").json()["kv_cache_blocks_free"] == blocks


def test_speculation_through_the_openai_client_changes_no_token(model):
    """A server verifying prompt-lookup drafts answers exactly as the library does without them,
    streamed or whole, n = 2 seeded, with logprobs; /metrics counts the drafts it kept."""
    messages = [{"role": "user", "content": "Repeat: alpha beta gamma alpha beta gamma alpha beta"}]
    settings = dict(temperature=0.2, seed=3, n=2, max_tokens=40)
    want = [c.text for c in generate(model, [messages], **settings)]
    greedy = generate(model, [messages], temperature=0.0, max_tokens=30, logprobs=True, top_logprobs=2)[0]
    with running_server(model, max_batch=2, speculation=Speculation(num_tokens=4, ngram_min=1)) as (url, _, _):
        c = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        whole = c.chat.completions.create(model=NAME, messages=messages, **settings)
        assert [choice.message.content for choice in whole.choices] == want
        streamed = ["", ""]
        for chunk in c.chat.completions.create(model=NAME, messages=messages, stream=True, **settings):
            for choice in chunk.choices:
                streamed[choice.index] += choice.delta.content or ""
        assert streamed == want
        reply = c.chat.completions.create(model=NAME, messages=messages, temperature=0.0, max_tokens=30, logprobs=True,
                                          top_logprobs=2)  # fmt: skip
        assert reply.choices[0].message.content == greedy.text
        got = [(bytes(x.bytes), [bytes(t.bytes) for t in x.top_logprobs]) for x in reply.choices[0].logprobs.content]
        assert got == [(x.bytes, [t.bytes for t in x.top]) for x in greedy.logprobs]
        metrics = httpx.get(f"{url}/metrics").text
    drafted, accepted = (float(re.search(rf"^codellama_speculative_{name}_total (\S+)$", metrics, re.M)[1])
                         for name in ("draft_tokens", "accepted_tokens"))  # fmt: skip
    assert 0 < accepted <= drafted, metrics


def test_16_concurrent_streams_equal_one_at_a_time(server, model):
    url = server[0]
    prompts = [[{"role": "user", "content": f"Count to {i}."}] for i in range(16)]
    expected = [c.text for c in generate(model, prompts, temperature=0.0, max_tokens=10)]

    async def one(client, messages):
        stream = await client.chat.completions.create(model=NAME, messages=messages, temperature=0.0, max_tokens=10, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0) as client:
            return await asyncio.gather(*(one(client, m) for m in prompts))

    assert asyncio.run(main()) == expected


def test_a_client_that_disconnects_frees_its_slot(server):
    url, engine = server
    body = json.dumps({"model": NAME, "stream": True, "messages": HELLO, "max_tokens": 100, "temperature": 0.0})
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=headers, content=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and '"content": "' in line:
                break  # leave mid-stream
    for _ in range(100):
        if engine.slots_in_use == 0:
            break
        time.sleep(0.05)
    assert engine.slots_in_use == 0


def test_the_command_line_server_starts_serves_drains_and_stops(tmp_path, sp_dir):
    """`codellama-serve` as users run it: keys from the environment,
    one log line per request (no key, no user in clear), ready only after warm-up; on SIGTERM, new
    requests get 503 while those in flight finish (or, past --drain-timeout, end with an error
    event), and it exits 0."""
    hf = write_hf_checkpoint(tmp_path / "hf", sp_dir, max_position_embeddings=4096)
    converted = convert(open_checkpoint(hf), tmp_path / "ckpt", dtype="float32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CODELLAMA_API_KEYS": f"{KEY},sk-other"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "codellama_jax.serving", "--model", str(converted), "--port", str(port),
         "--max-batch", "2", "--price-input", "1.5", "--drain-timeout", "1",
         "--kv-cache-memory", "10MiB"],  # 640 blocks of 16 KiB: both rows at 4096 tokens
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    watchdog = threading.Timer(600, proc.kill)  # a server that never gets ready fails the test, not the suite
    watchdog.start()
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": "Bearer sk-other"}
    streams: dict[int, str] = {}
    started = {n: threading.Event() for n in (16, 4000, 4001)}  # one ends in time, two cannot (1 s of drain)

    def stream(max_tokens: int) -> None:
        body = {"model": "hf", "messages": HELLO, "max_tokens": max_tokens, "stream": True, "temperature": 0.0}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
            lines = []
            for line in r.iter_lines():
                lines.append(line)
                if len([x for x in lines if x.startswith("data: ")]) > 1:  # a token: decoding in a slot
                    started[max_tokens].set()
            streams[max_tokens] = "\n".join(lines)

    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "serving" in line:
                break
        assert f"serving 'hf' on http://127.0.0.1:{port}" in lines[-1], "".join(lines)
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-other", max_retries=0)
        reply = c.chat.completions.create(model="hf", messages=HELLO, max_tokens=4, user="alice@example.com")
        assert reply.usage.model_extra["estimated_cost"] == pytest.approx(reply.usage.prompt_tokens * 1.5 / 1e6)

        clients = [threading.Thread(target=stream, args=(n,)) for n in started]
        for t, event in zip(clients, started.values()):  # the third takes the slot the first leaves
            t.start()
            event.wait(timeout=60)
        queued: list[httpx.Response] = []  # both slots are busy: this one waits for a slot
        clients.append(threading.Thread(target=lambda: queued.append(httpx.post(
            f"{url}/v1/chat/completions", json={"model": "hf", "messages": HELLO, "max_tokens": 4}, headers=headers,
            timeout=60))))  # fmt: skip
        clients[-1].start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").json()["queue_depth"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").status_code != 503 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = httpx.post(f"{url}/v1/chat/completions", json={"model": "hf", "messages": HELLO}, headers=headers)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        assert refused.json()["error"]["code"] == "unavailable"
        for t in clients:
            t.join(timeout=60)
    finally:
        if not started[4001].is_set():  # the test failed before its own SIGTERM
            proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        proc.wait(timeout=60)
        watchdog.cancel()
    log = "".join(lines) + rest
    assert proc.returncode == 0, log
    assert "chat n=1 prompt=" in log and "alice" not in log and KEY not in log and "sk-other" not in log
    assert queued[0].status_code == 503 and queued[0].headers["Retry-After"] == "5"  # answered at once, not held
    finished = streams[16]
    assert '"finish_reason": "length"' in finished and finished.rstrip().endswith("data: [DONE]")
    for cut in (streams[4000], streams[4001]):
        assert '"error"' in cut and "stopped" in cut and '"finish_reason": "' not in cut  # ended, not hung
    assert "draining:" in log and "drain timeout: ending 2 requests" in log


def test_a_port_in_use_is_an_error_at_once_naming_the_address(tmp_path):
    """The socket is claimed before the model is read: the missing model is never reached."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "codellama_jax.serving", "--model", str(tmp_path / "absent"),
                               "--port", str(port)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr, done.stderr
    assert "absent" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("flags, message", [
    (["--ngram-min", "5", "--ngram-max", "2"], "need 1 <= ngram_min <= ngram_max (--ngram-min, --ngram-max), got 5 and 2"),
    (["--num-speculative-tokens", "0"], "num_tokens (--num-speculative-tokens) must be in [1, 64], got 0"),
    (["--speculative", "eagle"], "argument --speculative: invalid choice: 'eagle'"),
])  # fmt: skip
def test_bad_speculative_flags_are_refused_before_loading(tmp_path, flags, message):
    done = subprocess.run([sys.executable, "-m", "codellama_jax.serving", "--model", str(tmp_path / "absent"), *flags],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("module", ["codellama_jax.serving", "codellama_jax.convert", "codellama_jax.plan"])
def test_every_cli_explains_every_flag(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True).stdout
    entries = re.split(r"\n(?=  -)", out.split("options:")[1].strip())
    assert len(entries) >= 4
    for entry in entries:  # "--flag METAVAR  what it does", the words beyond flags, metavars and choices
        words = [w for w in entry.split() if not (w.startswith(("-", "{")) or w.strip(",").isupper())]
        assert len(words) >= 3, f"{module}: {entry!r} has no explanation"
    if module == "codellama_jax.serving":
        assert "CODELLAMA_API_KEYS" in out and "--drain-timeout" in out


def test_served_name_is_the_checkpoints_own(tmp_path, sp_dir):
    assert served_name(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert served_name(tmp_path / "CodeLlama-70b-Instruct-hf") == "CodeLlama-70b-Instruct-hf"
    hf_dir = write_hf_checkpoint(tmp_path / "CodeLlama-7b-Instruct-hf", sp_dir)
    assert served_name(convert(open_checkpoint(hf_dir), tmp_path / "converted", dtype="float32")) == hf_dir.name
