"""Chat templates: the model's own jinja `chat_template`, rendered in a sandbox as transformers does.

A checkpoint that carries no template gets a built-in one: CodeLlama-70B's `Source: ... <step>`
format, the `[INST]` format of CodeLlama 7B/13B/34B, or ChatML.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from codellama_jax.errors import RequestError
from codellama_jax.tokenizer import Tokenizer

Message = Mapping[str, Any]

CODELLAMA_70B_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set offset = 1 %}{% else %}{% set offset = 0 %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != ((loop.index0 + offset) % 2 == 0) and message['role'] != 'system' %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ 'Source: ' + message['role'] + '\\n\\n ' + message['content'] | trim + ' <step> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Source: assistant\\nDestination: user\\n\\n ' }}{% endif %}"
)

CODELLAMA_INST_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% set content = message['content'] | trim %}"
    "{% if loop.first and system %}{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}{% endif %}"
    "{{ bos_token + '[INST] ' + content + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES = {
    "codellama-70b": CODELLAMA_70B_TEMPLATE,
    "codellama-inst": CODELLAMA_INST_TEMPLATE,
    "chatml": CHATML_TEMPLATE,
}


class ChatTemplate:
    """A jinja chat template with the special-token strings it may refer to."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", **special_tokens: str):
        self.source = source
        self.variables = {"bos_token": bos_token, "eos_token": eos_token, **special_tokens}
        self._template = _compile(source)

    @classmethod
    def builtin(cls, name: str, **special_tokens: str) -> ChatTemplate:
        if name not in BUILTIN_TEMPLATES:
            raise KeyError(f"unknown chat template {name!r}; built-in: {', '.join(BUILTIN_TEMPLATES)}")
        return cls(BUILTIN_TEMPLATES[name], **special_tokens)

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True, **extra: Any) -> str:
        """The template applied to `messages` as they are, byte-identical to transformers'
        `apply_chat_template(tokenize=False)`."""
        check_messages(messages)
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **{**self.variables, **extra},
            )
        except (jinja2.TemplateError, TypeError) as e:
            raise RequestError(f"chat template: {e}", param="messages") from None

    def prompt(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation in any order OpenAI accepts (see `plain_messages`):
        rendered as sent when the template can express it, else with its turns merged
        (`merge_turns`). A final assistant message is continued: the prompt ends with its text,
        as transformers' `continue_final_message` renders it; any other ends with the template's
        generation prompt (unless `add_generation_prompt` is False)."""
        messages = plain_messages(messages)
        check_messages(messages)
        if messages[-1]["role"] == "assistant" and not messages[-1]["content"].strip():  # nothing to continue
            messages = messages[:-1]
        if not messages:
            raise RequestError("there is nothing to answer: the only message is an empty assistant message",
                               param="messages")  # fmt: skip
        continued = messages[-1]["role"] == "assistant"
        if continued:  # a mark right after its text, to cut the template's closing text at (as transformers does)
            messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + _END + " "}]
        generation_prompt = add_generation_prompt and not continued
        try:
            text = self.render(messages, add_generation_prompt=generation_prompt)
        except RequestError:
            merged = merge_turns(messages)
            if merged == messages:
                raise
            text = self.render(merged, add_generation_prompt=generation_prompt)
        if not continued:
            return text
        end = text.rfind(_END)
        if end < 0:
            raise RequestError("the chat template does not show the final assistant message, so it cannot be continued",
                               param="messages")  # fmt: skip
        return text[:end] if text.startswith(" ", end + 1) else text[:end].rstrip()  # a template that trims: trimmed

    def encode(
        self, tokenizer: Tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = True, limit: int | None = None
    ) -> list[int]:
        """Prompt token ids (`prompt`): the template's special tokens become control tokens, while
        text the messages brought in (even `<s>` or `<step>` typed by a user) stays plain text.
        A prompt that surely has `limit` tokens or more is refused before it is tokenized.

        Special-token text in the messages is swapped for numbered private-use placeholders before
        rendering, so only the template's own text can match a control token; the placeholders
        are then swapped back and marked as plain text for the tokenizer."""
        originals: list[str] = []
        pattern = re.compile("|".join(map(re.escape, sorted([*tokenizer.special_tokens, _MARK, _END], key=len, reverse=True))))

        def escape(value):
            if not isinstance(value, str):
                return value
            return pattern.sub(lambda m: originals.append(m.group()) or f"{_MARK}{len(originals) - 1}{_MARK}", value)

        escaped = [{k: v if k == "role" else escape(v) for k, v in m.items()} for m in plain_messages(messages)]
        rendered = self.prompt(escaped, add_generation_prompt=add_generation_prompt)
        text, plain_spans = [], []
        length = 0
        for i, piece in enumerate(re.split(f"{_MARK}(\\d+){_MARK}", rendered)):
            if i % 2:  # a placeholder: the original text, as plain text
                piece = originals[int(piece)]
                plain_spans.append((length, length + len(piece)))
            text.append(piece)
            length += len(piece)
        return tokenizer.encode_with_specials("".join(text), plain_spans, limit=limit)


ROLES = ("system", "user", "assistant", "tool")
_MARK = "\ue000"  # private use: brackets the placeholders of special-token text in messages
_END = "\ue001"  # private use: marks where a continued message's text ends


def check_messages(messages: Sequence[Message]) -> None:
    """Messages are mappings with a known role and string content (a clear error otherwise)."""
    if not messages:
        raise RequestError("messages must not be empty", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages.{i}")
        if m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}",
                               param=f"messages.{i}.role")  # fmt: skip
        if not isinstance(m.get("content"), str):
            raise RequestError(f"messages[{i}].content must be a string", param=f"messages.{i}.content")


def plain_messages(messages: Sequence[Message]) -> list[dict]:
    """OpenAI's message forms in the shape templates know: role `developer` is `system`, and
    `content` given as parts is their text, joined by newlines (a part that is not text is a
    RequestError naming it: these models read text only). Other keys (`name`, ...) pass through."""
    if isinstance(messages, (str, Mapping)) or not messages:
        raise RequestError("messages must be a non-empty list of messages", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'", param=f"messages.{i}")
        m = dict(m)
        if m.get("role") == "developer":
            m["role"] = "system"
        if isinstance(m.get("content"), (list, tuple)):
            if not m["content"]:
                raise RequestError(f"messages[{i}].content has no parts", param=f"messages.{i}.content")
            m["content"] = "\n".join(_part_text(part, f"messages.{i}.content.{j}") for j, part in enumerate(m["content"]))
        out.append(m)
    return out


def _part_text(part: Any, param: str) -> str:
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind in ("text", "refusal") and isinstance(part.get(kind), str):  # an assistant's refusal is its text
        return part[kind]
    if kind in ("image_url", "input_audio", "file", "image", "audio"):
        raise RequestError(f"{param} is an {kind!r} part; this model takes text only", param=param)
    raise RequestError(f'{param} must be a content part such as {{"type": "text", "text": "..."}}', param=param)


def merge_turns(messages: Sequence[Message]) -> list[dict]:
    """The conversation as templates with a strict order expect it (one system message first,
    user and assistant alternating): system messages joined into one at the start, consecutive
    messages of one role joined into one; texts joined by a blank line, in order."""
    systems = [m for m in messages if m["role"] == "system"]
    out = [{"role": "system", "content": "\n\n".join(m["content"] for m in systems)}] if systems else []
    for m in messages:
        if m["role"] == "system":
            continue
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{m['content']}"}
        else:
            out.append(dict(m))
    return out


def default_template_name(tokenizer: Tokenizer) -> str:
    """The built-in template that fits a tokenizer without a `chat_template` of its own."""
    if "<step>" in tokenizer.special_tokens:
        return "codellama-70b"
    if "<|im_start|>" in tokenizer.special_tokens:
        return "chatml"
    return "codellama-inst"


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not parse: {e}") from None


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def read_chat_template(directory: Path) -> str | None:
    """The `chat_template` a HF checkpoint directory carries (tokenizer_config.json or chat_template.jinja)."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    config_file = directory / "tokenizer_config.json"
    template = json.loads(config_file.read_text()).get("chat_template") if config_file.is_file() else None
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def chat_template_for(tokenizer: Tokenizer, source: str | None) -> ChatTemplate:
    """The checkpoint's own template, or the built-in one that fits its tokenizer."""
    tokens = {"bos_token": tokenizer.token_text(tokenizer.bos_id) or "", "eos_token": tokenizer.token_text(tokenizer.eos_id) or ""}
    if source:
        return ChatTemplate(source, **tokens)
    return ChatTemplate.builtin(default_template_name(tokenizer), **tokens)
