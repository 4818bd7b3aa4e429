"""Adapters attached to ONNX exports of the base made by other tools (refpeft_onnx.attach, `refpeft attach`).

A tiny random Llama is exported by torch.onnx (TorchScript exporter: weights renamed "onnx::MatMul_N",
no KV cache) and by the onnxruntime-genai model builder (q, k, v fused into one MatMul,
GroupQueryAttention, a KV cache); PEFT adapters are attached and verified against refpeft's
reference, and the genai builder's folder then generates each adapter's tokens as PEFT does.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from refpeft.cli import main
from refpeft.errors import ConfigError

pytest.importorskip("onnxruntime_genai", reason="the onnx extra: pip install 'refpeft[onnx]'")
torch = pytest.importorskip("torch", reason="torch.onnx and transformers + PEFT are the peers here")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from refpeft_onnx.attach import attach  # noqa: E402
from refpeft_onnx.decoder_export import load_base, read_adapters  # noqa: E402
from refpeft_onnx.decoder_graph import decoder_layers  # noqa: E402
from refpeft_onnx.genai_run import GenaiModel  # noqa: E402
from tests.peft_peers import tiny_llama, write_adapters  # noqa: E402

DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "refpeft" / "demo_base"
TINY = dict(vocab_size=187, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=96, rms_norm_eps=1e-6,
            tie_word_embeddings=False, eos_token_id=None, bos_token_id=None, pad_token_id=0)
PROMPT = [5, 17, 3, 42, 8, 23, 11, 60, 2]
NEW_TOKENS = 24
CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                      "down_proj"], init_lora_weights=False,
                                    rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 3.0}),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True,
                                    init_lora_weights=False),
    "vera": lambda: peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"], save_projection=True, init_weights=False),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("attach")
    base = tiny_llama(TINY)
    base.save_pretrained(root / "base")
    for f in ("tokenizer.json", "tokenizer_config.json"):      # a WordLevel tokenizer the genai builder accepts
        shutil.copy(DEMO_TOKENIZER / f, root / "base" / f)
    expected = {None: _greedy(base)}
    write_adapters(root, base, CONFIGS, visit=lambda name, adapted: expected.update({name: _greedy(adapted)}))
    assert len({tuple(t) for t in expected.values()}) == len(expected)
    return root, expected


def _greedy(model) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([PROMPT]), do_sample=False, max_new_tokens=NEW_TOKENS,
                             pad_token_id=0, top_k=None, top_p=None, temperature=None)
    return out[0, len(PROMPT):].tolist()


@pytest.fixture(scope="module")
def torch_export(folders):
    root, _ = folders
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base", attn_implementation="eager").eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.tensor([PROMPT])
    path = root / "torch-onnx" / "model.onnx"
    path.parent.mkdir()
    torch.onnx.export(Logits(model), (ids, torch.ones_like(ids)), str(path), dynamo=False, opset_version=18,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask", "logits")})
    return path


def attach_verified(graph: Path, root: Path, adapters: list[str], out: Path, capsys) -> None:
    """`refpeft attach GRAPH root/ADAPTER... --base root/base -o out` writes the folder, its verification
    agreeing with the refpeft reference on every adapter and on the base (one run each)."""
    assert main(["attach", str(graph), *(str(root / a) for a in adapters), "--base", str(root / "base"),
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "agrees with the refpeft reference" in printed and f"{len(adapters) + 1} runs" in printed


@pytest.mark.parametrize("adapters", [["lora"], ["lora", "dora"], ["vera"]])
def test_adapters_attached_to_a_torch_onnx_export_agree_with_the_reference(folders, torch_export, adapters, tmp_path,
                                                                            capsys):
    root, _ = folders
    out = tmp_path / "attached"
    attach_verified(torch_export, root, adapters, out, capsys)
    assert sorted(p.stem for p in (out / "adapters").iterdir()) == sorted(adapters)


def test_attaching_to_the_genai_builders_fused_graph_generates_as_peft(folders, tmp_path):
    root, expected = folders
    built = tmp_path / "builder"
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(root / "base"), "-o",
                    str(built), "-p", "fp32", "-e", "cpu"], check=True, capture_output=True, cwd=tmp_path)
    (built / "chat_template.jinja").unlink(missing_ok=True)            # conformance/FINDINGS.md G-1
    out = tmp_path / "attached"
    assert main(["attach", str(built / "model.onnx"), str(root / "lora"), str(root / "dora"), "--base",
                 str(root / "base"), "-o", str(out)]) == 0
    genai = GenaiModel(out)
    for adapter in ("lora", "dora", None, "lora"):
        assert genai.generate(PROMPT, max_new_tokens=NEW_TOKENS, adapter=adapter) == expected[adapter], adapter


def test_a_graph_without_the_layer_is_refused(folders, torch_export, tmp_path):
    root, _ = folders
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))     # other weights, same shapes
    other.save_pretrained(tmp_path / "other")
    model, _ = load_base(tmp_path / "other")
    import onnx

    with pytest.raises(ConfigError, match="no MatMul of the graph multiplies by this layer's weight"):
        attach(onnx.load(torch_export), decoder_layers(model), read_adapters(model, [str(root / "lora")]))
    assert main(["attach", str(torch_export), str(root / "lora"), "--base", str(tmp_path / "other"),
                 "-o", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_one_more_adapter_file_for_an_exported_decoder(folders, torch_export, tmp_path, capsys):
    root, expected = folders
    out = tmp_path / "onnx"
    assert main(["export", str(root / "lora"), "--base", str(root / "base"), "--unmerged", "-o", str(out)]) == 0
    late = out / "adapters" / "dora.onnx_adapter"              # DoRA's modules are not all LoRA's: refused ...
    assert main(["export-adapter", str(root / "dora"), "--base", str(root / "base"), "--model",
                 str(out / "model.onnx"), "-o", str(late)]) == 2
    assert "not adapter inputs of the graph" in capsys.readouterr().err and not late.exists()
    again = out / "adapters" / "again.onnx_adapter"            # ... the same modules join the graph
    assert main(["export-adapter", str(root / "lora"), "--base", str(root / "base"), "--model",
                 str(out / "model.onnx"), "-o", str(again)]) == 0
    assert GenaiModel(out).generate(PROMPT, max_new_tokens=NEW_TOKENS, adapter="again") == expected["lora"]
    assert main(["export-adapter", str(root / "lora"), "--base", str(root / "base"), "--model", str(torch_export),
                 "-o", str(tmp_path / "x.onnx_adapter")]) == 2
    assert "refpeft attach" in capsys.readouterr().err
