"""`refpeft attach` for the additive branches past LoRA: LoHa, LoKr (PEFT-written) and Pre-Diag (Python API).

A tiny random Llama is exported by torch.onnx (tests/test_export_attach.py's `torch_export`); the
adapters are attached, verified by refpeft against its float64 reference (the command refuses to
write otherwise), and the written graph is then run in ONNX Runtime with each adapter's
.onnx_adapter file and compared with PEFT's own logits (the peer). IA3 and OFT transform the
layer's input, which a foreign graph's MatMul already consumed: they are refused.
"""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.cli import main
from refpeft.errors import ConfigError

pytest.importorskip("onnxruntime_genai", reason="the onnx extra: pip install 'refpeft[onnx]'")
torch = pytest.importorskip("torch", reason="torch.onnx and transformers + PEFT are the peers here")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from refpeft.adapter import Adapter, ModuleAdapter  # noqa: E402
from refpeft_onnx.decoder_export import attach_adapters, load_base, read_adapters  # noqa: E402
from refpeft_onnx.decoder_graph import decoder_layers  # noqa: E402
from tests.peft_peers import tiny_llama, write_adapters  # noqa: E402
from tests.test_export_attach import PROMPT, TINY, attach_verified  # noqa: E402
from tests.test_export_attach import torch_export  # noqa: E402,F401  (the torch.onnx export fixture)

TARGETS = ["q_proj", "v_proj", "down_proj"]
CONFIGS = {
    "loha": lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=TARGETS, init_weights=False),
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=TARGETS, init_weights=False),
    "lokr-both": lambda: peft.LoKrConfig(r=1, alpha=2, target_modules=["q_proj", "o_proj"], decompose_both=True,
                                         init_weights=False),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                  init_ia3_weights=False),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj"], init_weights=False),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj"], init_weights=False),
}
IDS = torch.tensor([PROMPT, PROMPT[::-1]])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """root/base and root/NAME for each PEFT adapter; the PEFT logits of each adapter (None: the base)."""
    root = tmp_path_factory.mktemp("attach-methods")
    base = tiny_llama(TINY)
    base.save_pretrained(root / "base")
    logits = {None: _logits(base)}
    write_adapters(root, base, CONFIGS, visit=lambda name, adapted: logits.update({name: _logits(adapted)}))
    return root, logits


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits.double().numpy()


def _run_attached(folder, adapter: str | None) -> np.ndarray:
    """The written model.onnx in ONNX Runtime, fed adapters/ADAPTER.onnx_adapter's tensors (none: the base)."""
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": IDS.numpy(), "attention_mask": np.ones(IDS.shape, dtype=np.int64)}
    if adapter is not None:
        parameters = ort.AdapterFormat.read_adapter(str(folder / "adapters" / f"{adapter}.onnx_adapter"))
        feeds.update({name: value.numpy() for name, value in parameters.get_parameters().items()})
    return session.run(["logits"], feeds)[0].astype(np.float64)


@pytest.mark.parametrize("adapters", [["loha"], ["lokr", "lokr-both"]])
def test_peft_loha_and_lokr_attach_and_run_as_peft(folders, torch_export, adapters, tmp_path, capsys):
    root, logits = folders
    out = tmp_path / "attached"
    attach_verified(torch_export, root, adapters, out, capsys)
    np.testing.assert_allclose(_run_attached(out, None), logits[None], rtol=0, atol=2e-4)
    for name in adapters:
        moved = np.max(np.abs(logits[name] - logits[None]))
        assert moved > 0.05, (name, moved)                   # the adapter changes the logits far beyond atol
        np.testing.assert_allclose(_run_attached(out, name), logits[name], rtol=0, atol=2e-4, err_msg=name)


def _prediag_adapter(model) -> Adapter:
    """Pre-Diag on q_proj and up_proj of every layer: A, B N(0, 0.3^2), D in [1/2, 3/2) (no PEFT format)."""
    rng = np.random.default_rng(3)
    modules = {}
    for path, layer in decoder_layers(model).items():
        if path.endswith(("q_proj", "up_proj")):
            tensors = {"A": 0.3 * rng.standard_normal((4, layer.k)), "B": 0.3 * rng.standard_normal((layer.d, 4)),
                       "prediag_D": rng.random(layer.d) + 0.5}
            modules[path] = ModuleAdapter("prediag", {n: t.astype(np.float32) for n, t in tensors.items()}, alpha=8.0)
    return Adapter(modules)


def test_prediag_attaches_through_the_python_api(folders, torch_export, tmp_path):
    root, logits = folders
    model, _ = load_base(root / "base")
    adapter = _prediag_adapter(model)
    result = attach_adapters(tmp_path / "attached", torch_export, model, {"prediag": adapter},
                             inputs=[root / "base"])
    assert result.report.passed and len(result.report.checks) == 2, result.report.summary()
    graph_inputs = {i.name for i in onnx.load(tmp_path / "attached" / "model.onnx").graph.input}
    assert {f"{path}.prediag_D" for path in adapter.modules} <= graph_inputs
    np.testing.assert_allclose(_run_attached(tmp_path / "attached", None), logits[None], rtol=0, atol=2e-4)
    with_adapter = _run_attached(tmp_path / "attached", "prediag")
    assert np.max(np.abs(with_adapter - logits[None])) > 0.05
    # the adapter's rows of D really scale W0's rows: D = 1 everywhere gives the LoRA part alone
    ones = Adapter({p: m.replace(prediag_D=np.ones_like(m.prediag_D)) for p, m in adapter.modules.items()})
    attach_adapters(tmp_path / "ones", torch_export, model, {"prediag": ones}, inputs=[root / "base"])
    assert np.max(np.abs(_run_attached(tmp_path / "ones", "prediag") - with_adapter)) > 5e-3   # 0.022 measured


@pytest.mark.parametrize("name, message", [("ia3", "the ia3 branch transforms the layer's input"),
                                           ("oft", "the oft branch transforms the layer's input"),
                                           ("boft", "boft adapters have no unmerged ONNX branch")])
def test_input_transforming_and_merged_only_methods_are_refused(folders, torch_export, name, message, tmp_path,
                                                                 capsys):
    root, _ = folders
    out = tmp_path / "attached"
    assert main(["attach", str(torch_export), str(root / name), "--base", str(root / "base"), "-o", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    model, _ = load_base(root / "base")
    with pytest.raises(ConfigError, match=message):
        attach_adapters(tmp_path / "api", torch_export, model, read_adapters(model, [str(root / name)]))
