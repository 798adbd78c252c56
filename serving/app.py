"""The OpenAI-compatible HTTP API (Quart) over the continuous-batching engine.

Routes: chat completions and completions (each under /v1 and /v1/openai), models, /health,
/metrics (Prometheus) and /openapi.json. Every error is OpenAI's `{"error": {...}}` shape.
`app.config["DRAINING"] = True` (set on SIGTERM by __main__) refuses new generation requests with
503 while those in flight finish; so does `app.config["FAILED"]`, a reason (a multi-host server
whose worker process is lost), for good, with /health saying why; `app.asgi_app.open` counts them, from the first byte of a
request to the last byte of its answer (streams included).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import ValidationError
from quart import Quart, Response, request
from quart_schema import QuartSchema, document_request
from werkzeug.exceptions import HTTPException

from codellama_jax import generation, tools
from codellama_jax.engine import DRAINING, Chunk, Engine, EngineStopped, Handle, QueueFull
from codellama_jax.errors import ContextLengthExceeded, RequestError
from codellama_jax.loader import Model

from . import protocol
from .protocol import ChatCompletionRequest, CompletionRequest, Message, ProtocolError, Strict

log = logging.getLogger("codellama_jax.serving")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    prices: tuple[float, float] = (0.0, 0.0)  # USD per million prompt / completion tokens
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 2**20
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed to call the API (CORS); "*" for any


class Metrics:
    """Prometheus series of one server (its own registry)."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("codellama_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("codellama_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("codellama_completion_tokens", "tokens generated", registry=r)
        Gauge("codellama_queue_depth", "requests waiting for a slot", registry=r).set_function(lambda: engine.queue_depth)
        Gauge("codellama_slots_in_use", "decode slots busy", registry=r).set_function(lambda: engine.slots_in_use)
        Gauge("codellama_slots", "decode slots", registry=r).set(engine.max_batch)
        r.register(_SchedulerCollector(engine))
        self.ttft = Histogram("codellama_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))  # fmt: skip
        self.tokens_per_second = Histogram("codellama_output_tokens_per_second", "decode speed per request",
                                           registry=r, buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000))  # fmt: skip


class _SchedulerCollector:
    """The scheduler's own figures, read when scraped: KV cache blocks, sequences running and
    waiting, preemptions, prefix cache lookups and hits (in tokens), speculative drafts and their
    tokens proposed and accepted."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        for name, text in (("kv_cache_blocks", "KV cache blocks"), ("kv_cache_blocks_used", "KV cache blocks held"),
                           ("sequences_running", "sequences decoding"), ("sequences_waiting", "sequences waiting for a row")):  # fmt: skip
            yield GaugeMetricFamily(f"codellama_{name}", text, value=stats[name])
        counters = (
            ("preemptions", "sequences preempted (KV cache full), prefilled again later"),
            ("prefix_cache_queried_tokens", "prompt tokens looked up in the prefix cache"),
            ("prefix_cache_hit_tokens", "prompt tokens found in the prefix cache (not prefilled)"),
            ("speculative_drafts", "drafts verified (speculative decoding)"),
            ("speculative_draft_tokens", "tokens proposed in drafts"),
            ("speculative_accepted_tokens", "draft tokens accepted (each one a forward pass saved)"),
        )
        for name, text in counters:
            yield CounterMetricFamily(f"codellama_{name}", text, value=stats[name])


def create_app(model: Model, engine: Engine, config: ServerConfig) -> Quart:
    """The Quart app; the engine must be started by whoever runs the app."""
    app = Quart("codellama_jax.serving")
    app.config.update(MAX_CONTENT_LENGTH=config.max_body_bytes, RESPONSE_TIMEOUT=None, BODY_TIMEOUT=60, DRAINING=False,
                      FAILED=None)
    QuartSchema(app, openapi_path="/openapi.json", info={"title": "codellama-jax", "version": "1"},
                redoc_ui_path=None, scalar_ui_path=None, swagger_ui_path=None)  # fmt: skip
    metrics = Metrics(engine)
    started = protocol.now()
    app.asgi_app = OpenRequests(app.asgi_app)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    lanes = [ThreadPoolExecutor(max(1, cores // 2), thread_name_prefix=f"codellama-{kind}") for kind in ("small", "large")]

    async def off_loop(fn, *args):
        """A request's CPU work (reading the body, templates, tokenizers, grammars) off the event
        loop, so that streams keep flowing: in one of two lanes of half the cores each, one for
        bodies over LARGE_BODY, so that small requests never wait behind large ones."""
        lane = lanes[(request.content_length or 0) > LARGE_BODY]
        return await asyncio.get_running_loop().run_in_executor(lane, fn, *args)

    def fail(status: int, message: str, retry_after: int | None = None, **fields) -> Response:
        response = Response(json.dumps(protocol.error_body(message, **fields)), status=status, content_type="application/json")
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        return response

    def allowed_origin() -> str | None:
        origin = request.headers.get("Origin")
        return origin if origin and ("*" in config.allowed_origins or origin in config.allowed_origins) else None

    @app.before_request
    async def admit():
        """CORS preflights first (browsers send them without keys); then API keys on every /v1
        route; while draining, no new generation; bodies must say they are JSON."""
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method") and allowed_origin():
            response = Response("", status=204)
            response.headers.update({
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers", "authorization, content-type"),
                "Access-Control-Max-Age": "600",
            })  # fmt: skip
            return response
        if not request.path.startswith("/v1"):
            return None
        if config.api_keys:
            scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
            token = token.strip() if scheme.lower() == "bearer" else ""
            if not any([hmac.compare_digest(token.encode(), key.encode()) for key in config.api_keys]):
                return fail(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if (app.config["DRAINING"] or app.config["FAILED"]) and request.method == "POST":
            return fail(503, app.config["FAILED"] or DRAINING, retry_after=5, type="server_error", code="unavailable")
        if request.method == "POST":
            if request.mimetype != "application/json":
                return fail(400, f"the body must be JSON sent with 'Content-Type: application/json' (got "
                            f"{request.mimetype or 'no Content-Type'!r})")  # fmt: skip
        return None

    @app.after_request
    async def count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unknown"
        metrics.requests.labels(route, str(response.status_code)).inc()
        if origin := allowed_origin():
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "Retry-After"
            response.vary.add("Origin")
        return response

    @app.errorhandler(ProtocolError)
    async def refused(e: ProtocolError):
        return fail(e.status, e.message, e.retry_after, param=e.param, code=e.code, type=e.type)

    @app.errorhandler(RequestError)
    async def unservable(e: RequestError):
        prompt_field = "messages" if request.path.endswith("chat/completions") else "prompt"
        param = e.param if not isinstance(e, ContextLengthExceeded) else prompt_field
        return fail(400, str(e), param=param, code=e.code)

    @app.errorhandler(HTTPException)
    async def http_error(e: HTTPException):
        messages = {413: "request body too large", 404: f"no route {request.path} (the API is described at /openapi.json)",
                    405: f"{request.method} is not allowed on {request.path}"}  # fmt: skip
        return fail(e.code or 500, messages.get(e.code, e.description or e.name))

    @app.errorhandler(Exception)
    async def internal(e: Exception):
        request_id = uuid.uuid4().hex
        log.exception("internal error, request id %s", request_id)
        return fail(500, f"internal server error (request id {request_id})", type="server_error", code="internal_error")

    def check_model(name: str) -> None:
        if name != config.served_model_name:
            raise ProtocolError(f"the model {name!r} does not exist; this server serves {config.served_model_name!r}",
                                param="model", status=404, code="model_not_found")  # fmt: skip

    def submit(prompts: list[list[int]], body, grammar, offered) -> list[Handle]:
        """Every prompt's `n` handles, in choice order; none if one of them cannot be served."""
        params = body.sampling()
        handles: list[Handle] = []
        try:
            for ids in prompts:
                handles += engine.submit(ids, params, grammar, offered)
        except BaseException as e:
            for h in handles:
                h.cancel()
            if isinstance(e, QueueFull):
                raise ProtocolError(str(e), status=429, type="rate_limit_error", code="rate_limit_exceeded",
                                    retry_after=1) from None  # fmt: skip
            if isinstance(e, EngineStopped):
                raise _unavailable(e) from None
            raise
        return handles

    async def respond(body, prompts: list[list[int]], kind: str, grammar=None, offered: tools.Tools | None = None) -> Response:
        """Runs a request through the engine and answers it whole or as a stream."""
        start = time.perf_counter()
        handles = submit(prompts, body, grammar, offered)
        prompt_tokens = sum(map(len, prompts))
        if body.stream:
            return stream_response(body, prompt_tokens, handles, kind, start, offered)
        try:
            results = await asyncio.gather(*(collect(h, start) for h in handles))
        except EngineStopped as e:  # shut down before this request finished
            raise _unavailable(e) from None
        finally:
            for h in handles:
                h.cancel()
        completion_tokens = sum(chunks[-1].completion_tokens for chunks in results)
        cached_tokens = sum(chunks[-1].cached_tokens for chunks in results[:: body.n])  # a prompt's samples share it
        record(body, prompt_tokens, completion_tokens, start, kind)
        if kind == "chat":
            choices = [
                {"index": i, **_chat_message("".join(c.text for c in chunks), chunks[-1].finish_reason, offered),
                 "logprobs": protocol.chat_logprobs(_logprobs(chunks))}
                for i, chunks in enumerate(results)
            ]  # fmt: skip
        else:
            choices = [
                {"index": i, "text": "".join(c.text for c in chunks),
                 "logprobs": protocol.TextLogprobs()(_logprobs(chunks)), "finish_reason": chunks[-1].finish_reason}
                for i, chunks in enumerate(results)
            ]  # fmt: skip
        return Response(json.dumps({
            "id": protocol.new_id("chatcmpl" if kind == "chat" else "cmpl"),
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": protocol.now(), "model": config.served_model_name, "choices": choices,
            "usage": protocol.usage(prompt_tokens, completion_tokens, cached_tokens, config.prices),
        }), content_type="application/json")  # fmt: skip

    async def collect(handle: Handle, start: float) -> list[Chunk]:
        chunks = []
        async for chunk in handle:
            if not chunks:
                metrics.ttft.observe(time.perf_counter() - start)
            chunks.append(chunk)
        return chunks

    def stream_response(body, prompt_tokens: int, handles: list[Handle], kind: str, start: float, offered) -> Response:
        ident, created = protocol.new_id("chatcmpl" if kind == "chat" else "cmpl"), protocol.now()
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def event(choices: list[dict], **extra) -> str:
            payload = {"id": ident, "object": obj, "created": created, "model": config.served_model_name,
                       "choices": choices, **({"usage": None} if body.include_usage else {}), **extra}  # fmt: skip
            return f"data: {json.dumps(payload)}\n\n"

        text_logprobs = [protocol.TextLogprobs() for _ in handles]
        parsers = [tools.ToolCallParser() if offered is not None else None for _ in handles]

        def pieces(index: int, text: str = "", logprobs=None, reason: str | None = None, first: bool = False,
                   calls: list[tools.CallDelta] = ()) -> list[dict]:  # fmt: skip
            """This part of a choice as choice objects, each its own event: a chat delta carries
            at most one call's part, as OpenAI's do."""
            if kind == "text":
                return [{"index": index, "text": text, "logprobs": text_logprobs[index](logprobs), "finish_reason": reason}]
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            deltas = ([delta] if delta else []) + [{"tool_calls": [protocol.tool_call_delta(c)]} for c in calls]
            out = [{"index": index, "delta": d, "logprobs": None, "finish_reason": None} for d in deltas or [{}]]
            out[0]["logprobs"] = protocol.chat_logprobs(logprobs)
            out[-1]["finish_reason"] = reason
            return out

        async def events() -> AsyncIterator[str]:
            completion_tokens, cached_tokens = [0] * len(handles), [0] * len(handles)
            try:
                if kind == "chat":
                    for i in range(len(handles)):
                        yield event(pieces(i, first=True))
                first = True
                async for index, chunk in _interleave(handles):
                    if first:
                        metrics.ttft.observe(time.perf_counter() - start)
                        first = False
                    if isinstance(chunk, BaseException):
                        (log.warning if isinstance(chunk, EngineStopped) else log.error)("stream %s ended: %s", ident, chunk)
                        refused = isinstance(chunk, RequestError)  # the request's own doing (its grammar)
                        error = protocol.error_body(str(chunk), type="invalid_request_error" if refused else "server_error",
                                                    param=chunk.param if refused else None)  # fmt: skip
                        yield f"data: {json.dumps(error)}\n\n"
                        break
                    completion_tokens[index], cached_tokens[index] = chunk.completion_tokens, chunk.cached_tokens
                    text, calls, reason, parser = chunk.text, [], chunk.finish_reason, parsers[index]
                    if parser is not None:  # a tools answer: content and call deltas
                        text, calls = parser.push(text)
                        if reason:
                            text += parser.finish()
                            reason = tools.finish_reason(reason, parser)
                    if text or calls or chunk.logprobs:
                        for piece in pieces(index, text, chunk.logprobs, calls=calls):
                            yield event([piece])
                    if reason:  # its own last event, with an empty delta
                        yield event(pieces(index, reason=reason))
                if body.include_usage:
                    usage = protocol.usage(prompt_tokens, sum(completion_tokens), sum(cached_tokens[:: body.n]), config.prices)
                    yield event([], usage=usage)
                yield "data: [DONE]\n\n"
                record(body, prompt_tokens, sum(completion_tokens), start, kind)
            finally:  # also when the client goes away: the slots are freed at the next step
                for h in handles:
                    h.cancel()

        response = Response(events(), content_type="text/event-stream")
        response.headers["Cache-Control"] = "no-cache"
        response.timeout = None
        return response

    def record(body, prompt_tokens: int, completion_tokens: int, start: float, kind: str) -> None:
        seconds = time.perf_counter() - start
        metrics.prompt_tokens.inc(prompt_tokens)
        metrics.completion_tokens.inc(completion_tokens)
        if completion_tokens and seconds > 0:
            metrics.tokens_per_second.observe(completion_tokens / seconds)
        user = hashlib.sha256(body.user.encode()).hexdigest()[:12] if body.user else "-"
        log.info("%s n=%d prompt=%d completion=%d %.3fs stream=%s user=%s",
                 kind, body.n, prompt_tokens, completion_tokens, seconds, body.stream, user)  # fmt: skip

    @app.post("/v1/chat/completions")
    @app.post("/v1/openai/chat/completions")
    @document_request(ChatCompletionRequest)
    async def chat_completions():
        data = await off_loop(_read, ChatCompletionRequest, await request.get_data())
        check_model(data.model)
        data.check()

        def prepare():
            offered = data.offered_tools()
            ids = generation.prompt_ids(model, data.chat_messages(), offered, limit=engine.max_len)
            return offered, ids, generation.output_grammar(model, data.response_format, offered)

        offered, prompt_ids, grammar = await off_loop(prepare)
        return await respond(data, [prompt_ids], "chat", grammar, offered)

    @app.post("/v1/completions")
    @app.post("/v1/openai/completions")
    @document_request(CompletionRequest)
    async def completions():
        data = await off_loop(_read, CompletionRequest, await request.get_data())
        check_model(data.model)
        data.check()

        prompts = data.prompts()
        if len(prompts) > engine.max_queue:  # each prompt waits in the queue as a request of its own
            raise ProtocolError(f"{len(prompts)} prompts in one request; this server queues at most {engine.max_queue}",
                                param="prompt")  # fmt: skip

        def prepare():
            return [generation.prompt_ids(model, p, limit=engine.max_len, suffix=data.suffix) for p in prompts]

        return await respond(data, await off_loop(prepare), "text")

    @app.get("/v1/models")
    @app.get("/v1/openai/models")
    async def models():
        entry = {"id": config.served_model_name, "object": "model", "created": started, "owned_by": "codellama-jax"}
        return {"object": "list", "data": [entry]}

    @app.get("/health")
    async def health():
        failed, draining = app.config["FAILED"], app.config["DRAINING"]
        body = {"status": "failed" if failed else "draining" if draining else "ok", "model": config.served_model_name,
                "slots": engine.max_batch, "slots_in_use": engine.slots_in_use, "queue_depth": engine.queue_depth,
                "kv_cache_blocks_free": engine.stats()["kv_cache_blocks_free"]}  # fmt: skip
        if failed:
            body["error"] = failed
        return body, 503 if failed or draining else 200

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), content_type="text/plain; version=0.0.4")

    return app


