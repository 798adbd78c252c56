"""`codellama-serve` over two processes (JAX's multi-controller runtime on 127.0.0.1, 4 fake CPU
devices each, one (2, 4) mesh): through process 0 it answers exactly as one process over 8
devices does; a lost worker turns /health 503, ends what is in flight and makes process 0 exit
3 within the bound; SIGTERM to process 0 drains and stops both (after the comparison: both use
the same pair of processes); workers unpickle nothing but plans."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import openai
import pytest

from codellama_jax import multihost
from codellama_jax.runner import Fill, Prefill, Verify
from codellama_jax.sampling import SamplingParams
from codellama_jax.speculative import Speculation
from conftest import KEY, write_hf_checkpoint

NAME = "multihost-test"
HELLO = [{"role": "user", "content": "Hello!"}]
POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "label": {"enum": ["a", "b"]}},
         "required": ["x", "label"], "additionalProperties": False}  # fmt: skip
STARTUP_SECONDS = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """Processes of one `codellama-serve` (one, or a group joined through a coordinator), each
    logging to a file; stopped by pid, never by name."""

    def __init__(self, checkpoint: Path, logs: Path, cache: Path, processes: int, *flags: str, worker_flags=()):
        logs.mkdir(parents=True)
        self.port, self.logs = _free_port(), logs
        self.url = f"http://127.0.0.1:{self.port}"
        devices = 8 // processes
        common = [sys.executable, "-m", "codellama_jax.serving", "--model", str(checkpoint), "--port", str(self.port),
                  "--served-model-name", NAME, "--mesh", "2x4", "--max-batch", "2", "--max-len", "128", "--prefill-chunk", "64",
                  "--drain-timeout", "10", *flags]  # fmt: skip
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
               "CODELLAMA_API_KEYS": KEY}  # fmt: skip
        group = ["--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", str(processes)] if processes > 1 else []
        self.procs = []
        for i in range(processes):
            rank = ["--process-id", str(i), *(worker_flags if i else ())] if group else []
            with open(logs / f"{i}.log", "w") as log:
                self.procs.append(subprocess.Popen([*common, *group, *rank, "--compile-cache", str(cache / str(processes))],
                                                   env=env, stdout=log, stderr=subprocess.STDOUT))  # fmt: skip

    def log(self, i: int = 0) -> str:
        return (self.logs / f"{i}.log").read_text()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while "serving '" not in self.log():
            codes = [p.poll() for p in self.procs]
            assert all(c is None for c in codes) and time.monotonic() < deadline, (codes, self.log(), self.log(len(self.procs) - 1))
            time.sleep(0.5)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, **kw)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sp_dir) -> Path:
    return write_hf_checkpoint(tmp_path_factory.mktemp("multihost") / "hf", sp_dir, num_key_value_heads=2,
                               max_position_embeddings=1024)  # fmt: skip


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Compiled programs, kept for the second pair of processes to start faster."""
    return tmp_path_factory.mktemp("xla")


@pytest.fixture(scope="module")
def servers(checkpoint, cache, tmp_path_factory):
    """The two-process server and the one-process reference, started together."""
    root = tmp_path_factory.mktemp("servers")
    with contextlib.ExitStack() as stack:
        pair = Server(checkpoint, root / "pair", cache, 2)
        stack.callback(pair.stop)
        single = Server(checkpoint, root / "single", cache, 1)
        stack.callback(single.stop)
        pair.wait_ready()
        single.wait_ready()
        yield pair, single


def _answers(server: Server) -> dict:
    """The same requests, each kind of answer the engine gives: greedy and seeded chat, streamed
    and whole, n = 2, structured output, and 16 concurrent streams."""
    c = server.client()
    response_format = {"type": "json_schema", "json_schema": {"name": "point", "schema": POINT, "strict": True}}
    greedy = c.chat.completions.create(model=NAME, messages=HELLO, temperature=0.0, max_tokens=24)
    seeded = c.chat.completions.create(model=NAME, messages=HELLO, max_tokens=16, seed=3, n=2, top_p=0.9, logprobs=True,
                                       top_logprobs=2)  # fmt: skip
    streamed = c.chat.completions.create(model=NAME, messages=HELLO, max_tokens=16, seed=4, stream=True,
                                         stream_options={"include_usage": True})  # fmt: skip
    chunks = list(streamed)
    structured = c.chat.completions.create(model=NAME, messages=HELLO, max_tokens=60, seed=1, n=2,
                                           response_format=response_format)  # fmt: skip
    for choice in structured.choices:
        jsonschema.validate(json.loads(choice.message.content), POINT)

    async def one(client, i):
        stream = await client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": f"Count to {i}."}],
                                                      temperature=0.0, max_tokens=10, stream=True)  # fmt: skip
        return "".join([x.choices[0].delta.content or "" async for x in stream if x.choices])

    async def concurrent():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(16)))

    return {
        "greedy": (greedy.choices[0].message.content, greedy.choices[0].finish_reason, greedy.usage.completion_tokens),
        "seeded": [(x.message.content, [t.token for t in x.logprobs.content]) for x in seeded.choices],
        "seeded_top": [[[a.token for a in t.top_logprobs] for t in x.logprobs.content] for x in seeded.choices],
        "streamed": "".join(x.choices[0].delta.content or "" for x in chunks if x.choices),
        "streamed_usage": chunks[-1].usage.completion_tokens,
        "structured": [x.message.content for x in structured.choices],
        "concurrent": asyncio.run(concurrent()),
    }


