"""The chat-completions contract as pydantic models: every input field with its default and range
(../shared/reference/chat-completions-contract.txt), OpenAI's other request fields (used, accepted
without effect, or refused by name; see the README), strict types, and the response and error
shapes of OpenAI's own specification."""

from __future__ import annotations

import codecs
import re
import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from codellama_jax.generation import TokenLogprob
from codellama_jax.sampling import RANGES, SamplingParams
from codellama_jax.tools import CallDelta, ToolCall, Tools, parse_tools

Json = dict[str, Any]


class Strict(BaseModel):
    """No coercion between types, no NaN or infinity, no unknown fields; a null is the field's
    default (as OpenAI takes it), except for a required field."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}
        return data


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text


class MessageToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Json] | None = None  # text, or content parts (text only); optional beside tool_calls
    name: str | None = None  # given to the model's chat template (see the README)
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    # what an assistant message of ours carries when a client sends it back
    refusal: str | None = None
    annotations: list[Json] | None = None
    audio: Json | None = None
    function_call: Json | None = None


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # ignored: no obfuscation padding is sent


def _field(name: str, default):
    return Field(default, **RANGES[name].bounds())


class Sampling(Strict):
    """Fields shared by chat and text completions."""

    model: str
    stream: bool = False
    temperature: float = _field("temperature", 1.0)
    top_p: float = _field("top_p", 1.0)
    min_p: float = _field("min_p", 0.0)
    top_k: int = _field("top_k", 0)
    max_tokens: int | None = _field("max_tokens", None)
    stop: str | list[str] | None = None
    n: int = _field("n", 1)
    presence_penalty: float = _field("presence_penalty", 0.0)
    frequency_penalty: float = _field("frequency_penalty", 0.0)
    repetition_penalty: float = _field("repetition_penalty", 1.0)
    seed: int | None = _field("seed", None)
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias
    user: str | None = None  # logged as a hash
    stream_options: StreamOptions | None = None

    def check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ProtocolError("stream_options is only allowed when stream is true", param="stream_options")

    def sampling_params(self, *, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> SamplingParams:
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not re.fullmatch(r"[0-9]{1,9}", key.strip()):
                raise ProtocolError(f"logit_bias keys must be token ids, got {key[:20]!r}", param="logit_bias")
            bias[int(key)] = value
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k, max_tokens=max_tokens,
            stop=stop, n=self.n, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, seed=self.seed, logit_bias=bias or None, logprobs=logprobs,
            top_logprobs=top_logprobs,
        )  # fmt: skip

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = _field("max_tokens", None)  # the current name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = _field("top_logprobs", None)
    tools: list[Json] | None = None
    tool_choice: str | Json | None = None
    parallel_tool_calls: bool = True
    response_format: Json | None = None
    # accepted and ignored: they change nothing in what this server generates (see the README)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prediction: Json | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    modalities: list[str] | None = None  # ["text"]: what this server produces anyway
    audio: Json | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: Json | None = None
    # known, and refused: this server cannot do what they ask
    web_search_options: Json | None = None
    moderation: Json | None = None
    functions: list[Json] | None = None
    function_call: str | Json | None = None

    def check(self) -> None:
        """What the schema cannot say. The order of messages is the template's to judge
        (`ChatTemplate.prompt`)."""
        self.check_stream_options()
        refused = {"web_search_options": "web search is not available on this server",
                   "moderation": "moderation is not available on this server",
                   "functions": "functions is deprecated and not supported; send tools",
                   "function_call": "function_call is deprecated and not supported; send tool_choice"}  # fmt: skip
        for name, why in refused.items():
            if getattr(self, name) is not None:
                raise ProtocolError(why, param=name)
        if any(m != "text" for m in self.modalities or []):
            raise ProtocolError("this model produces text only: modalities must be [\"text\"]", param="modalities")
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise ProtocolError("max_tokens and max_completion_tokens differ; send one of them",
                                param="max_completion_tokens")  # fmt: skip
        for i, m in enumerate(self.messages):
            if m.content is None and not (m.role == "assistant" and (m.tool_calls or m.refusal is not None)):
                raise ProtocolError(f"messages[{i}].content is required for a {m.role} message", param=f"messages.{i}.content")
            if (m.tool_calls and m.role != "assistant") or (m.tool_call_id is not None and m.role != "tool"):
                raise ProtocolError(f"messages[{i}]: only assistant messages carry tool_calls, only tool messages a "
                                    "tool_call_id", param=f"messages.{i}")  # fmt: skip
            if m.role == "tool" and m.tool_call_id is None:
                raise ProtocolError(f"messages[{i}]: a tool message needs its tool_call_id", param=f"messages.{i}.tool_call_id")
            if m.function_call is not None or m.audio is not None:
                field = "function_call" if m.function_call is not None else "audio"
                raise ProtocolError(f"messages[{i}].{field} is not supported", param=f"messages.{i}.{field}")
        if self.top_logprobs and not self.logprobs:
            raise ProtocolError("top_logprobs requires logprobs to be true", param="top_logprobs")

    def chat_messages(self) -> list[Json]:
        """The messages as the library takes them (OpenAI's own forms: parts, developer, ...); an
        assistant's refusal sent back without content is what it said."""
        out = []
        for m in self.messages:
            message = m.model_dump(exclude_none=True, exclude={"refusal", "annotations", "audio", "function_call"})
            if m.content is None and m.refusal is not None and not m.tool_calls:
                message["content"] = m.refusal
            out.append(message)
        return out

    def offered_tools(self) -> Tools | None:
        """The tools the model may call (None: none, or tool_choice "none")."""
        return parse_tools(self.tools, self.tool_choice, self.parallel_tool_calls)

    def sampling(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling_params(max_tokens=max_tokens, logprobs=self.logprobs, top_logprobs=self.top_logprobs or 0)


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]  # text or token ids, one prompt or several
    logprobs: int | None = Field(None, ge=0, le=5)  # legacy completions: number of alternatives
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=RANGES["n"].high)
    suffix: str | None = None  # fill-in-the-middle: the text after the gap (the prompt is the text before)

    def check(self) -> None:
        self.check_stream_options()
        if self.echo:
            raise ProtocolError("echo is not supported", param="echo")
        if self.best_of is not None and self.best_of != self.n:
            raise ProtocolError("best_of other than n is not supported (every sample is returned)", param="best_of")
        if not self.prompt and not (self.suffix is not None and self.prompt == ""):  # "" before a suffix: the file's start
            raise ProtocolError("prompt must not be empty", param="prompt")

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)

    def sampling(self) -> SamplingParams:
        return self.sampling_params(max_tokens=self.max_tokens, logprobs=self.logprobs is not None,
                                    top_logprobs=self.logprobs or 0)  # fmt: skip


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


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int, prices: tuple[float, float]) -> dict:
    """Token counts, with the prompt tokens the prefix cache served, and the cost at (input,
    output) prices per million tokens."""
    cost = (prompt_tokens * prices[0] + completion_tokens * prices[1]) / 1e6
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "estimated_cost": round(cost, 10),
    }


