"""Whole-decoder ONNX export (refpeft_onnx.decoder_*) run by onnxruntime-genai, against refpeft and transformers + PEFT.

A tiny random Llama (GQA, untied head, random norms) is saved as a transformers folder, with PEFT
adapters (LoRA with rank/alpha patterns, rsLoRA, DoRA, VeRA) saved by PEFT itself. Each is
exported the way a user would (`refpeft export BASE ADAPTER... -o DIR`), and the 32-token greedy
continuation through onnxruntime-genai must equal refpeft's own greedy decode and transformers +
PEFT `generate` (all float32), merged and unmerged, adapters switched in one process.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from refpeft.cli import main
from refpeft.errors import ConfigError, OutputError
from refpeft.model.adapted import with_adapter
from refpeft.model.decoder import Model
from refpeft.model.generate import generate
from refpeft.model.load import load_model

pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'refpeft[onnx]'")
og = pytest.importorskip("onnxruntime_genai", reason="the onnx extra: pip install 'refpeft[onnx]'")
torch = pytest.importorskip("torch", reason="transformers + PEFT on torch are the peers checked here")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from refpeft_onnx.decoder_export import export_decoder, load_base, read_adapters  # noqa: E402
from refpeft_onnx.genai_run import GenaiModel  # noqa: E402
from tests.peft_peers import write_base_and_adapters  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=96, rms_norm_eps=1e-6, tie_word_embeddings=False)
PROMPT = [5, 17, 3, 42, 8, 23, 11, 60, 2]
NEW_TOKENS = 32
ADAPTER_CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                      "up_proj", "down_proj"], init_lora_weights=False,
                                    rank_pattern={"q_proj": 2}, alpha_pattern={r"layers\.1\.mlp\.down_proj": 3.0}),
    "rslora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                                      init_lora_weights=False),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                                    init_lora_weights=False),
    "vera": lambda: peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"], save_projection=True, init_weights=False),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The base folder and one PEFT adapter folder per method, all written by transformers / PEFT."""
    root = tmp_path_factory.mktemp("decoder")
    write_base_and_adapters(root, TINY, ADAPTER_CONFIGS)
    return root


def _peft_greedy(folders, adapter: str | None) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folders / "base", attn_implementation="eager").eval()
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, folders / adapter).eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                             do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0,
                             top_k=None, top_p=None, temperature=None)
    return out[0, len(PROMPT):].tolist()


def _refpeft_greedy(folders, adapter: str | None) -> list[int]:
    config, weights, _ = load_model(folders / "base")
    model = Model(config, weights)
    if adapter is not None:
        model = with_adapter(model, folders / adapter, dtype="float32")
    [new] = generate(model, [PROMPT], max_new_tokens=NEW_TOKENS)
    return new


@pytest.fixture(scope="module")
def expected(folders):
    """Each adapter's (and the base's) greedy continuation by PEFT, checked equal to refpeft's."""
    tokens = {}
    for adapter in [None, *ADAPTER_CONFIGS]:
        theirs = _peft_greedy(folders, adapter)
        assert _refpeft_greedy(folders, adapter) == theirs, adapter
        tokens[adapter] = theirs
    assert len({tuple(t) for t in tokens.values()}) == len(tokens)   # every adapter changes the text
    return tokens


def test_merged_exports_generate_each_adapters_tokens(folders, expected, tmp_path):
    for adapter in [None, *ADAPTER_CONFIGS]:
        out = tmp_path / f"merged-{adapter}"
        args = ["export", *([str(folders / adapter)] if adapter else []), "--base", str(folders / "base"), "-o", str(out)]
        assert main(args) == 0
        assert GenaiModel(out).generate(PROMPT, max_new_tokens=NEW_TOKENS) == expected[adapter], adapter


