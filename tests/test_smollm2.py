"""The real SmolLM2-135M-Instruct GGUF: logits match transformers loading the same file, greedy
decoding of the ChatML prompt answers "Paris", and structured answers are valid and sensible."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch
import transformers

from codellama_jax import load
from codellama_jax.generation import chat, generate

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load(smollm2_gguf, dtype="float32")


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


def test_logits_match_transformers_on_the_same_gguf(smollm2, reference):
    ids = smollm2.chat_template.encode(smollm2.tokenizer, QUESTION)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].numpy()
    ours = smollm2.logits([ids])[0]
    logit_range = float(expected.max() - expected.min())
    # both dequantize the same Q4_1/Q8_0 blocks to float32; what remains is float32 rounding,
    # which grows with the logits' magnitude: allow 1e-4 per unit of logit range
    diff = float(np.abs(ours - expected).max())
    print(f"max |Δlogits| = {diff:.2e} over a logit range of {logit_range:.1f}")
    assert diff <= 1e-4 * logit_range


def test_greedy_answer_is_paris(smollm2):
    answer = chat(smollm2, QUESTION, temperature=0.0, max_tokens=20)
    assert "Paris" in answer.text and answer.finish_reason == "stop"


PROMPTS = [
    QUESTION,
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three primes."}],
]


def test_greedy_64_tokens_match_transformers_generate(smollm2, reference):
    prompts = [smollm2.chat_template.encode(smollm2.tokenizer, m) for m in PROMPTS]
    expected = []
    for ids in prompts:
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=64,
                eos_token_id=list(smollm2.stop_token_ids), pad_token_id=0,
            )[0, len(ids):].tolist()  # fmt: skip
        expected.append([t for t in out if t not in smollm2.stop_token_ids])
    assert generate(smollm2, prompts[:1], temperature=0.0, max_tokens=64)[0].token_ids == expected[0]
    batch = generate(smollm2, prompts, temperature=0.0, max_tokens=64)
    assert [c.token_ids for c in batch] == expected
    assert max(len(e) for e in expected) == 64


CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40},
                   "population_millions": {"type": "number", "minimum": 0, "maximum": 100},
                   "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 3}},
    "required": ["city", "country", "population_millions", "landmarks"],
    "additionalProperties": False,
}  # fmt: skip
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}  # fmt: skip


def test_structured_answers_of_a_real_model(smollm2):
    """JSON mode, a schema and a tool call from the demo model: valid by construction, and sensible."""
    facts = [{"role": "user", "content": "Give facts about Paris as JSON."}]
    schema_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
    answer = chat(smollm2, facts, temperature=0.0, max_tokens=120, response_format=schema_format)
    assert answer.finish_reason == "stop"
    value = json.loads(answer.text)
    jsonschema.validate(value, CITY)
    assert value["city"] == "Paris"
    objects = generate(smollm2, [facts, QUESTION], n=2, seed=0, max_tokens=120, response_format={"type": "json_object"})
    assert all(c.finish_reason == "stop" and isinstance(json.loads(c.text), dict) for c in objects)
    weather = chat(smollm2, [{"role": "user", "content": "What is the weather in Paris?"}], temperature=0.0,
                   max_tokens=60, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)  # fmt: skip
    (call,) = weather.tool_calls
    assert weather.finish_reason == "tool_calls" and call.name == "get_weather"
    assert json.loads(call.arguments)["city"] == "Paris"


CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone",
         "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 32}}, "required": ["zone"]}}}  # fmt: skip


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_the_demo_models_tool_answer_ends(smollm2, tool_choice):
    """Asked for the weather with two tools, greedy, the demo model used to repeat its call until
    max_tokens: a named tool is called once, and a repeated call ends the answer."""
    reply = chat(smollm2, [{"role": "user", "content": "What is the weather in Paris?"}], temperature=0.0,
                 max_tokens=120, tools=[WEATHER, CLOCK], tool_choice=tool_choice)  # fmt: skip
    calls = [(c.name, c.arguments) for c in reply.tool_calls]
    assert reply.finish_reason == "tool_calls" and len(set(calls)) == len(calls) and reply.completion_tokens < 120, reply
    assert calls[0][0] == "get_weather" and json.loads(calls[0][1])["city"] == "Paris"
