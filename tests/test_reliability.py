"""The server under load, faults, fuzzing and attack: 64 clients on 8 slots, clients that leave
mid-stream, hypothesis-generated bodies (never a 5xx), hostile bodies, and the security promises
(keys on every /v1 route, sandboxed templates, no control-token injection, local bind)."""

from __future__ import annotations

import asyncio
import gc
import json
import random
import statistics
import time

import httpx
import openai
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codellama_jax.scheduler import Sequence
from codellama_jax import generate, load
from codellama_jax.serving.__main__ import parse_args

from conftest import KEY, NAME, running_server, write_hf_checkpoint

HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def model(tmp_path_factory, sp_dir):
    return load(write_hf_checkpoint(tmp_path_factory.mktemp("reliability") / "hf", sp_dir, max_position_embeddings=512))


@pytest.fixture(scope="module")
def server(model):
    with running_server(model, max_batch=8, max_queue=64) as running:
        yield running


def _requests(count: int) -> list[dict]:
    """Mixed traffic: streaming or not, prompts and lengths of all sizes, greedy or seeded sampling."""
    rng = random.Random(0)
    out = []
    for i in range(count):
        words = " ".join(rng.choice(["tensor", "shard", "cache", "token", "batch", "mesh"]) for _ in range(rng.randint(1, 20)))
        sampling = {"temperature": 0.0} if i % 3 else {"temperature": 0.9, "top_p": 0.95, "seed": i}
        out.append({"messages": [{"role": "user", "content": f"{i}: {words}"}], "max_tokens": rng.randint(1, 24),
                    "stream": bool(i % 2), **sampling})  # fmt: skip
    return out


async def _ask(client: openai.AsyncOpenAI, request: dict) -> tuple[str, float]:
    start = time.perf_counter()
    if request["stream"]:
        text = ""
        async for chunk in await client.chat.completions.create(model=NAME, **request):
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    else:
        reply = await client.chat.completions.create(model=NAME, **request)
        text = reply.choices[0].message.content
    return text, time.perf_counter() - start


def test_64_clients_on_8_slots_all_answered_right_and_memory_flat(server, model):
    url, engine, _ = server
    requests = _requests(64)
    expected = [generate(model, [r["messages"]], **{k: v for k, v in r.items() if k not in ("messages", "stream")})[0].text
                for r in requests]  # fmt: skip
    process = psutil.Process()

    async def round_of_64():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(_ask(client, r) for r in requests), return_exceptions=True)

    rss, latencies = [], []
    for _ in range(3):
        results = asyncio.run(round_of_64())
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        assert [text for text, _ in results] == expected  # none lost, none mixed up
        latencies += [seconds for _, seconds in results]
        gc.collect()
        rss.append(process.memory_info().rss / 2**20)
    p99 = statistics.quantiles(latencies, n=100)[98]
    print(f"\n192 requests (3 rounds of 64 on 8 slots), 0 errors; latency p50 {statistics.median(latencies):.2f} s, "
          f"p99 {p99:.2f} s; RSS after each round {', '.join(f'{m:.0f}' for m in rss)} MiB")  # fmt: skip
    assert rss[2] - rss[0] < 64, f"memory grew {rss[2] - rss[0]:.0f} MiB between rounds 1 and 3"
    assert engine.slots_in_use == 0 and engine.queue_depth == 0


