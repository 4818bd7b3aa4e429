"""refpeft.model.tokenizer (and the GGUF tokenizer of refpeft.model.gguf_file) against transformers' tokenizers.

- SmolLM2's GGUF tokenizer: the same ids as `AutoTokenizer.from_pretrained(folder, gguf_file=...)`
  for plain, unicode, whitespace-heavy and chat text, the same decoded text, the same special ids;
  its chat template renders the same text as transformers' `apply_chat_template(..., tokenize=False)`.
- The same tokenizer saved by transformers as a folder (tokenizer.json + tokenizer_config.json)
  loads with the same behaviour.
- The Jinja environment matches transformers' on the features templates rely on (trim_blocks,
  lstrip_blocks, loop controls, namespace, tojson without HTML escaping, raise_exception), and a
  tokenizer without a template renders ChatML.
"""

from __future__ import annotations


import jinja2
import pytest
import tokenizers

from refpeft.errors import ConfigError, FormatError
from refpeft.model.load import load_tokenizer
from refpeft.model.tokenizer import CHATML_TEMPLATE, Tokenizer, render_chat_template
from tests.support import SMOLLM2, require_smollm2

transformers = pytest.importorskip("transformers", reason="transformers' tokenizers are the peer checked here")
pytest.importorskip("gguf", reason="reading GGUF needs the gguf package")

TEXTS = [
    "Hello world",
    " leading space and  double  spaces ",
    "What is the capital of France?",
    "unicode: héllo naïve café — 日本語のテキスト, emoji 🤗👍🏽, Ελληνικά, русский",
    "digits 1234567890 3.14159 and\nnewlines\n\n\ttabs\r\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "code: def f(x):\n    return x ** 2  # comment",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 👋"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
]


@pytest.fixture(scope="module")
def gguf_pair():
    path = require_smollm2()
    return load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=SMOLLM2)


@pytest.fixture(scope="module")
def folder_pair(gguf_pair, tmp_path_factory):
    _, theirs = gguf_pair
    folder = tmp_path_factory.mktemp("tokenizer")
    theirs.save_pretrained(folder)
    return load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(params=["gguf", "folder"])
def pair(request):
    return request.getfixturevalue(f"{request.param}_pair")


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_like_transformers(pair, text):
    ours, theirs = pair
    ids = ours.encode(text)
    assert ids == theirs(text)["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_special_ids_and_size(pair):
    ours, theirs = pair
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, theirs.unk_token_id) == (1, 2, 2, 0)
    assert ours.vocab_size == len(theirs) == 49152


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", CHATS, ids=["user", "multi-turn"])
def test_chat_template_like_transformers(pair, chat, add_generation_prompt):
    ours, theirs = pair
    text = ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.encode(text) == theirs(text)["input_ids"]
    if add_generation_prompt:
        assert text.endswith("<|im_start|>assistant\n")


def test_gguf_chat_prompt_starts_with_default_system(gguf_pair):
    ours, _ = gguf_pair
    text = ours.apply_chat_template(CHATS[0], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    ids = ours.encode(text)
    assert ids[0] == ours.backend.token_to_id("<|im_start|>") and ids.count(ours.eos_token_id) == 2


# A template exercising what transformers' environment changes or relies on: whitespace control,
# loop controls, namespace, tojson (not HTML-escaped, not key-sorted), special-token variables.
TEMPLATE = """{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role == 'skip' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {{ bos_token }}{{ m | tojson }}
{% endfor %}
{{ ns.n }}{% if add_generation_prompt %}<gen>{{ eos_token }}{% endif %}"""


def test_jinja_environment_like_transformers(gguf_pair):
    ours, theirs = gguf_pair
    chat = [{"role": "user", "content": "<b>&'\"é</b>", "z": 1, "a": None}, {"role": "skip", "content": "x"}]
    for flag in (True, False):
        expected = theirs.apply_chat_template(chat, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=flag)
        assert render_chat_template(TEMPLATE, chat, add_generation_prompt=flag, **ours.special_tokens) == expected


def test_raise_exception_and_bad_templates():
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", [])
    with pytest.raises(ConfigError, match="not valid Jinja"):
        render_chat_template("{% for m in messages %}", [])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{{ messages.__class__.__mro__ }}", [])


def test_no_template_renders_chatml():
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    tokenizer = Tokenizer(backend, chat_template=None)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.chat_template is None and CHATML_TEMPLATE.startswith("{% for message in messages %}")


def test_bad_tokenizer_inputs(tmp_path, gguf_pair):
    ours, _ = gguf_pair
    with pytest.raises(FormatError, match=r"tokenizer\.json: no such file"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"tokenizer\.json: not a readable tokenizer"):
        load_tokenizer(tmp_path)
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 a zip, not a gguf")
    with pytest.raises(FormatError, match=r"fake\.gguf: not a GGUF file"):
        load_tokenizer(tmp_path / "fake.gguf")
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        ours.decode([49152])
    with pytest.raises(ConfigError, match="is not in the tokenizer's vocabulary"):
        Tokenizer(ours.backend, special_tokens={"bos_token": "<no such token>"})


def _bytes_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


@pytest.mark.parametrize("pre, add_bos", [("llama-bpe", True), ("qwen2", False), ("gpt2", False)])
def test_written_gguf_tokenizer_like_transformers(tmp_path, pre, add_bos):
    """Control and user-defined tokens, a split regex, add_bos: the paths SmolLM2's file does not take."""
    import gguf

    tokens = ["<s>", "</s>", "<|ctl|>", *_bytes_alphabet(), "Ġt", "he", "Ġthe", "12", "<think>"]
    types = [3, 3, 3] + [1] * 256 + [1, 1, 1, 1, 4]
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    for key, value in (("block_count", 1), ("embedding_length", 8), ("feed_forward_length", 8),
                       ("attention.head_count", 2), ("context_length", 16)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["Ġ t", "h e", "Ġt he", "1 2"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = load_tokenizer(tmp_path / "t.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    for text in ["the theme 1234 <think>x</think> <|ctl|>é", " the\n\nthe  12", "</s>the"]:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs(text)["input_ids"])
    assert ours.encode("the")[:1] == ([0] if add_bos else [ours.backend.token_to_id("t")])