class OpenRequests:
    """ASGI middleware: how many generation requests (POST /v1/...) are being answered, so that a
    drain waits for them all, including those still tokenizing or streaming their last events."""

    def __init__(self, app):
        self.app, self.open = app, 0

    async def __call__(self, scope, receive, send):
        counted = scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith("/v1")
        self.open += counted
        try:
            await self.app(scope, receive, send)
        finally:
            self.open -= counted


MAX_JSON_DEPTH = 256
LARGE_BODY = 64 * 2**10
UNIONS = {"content", "prompt", "stop", "tool_choice"}  # fields whose errors pydantic locates in a union member


def _read(model_class: type[Strict], body: bytes) -> Strict:
    """The body as a request model, or a ProtocolError naming the field at fault. Messages are
    validated one by one, so that a body of many bad ones fails at the first, and the work
    (done off the event loop) lets go of the GIL between them."""
    value = _json_object(body)
    try:
        if model_class is ChatCompletionRequest and isinstance(value.get("messages"), list):
            for i, message in enumerate(value["messages"]):
                try:
                    value["messages"][i] = Message.model_validate(message)
                except ValidationError as e:
                    raise _invalid(e, ("messages", i)) from None
        return model_class.model_validate(value)
    except ValidationError as e:
        raise _invalid(e) from None