def test_clients_leaving_mid_stream_free_their_slots_and_tasks(server, model):
    url, engine, loop = server

    async def task_count() -> int:
        return len(asyncio.all_tasks())

    def tasks() -> int:
        return asyncio.run_coroutine_threadsafe(task_count(), loop).result()

    before = tasks()
    rng = random.Random(1)

    async def leave_after(chunks: int):  # requests that would run for seconds: stop token suppressed
        body = {"model": NAME, "messages": [{"role": "user", "content": "go"}], "max_tokens": 400, "stream": True,
                "logit_bias": {str(model.tokenizer.eos_id): -100}}  # fmt: skip
        async with httpx.AsyncClient(timeout=60) as client:
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=HEADERS) as response:
                assert response.status_code == 200
                seen = 0
                async for _ in response.aiter_lines():
                    seen += 1
                    if seen > chunks:
                        return  # the connection closes with the stream unfinished

    async def main():
        await asyncio.gather(*(leave_after(rng.randint(0, 12)) for _ in range(24)))

    runner, calls = engine.scheduler.runner, []  # the decode calls launched, when (counted, not timed: a busy machine)
    launch = runner.launch
    runner.launch = lambda plan: (calls.append(time.monotonic()), launch(plan))[1]
    try:
        asyncio.run(main())
        left = time.monotonic()
        while (engine.slots_in_use or engine.queue_depth or tasks() > before) and time.monotonic() < left + 60:
            time.sleep(0.05)
    finally:
        del runner.launch
    assert (engine.slots_in_use, engine.queue_depth) == (0, 0)
    assert tasks() <= before, "tasks leaked"
    # the 24 x 400 tokens on 8 rows, 2 steps a call, would take 600 decode calls; once the clients
    # have gone, each row ends at its next call and a request still queued never starts
    after = sum(t > left for t in calls)
    assert calls and after < 30, f"{after} decode calls after the clients left, {len(calls)} in all"
    reply = httpx.post(f"{url}/v1/chat/completions", headers=HEADERS, timeout=60,
                       json={"model": NAME, "messages": [{"role": "user", "content": "still there?"}], "max_tokens": 5,
                             "temperature": 0.0})  # fmt: skip
    assert reply.json()["choices"][0]["message"]["content"] == generate(
        model, [[{"role": "user", "content": "still there?"}]], max_tokens=5, temperature=0.0)[0].text  # fmt: skip


def test_an_exception_in_one_request_fails_only_that_request(server, model, monkeypatch):
    url, engine, _ = server
    advance = Sequence.advance

    def sabotaged(sequence, *args):  # a bug that strikes one request's processing only
        if sequence.params.seed == 4242:
            raise RuntimeError("injected fault")
        return advance(sequence, *args)

    monkeypatch.setattr(Sequence, "advance", sabotaged)
    question = [{"role": "user", "content": "count"}]

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(
                client.post(f"{url}/v1/chat/completions", headers=HEADERS,
                            json={"model": NAME, "messages": question, "max_tokens": 8, "seed": seed})
                for seed in (1, 4242, 2, 3)))  # fmt: skip

    ok1, failed, ok2, ok3 = asyncio.run(main())
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
    for seed, reply in zip((1, 2, 3), (ok1, ok2, ok3)):
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["message"]["content"] == generate(model, [question], max_tokens=8, seed=seed)[0].text
    monkeypatch.undo()
    assert engine.slots_in_use == 0


# -- fuzzing: whatever the body, a 2xx or an OpenAI-shaped 4xx, never a 5xx --

LEAVES = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
          | st.text(max_size=12) | st.sampled_from(["", "user", "assistant", "tool", "system", "<step>", "<s>", NAME]))  # fmt: skip
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                      max_leaves=8)  # fmt: skip
FIELDS = ["temperature", "top_p", "min_p", "top_k", "max_tokens", "stop", "n", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "seed", "logit_bias", "user", "stream", "stream_options", "logprobs", "top_logprobs",
          "tools", "tool_choice", "response_format", "parallel_tool_calls", "unknown_field"]  # fmt: skip
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "robot"])},
                                optional={"content": st.text(max_size=40) | VALUES, "tool_call_id": VALUES,
                                          "tool_calls": VALUES, "name": VALUES})  # fmt: skip
