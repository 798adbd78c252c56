"""Tool calls: the documented format rendered into prompts, parsed back whole and streamed, and calls
from a random tiny model that validate against their function's schema (checked by `jsonschema`)."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from codellama_jax import chat, generate, load, structured
from codellama_jax.errors import RequestError
from codellama_jax.tokenizer import TextStream
from codellama_jax.tools import RepeatedCall, ToolCallParser, parse, parse_tools, render_messages

from conftest import write_hf_checkpoint

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}  # fmt: skip
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
                   "required": ["zone"], "additionalProperties": False}}}  # fmt: skip
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def model(tmp_path_factory, sp_dir):
    return load(write_hf_checkpoint(tmp_path_factory.mktemp("tools") / "hf", sp_dir, max_position_embeddings=1024))


def test_whole_and_streamed_parses_agree():
    text = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Pa}r\\"is{", "unit": "celsius"}}</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"zone": "CET", "nested": [{"a": "]"}]}}</tool_call>')  # fmt: skip
    answer = parse(text)
    content, calls = answer.content, answer.calls
    assert content == "" and answer.complete
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": 'Pa}r"is{', "unit": "celsius"}),
        ("get_time", {"zone": "CET", "nested": [{"a": "]"}]}),
    ]
    rng = random.Random(0)
    for _ in range(20):  # random chunkings of the same text
        parser, arguments, names = ToolCallParser(), {}, {}
        position = 0
        while position < len(text):
            size = rng.randint(1, 9)
            _, deltas = parser.push(text[position : position + size])
            position += size
            assert len({d.index for d in deltas}) == len(deltas)  # one part per call, as OpenAI streams them
            for d in deltas:
                names.setdefault(d.index, d.name)
                arguments[d.index] = arguments.get(d.index, "") + d.arguments
        assert [names[i] for i in sorted(names)] == [c.name for c in calls]
        assert [arguments[i] for i in sorted(arguments)] == [c.arguments for c in calls]


@pytest.mark.parametrize("text", ["Plain answer.", "<tool", "<tools are fun>", "", " \n "])
def test_plain_answers_are_content(text):
    answer = parse(text)
    assert (answer.content, answer.calls, answer.complete) == (text, [], True)


def test_a_call_after_whitespace_is_a_call_the_grammar_checks(model):
    """Templates that end in a space invite " <tool_call>": it is a call, never free text."""
    grammar = structured.compile_grammar(model, parse_tools([WEATHER], "auto").grammar())
    call = ' <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}</tool_call>'
    accepted = grammar.constraint()
    for token in model.tokenizer.encode_continuation(call):
        accepted.advance(token)
    assert accepted.complete
    assert [(c.name, c.arguments) for c in parse(call).calls] == [("get_weather", '{"city": "Oslo", "unit": "celsius"}')]
    refused = grammar.constraint()
    with pytest.raises(RequestError, match="refused"):
        for token in model.tokenizer.encode_continuation(' <tool_call>{"name": "rm_rf"'):
            refused.advance(token)


def test_a_call_cut_off_is_not_a_finished_call(model):
    (cut,) = generate(model, [ASK], seed=0, max_tokens=200, stop=["}"], tools=[WEATHER], tool_choice="required")
    assert cut.finish_reason == "stop" and cut.tool_calls[0].name == "get_weather"
    with pytest.raises(json.JSONDecodeError):  # the stop string took the arguments' closing brace
        json.loads(cut.tool_calls[0].arguments)
    (short,) = generate(model, [ASK], seed=0, max_tokens=30, tools=[WEATHER], tool_choice="required")
    assert short.finish_reason == "length"


def test_history_renders_calls_and_results_as_the_model_writes_and_reads_them():
    tools = parse_tools([WEATHER], "auto")
    messages = [
        {"role": "system", "content": "Be brief."},
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
        {"role": "user", "content": "And tomorrow?"},
    ]  # fmt: skip
    rendered = render_messages(messages, tools)
    assert [m["role"] for m in rendered] == ["system", "user", "assistant", "user"]
    assert rendered[0]["content"] == "Be brief.\n\n" + tools.prompt()
    assert rendered[2]["content"] == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>'
    assert rendered[3]["content"] == '<tool_response name="get_weather">\n{"temperature": 21}\n</tool_response>\nAnd tomorrow?'
    assert render_messages(ASK, None) == ASK


@pytest.mark.parametrize(
    "tools, tool_choice, message",
    [
        ([{"type": "function", "function": {"name": "has space"}}], None, "name"),
        ([WEATHER, WEATHER], None, "unique"),
        ([{"type": "retrieval"}], None, r"tools\[0\]"),
        ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, "get_time"),
        ([WEATHER], "sometimes", "tool_choice"),
        (None, "required", "needs tools"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}], None,
         r"tools\[0\].function.parameters: .*not"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], None, "an object"),
    ],
)
def test_bad_tools_are_refused_by_name(tools, tool_choice, message):
    with pytest.raises(ValueError, match=message):
        parse_tools(tools, tool_choice)


def test_tool_choice_none_offers_nothing():
    assert parse_tools([WEATHER], "none") is None
    assert parse_tools(None, None) is None


@pytest.mark.parametrize("choice", ["required", "get_time"])
def test_calls_name_a_tool_and_their_arguments_validate(model, choice):
    tool_choice = choice if choice == "required" else {"type": "function", "function": {"name": choice}}
    outputs = generate(model, [ASK, [{"role": "user", "content": "Time?"}]], n=3, seed=0, max_tokens=200,
                       tools=[WEATHER, CLOCK], tool_choice=tool_choice, parallel_tool_calls=False)  # fmt: skip
    for c in outputs:
        assert c.finish_reason == "tool_calls" and c.text == "" and len(c.tool_calls) == 1, c
        call = c.tool_calls[0]
        assert call.name in SCHEMAS and (choice == "required" or call.name == choice)
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_auto_answers_in_text_or_with_valid_calls(model):
    outputs = generate(model, [ASK], n=4, seed=3, max_tokens=200, tools=[WEATHER, CLOCK], parallel_tool_calls=False)
    for c in outputs:
        if c.tool_calls:
            assert c.finish_reason == "tool_calls"
            jsonschema.validate(json.loads(c.tool_calls[0].arguments), SCHEMAS[c.tool_calls[0].name])
        else:
            assert not c.text.startswith("<tool_call>")


def test_a_tool_result_goes_back_to_the_model(model):
    first = chat(model, ASK, temperature=0.0, max_tokens=200, tools=[WEATHER], tool_choice="required")
    call = first.tool_calls[0]
    history = [*ASK,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
               {"role": "tool", "tool_call_id": call.id, "content": "21 C, sunny"}]  # fmt: skip
    second = chat(model, history, temperature=0.0, max_tokens=8, tools=[WEATHER], tool_choice="none")
    assert second.tool_calls is None and second.finish_reason in ("stop", "length")
    with pytest.raises(ValueError, match="answers no earlier tool call"):
        chat(model, [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "?"}], max_tokens=4)
    with pytest.raises(ValueError, match="chat messages"):
        generate(model, ["plain text"], tools=[WEATHER])


PARIS = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>'
LYON = '<tool_call>{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "celsius"}}</tool_call>'
CET = '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'


@pytest.mark.parametrize(
    "answer, stop, shown, stopped",
    [
        (f" {PARIS}\n{CET}\n{PARIS}\n{LYON}", (), f" {PARIS}\n{CET}", True),  # the repeat ends it, unseen
        (f"{PARIS}\n{LYON}\n{LYON}", (), f"{PARIS}\n{LYON}", True),  # same name, other arguments: a new call
        (f"{PARIS}\n{PARIS[:40]}", (), PARIS, False),  # max_tokens ends it while it could still be a repeat: dropped
        (f"{PARIS}\n{PARIS[:40]}STOP", ("STOP",), PARIS, True),  # so does a stop string
    ],
)
def test_a_repeated_call_ends_the_answer_before_it_is_shown(model, answer, stop, shown, stopped):
    stream = TextStream(model.tokenizer, stop=stop, end=RepeatedCall())
    released = []
    for token in model.tokenizer.encode_continuation(answer):
        released.append(stream.push(token))
        assert shown.startswith(stream.text)  # nothing of a repeat is ever released
    released.append(stream.finish())
    assert "".join(released) == stream.text == shown
    assert stream.stopped == stopped  # a stop (finish_reason "tool_calls"), or max_tokens ("length")


def test_a_named_tool_is_called_once_and_a_repeated_call_ends_the_turn(model):
    named = {"type": "function", "function": {"name": "get_weather"}}
    for c in generate(model, [ASK], n=3, seed=0, max_tokens=250, tools=[WEATHER, CLOCK], tool_choice=named):
        assert c.finish_reason == "tool_calls" and [t.name for t in c.tool_calls] == ["get_weather"], c
    prompts = [ASK, [{"role": "user", "content": "Time?"}]]
    for offered in ([CLOCK], [WEATHER, CLOCK]):  # greedy, this model calls get_time({"zone": "FJJ"}) again and again
        for c in generate(model, prompts, temperature=0.0, max_tokens=250, tools=offered, tool_choice="required"):
            calls = [(t.name, t.arguments) for t in c.tool_calls]
            assert len(set(calls)) == len(calls), c
            assert c.finish_reason == "tool_calls" or len(offered) == 2, c
