"""A model's tokenizer: text <-> token ids through `tokenizers`, and its chat template rendered as transformers does.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the same Rust object transformers' fast tokenizers
drive) with the ids a decoder needs (bos, eos, pad, unk) and the chat template. It is built
  - from a model folder: `tokenizer.json` (the backend), and `tokenizer_config.json` /
    `special_tokens_map.json` / `chat_template.jinja` (special tokens, template, add_bos/eos);
  - from a GGUF file's metadata, by refpeft.model.gguf_file.

encode(text) equals transformers' `tokenizer(text)["input_ids"]` and decode(ids) its
`tokenizer.decode(ids)`: transformers 5 calls the backend's encode with add_special_tokens=True and
its decode without clean-up for BPE models. When tokenizer_config.json states add_bos_token or
add_eos_token, or tokenizer.json has no post-processor, transformers 5 replaces the post-processor
by a TemplateProcessing that adds exactly those (`TokenizersBackend.update_post_processor`); so does
`template_post_processor` here.

Chat templates (transformers/utils/chat_template_utils.py, `_cached_compile_jinja_template` and
`render_jinja_template`): Jinja2's ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks,
the loopcontrols extension, a `{% generation %}` block tag (rendered as its body; transformers uses
it to track assistant tokens), and the globals `raise_exception(message)` (raises
jinja2.TemplateError) and `strftime_now(format)`; the `tojson` filter is json.dumps with
ensure_ascii=False and no HTML escaping. The template sees `messages` (each dict without its
None-valued keys; reasoning under "reasoning_content"/"thinking"/"reasoning" is aliased to the first
two, as transformers does), `tools`, `documents`, `add_generation_prompt`, the special tokens by
name (`bos_token`, `eos_token`, `unk_token`, `pad_token`) and any extra keywords. transformers
refuses a tokenizer without a template; refpeft falls back to ChatML (`CHATML_TEMPLATE`), the
format SmolLM2 and Qwen use.
"""

from __future__ import annotations

import functools
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import processors

from refpeft.errors import ConfigError, FormatError
from refpeft.io import read_json_object

CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
                   "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class Tokenizer:
    """A tokenizers.Tokenizer with its special tokens and chat template (see the module docstring)."""

    def __init__(self, backend: tokenizers.Tokenizer, *, special_tokens: dict[str, str | None] | None = None,
                 chat_template: str | None = None):
        self.backend = backend
        self.special_tokens = {name: (special_tokens or {}).get(name) for name in SPECIAL_NAMES}
        self.chat_template = chat_template
        for name, token in self.special_tokens.items():
            if token is not None and backend.token_to_id(token) is None:
                raise ConfigError(f"{name} {token!r} is not in the tokenizer's vocabulary")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._id("unk_token")

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (special tokens written in the text stay whole)."""
        if not isinstance(text, str):
            raise ConfigError(f"encode takes a str, got {type(text).__name__}")
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """The text of `ids`."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ConfigError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False,
                            tools: list[dict] | None = None, documents: list[dict] | None = None,
                            **kwargs: Any) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...]), as transformers'
        `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` renders it."""
        return render_chat_template(self.chat_template or CHATML_TEMPLATE, messages,
                                    add_generation_prompt=add_generation_prompt, tools=tools, documents=documents,
                                    **{**self.special_tokens, **kwargs})

    def _id(self, name: str) -> int | None:
        token = self.special_tokens[name]
        return None if token is None else self.backend.token_to_id(token)


def render_chat_template(template: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = False,
                         **variables: Any) -> str:
    """Render a chat template over `messages` in transformers' Jinja environment (module docstring)."""
    chat = []
    for message in messages:
        if not isinstance(message, dict):
            raise ConfigError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    try:
        compiled = _compiled(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"the chat template is not valid Jinja (line {exc.lineno}: {exc.message})") from None
    return compiled.render(messages=chat, add_generation_prompt=add_generation_prompt, **variables)


def template_post_processor(backend: tokenizers.Tokenizer, *, bos: str | None, eos: str | None,
                            add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    """transformers 5's `update_post_processor`: add bos/eos around each sequence when asked."""
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    special = ([(bos, backend.token_to_id(bos))] if add_bos else []) + ([(eos, backend.token_to_id(eos))]
                                                                         if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def tokenizer_from_folder(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder (tokenizer.json and its config files)."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FormatError(f"{path}: no such file (refpeft reads fast tokenizers' tokenizer.json)")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own exception type for a bad file
        raise FormatError(f"{path}: not a readable tokenizer ({exc})") from None
    config = {**_json_object(folder / "special_tokens_map.json"), **_json_object(folder / "tokenizer_config.json")}
    special = {name: _token_text(config.get(name)) for name in SPECIAL_NAMES}
    template = config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():  # transformers >= 4.43 saves the template on its own
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(template, list):  # several named templates: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ConfigError(f"{folder / 'tokenizer_config.json'}: chat templates {sorted(named)} have no 'default'")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise FormatError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string")
    if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
        backend.post_processor = template_post_processor(
            backend, bos=special["bos_token"], eos=special["eos_token"],
            add_bos=bool(config.get("add_bos_token", False)), add_eos=bool(config.get("add_eos_token", False)))
    return Tokenizer(backend, special_tokens=special, chat_template=template)


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> jinja2.Template:
    """The template compiled once (transformers caches it too: `_cached_compile_jinja_template`)."""
    return _environment().from_string(template)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _json_object(path: Path) -> dict[str, Any]:
    """The file's JSON object, or {} when the (optional) file is absent."""
    return read_json_object(path) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or a serialised AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