ANY_BODY = st.fixed_dictionaries(
    {"model": st.sampled_from([NAME, NAME, "gpt-4"]), "messages": st.lists(MESSAGE, max_size=3) | VALUES},
    optional={name: VALUES for name in FIELDS} | {"max_tokens": st.integers(0, 8), "stream": st.booleans()},
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}}  # fmt: skip
PLAUSIBLE = {  # each field near and across the edges of its range
    "temperature": st.floats(-0.5, 2.5), "top_p": st.floats(-0.1, 1.1), "min_p": st.floats(-0.1, 1.1),
    "top_k": st.integers(-1, 1001), "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=17),
    "n": st.integers(0, 5), "presence_penalty": st.floats(-2.5, 2.5), "frequency_penalty": st.floats(-2.5, 2.5),
    "repetition_penalty": st.floats(0, 5.5), "seed": st.integers(-1, 2**64), "logprobs": st.booleans(),
    "top_logprobs": st.integers(-1, 21), "stream": st.booleans(), "user": st.text(max_size=10),
    "logit_bias": st.dictionaries(st.integers(-1, 500).map(str), st.floats(-101, 101), max_size=3),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema", "json_schema": {
        "name": "a", "schema": {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"]}}}]),
    "tools": st.just([WEATHER]), "parallel_tool_calls": st.booleans(),
    "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "function": {"name": "get_weather"}}]),
}  # fmt: skip
PLAUSIBLE_BODY = st.fixed_dictionaries(
    {"model": st.just(NAME), "max_tokens": st.integers(0, 8),
     "messages": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=30)}), min_size=1, max_size=2)},
    optional=PLAUSIBLE,
)  # fmt: skip
BODY = ANY_BODY | PLAUSIBLE_BODY
def _check(response: httpx.Response) -> int:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    elif response.headers["content-type"].startswith("text/event-stream"):  # a failure inside a stream
        assert not any(line.startswith('data: {"error"') for line in response.text.splitlines()), response.text
    return response.status_code


def test_fuzzed_json_bodies_never_fail_the_server(server):
    statuses = []

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(body=BODY)
    def post(body):
        path = "/v1/chat/completions"
        if random.Random(json.dumps(body, default=str)).random() < 0.2:  # text completions, messages as the prompt
            path = "/v1/openai/completions"
            messages = body["messages"]
            first = messages[0] if isinstance(messages, list) and messages else None
            prompt = first.get("content") if isinstance(first, dict) else messages
            body = {**{k: v for k, v in body.items() if k not in ("messages", "tools", "tool_choice", "response_format")},
                    "prompt": prompt}  # fmt: skip
        response = httpx.post(f"{server[0]}{path}", content=json.dumps(body, default=str), headers=HEADERS, timeout=60)
        statuses.append(_check(response))

    post()
    counts = {status: statuses.count(status) for status in sorted(set(statuses))}
    print(f"\nfuzzed JSON bodies: {len(statuses)}, by status {counts}")
    assert len(statuses) >= 300 and counts.get(200, 0) >= 10  # valid bodies were among them


def test_fuzzed_raw_bodies_never_fail_the_server(server):
    statuses = []

    @settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
    def post(raw):
        statuses.append(_check(httpx.post(f"{server[0]}/v1/chat/completions", content=raw, headers=HEADERS, timeout=60)))

    post()
    assert len(statuses) >= 100


