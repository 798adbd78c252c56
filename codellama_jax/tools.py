"""Tool calling for models without a tool format of their own (CodeLlama): one documented text
format, enforced by a grammar.

What the model sees and writes:

- the tools are described at the end of the system message (`Tools.prompt`), one JSON line each;
- a call is `<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>`,
  several calls one per line (the first may follow a little whitespace, as templates that end in a
  space invite); the grammar lets the name be only a given tool's and the arguments only JSON
  valid against that tool's `parameters` schema ("auto" also allows a plain answer, which cannot
  begin, even after whitespace, with `<tool_call>`);
- earlier calls in the history are written back in that form, and tool results are a user turn
  of `<tool_response name="get_weather">...</tool_response>` blocks (`render_messages`), so the
  conversation fits every chat template, including those that only alternate user/assistant.

`ToolCallParser` turns the generated text back into content and calls, incrementally for streams.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import re
import secrets
from typing import Any, Mapping, Sequence

from codellama_jax import structured
from codellama_jax.errors import RequestError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_HEAD = re.compile(r'\s*<tool_call>\{"name": "([a-zA-Z0-9_-]{1,64})", "arguments": ')


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: Mapping[str, Any]


@dataclasses.dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


@dataclasses.dataclass(frozen=True)
class Tools:
    """The tools a request offers and how it may use them: `choice` is "auto", "required", or
    the one tool's name that must be called; `parallel` allows several calls in one answer."""

    tools: tuple[Tool, ...]
    choice: str
    parallel: bool = True

    def prompt(self) -> str:
        """What the system message says about the tools."""
        lines = [
            "You can call these functions (JSON schemas of their arguments):",
            *(structured_json({"name": t.name, "description": t.description, "parameters": t.parameters})
              for t in self.tools),
            f'To call a function, answer with {OPEN}{{"name": <function name>, "arguments": <arguments object>}}{CLOSE}'
            + (", one call per line." if self.several else "."),
            'Function results come back as <tool_response name="...">...</tool_response>.',
        ]  # fmt: skip
        if self.choice == "auto":
            lines.append("If no function is needed, answer directly.")
        elif self.choice == "required":
            lines.append("You must call a function.")
        else:
            lines.append(f"You must call {self.choice}.")
        return "\n".join(lines)

    @property
    def several(self) -> bool:
        """Whether an answer may hold several calls: a named tool_choice asks for exactly one."""
        return self.parallel and self.choice in ("auto", "required")

    def grammar(self) -> str:
        """The Lark grammar of an answer: calls only, or (auto) calls or plain text."""
        callable_tools = [t for t in self.tools if self.choice in ("auto", "required", t.name)]
        rules = [f"start: {'TEXT | calls' if self.choice == 'auto' else 'calls'}",
                 'calls: call ("\\n" call)*' if self.several else "calls: call",
                 f"call: OPEN ({' | '.join(f'call_{i}' for i in range(len(callable_tools)))}) \"{CLOSE}\"",
                 f"OPEN: /[ \\t\\r\\n]{{0,8}}{re.escape(OPEN)}/",
                 f"TEXT: /(?s:.*)/ & ~/(?s:\\s*{re.escape(OPEN)}.*)/"]  # fmt: skip
        for i, tool in enumerate(callable_tools):
            schema = {**_object_schema(tool.parameters), "x-guidance": structured.JSON_OPTIONS}
            rules.append(f'call_{i}: "{{\\"name\\": \\"{tool.name}\\", \\"arguments\\": " args_{i} "}}"')
            rules.append(f"args_{i}: %json {json.dumps(schema)}")
        return structured.lark_grammar("\n".join(rules))


def parse_tools(tools: Sequence[Mapping[str, Any]] | None, tool_choice: str | Mapping[str, Any] | None = None,
                parallel_tool_calls: bool = True) -> Tools | None:  # fmt: skip
    """OpenAI's `tools` and `tool_choice`, checked; None when no tool may be called."""
    parsed = [_parse_tool(i, t) for i, t in enumerate(tools or [])]
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise RequestError(f"tools: function names must be unique, got {names}", param="tools")
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise RequestError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                               '{"name": ...}}', param="tool_choice")  # fmt: skip
        if name not in names:
            raise RequestError(f"tool_choice names the function {name!r}, which is not among the tools", param="tool_choice")
        choice = name
    elif tool_choice is None:
        choice = "auto" if parsed else "none"
    elif tool_choice in ("none", "auto", "required"):
        choice = tool_choice
    else:
        raise RequestError(f'tool_choice must be "none", "auto", "required" or a function, got {tool_choice!r}',
                           param="tool_choice")  # fmt: skip
    if choice != "none" and not parsed:
        raise RequestError(f"tool_choice {tool_choice!r} needs tools", param="tool_choice")
    if not isinstance(parallel_tool_calls, bool):
        raise RequestError("parallel_tool_calls must be true or false", param="parallel_tool_calls")
    return Tools(tuple(parsed), choice, parallel_tool_calls) if choice != "none" else None