def _invalid(e: ValidationError, where: tuple = ()) -> ProtocolError:
    """pydantic's first complaint as a 400 naming its field (a dotted path, union members left out)."""
    first = e.errors(include_url=False)[0]
    loc = (*where, *first["loc"])
    param = ".".join(str(p) for i, p in enumerate(loc) if not (i and loc[i - 1] in UNIONS and isinstance(p, str)))
    return ProtocolError(f"{param}: {first['msg']}" if param else first["msg"], param=param or None)


def _json_object(body: bytes) -> dict:
    """The body's JSON object; a ProtocolError says what makes it unreadable: invalid UTF-8 or
    JSON, not an object, nested deeper than MAX_JSON_DEPTH, a string with a lone surrogate (no
    tokenizer can encode it)."""

    def malformed(problem: str) -> ProtocolError:
        return ProtocolError(f"malformed request body: {problem}")

    try:
        value = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise malformed(f"not valid UTF-8 at byte {e.start}") from None
    except RecursionError:
        raise malformed(f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:
        raise malformed(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise malformed(f"the body must be a JSON object, got {type(value).__name__}")
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise malformed(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            pending += [(x, depth + 1) for x in (*item.keys(), *item.values())]
        elif isinstance(item, list):
            pending += [(x, depth + 1) for x in item]
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise malformed("a string holds a lone UTF-16 surrogate (\\ud800-\\udfff)") from None
    return value


def _unavailable(e: EngineStopped) -> ProtocolError:
    return ProtocolError(str(e), status=503, type="server_error", code="unavailable", retry_after=5)


def _chat_message(text: str, reason: str, offered: tools.Tools | None) -> dict:
    """A whole answer's `message` and `finish_reason`: with tools, its calls taken out of the text."""
    answer = tools.parse(text) if offered is not None else None
    if answer is None or not answer.calls:
        message = {"role": "assistant", "content": answer.content if answer else text, "refusal": None}
        return {"message": message, "finish_reason": reason}
    message = {"role": "assistant", "content": answer.content or None, "refusal": None,
               "tool_calls": protocol.tool_calls(answer.calls)}  # fmt: skip
    return {"message": message, "finish_reason": tools.finish_reason(reason, answer)}


def _logprobs(chunks: list[Chunk]) -> list | None:
    if chunks[0].logprobs is None:
        return None
    return [lp for c in chunks for lp in (c.logprobs or [])]


async def _interleave(handles: list[Handle]) -> AsyncIterator[tuple[int, Any]]:
    """(index, chunk) from all handles as they arrive; an exception is passed on as a value."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle: Handle):
        try:
            async for chunk in handle:
                await queue.put((index, chunk))
        except Exception as e:
            await queue.put((index, e))
        await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
