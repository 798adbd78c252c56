"""The library API: `generate()`, `stream()` and `chat()`, and the request front end they share
with the server (prompts, tools and grammars in; completions out).

Every call drives a `Scheduler` (scheduler.py) sized for its rows, the same host scheduler and
device runner the server's engine uses: one implementation of prefill, decoding, sampling, stop
strings, grammars and logprobs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from codellama_jax import chat_template, infill, structured
from codellama_jax import tools as tool_calls
from codellama_jax.errors import RequestError
from codellama_jax.buckets import bucket
from codellama_jax.loader import Model
from codellama_jax.sampling import SamplingParams
from codellama_jax.scheduler import Scheduler, TokenLogprob, max_new_tokens
from codellama_jax.speculative import Speculation, speculation

Prompt = str | Sequence[int] | Sequence[Mapping[str, Any]]

GENERATE_STEPS = 16  # decode steps per runner call in generate(): the host looks at text between calls


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length", or "tool_calls"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    index: int = 0  # which of the n samples of its prompt
    prompt_index: int = 0
    tool_calls: list[tool_calls.ToolCall] | None = None  # when tools were offered and called; `text` is then ""


def prompt_ids(model: Model, prompt: Prompt, tools: tool_calls.Tools | None = None, limit: int | None = None,
               suffix: str | None = None) -> list[int]:  # fmt: skip
    """Token ids of a prompt: text (BOS added as the tokenizer does), chat messages (the model's
    chat template, see `ChatTemplate.prompt`, with `tools` described and tool calls and results
    rendered as tools.py says), or token ids as they are; with `suffix`, the infilling prompt of
    the text before a gap (`prompt`) and after it. Text that surely holds more than `limit`
    tokens (default: the context) is refused before it is tokenized."""
    limit = model.config.max_seq_len if limit is None else limit
    is_chat = not isinstance(prompt, str) and len(prompt) and isinstance(prompt[0], Mapping)
    if tools is not None and not is_chat:
        raise RequestError("tools need chat messages as the prompt", param="messages")
    if suffix is not None:
        if not isinstance(prompt, str):
            raise RequestError("with suffix (fill-in-the-middle) a prompt must be text: the code before the gap",
                               param="prompt")  # fmt: skip
        return infill.prompt_ids(_tokenizer(model), model.config, prompt, suffix, limit)
    if is_chat:
        messages = tool_calls.render_messages(chat_template.plain_messages(prompt), tools)
        return model.chat_template.encode(_tokenizer(model), messages, limit=limit)
    if isinstance(prompt, str):
        tokenizer = _tokenizer(model)
        return tokenizer.encode(prompt, add_bos=tokenizer.add_bos, limit=limit)
    array = np.asarray(prompt)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise RequestError("a prompt must be text, a list of token ids (integers), or a list of chat messages",
                           param="prompt")  # fmt: skip
    ids = array.tolist()
    bad = [t for t in ids if not 0 <= t < model.config.vocab_size]
    if bad:
        raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {model.config.vocab_size})",
                           param="prompt")  # fmt: skip
    return ids


def output_grammar(
    model: Model, response_format: Mapping[str, Any] | None = None, tools: tool_calls.Tools | None = None
) -> structured.Grammar | None:
    """The grammar the output must follow (None: free text), compiled for the model."""
    param = "tools" if tools is not None else "response_format"  # the field a grammar failure names
    try:
        asked = structured.response_format_grammar(response_format)
        if tools is not None and asked is not None:
            raise RequestError("response_format cannot be combined with tools; give one or the other", param="response_format")
        source = tools.grammar() if tools is not None else asked
        return None if source is None else structured.compile_grammar(model, source, param)
    except RequestError:
        raise
    except ValueError as e:
        raise RequestError(str(e), param=param) from None


def _tokenizer(model: Model):
    if model.tokenizer is None:
        raise RequestError("this checkpoint has no tokenizer (tokenizer.model or tokenizer.json); pass token ids",
                           param="prompt")  # fmt: skip
    return model.tokenizer


def _scheduler(model: Model, prompts: Sequence[list[int]], params: SamplingParams, steps: int,
               speculative: Speculation | None) -> Scheduler:  # fmt: skip
    """A scheduler with a row for every sample and room for the longest request (both rounded up
    to powers of two, so that calls of similar sizes share compiled programs), `steps` decode
    steps per call."""
    longest = max(len(ids) + max_new_tokens(model, len(ids), params.max_tokens) for ids in prompts)
    return Scheduler(model, max_batch=bucket(len(prompts) * params.n, minimum=1), max_len=bucket(longest),
                     steps_per_call=steps, speculation=speculative)  # fmt: skip


def generate(
    model: Model,
    prompts: Sequence[Prompt],
    *,
    response_format: Mapping[str, Any] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: str | Mapping[str, Any] | None = None,
    parallel_tool_calls: bool = True,
    suffix: str | None = None,
    speculative: str | Speculation | None = None,
    **sampling: Any,
) -> list[Completion]:
    """Completions of a batch of prompts (text, token ids, or chat messages), `n` per prompt,
    in prompt order. Sampling settings are those of `SamplingParams` (the contract's fields).
    With `suffix` every prompt is the text before a gap and the completion fills it
    (fill-in-the-middle, infill.py), ending where the model closes the gap.

    `response_format` ({"type": "json_object"} or {"type": "json_schema", "json_schema": {"name",
    "schema"}}) makes every output valid JSON of that kind; `tools` (OpenAI's function tools, with
    `tool_choice` "auto", "required", "none" or {"type": "function", "function": {"name"}})
    lets the model answer with calls, returned in `Completion.tool_calls` (tools.py's format).

    `speculative="ngram"` (or a `Speculation` with its settings) verifies drafts of tokens copied
    from the prompt and output so far, several tokens per forward pass where the output repeats
    its input (code edits), and the grammar's forced tokens: the output is the same as without.

    The decode loop runs on the device until every row is done; with stop strings it returns to
    the host every few steps to look for them in the text, and under a grammar after every step.
    """
    params = SamplingParams(**sampling)
    speculative = speculation(speculative)
    if isinstance(prompts, (str, Mapping)) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
        raise ValueError("prompts must be a list of prompts (each text, token ids, or chat messages)")
    if not prompts:
        raise ValueError("no prompts given")
    offered = tool_calls.parse_tools(tools, tool_choice, parallel_tool_calls)
    grammar = output_grammar(model, response_format, offered)
    ids = [prompt_ids(model, p, offered, suffix=suffix) for p in prompts]
    if params.stop or params.logprobs:
        _tokenizer(model)
    scheduler = _scheduler(model, ids, params, GENERATE_STEPS, speculative)
    chunks: list[list] = [[] for _ in range(len(ids) * params.n)]
    for p, prompt in enumerate(ids):
        scheduler.add(scheduler.sequences(prompt, params, lambda i, p=p: chunks[p * params.n + i].append, grammar, offered))
    while scheduler.has_work():
        scheduler.step()
    completions = []
    for r, got in enumerate(chunks):
        if isinstance(got[-1], BaseException):
            raise got[-1]
        last = got[-1]
        completions.append(Completion(
            "".join(c.text for c in got), [t for c in got for t in c.token_ids], last.finish_reason,
            last.prompt_tokens, last.completion_tokens,
            [lp for c in got for lp in c.logprobs] if params.logprobs else None,
            index=r % params.n, prompt_index=r // params.n,
        ))  # fmt: skip
    if offered is not None:
        for c in completions:
            answer = tool_calls.parse(c.text)
            c.text, c.tool_calls = answer.content, answer.calls or None
            c.finish_reason = tool_calls.finish_reason(c.finish_reason, answer)
    return completions


def stream(model: Model, prompt: Prompt, *, response_format: Mapping[str, Any] | None = None, suffix: str | None = None,
           speculative: str | Speculation | None = None, **sampling: Any) -> Iterator[str]:  # fmt: skip
    """Text deltas of one completion as they are decoded (stop strings never shown in part),
    optionally constrained by `response_format`, filling the gap before `suffix`, or
    `speculative`, as in `generate()`."""
    params = SamplingParams(**sampling)
    speculative = speculation(speculative)
    if params.n != 1:
        raise ValueError("stream() produces one completion; use generate() for n > 1")
    ids = prompt_ids(model, prompt, suffix=suffix)
    _tokenizer(model)
    scheduler = _scheduler(model, [ids], params, 1, speculative)  # each token's text as soon as it is decoded
    chunks: list = []
    scheduler.add(scheduler.sequences(ids, params, lambda i: chunks.append, output_grammar(model, response_format)))
    while scheduler.has_work():
        scheduler.step()
        for chunk in chunks:
            if isinstance(chunk, BaseException):
                raise chunk
            if chunk.text:
                yield chunk.text
        chunks.clear()


def chat(model: Model, messages: Sequence[Mapping[str, Any]], **sampling: Any) -> Completion:
    """One completion of a conversation, with the model's chat template (`response_format`,
    `tools` and `tool_choice` as in `generate()`)."""
    if sampling.get("n", 1) != 1:
        raise ValueError("chat() returns one completion; use generate([messages], n=...) for several")
    return generate(model, [messages], **sampling)[0]