def test_one_unmerged_export_switches_between_adapters_in_one_process(folders, expected, tmp_path):
    out = tmp_path / "unmerged"
    names = ["lora", "rslora", "dora"]
    assert main(["export", *(str(folders / n) for n in names), "--base", str(folders / "base"), "--unmerged",
                 "-o", str(out)]) == 0
    assert sorted(p.name for p in (out / "adapters").iterdir()) == sorted(f"{n}.onnx_adapter" for n in names)
    model = GenaiModel(out)
    for adapter in [*names, None, names[0]]:                  # back and forth, and to no adapter
        assert model.generate(PROMPT, max_new_tokens=NEW_TOKENS, adapter=adapter) == expected[adapter], adapter


def test_unmerged_vera_export(folders, expected, tmp_path):
    out = tmp_path / "vera"
    assert main(["export", str(folders / "vera"), "--base", str(folders / "base"), "--unmerged", "-o", str(out)]) == 0
    model = GenaiModel(out)
    assert model.generate(PROMPT, max_new_tokens=NEW_TOKENS, adapter="vera") == expected["vera"]
    assert model.generate(PROMPT, max_new_tokens=NEW_TOKENS) == expected[None]


def test_the_folder_holds_what_genai_and_transformers_read(folders, tmp_path):
    out = tmp_path / "files"
    export_decoder(out, *load_base(folders / "base"))
    config = json.loads((out / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == TINY["num_key_value_heads"]
    assert config["search"]["past_present_share_buffer"] is False
    assert sorted(p.name for p in out.iterdir()) == ["genai_config.json", "model.onnx", "model.onnx.data"]   # no tokenizer


def test_bad_output_paths_write_nothing(folders, tmp_path):
    model, tokenizer = load_base(folders / "base")
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(OutputError, match="exists"):
        export_decoder(existing, model, tokenizer)
    with pytest.raises(OutputError, match="inside the input"):
        export_decoder(folders / "base" / "onnx", model, tokenizer, inputs=[folders / "base"])
    assert not (folders / "base" / "onnx").exists() and list(existing.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["exists"]                               # no staging left behind


def test_adapters_that_match_nothing_are_refused(folders, tmp_path):
    one_layer = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "num_hidden_layers": 1}))
    one_layer.save_pretrained(tmp_path / "one-layer")
    with pytest.raises(ConfigError, match="model.layers.1.* not a linear layer"):
        read_adapters(load_base(tmp_path / "one-layer")[0], [str(folders / "lora")])
    model, _ = load_base(folders / "base")
    adapters = read_adapters(model, [f"first={folders / 'lora'}"])
    with pytest.raises(ConfigError, match="two adapters are named"):
        read_adapters(model, [str(folders / "lora"), f"lora={folders / 'dora'}"])
    with pytest.raises(ConfigError, match="merged graph folds in one adapter"):
        export_decoder(tmp_path / "x", model, None, {**adapters, "second": adapters["first"]}, form="merged")
    assert not (tmp_path / "x").exists()


