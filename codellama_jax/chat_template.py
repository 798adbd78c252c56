"""Chat templates: the model's own jinja `chat_template`, rendered in a sandbox as transformers does.

A checkpoint that carries no template gets a built-in one: CodeLlama-70B's `Source: ... <step>`
format, the `[INST]` format of CodeLlama 7B/13B/34B, or ChatML.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

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
        """The prompt text, byte-identical to transformers' `apply_chat_template(tokenize=False)`."""
        check_messages(messages)
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **{**self.variables, **extra},
            )
        except (jinja2.TemplateError, TypeError) as e:
            raise ValueError(f"chat template: {e}") from None

    def encode(self, tokenizer: Tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """Prompt token ids: the template's special tokens become control tokens, while text the
        messages brought in (even `<s>` or `<step>` typed by a user) stays plain text.

        Special-token text in the messages is swapped for numbered private-use placeholders before
        rendering, so only the template's own text can match a control token; the placeholders
        are then swapped back and marked as plain text for the tokenizer."""
        originals: list[str] = []
        pattern = re.compile("|".join(map(re.escape, sorted([*tokenizer.special_tokens, _MARK], key=len, reverse=True))))

        def escape(value):
            if not isinstance(value, str):
                return value
            return pattern.sub(lambda m: originals.append(m.group()) or f"{_MARK}{len(originals) - 1}{_MARK}", value)

        check_messages(messages)
        escaped = [{k: v if k == "role" else escape(v) for k, v in m.items()} for m in messages]
        rendered = self.render(escaped, add_generation_prompt=add_generation_prompt)
        text, plain_spans = [], []
        length = 0
        for i, piece in enumerate(re.split(f"{_MARK}(\\d+){_MARK}", rendered)):
            if i % 2:  # a placeholder: the original text, as plain text
                piece = originals[int(piece)]
                plain_spans.append((length, length + len(piece)))
            text.append(piece)
            length += len(piece)
        return tokenizer.encode_with_specials("".join(text), plain_spans)


ROLES = ("system", "user", "assistant", "tool")
_MARK = "\ue000"  # private use: brackets the placeholders of special-token text in messages


def check_messages(messages: Sequence[Message]) -> None:
    """Messages are mappings with a known role and string content (a clear error otherwise)."""
    if not messages:
        raise ValueError("messages must not be empty")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")


def default_template_name(tokenizer: Tokenizer) -> str:
    """The built-in template that fits a tokenizer without a `chat_template` of its own."""
    if "<step>" in tokenizer.special_tokens:
        return "codellama-70b"
    if "<|im_start|>" in tokenizer.special_tokens:
        return "chatml"
    return "codellama-inst"


@lru_cache(maxsize=16)
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
