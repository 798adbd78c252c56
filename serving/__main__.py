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


from codellama_jax import buckets, demo_model, distributed
from codellama_jax.checkpoint import FORMAT_FILE
from codellama_jax.speculative import Speculation

HEARTBEAT_SECONDS = 1.0  # multihost.HEARTBEAT_SECONDS, without importing JAX for --help

ENV_API_KEYS = "CODELLAMA_API_KEYS"
LISTEN_BACKLOG = 1024
EXIT_WORKER_LOST = 3  # a multi-host server lost a worker: the orchestrator restarts the group
FLUSH_SECONDS = 2.0  # for the errors of the requests a lost worker ended to reach their clients
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
    multi = parser.add_argument_group(
        "multi-host", "one server over the devices of several hosts (a TPU slice, several GPU hosts): every host runs "
        "the same command, --mesh spanning every host's devices; process 0 serves HTTP and plans each step, the others "
        "run the same device calls")  # fmt: skip
    multi.add_argument("--coordinator", metavar="HOST:PORT", default=os.environ.get(distributed.ENV_COORDINATOR),
                       help=f"process 0's host and a free port for JAX's coordination service (or ${distributed.ENV_COORDINATOR})")
    multi.add_argument("--num-processes", type=int, metavar="N", default=os.environ.get(distributed.ENV_NUM_PROCESSES),
                       help=f"processes in all, one per host (or ${distributed.ENV_NUM_PROCESSES})")
    multi.add_argument("--process-id", type=int, metavar="I", default=os.environ.get(distributed.ENV_PROCESS_ID),
                       help=f"this process's rank, 0 to N-1; 0 serves HTTP (or ${distributed.ENV_PROCESS_ID})")
    multi.add_argument("--multi-host", action="store_true",
                       help="join the other hosts as JAX's own cluster detection finds them (TPU pods, SLURM, Open MPI), "
                       "without the three flags above")  # fmt: skip
    multi.add_argument("--worker-timeout", type=float, default=10.0, metavar="SECONDS",
                       help="process 0: a worker silent (no heartbeat) this long turns /health 503, ends the requests "
                       f"in flight with an error and makes the server exit {EXIT_WORKER_LOST}, for the orchestrator to "
                       "restart the group (default %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    args.multi_host = args.multi_host or any(x is not None for x in (args.coordinator, args.num_processes, args.process_id))
    if args.worker_timeout < 2 * HEARTBEAT_SECONDS:
        parser.error(f"--worker-timeout must be at least {2 * HEARTBEAT_SECONDS:g} s (two heartbeats), got {args.worker_timeout}")
    if args.multi_host and not args.mesh:
        parser.error("a multi-host server needs --mesh over every host's devices, e.g. 1x16 for 4 hosts of 4 chips")
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
        # the port is claimed at once when this process will serve; a rank from JAX's cluster
        # detection is known only once joined (a worker serves no HTTP)
        sock = claim(args.host, args.port) if not args.multi_host or args.process_id == 0 else None
        if args.multi_host:
            distributed.initialize(args.coordinator, args.num_processes, args.process_id)
            return _multi_host(args, sock)
        return asyncio.run(_serve(args, sock))
    except (OSError, ValueError) as e:
        print(f"codellama-serve: error: {e}", file=sys.stderr)
        return 1


def _load(args: argparse.Namespace):
    """The model on `--mesh`, with the compile cache on: what every process of a server does alike."""
    from codellama_jax import load, make_mesh

    path = Path(args.model) if args.model else demo_model.fetch_smollm2(DEFAULT_CACHE / "models")
    mesh = None
    if args.mesh:
        try:
            mesh = make_mesh(tuple(int(n) for n in args.mesh.split("x")))
        except ValueError as e:
            raise ValueError(f"--mesh {args.mesh!r}: {e}") from None
    buckets.use_compile_cache(None if args.compile_cache.lower() == "none" else args.compile_cache)
    interactive = sys.stderr.isatty()  # progress bars for people, plain log lines for log files
    model = load(path, dtype=args.dtype, mesh=mesh, quantize=args.quantize, scan_layers=args.scan_layers,
                 progress=interactive)
    return path, model


def _multi_host(args: argparse.Namespace, sock: socket.socket | None) -> int:
    """One process of a multi-host server. Any failure ends it at once: JAX's exit would wait at
    a barrier for the others (up to its shutdown timeout) while they wait in a collective, or for
    a call, from this one."""
    import jax

    try:
        if jax.process_index() != 0:
            return _follow(args)
        return asyncio.run(_serve(args, sock or claim(args.host, args.port)))
    except BaseException as e:
        if isinstance(e, (OSError, ValueError)):
            print(f"codellama-serve: error: {e}", file=sys.stderr)
        else:
            log.exception("process %d of the multi-host server failed", jax.process_index())
        sys.stderr.flush()
        os._exit(1)


def _fingerprint(args: argparse.Namespace, model) -> str:
    """What every process of a multi-host server must load alike (their paths may differ)."""
    return (f"{model.config}, mesh {dict(model.mesh.shape)}, {model.module.dtype}, quantize {args.quantize}, "
            f"scan_layers {args.scan_layers}")  # fmt: skip


def _follow(args: argparse.Namespace) -> int:
    """A worker of a multi-host server: its share of the model, then the runner calls process 0
    publishes (multihost.py), until process 0 stops; a SIGTERM or Ctrl-C waits for that (process
    0 drains, its workers running its calls meanwhile)."""
    import jax

    from codellama_jax import multihost
    from codellama_jax.scheduler import Scheduler

    me = f"worker process {jax.process_index()} of {jax.process_count()}"
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: log.info("%s: stops when process 0 does (signal it instead)", me))
    worker = multihost.Worker()
    _, model = _load(args)
    scheduler = Scheduler(model, **worker.setup(_fingerprint(args, model)))
    buckets.warm_up(scheduler, worker.stopping)
    worker.ready()
    log.info("%s: running process 0's calls", me)
    worker.follow(scheduler.runner)
    distributed.shutdown()
    log.info("%s: stopped", me)
    return 0


