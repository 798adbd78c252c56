"""Every kind of response the server gives validates against OpenAI's own schemas (openai_spec.py):
chat whole and streamed (plain, n=2, logprobs, tools, json_schema), completions, the model list,
and errors, including those inside a stream."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
import yaml

from codellama_jax import load

from conftest import KEY, NAME, running_server, write_hf_checkpoint
from openai_spec import EXTRACT, SPEC, extract, validator

HELLO = [{"role": "user", "content": "Hello!"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}}  # fmt: skip
POINT = {"type": "json_schema", "json_schema": {"name": "point", "schema": {
    "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x"]}}}  # fmt: skip
CHAT = {
    "plain": {"messages": HELLO, "max_tokens": 6},
    "n=2": {"messages": HELLO, "max_tokens": 6, "n": 2, "seed": 1},
    "logprobs": {"messages": HELLO, "max_tokens": 6, "logprobs": True, "top_logprobs": 3},
    "tools": {"messages": HELLO, "max_tokens": 80, "tools": [WEATHER], "tool_choice": "required", "temperature": 0.0},
    "json_schema": {"messages": HELLO, "max_tokens": 40, "response_format": POINT, "logprobs": True},
}
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def url(tmp_path_factory, sp_dir):
    model = load(write_hf_checkpoint(tmp_path_factory.mktemp("spec") / "hf", sp_dir, max_position_embeddings=1024))
    with running_server(model) as (url, _, _):
        yield url


def _events(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    return [json.loads(e.removeprefix("data: ")) for e in events[:-2]]


@pytest.mark.skipif(not SPEC.is_file(), reason="the spec itself is beside this checkout only on the team's machines")
def test_the_extract_is_the_specs_own():
    spec = yaml.load(SPEC.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert extract(spec) == json.loads(EXTRACT.read_text())


def test_the_validator_knows_what_the_spec_requires():
    message = {"role": "assistant", "content": "hi"}  # no "refusal": what this server used to send
    bad = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
           "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}]}  # fmt: skip
    with pytest.raises(jsonschema.ValidationError, match="refusal"):
        validator("CreateChatCompletionResponse").validate(bad)


@pytest.mark.parametrize("kind", list(CHAT))
def test_chat_responses_whole_and_streamed(url, kind):
    body = {"model": NAME, "seed": 3, **CHAT[kind]}
    whole = httpx.post(f"{url}/v1/chat/completions", json=body, headers=HEADERS, timeout=60)
    assert whole.status_code == 200, whole.text
    validator("CreateChatCompletionResponse").validate(whole.json())
    chunks = _events(httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True, "stream_options": {
        "include_usage": True}}, headers=HEADERS, timeout=60))  # fmt: skip
    chunk_schema = validator("CreateChatCompletionStreamResponse")
    for chunk in chunks:
        chunk_schema.validate(chunk)
        assert all(len(c["delta"].get("tool_calls", [])) <= 1 for c in chunk["choices"])  # one call's part per chunk
    assert all(c["usage"] is None for c in chunks[:-1])  # as OpenAI: null on every chunk but the last
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == whole.json()["usage"]["completion_tokens"]
    if kind == "tools":
        assert any(c["choices"] and "tool_calls" in c["choices"][0]["delta"] for c in chunks)


@pytest.mark.parametrize("extra", [{}, {"logprobs": 3}, {"prompt": ["def f(", "class A"], "n": 2}])
def test_completions_whole_and_streamed(url, extra):
    body = {"model": NAME, "prompt": "def add(a, b):", "max_tokens": 6, **extra}
    schema = validator("CreateCompletionResponse")
    whole = httpx.post(f"{url}/v1/completions", json=body, headers=HEADERS, timeout=60)
    assert whole.status_code == 200, whole.text
    schema.validate(whole.json())
    chunks = _events(httpx.post(f"{url}/v1/completions", json={**body, "stream": True}, headers=HEADERS, timeout=60))
    for chunk in chunks:
        validator("CompletionChunk").validate(chunk)
    finals = [c for chunk in chunks for c in chunk["choices"] if c["finish_reason"] is not None]
    assert len(finals) == len(whole.json()["choices"])


def test_the_model_list(url):
    validator("ListModelsResponse").validate(httpx.get(f"{url}/v1/models", headers=HEADERS).json())


@pytest.mark.parametrize(
    "method, path, body, headers, status",
    [
        ("POST", "/v1/chat/completions", {"model": NAME, "messages": HELLO, "temperature": 3}, HEADERS, 400),
        ("POST", "/v1/chat/completions", {"model": NAME, "messages": HELLO}, {}, 401),
        ("POST", "/v1/chat/completions", {"model": "gpt-4", "messages": HELLO}, HEADERS, 404),
        ("GET", "/v1/nothing", None, HEADERS, 404),
        ("GET", "/v1/chat/completions", None, HEADERS, 405),
        ("POST", "/v1/completions", {"model": NAME, "prompt": "x" * 2**21}, HEADERS, 413),
    ],
)
def test_errors(url, method, path, body, headers, status):
    response = httpx.request(method, f"{url}{path}", json=body, headers=headers, timeout=60)
    assert response.status_code == status
    validator("ErrorResponse").validate(response.json())
