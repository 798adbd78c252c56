"""The chat-completions contract as pydantic models: every input field with its default and range
(../shared/reference/chat-completions-contract.txt, plus OpenAI's logprobs, top_logprobs and
stream_options), strict types, and the response and error shapes clients expect."""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from codellama_jax.generation import TokenLogprob
from codellama_jax.sampling import MAX_SEED, MAX_TOP_LOGPROBS, SamplingParams
from codellama_jax.tools import CallDelta, ToolCall, Tools, parse_tools

MAX_STOP = 16


class Strict(BaseModel):
    """No coercion between types, no NaN or infinity, no unknown fields."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text


class MessageToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None  # only an assistant message with tool_calls may leave it out
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """Fields shared by chat and text completions."""

    model: str
    stream: bool = False
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    min_p: float = Field(0.0, ge=0, le=1)
    top_k: int = Field(0, ge=0, lt=1000)
    max_tokens: int | None = Field(None, ge=0, le=1_000_000)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=4)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, ge=0.01, le=5)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> -100..100
    user: str | None = None
    stream_options: StreamOptions | None = None

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ProtocolError("stream_options is only allowed when stream is true", param="stream_options")

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise ProtocolError(f"stop has {len(stops)} sequences; at most {MAX_STOP} are allowed", param="stop")
        if any(s == "" for s in stops):
            raise ProtocolError("stop sequences must not be empty", param="stop")
        return stops

    def sampling_params(self, *, logprobs: bool, top_logprobs: int) -> SamplingParams:
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.strip().isdigit():
                raise ProtocolError(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
            bias[int(key)] = value
        try:
            return self._sampling_params(logprobs, top_logprobs, bias)
        except ValueError as e:  # the ranges the schema cannot state (logit_bias values)
            raise ProtocolError(str(e), param=str(e).split("[")[0].split(" ")[0]) from None

    def _sampling_params(self, logprobs: bool, top_logprobs: int, bias: dict[int, float]) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k,
            max_tokens=self.max_tokens, stop=self.stops(), n=self.n, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty, seed=self.seed,
            logit_bias=bias or None, logprobs=logprobs, top_logprobs=top_logprobs,
        )  # fmt: skip

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None

    def check(self) -> None:
        """What the schema cannot say: message order and content."""
        self.check_stream_options()
        if sum(m.role == "system" for m in self.messages) > 1:
            raise ProtocolError("at most one system message is allowed", param="messages")
        for i, m in enumerate(self.messages):
            if m.content is None and not (m.role == "assistant" and m.tool_calls):
                raise ProtocolError(f"messages[{i}].content is required for a {m.role} message", param=f"messages.{i}.content")
            if (m.tool_calls and m.role != "assistant") or (m.tool_call_id is not None and m.role != "tool"):
                raise ProtocolError(f"messages[{i}]: only assistant messages carry tool_calls, only tool messages a "
                                    "tool_call_id", param=f"messages.{i}")  # fmt: skip
        turns = [m for m in self.messages if m.role != "system"]
        roles = [m.role for m in turns]
        if not roles or roles[-1] not in ("user", "tool"):
            raise ProtocolError("the last message (after any system message) must be from the user or a tool", param="messages")
        if roles[0] != "user":
            raise ProtocolError("the conversation must start with a user message", param="messages")
        for previous, message in zip(turns, turns[1:]):
            if message.role == previous.role and message.role in ("user", "assistant"):
                raise ProtocolError(f"two {message.role} messages in a row", param="messages")
            if message.role == "tool" and not (previous.role == "tool" or previous.tool_calls):
                raise ProtocolError("a tool message must follow an assistant message with tool_calls", param="messages")
        if self.top_logprobs and not self.logprobs:
            raise ProtocolError("top_logprobs requires logprobs to be true", param="top_logprobs")

    def offered_tools(self) -> Tools | None:
        """The tools the model may call (None: none, or tool_choice "none")."""
        try:
            return parse_tools(self.tools, self.tool_choice, self.parallel_tool_calls)
        except ValueError as e:
            raise ProtocolError(str(e), param="tool_choice" if str(e).startswith("tool_choice") else "tools") from None

    def sampling(self) -> SamplingParams:
        return self.sampling_params(logprobs=self.logprobs, top_logprobs=self.top_logprobs or 0)


class CompletionRequest(Sampling):
    prompt: str = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)  # legacy completions: number of alternatives
    echo: bool = False

    def check(self) -> None:
        self.check_stream_options()
        if self.echo:
            raise ProtocolError("echo is not supported", param="echo")

    def sampling(self) -> SamplingParams:
        return self.sampling_params(logprobs=self.logprobs is not None, top_logprobs=self.logprobs or 0)


class ProtocolError(Exception):
    """A request the schema accepts but the server refuses: a 400 naming the field."""

    def __init__(self, message: str, *, param: str | None = None, status: int = 400, code: str | None = None,
                 type: str = "invalid_request_error", retry_after: int | None = None):  # fmt: skip
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type
        self.retry_after = retry_after  # seconds, for 429 and 503


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, prices: tuple[float, float]) -> dict:
    """Token counts and the cost at (input, output) prices per million tokens."""
    cost = (prompt_tokens * prices[0] + completion_tokens * prices[1]) / 1e6
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "estimated_cost": round(cost, 10),
    }


def chat_logprobs(logprobs: list[TokenLogprob] | None) -> dict | None:
    """OpenAI's chat `logprobs` object: one entry per token, with its top alternatives."""
    if logprobs is None:
        return None

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**entry(lp.token, lp.logprob), "top_logprobs": [entry(text, value) for _, text, value in lp.top]}
            for lp in logprobs
        ]
    }


def tool_calls(calls: list[ToolCall]) -> list[dict]:
    """A message's `tool_calls`."""
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def tool_call_deltas(deltas: list[CallDelta]) -> list[dict]:
    """A stream delta's `tool_calls`: the first part of a call has its id and name."""
    return [
        {"index": d.index, **({"id": d.id, "type": "function"} if d.id else {}),
         "function": {**({"name": d.name} if d.name else {}), "arguments": d.arguments}}
        for d in deltas
    ]  # fmt: skip


def text_logprobs(logprobs: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
    """The legacy completions `logprobs` object."""
    if logprobs is None:
        return None
    offsets, position = [], offset
    for lp in logprobs:
        offsets.append(position)
        position += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{text: value for _, text, value in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }
