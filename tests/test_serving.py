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

from conftest import KEY, NAME, PRICES, running_server, write_hf_checkpoint

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


def test_a_system_message_anywhere_counts_as_the_first(client):
    system = {"role": "system", "content": "Be brief."}
    first = client.chat.completions.create(model=NAME, messages=[system, *HELLO], temperature=0.0, max_tokens=6)
    later = client.chat.completions.create(model=NAME, messages=[*HELLO, system], temperature=0.0, max_tokens=6)
    assert later.choices[0].message.content == first.choices[0].message.content


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
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens", "estimated_cost"}
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
    ],
    ids=["malformed", "array", "no-messages", "empty-messages", "wrong-type", "top_k-range", "n-range",
         "stream_options-without-stream", "17-stops", "bias-range", "bias-vocab", "bias-key",
         "unknown-field", "nan", "order", "tools", "tool_choice-unknown", "tool_choice-without-tools",
         "response_format-type", "schema-unsupported", "tool-without-call", "no-content", "too-large"],  # fmt: skip
)
def test_bad_input_is_a_clear_openai_error(server, body, status, param):
    response = _post(server[0], body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_missing_key_and_openapi(server):
    url = server[0]
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    spec = httpx.get(f"{url}/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"]
    metrics = httpx.get(f"{url}/metrics").text
    assert "codellama_requests_total" in metrics and "codellama_time_to_first_token_seconds" in metrics


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
    """`codellama-serve` as users run it: keys from the environment, one log line per request
    (no key, no user in clear), ready only after warm-up; on SIGTERM, new requests get 503 while
    those in flight finish (or, past --drain-timeout, end with an error event), and it exits 0."""
    hf = write_hf_checkpoint(tmp_path / "hf", sp_dir, max_position_embeddings=4096)
    converted = convert(open_checkpoint(hf), tmp_path / "ckpt", dtype="float32")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CODELLAMA_API_KEYS": f"{KEY},sk-other"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "codellama_jax.serving", "--model", str(converted), "--port", str(port),
         "--max-batch", "2", "--price-input", "1.5", "--drain-timeout", "1"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    watchdog = threading.Timer(180, proc.kill)  # a server that never gets ready fails the test, not the suite
    watchdog.start()
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": "Bearer sk-other"}
    streams: dict[int, str] = {}
    started = {n: threading.Event() for n in (16, 4000)}  # one ends in time, one cannot (1 s of drain)

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
        for t in clients:
            t.start()
        for event in started.values():
            event.wait(timeout=60)
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
        if not started[4000].is_set():  # the test failed before its own SIGTERM
            proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        proc.wait(timeout=60)
        watchdog.cancel()
    log = "".join(lines) + rest
    assert proc.returncode == 0, log
    assert "chat n=1 prompt=" in log and "alice" not in log and KEY not in log and "sk-other" not in log
    finished, cut = streams[16], streams[4000]
    assert '"finish_reason": "length"' in finished and finished.rstrip().endswith("data: [DONE]")
    assert '"error"' in cut and "stopped" in cut and '"finish_reason": "' not in cut  # ended, not hung
    assert "draining:" in log and "drain timeout: ending 1 requests" in log


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