def test_two_processes_answer_as_one(servers):
    pair, single = servers
    got, expected = _answers(pair), _answers(single)
    assert got == expected
    assert "2 process(es)" in pair.log() and "running process 0's calls" in pair.log(1)
    health = httpx.get(f"{pair.url}/health").json()
    assert health["status"] == "ok" and health["slots_in_use"] == 0


def test_sigterm_to_process_0_drains_and_stops_both(servers):
    """A stream in flight when process 0 is told to stop finishes; then both processes exit 0."""
    pair, _ = servers
    with httpx.stream("POST", f"{pair.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": NAME, "messages": HELLO, "max_tokens": 40, "stream": True, "temperature": 0.0,
                            "stop": []}, timeout=60) as r:  # fmt: skip
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # decoding
        pair.procs[0].send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in "".join(rest), rest
    for p in pair.procs:
        assert p.wait(timeout=60) == 0, (pair.log(), pair.log(1))
    assert "process 0 stopped the server" in pair.log(1)


def test_a_lost_worker_fails_requests_health_and_process_0(checkpoint, cache, tmp_path):
    """A worker killed mid-stream: the stream ends with an error, /health turns 503 and process 0
    exits 3, within --worker-timeout and the flush after it."""
    timeout = 3
    pair = Server(checkpoint, tmp_path / "logs", cache, 2, "--worker-timeout", str(timeout))
    try:
        pair.wait_ready()
        with httpx.stream("POST", f"{pair.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": NAME, "messages": HELLO, "max_tokens": 70, "stream": True,
                                "temperature": 0.0, "stop": []}, timeout=60) as r:  # fmt: skip
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            pair.procs[1].kill()
            killed = time.monotonic()
            rest = list(lines)
        assert '"error"' in "".join(rest) and '"finish_reason": "length"' not in "".join(rest), rest
        statuses = []
        while pair.procs[0].poll() is None and time.monotonic() - killed < 60:
            with contextlib.suppress(httpx.TransportError):
                statuses.append(httpx.get(f"{pair.url}/health", timeout=2).status_code)
            time.sleep(0.2)
        exited = time.monotonic() - killed
        assert pair.procs[0].returncode == 3, pair.log()
        assert exited < timeout + 6, exited
        # the first to tell: a collective failing on process 0, or the worker's missing heartbeat
        assert 503 in statuses and "multi-host server cannot go on" in pair.log()
    finally:
        pair.stop()


def test_a_worker_with_another_model_ends_the_group_at_once(checkpoint, cache, tmp_path):
    """Hosts started with different layouts (here: unrolled layers on the worker): the worker
    refuses process 0's settings and exits 1 at once, not after JAX's shutdown barrier; process 0
    notices (its collective fails, or the heartbeat stops) and exits non-zero, nothing served."""
    pair = Server(checkpoint, tmp_path / "logs", cache, 2, "--worker-timeout", "3", worker_flags=("--no-scan-layers",))
    try:
        assert pair.procs[1].wait(timeout=120) == 1, pair.log(1)
        exited = time.monotonic()
        assert pair.procs[0].wait(timeout=30) != 0, pair.log()
        assert time.monotonic() - exited < 3 + 6
        assert "serves another model or layout than this process" in pair.log(1) and "serving '" not in pair.log()
    finally:
        pair.stop()


def test_published_calls_carry_plans_and_nothing_else():
    """Workers unpickle what the unauthenticated store holds: the runner's plans round-trip,
    anything else is refused before it is built."""
    fill = Fill(prompt=(1, 2, 3), rows=(0, 1), tables=((0,), (1,)), max_new=5, allowed_W=np.full(13, -1, np.int32),
                settings=((SamplingParams(temperature=0.5, seed=3, logit_bias={1: 2.0}, stop=["x"]), 0),) * 2)  # fmt: skip
    verify = Verify(rows=(0,), b=1, top_k=0, drafts_bK=np.zeros((1, 3), np.int32), tables_bJ=np.zeros((1, 2), np.int32),
                    allowed_bTW=np.full((1, 4, 13), -1, np.int32)[:, ::-1])  # fmt: skip
    call, (plan,) = multihost._unpack(multihost._pack(("admit", (Prefill(calls=((fill,),), shapes=((1, 16, 0),)),))))
    assert call == "admit" and plan.calls[0][0].settings == fill.settings
    _, (back,) = multihost._unpack(multihost._pack(("launch", (verify,))))
    np.testing.assert_array_equal(back.allowed_bTW, verify.allowed_bTW)
    assert multihost._unpack(multihost._pack(({"speculation": Speculation()}, "fp"))) == ({"speculation": Speculation()}, "fp")

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    with pytest.raises(pickle.UnpicklingError, match="may not hold"):
        multihost._unpack(multihost._pack(("launch", (Payload(),))))
