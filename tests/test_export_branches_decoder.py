"""IA3, OFT and LoKr on a whole decoder, exported unmerged and run by onnxruntime-genai, generate PEFT's tokens.

A tiny random Llama (tests/test_export_decoder.py's) is saved as a transformers folder, with one PEFT
adapter per method saved by PEFT itself (IA3 with down_proj as its feed-forward module, so both of
its sides occur; every trainable tensor moved off PEFT's identity init). Each is exported the way a
user would (`refpeft export ADAPTER --base BASE --unmerged -o DIR`, verified against refpeft's float64
decoder before writing); the 32-token greedy continuation through onnxruntime-genai with the adapter
active must equal transformers + PEFT `generate`, and with no adapter the base model's.
"""

from __future__ import annotations

import pytest

from refpeft.cli import main

pytest.importorskip("onnxruntime", reason="the onnx extra: pip install 'refpeft[onnx]'")
pytest.importorskip("onnxruntime_genai", reason="the onnx extra: pip install 'refpeft[onnx]'")
torch = pytest.importorskip("torch", reason="transformers + PEFT on torch are the peers checked here")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from refpeft_onnx.genai_run import GenaiModel  # noqa: E402
from tests.peft_peers import tiny_llama, write_adapters  # noqa: E402
from tests.test_export_decoder import NEW_TOKENS, PROMPT, TINY, _peft_greedy  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
ADAPTER_CONFIGS = {
    "ia3": lambda: peft.IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"]),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=TARGETS),
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=TARGETS),
}


def moved(name: str, p) -> None:
    """PEFT's identity init (IA3 ones, OFT zeros, LoKr w1 zeros) moved by N(0, 0.3^2)."""
    p.add_(0.3 * torch.randn_like(p))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("branches_decoder")
    base = tiny_llama(TINY)
    base.save_pretrained(root / "base")
    write_adapters(root, base, ADAPTER_CONFIGS, perturb=moved)
    return root


@pytest.mark.parametrize("method", ADAPTER_CONFIGS)
def test_unmerged_decoder_generates_peft_tokens_and_the_base_without_the_adapter(folders, tmp_path, method):
    out = tmp_path / method
    assert main(["export", str(folders / method), "--base", str(folders / "base"), "--unmerged", "-o", str(out)]) == 0
    model = GenaiModel(out)
    adapted, base = _peft_greedy(folders, method), _peft_greedy(folders, None)
    assert adapted != base                                        # the adapter changes the text
    assert model.generate(PROMPT, max_new_tokens=NEW_TOKENS, adapter=method) == adapted
    assert model.generate(PROMPT, max_new_tokens=NEW_TOKENS) == base
