"""Shared fixtures: a SentencePiece model trained here, random tiny HF checkpoints written by
transformers, the real SmolLM2-135M GGUF, and the server running in a background thread."""

from __future__ import annotations

import os

# 8 fake CPU devices for the sharding tests; must be set before jax is first imported
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import asyncio
import contextlib
import json
import random
import socket
import threading
import time
from pathlib import Path

import httpx
import jax
import pytest
import sentencepiece as spm
import torch
import transformers
from hypercorn.asyncio import serve
from hypercorn.config import Config

from codellama_jax.demo_model import fetch_smollm2
from codellama_jax.engine import Engine
from codellama_jax.serving.app import ServerConfig, create_app

REPO = Path(__file__).resolve().parents[1]

CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for i in range(10):\n\tprint(i * 2, end=' ')\n",
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n        self.items.append(x)\n",
    "Numbers like 12345 and 3.14159 are split into digits.",
    "SELECT name, count(*) FROM users WHERE age > 21 GROUP BY name;",
    "Hello world! Hello again, world. How are you today?",
]


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each test module's compiled programs go when it ends: XLA:CPU maps memory for every
    executable, and one process holding the thousands this suite compiles would pass the kernel's
    limit on mappings (vm.max_map_count, 65530) and crash inside a compile."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory) -> Path:
    """A Llama-style SentencePiece BPE model (byte fallback, split digits, `<step>` user-defined)."""
    out = tmp_path_factory.mktemp("sp")
    rng = random.Random(0)
    lines = [rng.choice(CORPUS) for _ in range(400)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(out / "tokenizer"),
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        split_digits=True,
        user_defined_symbols=["<step>"],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    step_id = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).piece_to_id("<step>")
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<s>",
                "eos_token": "</s>",
                "added_tokens_decoder": {str(step_id): {"content": "<step>", "special": True}},
            }
        )
    )
    return out


SP_VOCAB = 400

TINY = dict(
    vocab_size=SP_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def write_hf_checkpoint(directory: Path, sp_dir: Path | None = None, max_shard_size="10GB", **overrides) -> Path:
    """A random `LlamaForCausalLM` saved by transformers (safetensors), with the test tokenizer."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # make the norms non-trivial so their mapping is checked too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if sp_dir is not None:
        for f in ("tokenizer.model", "tokenizer_config.json"):
            (directory / f).write_bytes((sp_dir / f).read_bytes())
    return directory


@pytest.fixture(scope="session")
def tiny_gqa_tied(tmp_path_factory, sp_dir) -> Path:
    return write_hf_checkpoint(
        tmp_path_factory.mktemp("gqa") / "ckpt", sp_dir, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6
    )


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return fetch_smollm2(REPO / ".cache" / "models")


NAME = "codellama/tiny-test"
KEY = "sk-test-key"
PRICES = (2.0, 6.0)


@contextlib.contextmanager
def running_server(model, *, max_batch=4, max_queue=64, start_engine=True, keys=(KEY,), max_body_bytes=2**20,
                   allowed_origins=(), speculation=None):  # fmt: skip
    """The app on a free port in a background thread; yields its base URL, the engine and the
    server's event loop."""
    engine = Engine(model, max_batch=max_batch, max_len=1024, max_queue=max_queue, steps_per_call=2,
                    speculation=speculation)  # fmt: skip
    config = ServerConfig(NAME, PRICES, tuple(keys), max_body_bytes=max_body_bytes, allowed_origins=tuple(allowed_origins))
    app = create_app(model, engine, config)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    loop = asyncio.new_event_loop()
    stop: list[asyncio.Event] = []

    def run():
        asyncio.set_event_loop(loop)
        stop.append(asyncio.Event())
        loop.run_until_complete(serve(app, config, shutdown_trigger=stop[0].wait))

    if start_engine:
        engine.start()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health").status_code == 200:
                break
        time.sleep(0.05)
    try:
        yield url, engine, loop
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(timeout=30)
        if start_engine:
            engine.stop()