HELLO = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "body, status",
    [
        ("[" * 100_000 + "]" * 100_000, 400),
        ("[" * 980 + "]" * 980, 400),
        (b'{"model": "%s", "messages": [{"role": "user", "content": "\xff\xfe"}]}' % NAME.encode(), 400),
        ('{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % NAME, 400),
        (json.dumps({"model": NAME, "messages": HELLO, "max_tokens": 10**30}), 400),
        ('{"model": "%s", "messages": %s, "temperature": 1e400}' % (NAME, json.dumps(HELLO)), 400),
        ('{"model": "%s", "messages": %s, "top_p": NaN}' % (NAME, json.dumps(HELLO)), 400),
        (json.dumps({"model": NAME, "messages": HELLO, "seed": 2**64}), 400),
        (json.dumps({"model": NAME, "messages": [{"role": "user", "content": "x " * 800}]}), 400),
        (json.dumps({"model": NAME, "messages": HELLO, "stop": ""}), 400),
        (json.dumps({"model": "", "messages": HELLO}), 404),
        (json.dumps({"model": NAME, "messages": HELLO, "mystery": True}), 400),
        ("x" * (10 * 2**20), 413),
        ("", 400),
    ],
    ids=["nested-100k", "nested-980", "invalid-utf8", "lone-surrogate", "huge-int", "huge-float", "nan", "seed-2^64",
         "past-context", "empty-stop", "empty-model", "unknown-field", "10MB", "empty-body"],  # fmt: skip
)
def test_hostile_bodies_get_openai_errors(server, body, status):
    response = httpx.post(f"{server[0]}/v1/chat/completions", content=body, headers=HEADERS, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


# -- security --


def test_huge_prompts_are_refused_without_stalling_other_streams(model):
    """Four 4 MB prompts ("ab" * 1.9M, under a 5 MiB body limit) are refused as surely too long
    before they are tokenized, off the event loop: another client's streams keep flowing."""
    huge = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "ab" * 1_900_000}]})
    small = {"model": NAME, "messages": [{"role": "user", "content": "tensor"}], "max_tokens": 40, "stream": True}

    async def main(url):
        stamps: list[float] = []
        refusing = asyncio.Event()

        async def watch(client):  # streams back to back, every event's time kept, until the refusals are done
            while not refusing.is_set() or not stamps:
                async with client.stream("POST", f"{url}/v1/chat/completions", json=small, headers=HEADERS) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            stamps.append(time.perf_counter())

        async with httpx.AsyncClient(timeout=120) as client:
            await client.post(f"{url}/v1/chat/completions", json={**small, "stream": False}, headers=HEADERS)  # compiles
            watcher = asyncio.create_task(watch(client))
            while len(stamps) < 3:
                await asyncio.sleep(0.01)
            start = time.perf_counter()
            answers = await asyncio.gather(*(client.post(f"{url}/v1/chat/completions", content=huge, headers=HEADERS)
                                             for _ in range(4)))  # fmt: skip
            end = time.perf_counter()
            refusing.set()
            await watcher
        during = [t for t in stamps if start <= t <= end] or [end]
        window = [max([t for t in stamps if t < start], default=start), *during, min([t for t in stamps if t > end], default=end)]
        return answers, max(b - a for a, b in zip(window, window[1:])), end - start

    with running_server(model, max_batch=2, max_body_bytes=5 * 2**20) as (url, _, loop):
        answers, gap, seconds = asyncio.run(main(url))
    for answer in answers:
        error = answer.json()["error"]
        assert answer.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "messages"
        assert "at least" in error["message"]
    print(f"\n4 x 4 MB prompts refused in {seconds:.2f} s; another client's largest gap between events: {gap:.2f} s")
    assert gap < 5


def test_every_v1_route_needs_the_key(server):
    url = server[0]
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]  # every route the app declares
    routes = [(method.upper(), path) for path, ops in paths.items() if path.startswith("/v1") for method in ops]
    assert len(routes) >= 6
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):
            response = httpx.request(method, f"{url}{path}", headers=headers, json={"model": NAME, "messages": HELLO})
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"


def test_a_checkpoint_template_cannot_reach_python_internals(tmp_path, sp_dir):
    directory = write_hf_checkpoint(tmp_path / "evil", sp_dir)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ cycler.__init__.__globals__.os.popen('id').read() }}{{ messages[0].content }}"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with running_server(load(directory)) as (url, _, _):
        response = httpx.post(f"{url}/v1/chat/completions", headers=HEADERS, json={"model": NAME, "messages": HELLO})
    assert response.status_code == 400 and "unsafe" in response.json()["error"]["message"]


def test_control_tokens_in_user_content_stay_text(server, model):
    tokenizer = model.tokenizer
    plain = [{"role": "user", "content": "say <s> and <step> please"}]
    ids = model.chat_template.encode(tokenizer, plain)
    assert sum(i in tokenizer.special_ids for i in ids) == sum(
        i in tokenizer.special_ids for i in model.chat_template.encode(tokenizer, [{"role": "user", "content": "say please"}]))  # fmt: skip
    reply = httpx.post(f"{server[0]}/v1/chat/completions", headers=HEADERS, timeout=60,
                       json={"model": NAME, "messages": plain, "max_tokens": 1}).json()  # fmt: skip
    assert reply["usage"]["prompt_tokens"] == len(ids)


def test_the_server_binds_this_machine_only_by_default():
    assert parse_args([]).host == "127.0.0.1"
