"""`codellama-serve`: the OpenAI-compatible server on a model, with the demo model by default."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path


from codellama_jax import buckets, demo_model
from codellama_jax.checkpoint import FORMAT_FILE
from codellama_jax.speculative import Speculation

ENV_API_KEYS = "CODELLAMA_API_KEYS"
LISTEN_BACKLOG = 1024
DEFAULT_CACHE = Path(os.environ.get("CODELLAMA_CACHE", Path.home() / ".cache" / "codellama-jax"))

log = logging.getLogger("codellama_jax.serving")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="codellama-serve",
        description="Serve a Llama-family model over the OpenAI chat-completions API (continuous batching).",
    )
    parser.add_argument("--model", help="converted checkpoint dir, HF checkpoint dir or .gguf file "
                        f"(default: the SmolLM2-135M-Instruct demo GGUF, fetched once into {DEFAULT_CACHE})")  # fmt: skip
    parser.add_argument("--served-model-name", help="the name clients send as 'model' (default: the checkpoint's name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--max-batch", type=int, default=8, help="decode slots: requests generated at once (default 8)")
    parser.add_argument("--max-len", type=int, help="tokens per request, prompt and output (default: the context)")
    parser.add_argument("--block-size", type=int, default=16, help="positions per KV cache block (default 16)")
    parser.add_argument("--kv-cache-memory", metavar="SIZE",
                        help="memory of the KV cache on each device: bytes (e.g. 24GiB) or a fraction of what the "
                        "devices have free after loading the weights (e.g. 0.9; not on CPU); default: room for "
                        "every slot at --max-len")  # fmt: skip
    parser.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                        help="prefill every prompt whole, even when an earlier one began alike (default: reuse the "
                        "cached keys and values of the longest shared prefix)")  # fmt: skip
    parser.add_argument("--prefill-chunk", type=int, default=512, metavar="TOKENS",
                        help="prompt tokens prefilled per step, between decode steps: a longer prompt is prefilled in "
                        "chunks so that decoding requests keep streaming (default 512)")  # fmt: skip
    parser.add_argument("--decode-attention", choices=["auto", "reference"], default="auto",
                        help="decode attention over the paged cache: auto (JAX's Pallas paged-attention kernel on one "
                        "GPU or TPU, the pure-JAX reference elsewhere) or reference (always; default auto)")  # fmt: skip
    parser.add_argument("--speculative", choices=["ngram", "off"], default="ngram",
                        help="speculative decoding: ngram (prompt lookup: while few rows run, a row whose recent tokens "
                        "occurred before gets the tokens that followed them as a draft, verified in one forward pass; "
                        "under a grammar, the tokens it forces) or off (default ngram)")  # fmt: skip
    parser.add_argument("--num-speculative-tokens", type=int, default=Speculation.num_tokens, metavar="K",
                        help="tokens per draft (default %(default)s)")
    parser.add_argument("--ngram-min", type=int, default=Speculation.ngram_min, metavar="N",
                        help="shortest recurring suffix that makes a draft (default %(default)s)")
    parser.add_argument("--ngram-max", type=int, default=Speculation.ngram_max, metavar="N",
                        help="longest suffix matched: the longest match picks which earlier occurrence is copied "
                        "(default %(default)s)")  # fmt: skip
    parser.add_argument("--speculative-max-rows", type=int, default=Speculation.max_rows, metavar="ROWS",
                        help="speculate only while at most this many rows decode: a larger batch's step is closer to "
                        "compute-bound (default %(default)s)")  # fmt: skip
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429 (default 64)")
    parser.add_argument("--mesh", help="DATAxMODEL device mesh, e.g. 1x8 (default: one device)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on accelerators, float32 on CPU")
    parser.add_argument("--quantize", choices=["int8"], help="int8 weights with a float32 scale per output channel (half the bytes of bfloat16)")
    parser.add_argument("--no-scan-layers", dest="scan_layers", action="store_false",
                        help="unroll the layers, each with its own weights: on CPU decoding is faster "
                             "(~6-8%% here) and compiling several times slower; not with int8")  # fmt: skip
    parser.add_argument("--price-input", type=float, default=0.0, help="USD per million prompt tokens, for usage.estimated_cost")
    parser.add_argument("--price-output", type=float, default=0.0, help="USD per million completion tokens")
    parser.add_argument("--drain-timeout", type=float, default=20.0,
                        help="on SIGTERM/SIGINT: seconds to let requests in flight finish (new ones get 503) before "
                        "the rest are ended and the process exits 0 (default 20; with 5 s to flush, inside "
                        "Kubernetes' default 30 s grace period)")  # fmt: skip
    parser.add_argument("--api-key-file", type=Path, help=f"file with API keys, one per line (also: ${ENV_API_KEYS}, comma-separated); "
                        "with keys set every /v1 route needs 'Authorization: Bearer <key>'")  # fmt: skip
    parser.add_argument("--compile-cache", default=str(buckets.DEFAULT_CACHE_DIR), metavar="DIR",
                        help="keep compiled programs here, so a restart compiles nothing compiled before; 'none' turns "
                        "it off (default: %(default)s)")  # fmt: skip
    parser.add_argument("--allowed-origins", default="", metavar="ORIGINS",
                        help="comma-separated browser origins (e.g. https://app.example.com, or *) allowed to call the "
                        "API from a web page (CORS); default: none")  # fmt: skip
    args = parser.parse_args(argv)
    for flag in ("max_batch", "block_size", "prefill_chunk"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    try:  # checked even when off: a bad setting is a mistake either way
        speculation = Speculation(args.num_speculative_tokens, args.ngram_min, args.ngram_max, args.speculative_max_rows)
    except ValueError as e:
        parser.error(str(e))
    args.speculation = None if args.speculative == "off" else speculation
    return args


def claim(host: str, port: int) -> socket.socket:
    """The server's socket, listening before anything slow happens: a port in use is an error
    within seconds, not after loading, and no second server takes it meanwhile (an OSError names
    the address). Connections that arrive while the model loads wait until it is served."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def url(sock: socket.socket) -> str:
    """Where a listening socket is served (IPv6 hosts in brackets; the real port, even for --port 0)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def api_keys(key_file: Path | None) -> tuple[str, ...]:
    keys = [k.strip() for k in os.environ.get(ENV_API_KEYS, "").split(",")]
    if key_file is not None:
        keys += [line.strip() for line in key_file.read_text().splitlines()]
    return tuple(k for k in keys if k)


def served_name(path: Path) -> str:
    """The checkpoint's own name: its directory (or the converted checkpoint's source), or the
    GGUF's stem; the demo model's Hugging Face name."""
    if path.name == demo_model.FILENAME:
        return demo_model.NAME
    format_file = path / FORMAT_FILE
    if format_file.is_file():
        path = Path(json.loads(format_file.read_text()).get("source") or path)
    return path.stem if path.suffix == ".gguf" else path.name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    package_log = logging.getLogger("codellama_jax")  # the server's and the engine's lines
    package_log.addHandler(handler)
    package_log.setLevel(logging.INFO)
    package_log.propagate = False
    try:
        sock = claim(args.host, args.port)
        return asyncio.run(_serve(args, sock))
    except (OSError, ValueError) as e:
        print(f"codellama-serve: error: {e}", file=sys.stderr)
        return 1


async def _serve(args: argparse.Namespace, sock: socket.socket) -> int:
    import jax
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from codellama_jax import load, make_mesh
    from codellama_jax.plan import kv_blocks
    from codellama_jax.engine import Engine

    from .app import ServerConfig, create_app

    signalled = asyncio.Event()  # a stop asked for while loading or compiling is honoured after it
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled.set)
    keys = api_keys(args.api_key_file)
    path = Path(args.model) if args.model else demo_model.fetch_smollm2(DEFAULT_CACHE / "models")
    mesh = None
    if args.mesh:
        try:
            mesh = make_mesh(tuple(int(n) for n in args.mesh.split("x")))
        except ValueError as e:
            raise ValueError(f"--mesh {args.mesh!r}: {e}") from None
    start = time.perf_counter()
    buckets.use_compile_cache(None if args.compile_cache.lower() == "none" else args.compile_cache)
    interactive = sys.stderr.isatty()  # progress bars for people, plain log lines for log files
    model = load(path, dtype=args.dtype, mesh=mesh, quantize=args.quantize, scan_layers=args.scan_layers,
                 progress=interactive)
    num_blocks = None if args.kv_cache_memory is None else kv_blocks(model, args.kv_cache_memory, args.block_size)
    engine = Engine(model, max_batch=args.max_batch, max_len=args.max_len, max_queue=args.max_queue,
                    num_blocks=num_blocks, block_size=args.block_size, prefix_caching=args.prefix_caching,
                    prefill_chunk=args.prefill_chunk, decode_attention=args.decode_attention,
                    speculation=args.speculation)  # fmt: skip
    origins = tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip())
    config = ServerConfig(args.served_model_name or served_name(path), (args.price_input, args.price_output), keys,
                          allowed_origins=origins)  # fmt: skip
    app = create_app(model, engine, config)
    try:
        weights = sum(x.nbytes for x in jax.tree.leaves(model.params))
        log.info("loaded %s in %.1fs: %.2fB parameters, %.2f GiB on %d device(s); compiling", path,
                 time.perf_counter() - start, model.config.num_params / 1e9, weights / 2**30, model.mesh.size)  # fmt: skip
        # every shape up to --max-len (buckets.py), before the first request; a stop signal cuts it short
        await asyncio.to_thread(engine.warm_up, signalled.is_set)
        engine.start()
        log.info("ready in %.1fs (compile cache: %s)", time.perf_counter() - start, args.compile_cache)
        if signalled.is_set():
            return 0
        hyper = Config()
        hyper.accesslog = None
        hyper.backlog = LISTEN_BACKLOG
        hyper.graceful_timeout = 5  # for responses to flush once the engine is done
        address = url(sock)
        hyper.bind = [f"fd://{sock.detach()}"]  # hypercorn owns the socket from here
        shutdown = asyncio.Event()
        server = asyncio.create_task(serve(app, hyper, shutdown_trigger=shutdown.wait))
        scheduler = engine.scheduler
        spec = args.speculation
        log.info("serving %r on %s (%d slots, %d KV cache blocks of %d tokens, decode attention: %s, speculative: %s, %s)",
                 config.served_model_name, address, engine.max_batch, scheduler.pool.num_blocks,
                 scheduler.pool.block_size, scheduler.runner.kernel,
                 f"ngram, {spec.num_tokens} tokens, up to {spec.max_rows} rows" if spec else "off",
                 "API keys required" if keys else "no API keys")  # fmt: skip
        await asyncio.wait([server, asyncio.create_task(signalled.wait())], return_when=asyncio.FIRST_COMPLETED)
        if not server.done():
            await drain(app, engine, args.drain_timeout)
            shutdown.set()
        await server
    finally:
        await asyncio.to_thread(engine.stop)
    return 0


async def drain(app, engine, timeout: float) -> None:
    """New generation requests, and those still waiting for a slot, get 503 while those decoding
    (from their first byte to their answer's last) finish, for up to `timeout` seconds; whatever
    is left then ends with an error (503, or an error event in a stream)."""
    app.config["DRAINING"] = True
    engine.drain()  # requests still waiting for a slot are answered at once
    requests = app.asgi_app  # serving.app.OpenRequests
    log.info("draining: %d requests in flight; waiting up to %.0fs", requests.open, timeout)
    deadline = time.monotonic() + timeout
    while requests.open and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if requests.open:
        log.warning("drain timeout: ending %d requests", requests.open)
    await asyncio.to_thread(engine.stop)
    log.info("drained; stopping")


if __name__ == "__main__":
    sys.exit(main())