async def _serve(args: argparse.Namespace, sock: socket.socket) -> int:
    import jax
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from codellama_jax import multihost
    from codellama_jax.plan import kv_blocks
    from codellama_jax.engine import Engine

    from .app import ServerConfig, create_app

    signalled = asyncio.Event()  # a stop asked for while loading or compiling is honoured after it
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled.set)
    keys = api_keys(args.api_key_file)
    start = time.perf_counter()
    leader = multihost.Leader() if jax.process_count() > 1 else None
    made = {}  # the app and the engine once they exist, for _lost
    if leader is not None:  # from now on a worker that dies or fails ends the group
        leader.watch(lambda reason: _lost(reason, **made), args.worker_timeout)
    path, model = _load(args)
    num_blocks = None if args.kv_cache_memory is None else kv_blocks(model, args.kv_cache_memory, args.block_size)
    settings = dict(max_batch=args.max_batch, max_len=args.max_len, num_blocks=num_blocks, block_size=args.block_size,
                    prefix_caching=args.prefix_caching, prefill_chunk=args.prefill_chunk,
                    decode_attention=args.decode_attention, speculation=args.speculation)  # fmt: skip
    if leader is not None:  # the workers build the same scheduler (its runner joins them in collectives)
        leader.setup(settings, _fingerprint(args, model))
    engine = Engine(model, max_queue=args.max_queue, **settings)
    origins = tuple(o.strip() for o in args.allowed_origins.split(",") if o.strip())
    config = ServerConfig(args.served_model_name or served_name(path), (args.price_input, args.price_output), keys,
                          allowed_origins=origins)  # fmt: skip
    app = create_app(model, engine, config)
    made.update(app=app, engine=engine)
    if leader is not None:  # and run what this one plans; any failure ends the group
        leader.attach(engine.scheduler.runner)
        engine.on_failure = lambda e: _lost(f"a device call failed: {e}", app, engine)
    try:
        weights = sum(x.nbytes for x in jax.tree.leaves(model.params))
        log.info("loaded %s in %.1fs: %.2fB parameters, %.2f GiB on %d device(s); compiling", path,
                 time.perf_counter() - start, model.config.num_params / 1e9, weights / 2**30, model.mesh.size)  # fmt: skip
        # every shape up to --max-len (buckets.py), before the first request; a stop signal cuts it short
        await asyncio.to_thread(engine.warm_up, signalled.is_set)
        if leader is not None:
            await asyncio.to_thread(leader.wait_ready, signalled.is_set)
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
        log.info("serving %r on %s (%d slots, %d KV cache blocks of %d tokens, decode attention: %s, speculative: %s, "
                 "%d process(es), %s)", config.served_model_name, address, engine.max_batch, scheduler.pool.num_blocks,
                 scheduler.pool.block_size, scheduler.runner.kernel,
                 f"ngram, {spec.num_tokens} tokens, up to {spec.max_rows} rows" if spec else "off",
                 jax.process_count(), "API keys required" if keys else "no API keys")  # fmt: skip
        await asyncio.wait([server, asyncio.create_task(signalled.wait())], return_when=asyncio.FIRST_COMPLETED)
        if not server.done():
            await drain(app, engine, args.drain_timeout)
            shutdown.set()
        await server
    finally:
        await asyncio.to_thread(engine.stop)
        if leader is not None:
            leader.stop()
            await asyncio.to_thread(distributed.shutdown)
    return 0


def _lost(reason: str, app=None, engine=None) -> None:
    """A worker is gone (`Leader.watch`), or a call failed so that the processes may no longer
    run the same programs: the device calls will never finish right, so every request ends with
    an error and /health says 503 until the process exits, unclean (JAX's shutdown would wait for
    the lost worker), for its orchestrator to restart the group."""
    from codellama_jax.engine import EngineStopped

    try:
        failed = f"this multi-host server cannot go on: {reason}; retry on another replica"
        log.error("%s; ending every request and exiting %d", failed, EXIT_WORKER_LOST)
        if app is not None:  # serving already
            app.config["FAILED"] = failed
            engine.abort(EngineStopped(failed))
            time.sleep(FLUSH_SECONDS)
    finally:
        os._exit(EXIT_WORKER_LOST)


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