def _parse_tool(i: int, tool: Any) -> Tool:
    where, param = f"tools[{i}]", f"tools.{i}"
    if isinstance(tool, Mapping) and tool.get("type") == "custom":
        raise RequestError(f"{where} is a custom tool; only function tools are supported", param=f"{param}.type")
    if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(tool.get("function"), Mapping):
        raise RequestError(f'{where} must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}',
                           param=param)  # fmt: skip
    function = tool["function"]
    name, description = function.get("name"), function.get("description", "")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise RequestError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}",
                           param=f"{param}.function.name")  # fmt: skip
    if not isinstance(description, str):
        raise RequestError(f"{where}.function.description must be a string", param=f"{param}.function.description")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    try:
        structured.check_grammar(structured.json_schema_grammar(_object_schema(parameters)))
    except ValueError as e:
        raise RequestError(f"{where}.function.parameters: {e}", param=f"{param}.function.parameters") from None
    return Tool(name, description, parameters)


def _object_schema(parameters: Mapping[str, Any]) -> dict:
    """Arguments are always an object: a schema without a type gets "object", another type is refused."""
    if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
        raise ValueError('parameters must be a JSON schema of an object ({"type": "object", ...})')
    return {"type": "object", **parameters}


def structured_json(value: Any) -> str:
    """JSON laid out as the grammar writes it, so examples and history look like the model's own."""
    return json.dumps(value, ensure_ascii=False)


