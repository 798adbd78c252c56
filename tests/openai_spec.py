"""OpenAI's own response schemas, to validate what the server answers against them.

`data/openai-schemas.json` holds the component schemas our responses must follow and every schema
they refer to, extracted unchanged by `extract()` from OpenAI's published OpenAPI specification
(openai/openai-openapi, commit f85dbe2, 2026-08-21; `../shared/reference/openai-openapi.yaml`).
The spec is OpenAPI 3.1 but still writes `nullable: true` in places: null is allowed there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema

EXTRACT = Path(__file__).parent / "data" / "openai-schemas.json"
SPEC = Path(__file__).resolve().parents[2] / "shared" / "reference" / "openai-openapi.yaml"
ROOTS = ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse",
         "ListModelsResponse", "ErrorResponse")  # fmt: skip


def extract(spec: dict) -> dict:
    """The ROOTS schemas of a parsed spec and everything they refer to, by name."""
    schemas, out, pending = spec["components"]["schemas"], {}, list(ROOTS)
    while pending:
        name = pending.pop()
        if name not in out:
            out[name] = schemas[name]
            pending += [ref.rsplit("/", 1)[1] for ref in _refs(schemas[name])]
    return dict(sorted(out.items()))


def _refs(value: Any):
    if isinstance(value, dict):
        if isinstance(value.get("$ref"), str):
            yield value["$ref"]
        for v in value.values():
            yield from _refs(v)
    elif isinstance(value, list):
        for v in value:
            yield from _refs(v)


def _nullable(value: Any) -> Any:
    """`nullable: true` as JSON Schema says it: the schema, or null."""
    if isinstance(value, list):
        return [_nullable(v) for v in value]
    if not isinstance(value, dict):
        return value
    value = {k: _nullable(v) for k, v in value.items()}
    if value.pop("nullable", False):
        return {"anyOf": [value, {"type": "null"}]}
    return value


def validator(name: str) -> jsonschema.Draft202012Validator:
    """A validator of the named component schema. "CompletionChunk" is the chunk of a streamed
    completion: the spec gives it no schema of its own (its `CreateCompletionResponse`), but OpenAI
    sends `finish_reason: null` in every chunk but a choice's last, as clients expect."""
    schemas = json.loads(EXTRACT.read_text())
    if name == "CompletionChunk":
        chunk = json.loads(json.dumps(schemas["CreateCompletionResponse"]))
        chunk["properties"]["choices"]["items"]["properties"]["finish_reason"]["nullable"] = True
        schemas[name] = chunk
    schemas = _nullable(schemas)
    root = {"$ref": f"#/components/schemas/{name}", "components": {"schemas": schemas}}
    return jsonschema.Draft202012Validator(root)
