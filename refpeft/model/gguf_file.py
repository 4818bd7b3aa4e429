"""A GGUF file (llama.cpp's format) as a refpeft model: config, dequantised weights, tokenizer.

Read through the `gguf` package (`GGUFReader`, which memory-maps the file, and
`gguf.quants.dequantize`, NumPy, to float32): the same calls transformers' GGUF loader makes
(modeling_gguf_pytorch_utils.load_gguf_checkpoint), so the weights match it bit for bit.

Config, from the metadata of architecture `a` ("llama", "qwen2" or "qwen3"):
    a.block_count -> num_hidden_layers        a.embedding_length -> hidden_size
    a.feed_forward_length -> intermediate_size a.attention.head_count(_kv) -> heads (kv heads)
    a.rope.freq_base -> rope_theta            a.attention.layer_norm_rms_epsilon -> rms_norm_eps
    a.context_length -> max_position_embeddings
    a.vocab_size, else the length of tokenizer.ggml.tokens -> vocab_size
    head_dim: llama a.rope.dimension_count, qwen3 a.attention.key_length, else hidden / heads
    tie_word_embeddings: no `output.weight` tensor; biases: `blk.0.attn_q.bias` present (qwen2: always)
    tokenizer.ggml.{bos,eos,padding}_token_id -> bos/eos/pad_token_id
The floats are float32 in the file and kept as those values (eps 1e-5 reads 9.999999747e-06), as
transformers keeps them. Rope scaling: llama.cpp writes Llama 3.1's as a `rope_freqs` tensor of
per-frequency divisors (and others as `a.rope.scaling.type`); neither is supported, and both are
refused rather than ignored (transformers ignores them and loads unscaled rotary).

Tensors, GGUF name -> transformers name (shapes: GGUF lists dimensions fastest-first, so its
[576, 192] is the torch (192, 576); dequantize returns NumPy's row-major order, torch's):
    token_embd -> model.embed_tokens          output_norm -> model.norm       output -> lm_head
    blk.N.attn_norm -> model.layers.N.input_layernorm   blk.N.ffn_norm -> ...post_attention_layernorm
    blk.N.attn_{q,k,v,output} -> ...self_attn.{q,k,v,o}_proj   blk.N.attn_{q,k}_norm -> ...self_attn.{q,k}_norm
    blk.N.ffn_{gate,up,down} -> ...mlp.{gate,up,down}_proj

llama.cpp's converter permutes the rows of Llama's q and k (weights and biases) so that each head's
rotary pairs are adjacent (GPT-J "interleaved" rotary) instead of split in halves (transformers'
rotate_half). With n the number of heads of that projection (heads for q, kv heads for k) and
r = rows / n / 2, it wrote permute(w) = w.reshape(n, 2, r, ...).swapaxes(1, 2).reshape(w.shape);
the inverse, transformers' `LlamaTensorProcessor._reverse_permute_weights`, is

    unpermute(w) = w.reshape(n, r, 2, ...).swapaxes(1, 2).reshape(w.shape)

Qwen2/Qwen3 use rotate_half in llama.cpp too (NEOX rotary), so their q/k are stored unpermuted.

Tokenizer (transformers/integrations/gguf/gguf_tokenizer_mapping.py, `byte_level_tokenizer`):
tokenizer.ggml.model "gpt2" is byte-level BPE. The vocabulary is tokenizer.ggml.tokens with ids by
position (a token written outside the byte alphabet is respelled through it), merges are
tokenizer.ggml.merges split at the space; the backend is BPE with no unk token, ByteLevel
pre-tokenizer (GPT-2 regex, no prefix space; the split regex transformers substitutes for
tokenizer.ggml.pre "llama-bpe"-like and "qwen2"-like vocabularies is used for those), ByteLevel
decoder. Tokens typed CONTROL (3) become special added tokens, USER_DEFINED (4) plain added tokens;
bos/eos/unk/pad are the tokens at the ids in the metadata; tokenizer.ggml.add_{bos,eos}_token set
the post-processor; tokenizer.chat_template is the template. Other tokenizer models (sentencepiece
"llama", "t5", ...) are a ConfigError. Note that transformers, and so refpeft, do not reproduce
llama.cpp's own pre-tokenizer for every tokenizer.ggml.pre value: SmolLM2's "smollm" gets the GPT-2
regex, as transformers' GPT2Tokenizer uses.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers.models import BPE

from refpeft.backend import numpy_namespace
from refpeft.errors import ConfigError, DTypeError, FormatError
from refpeft.model.config import ModelConfig
from refpeft.model.tokenizer import Tokenizer, template_post_processor
from refpeft.model.weights import COMPUTE_DTYPES, expected_shapes

ARCHITECTURES = ("llama", "qwen2", "qwen3")
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_CONTROL, _USER_DEFINED = 3, 4
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre values for which transformers replaces the GPT-2 split (GGUF_PRE_TOKENIZER_SPLITS);
# those it maps to a regex not listed here are refused rather than tokenised differently.
_SPLITS = {**dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                            "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
           **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT)}
_UNSUPPORTED_SPLITS = ("tekken", "qwen35", "gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2")


def load_gguf(path: str | os.PathLike, *, dtype: str = "float32",
              xp: Any = None) -> tuple[ModelConfig, dict[str, Any], Tokenizer]:
    """(config, weights, tokenizer) of a GGUF file; weights are transformers-named `dtype` arrays of `xp`."""
    xp = numpy_namespace() if xp is None else xp
    if dtype not in COMPUTE_DTYPES:
        raise DTypeError(f"models load in {' or '.join(COMPUTE_DTYPES)}, not {dtype!r}")
    reader = open_gguf(path)
    config = gguf_config(reader, source=path)
    tokenizer = gguf_tokenizer(reader, source=path)
    tensors = _check_tensors(reader, config, source=path)  # every name and shape, before any dequantising
    import gguf.quants

    weights = {}
    for hf_name, tensor in tensors.items():
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise FormatError(f"{path}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which "
                              "gguf cannot dequantise") from None
        values = np.array(values, dtype=dtype).reshape(_torch_shape(tensor))  # a copy: F32 data is the file's map
        if config.model_type == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            heads = config.num_attention_heads if ".q_proj." in hf_name else config.num_key_value_heads
            values = unpermute_rotary_rows(values, heads)
        weights[hf_name] = xp.asarray(values)
    return config, weights, tokenizer


def unpermute_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation for a projection with `n_heads` heads (module docstring)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise FormatError(f"{rows} rows cannot be split into {n_heads} heads of rotary pairs")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: str | os.PathLike) -> Any:
    """A gguf.GGUFReader on `path`; FormatError naming the file if it is missing or not GGUF."""
    source = Path(path)
    if not source.is_file():
        raise FormatError(f"{source}: no such file")
    with open(source, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise FormatError(f"{source}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    from gguf import GGUFReader

    try:
        return GGUFReader(str(source))
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... for corrupt files
        raise FormatError(f"{source}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def gguf_config(reader: Any, *, source: Any = "") -> ModelConfig:
    """The ModelConfig the metadata describes (module docstring)."""
    arch = _field(reader, "general.architecture", source=source)
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{source}: GGUF architecture {arch!r} is not supported; refpeft loads "
                          f"{', '.join(ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ConfigError(f"{source}: holds a rope_freqs tensor (llama.cpp's form of Llama 3.1 rope scaling), "
                          "which refpeft does not support")
    scaling = _field(reader, f"{arch}.rope.scaling.type", source=source, default="none")
    if scaling != "none":
        raise ConfigError(f"{source}: rope scaling type {scaling!r} is not supported")

    def get(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", source=source, default=default)

    hidden, heads = get("embedding_length"), get("attention.head_count")
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
        raise FormatError(f"{source}: {arch}.embedding_length / attention.head_count missing or not integers")
    head_dim = {"llama": get("rope.dimension_count"), "qwen3": get("attention.key_length")}.get(arch)
    if head_dim is None:
        head_dim = hidden // heads
    vocab = get("vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    biased = arch == "qwen2" or "blk.0.attn_q.bias" in names
    eps, theta = get("attention.layer_norm_rms_epsilon"), get("rope.freq_base", 10_000.0)
    try:
        return ModelConfig(
            model_type=arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=get("feed_forward_length"),
            num_hidden_layers=get("block_count"), num_attention_heads=heads,
            num_key_value_heads=get("attention.head_count_kv", heads), head_dim=head_dim,
            rms_norm_eps=float(eps) if isinstance(eps, (int, float)) else eps,
            rope_theta=float(theta) if isinstance(theta, (int, float)) else theta, rope_scaling=None,
            max_position_embeddings=get("context_length"), tie_word_embeddings="output.weight" not in names,
            attention_bias=biased, o_proj_bias=arch != "qwen2" and "blk.0.attn_output.bias" in names,
            mlp_bias=arch == "llama" and "blk.0.ffn_up.bias" in names, qk_norm=arch == "qwen3",
            pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id", source=source, default=None),
            bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id", source=source, default=None),
            eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id", source=source, default=None))
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def gguf_tokenizer(reader: Any, *, source: Any = "") -> Tokenizer:
    """The byte-level BPE tokenizer the metadata describes, as transformers builds it (module docstring)."""
    kind = _field(reader, "tokenizer.ggml.model", source=source, default=None)
    if kind != "gpt2":
        raise ConfigError(f"{source}: tokenizer model {kind!r} is not supported; refpeft builds byte-level BPE "
                          "('gpt2') tokenizers from GGUF")
    pre = _field(reader, "tokenizer.ggml.pre", source=source, default=None)
    if pre in _UNSUPPORTED_SPLITS:
        raise ConfigError(f"{source}: pre-tokenizer {pre!r} is not supported")
    tokens = _field(reader, "tokenizer.ggml.tokens", source=source)
    merges = _field(reader, "tokenizer.ggml.merges", source=source, default=[])
    types = _field(reader, "tokenizer.ggml.token_type", source=source, default=[])
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8")): index
             for index, token in enumerate(tokens)}
    backend = tokenizers.Tokenizer(BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                                       continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    if pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
               if k == _CONTROL and set(t) <= alphabet]
    if control:
        backend.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
            if k == _USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens(user)
    special = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        index = _field(reader, f"tokenizer.ggml.{key}", source=source, default=None)
        if index is not None and not 0 <= index < len(tokens):
            raise FormatError(f"{source}: tokenizer.ggml.{key} {index} is outside the {len(tokens)} tokens")
        special[name] = None if index is None else tokens[index]
    named = [AddedToken(t, normalized=False, special=True) for t in special.values()
             if t is not None and t not in {a.content for a in backend.get_added_tokens_decoder().values()}]
    if named:
        backend.add_special_tokens(named)
    backend.post_processor = template_post_processor(
        backend, bos=special["bos_token"], eos=special["eos_token"],
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", source=source, default=False)),
        add_eos=bool(_field(reader, "tokenizer.ggml.add_eos_token", source=source, default=False)))
    template = _field(reader, "tokenizer.chat_template", source=source, default=None)
    return Tokenizer(backend, special_tokens=special, chat_template=template)


def _check_tensors(reader: Any, config: ModelConfig, *, source: Any) -> dict[str, Any]:
    """transformers' name -> ReaderTensor, in model order; FormatError for unknown, missing, mis-shaped."""
    expected = expected_shapes(config)
    found: dict[str, Any] = {}
    for tensor in reader.tensors:
        hf_name = _hf_name(tensor.name)
        if hf_name is None or hf_name not in expected:
            raise FormatError(f"{source}: unexpected tensor {tensor.name!r} (shape {_torch_shape(tensor)}) for a "
                              f"{config.model_type} model with this metadata")
        if hf_name in found:
            raise FormatError(f"{source}: tensor {tensor.name!r} appears twice")
        if _torch_shape(tensor) != expected[hf_name]:
            raise FormatError(f"{source}: tensor {tensor.name!r} ({hf_name}) has shape {_torch_shape(tensor)}, "
                              f"the metadata implies {expected[hf_name]}")
        found[hf_name] = tensor
    missing = [name for name in expected if name not in found]
    if missing:
        raise FormatError(f"{source}: tensor for {missing[0]!r} (shape {expected[missing[0]]}) is missing"
                          + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""))
    return {name: found[name] for name in expected}


def _hf_name(gguf_name: str) -> str | None:
    """transformers' name for a GGUF tensor name, or None for one outside the table."""
    top, _, suffix = gguf_name.partition(".")
    if top in _TOP and suffix in ("weight", "bias"):
        return f"{_TOP[top]}.{suffix}"
    match = _BLOCK.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER:
        return None
    return f"model.layers.{int(match.group(1))}.{_LAYER[match.group(2)]}.{match.group(3)}"


def _torch_shape(tensor: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _field(reader: Any, key: str, *, source: Any, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise FormatError(f"{source}: metadata key {key!r} is missing")
        return default
    try:
        return field.contents()
    except Exception as exc:
        raise FormatError(f"{source}: metadata key {key!r} cannot be read ({exc})") from None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE spells every byte as one of these)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))