def render_messages(messages: Sequence[Mapping[str, Any]], tools: Tools | None) -> list[dict]:
    """Chat messages any template renders: the tools described in the system message, earlier
    calls as `<tool_call>` text, tool results as a user turn (with any user text that follows)."""
    out: list[dict] = []
    names: dict[str, str] = {}  # tool call id -> function name
    after_tool = False
    for i, m in enumerate(messages):
        message = {k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")}
        role, content = m.get("role"), m.get("content")
        if role == "assistant" and m.get("tool_calls") and i == len(messages) - 1:
            raise RequestError("a final assistant message with tool_calls cannot be continued: send the tools' results "
                               "as tool messages", param=f"messages.{i}")  # fmt: skip
        if role == "assistant" and m.get("tool_calls"):
            calls = [_call_text(i, j, call, names) for j, call in enumerate(m["tool_calls"])]
            message["content"] = "\n".join(([content] if content else []) + calls)
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if call_id not in names:
                raise RequestError(f"messages[{i}].tool_call_id {call_id!r} answers no earlier tool call",
                                   param=f"messages.{i}.tool_call_id")  # fmt: skip
            if not isinstance(content, str):
                raise RequestError(f"messages[{i}].content must be a string", param=f"messages.{i}.content")
            message = {"role": "user", "content": f'<tool_response name="{names[call_id]}">\n{content}\n</tool_response>'}
        if after_tool and message["role"] == "user":  # one user turn: the results, then any words
            out[-1]["content"] += "\n" + message["content"]
        else:
            out.append(message)
        after_tool = role == "tool" or (after_tool and message["role"] == "user")
    if tools is not None:
        system = next((m for m in out if m["role"] == "system"), None)
        if system is None:
            out.insert(0, {"role": "system", "content": tools.prompt()})
        else:
            system["content"] = f"{system['content']}\n\n{tools.prompt()}"
    return out


def _call_text(i: int, j: int, call: Any, names: dict[str, str]) -> str:
    where, param = f"messages[{i}].tool_calls[{j}]", f"messages.{i}.tool_calls.{j}"
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not isinstance(call.get("id"), str):
        raise RequestError(f'{where} must be {{"id": ..., "type": "function", "function": {{"name": ..., '
                           '"arguments": ...}}}}', param=param)  # fmt: skip
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except (TypeError, ValueError, RecursionError):
        arguments = None
    if not isinstance(arguments, dict):
        raise RequestError(f"{where}.function.arguments must be a JSON object as a string",
                           param=f"{param}.function.arguments")  # fmt: skip
    names[call["id"]] = function["name"]
    return OPEN + structured_json({"name": function["name"], "arguments": arguments}) + CLOSE


@dataclasses.dataclass
class CallDelta:
    """Part of a streamed call: the first names it (`id`, `name`), later ones add argument text."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


class ToolCallParser:
    """The text of a tools answer, pushed piece by piece, as content and tool calls.

    Relies on the grammar's exact layout: a call's head `<tool_call>{"name": "...", "arguments": `
    is recognised whole, the arguments object is followed to its closing brace (strings and
    nesting tracked), then `}</tool_call>`. A plain answer is content from its first character
    that cannot begin `<tool_call>`.
    """

    def __init__(self):
        self.content = ""
        self.calls: list[ToolCall] = []
        self.spans: list[list[int]] = []  # each call's [start, end) in all text pushed (end -1 while open)
        self._pushed = 0
        self._pending = ""
        self._mode = "start"  # start | text | head | arguments | close
        self._complete = False
        self._depth, self._in_string, self._escaped = 0, False, False

    def push(self, text: str) -> tuple[str, list[CallDelta]]:
        """Content text and call parts made certain by `text`: at most one `CallDelta` per call."""
        self._pending += text
        self._pushed += len(text)
        content, deltas = "", []
        while self._pending:
            if self._mode == "start":
                lead = self._pending.lstrip()
                if lead.startswith(OPEN):
                    self._mode = "head"
                elif OPEN.startswith(lead):
                    break
                else:
                    self._mode = "text"
            elif self._mode == "text":
                content, self._pending = content + self._pending, ""
            elif self._mode == "head":
                head = _HEAD.match(self._pending)
                if head is None:
                    break  # grammar guarantees the head comes whole; wait for the rest
                call = ToolCall(f"call_{secrets.token_hex(12)}", head.group(1), "")
                self.calls.append(call)
                self.spans.append([self._pushed - len(self._pending), -1])
                deltas.append(CallDelta(len(self.calls) - 1, id=call.id, name=call.name))
                self._pending, self._mode = self._pending[head.end():], "arguments"
            elif self._mode == "arguments":
                n = self._scan_arguments()
                self.calls[-1].arguments += self._pending[:n]
                deltas.append(CallDelta(len(self.calls) - 1, arguments=self._pending[:n]))
                self._pending = self._pending[n:]
                if self._depth == 0:
                    self._mode = "close"
            elif self._mode == "close":
                end = "}" + CLOSE
                if not self._pending.startswith(end):
                    break
                self._pending, self._mode = self._pending[len(end):], "head"
                self.spans[-1][1] = self._pushed - len(self._pending)
        self.content += content
        merged: list[CallDelta] = []
        for d in deltas:
            if merged and merged[-1].index == d.index:
                last = merged[-1]
                merged[-1] = CallDelta(d.index, last.arguments + d.arguments, last.id or d.id, last.name or d.name)
            elif d.arguments or d.name:
                merged.append(d)
        return content, merged

    def finish(self) -> str:
        """Content still held back at the end (a plain answer that began like a call). A call cut
        off before its name was complete is dropped; one cut off later keeps its partial arguments."""
        rest = self._pending if self._mode == "start" else ""
        self.content += rest
        self._complete = self._mode in ("start", "text") or (self._mode == "head" and not self._pending)
        self._pending = ""
        return rest

    @property
    def complete(self) -> bool:
        """After `finish()`: the answer did not end inside a call."""
        return self._complete

    def _scan_arguments(self) -> int:
        """How much of the pending text belongs to the arguments object (all, or up to its end)."""
        for n, ch in enumerate(self._pending):
            if self._in_string:
                self._escaped, self._in_string = (False, True) if self._escaped else (ch == "\\", ch != '"')
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return n + 1
        return len(self._pending)


class RepeatedCall:
    """Where a tools answer ends because a call repeats an earlier call of the same answer (same
    name, same arguments): small models often call one tool again and again until max_tokens.
    Fed the answer's text as it is decoded (a `TextStream`'s `end`); `end` is where the repeat
    begins, and while the text after the last whole call could still become a repeat, `hold`
    says where it starts, so that it is not shown before it is known (nor at all, if the answer
    ends there)."""

    def __init__(self):
        self.end: int | None = None
        self.hold: int | None = None
        self._text = ""
        self._parser = ToolCallParser()
        self._whole = 0  # the parser's calls compared so far
        self._calls: list[str] = []  # their text, sorted, to look up prefixes
        self._after: int | None = None  # where the last whole call ends

    def feed(self, text: str) -> None:
        if self.end is not None:
            return
        self._text += text
        self._parser.push(text)
        spans = self._parser.spans
        while self._whole < len(spans) and spans[self._whole][1] >= 0:
            start, stop = spans[self._whole]
            call = self._text[start:stop].lstrip()
            i = bisect.bisect_left(self._calls, call)
            if i < len(self._calls) and self._calls[i] == call:
                self.end, self.hold = start, None
                return
            self._calls.insert(i, call)
            self._whole, self._after = self._whole + 1, stop
        if self._after is None:
            return
        rest = self._text[self._after :].lstrip()
        i = bisect.bisect_left(self._calls, rest)
        self.hold = self._after if i < len(self._calls) and self._calls[i].startswith(rest) else None


def answer_end(tools: Tools | None) -> RepeatedCall | None:
    """The rule that ends a tools answer at a repeated call (None where the grammar allows one call)."""
    return RepeatedCall() if tools is not None and tools.several else None


def finish_reason(reason: str, parser: ToolCallParser) -> str:
    """OpenAI's "tool_calls" for an answer that ended with whole calls (not cut off by max_tokens
    or a stop string), from its finished parser."""
    return "tool_calls" if parser.calls and parser.complete and reason == "stop" else reason


def parse(text: str) -> ToolCallParser:
    """A whole answer's content and calls (`.content`, `.calls`, `.complete`)."""
    parser = ToolCallParser()
    parser.push(text)
    parser.finish()
    return parser