def _dequantized_model(folders):
    """The NF4 export's base as refpeft computes it (float32 dequantised projections) and the same weights in torch."""
    from refpeft_onnx.decoder_verify import float64_model

    model, _ = load_base(folders / "base", nf4_blocksize=64)
    dense = float64_model(model)
    weights = {name: w.astype(np.float32) for name, w in dense.weights.items()}
    peer = transformers.AutoModelForCausalLM.from_pretrained(folders / "base", attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in peer.named_parameters():
            p.copy_(torch.from_numpy(weights[name]))
    return Model(dense.config, weights), peer


def test_unmerged_adapters_on_an_nf4_base_generate_as_peft_on_the_dequantised_base(folders, tmp_path):
    out = tmp_path / "nf4"
    assert main(["export", str(folders / "lora"), str(folders / "dora"), "--base", str(folders / "base"), "--nf4",
                 "--unmerged", "-o", str(out)]) == 0
    dense, peer = _dequantized_model(folders)
    genai = GenaiModel(out)
    for adapter in ("lora", "dora"):
        [ours] = generate(with_adapter(dense, folders / adapter, dtype="float32"), [PROMPT], max_new_tokens=NEW_TOKENS)
        adapted = peft.PeftModel.from_pretrained(peer, folders / adapter).eval()
        with torch.no_grad():
            theirs = adapted.generate(input_ids=torch.tensor([PROMPT]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                      eos_token_id=None, pad_token_id=0, top_k=None, top_p=None, temperature=None)
        peer = adapted.unload()
        assert ours == theirs[0, len(PROMPT):].tolist() == genai.generate(PROMPT, max_new_tokens=NEW_TOKENS,
                                                                          adapter=adapter), adapter


def test_an_nf4_merge_is_refused_with_the_requantisation_error(folders, tmp_path, capsys):
    out = tmp_path / "nf4-merged"
    assert main(["export", str(folders / "lora"), "--base", str(folders / "base"), "--nf4", "-o", str(out)]) == 2
    message = capsys.readouterr().err
    assert "re-quantising the merged weight" in message and "max error" in message and not out.exists()


def test_a_float16_export_is_verified_and_runs_in_genai(folders, expected, tmp_path, capsys):
    out = tmp_path / "fp16"
    assert main(["export", str(folders / "dora"), "--base", str(folders / "base"), "--unmerged", "--dtype", "float16",
                 "-o", str(out)]) == 0
    assert "agrees with the refpeft reference" in capsys.readouterr().out
    tokens = GenaiModel(out).generate(PROMPT, max_new_tokens=NEW_TOKENS, adapter="dora")
    # float16 rounding may flip a near tie, so only the opening tokens are held to float32's
    assert len(tokens) == NEW_TOKENS and tokens[:4] == expected["dora"][:4]


def test_a_graph_that_disagrees_with_the_reference_is_not_written(folders, tmp_path, monkeypatch):
    import refpeft_onnx.decoder_export as decoder_export
    from refpeft_onnx.verify import VerificationError

    model, _ = load_base(folders / "base")
    adapters = read_adapters(model, [str(folders / "lora")])
    build = decoder_export.build_decoder
    path = next(iter(adapters["lora"].modules))                 # the graph gets this module's B doubled
    module = adapters["lora"].modules[path]
    wrong = {"lora": type(adapters["lora"])({**adapters["lora"].modules, path: module.replace(B=2 * module.B)})}
    monkeypatch.setattr(decoder_export, "build_decoder", lambda m, a, **kw: build(m, wrong, **kw))
    with pytest.raises(VerificationError, match="DISAGREES"):
        export_decoder(tmp_path / "wrong", model, None, adapters)
    assert list(tmp_path.iterdir()) == []


FAMILIES = {
    "qwen2-bias": ("qwen2", dict(use_sliding_window=False)),
    "qwen3-qk-norm": ("qwen3", dict(head_dim=8, use_sliding_window=False)),
    "mistral": ("mistral", dict(sliding_window=None)),
    "llama-tied-llama3-rope": ("llama", dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_generates_through_genai_as_transformers(name, tmp_path):
    family, extra = FAMILIES[name]
    torch.manual_seed(0)
    peer = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(family, **{**TINY, **extra}, attn_implementation="eager")).eval()
    with torch.no_grad():                                   # biases and norms that matter
        for n, p in peer.named_parameters():
            if n.endswith((".bias", "norm.weight")):
                p.copy_((1.0 if n.endswith("norm.weight") else 0.0) + 0.3 * torch.randn_like(p))
    peer.config.eos_token_id = peer.generation_config.eos_token_id = None      # 32 tokens from all three
    peer.save_pretrained(tmp_path / "base")
    assert main(["export", "--base", str(tmp_path / "base"), "-o", str(tmp_path / "onnx")]) == 0
    with torch.no_grad():
        out = peer.generate(input_ids=torch.tensor([PROMPT]), do_sample=False, max_new_tokens=NEW_TOKENS,
                            pad_token_id=0, top_k=None, top_p=None, temperature=None)
    theirs = out[0, len(PROMPT):].tolist()
    model, _ = load_base(tmp_path / "base")
    assert generate(model, [PROMPT], max_new_tokens=NEW_TOKENS)[0] == theirs
    assert GenaiModel(tmp_path / "onnx").generate(PROMPT, max_new_tokens=NEW_TOKENS) == theirs