def token_string(lp: TokenLogprob) -> str:
    """A token as OpenAI writes it: its text, or for part of a character `bytes:` and its bytes
    escaped (`bytes:\\xf0\\x9f`), so that different partial tokens stay different keys."""
    if lp.bytes is None:  # a control token: its own text
        return lp.token
    try:
        return lp.bytes.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + lp.bytes.decode("utf-8", "backslashreplace")


def chat_logprobs(logprobs: list[TokenLogprob] | None) -> dict | None:
    """OpenAI's chat `logprobs` object: one entry per token, with its bytes and top alternatives."""
    if logprobs is None:
        return None

    def entry(lp: TokenLogprob) -> dict:
        return {"token": token_string(lp), "logprob": lp.logprob, "bytes": None if lp.bytes is None else list(lp.bytes)}

    return {"content": [{**entry(lp), "top_logprobs": [entry(t) for t in lp.top]} for lp in logprobs], "refusal": None}


def tool_calls(calls: list[ToolCall]) -> list[dict]:
    """A message's `tool_calls`."""
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def tool_call_delta(d: CallDelta) -> dict:
    """One call's part of a stream delta: the first part has its id and name."""
    return {"index": d.index, **({"id": d.id, "type": "function"} if d.id else {}),
            "function": {**({"name": d.name} if d.name else {}), "arguments": d.arguments}}  # fmt: skip


class TextLogprobs:
    """The legacy completions `logprobs` object of one choice, chunk by chunk: `text_offset` is
    the number of whole characters of the text before each token."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._chars = 0

    def __call__(self, logprobs: list[TokenLogprob] | None) -> dict | None:
        if logprobs is None:
            return None
        offsets = []
        for lp in logprobs:
            offsets.append(self._chars)
            self._chars += len(self._decoder.decode(lp.bytes or b""))
        return {
            "tokens": [token_string(lp) for lp in logprobs],
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{token_string(t): t.logprob for t in lp.top} for lp in logprobs],
            "text_offset": offsets,
        }
