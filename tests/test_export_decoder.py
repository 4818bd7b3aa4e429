"""Whole-decoder ONNX export (refpeft_onnx.decoder_*) run by onnxruntime-genai, against refpeft and transformers + PEFT.

A tiny random Llama (GQA, untied head, random norms) is saved as a transformers folder, with PEFT
adapters (LoRA with rank/alpha patterns, rsLoRA, DoRA, VeRA) saved by PEFT itself. Each is
exported the way a user would (`refpeft export BASE ADAPTER... -o DIR`), and the 32-token greedy
continuation through onnxruntime-genai must equal refpeft's own greedy decode and transformers +
PEFT `generate` (all float32), merged and unmerged, adapters switched in one process.
"""

from __future__ import annotations

import json

import pytest

from refpeft.cli import main
from refpeft.errors import ConfigError
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


def _peer_base(seed: int = 0):
    config = transformers.LlamaConfig(**TINY, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The base folder and one PEFT adapter folder per method, all written by transformers / PEFT."""
    root = tmp_path_factory.mktemp("decoder")
    _peer_base().save_pretrained(root / "base")
    for i, (name, make) in enumerate(ADAPTER_CONFIGS.items()):
        torch.manual_seed(10 + i)
        adapted = peft.get_peft_model(_peer_base(), make())
        with torch.no_grad():
            for n, p in adapted.named_parameters():
                if p.requires_grad:
                    p.copy_(0.3 * torch.randn_like(p) + (1.0 if "magnitude" in n else 0.0))
        adapted.save_pretrained(root / name)
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
    assert sorted(p.name for p in out.iterdir()) == ["genai_config.json", "model.onnx"]     # no tokenizer: none written


def test_bad_output_paths_write_nothing(folders, tmp_path):
    model, tokenizer = load_base(folders / "base")
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(ConfigError, match="exists"):
        export_decoder(existing, model, tokenizer)
    with pytest.raises(ConfigError, match="inside the input"):
        export_decoder(folders / "base" / "onnx", model, tokenizer, inputs=[folders / "base"])
    assert not (folders / "base" / "onnx").exists() and list(existing.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["exists"]                               # no staging left behind


def test_adapters_that_match_nothing_are_refused(folders, tmp_path):
    model, _ = load_base(folders / "base")
    adapters = read_adapters(model, [f"first={folders / 'lora'}"])
    with pytest.raises(ConfigError, match="two adapters are named"):
        read_adapters(model, [str(folders / "lora"), f"lora={folders / 'dora'}"])
    with pytest.raises(ConfigError, match="merged graph folds in one adapter"):
        export_decoder(tmp_path / "x", model, None, {**adapters, "second": adapters["first"]}, form="merged")
    assert not (tmp_path / "x").exists()
