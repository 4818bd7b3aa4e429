"""A method is one module: a toy method defined in tests/toy_scale_method.py alone works end to end.

Specifications:
- Nothing in refpeft/, export/ or conformance/ names the toy method: its module is all there is.
- Its hand-written backward matches finite differences.
- PEFT-format files: written and read back with the same method and tensors.
- Checkpoint merging: the merged weight computes the method's forward.
- ONNX export, merged and unmerged: ONNX Runtime agrees with refpeft's reference within the bound.
- The whole model: its gradients through the decoder match finite differences.
- Every method in the table has the same parts, and every method module prefixes its names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tests.toy_scale_method as toy
from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.checkpoint import SafetensorsFile, merge_into_checkpoint
from refpeft.io import write_safetensors
from refpeft.methods import METHODS, method_spec
from refpeft.model.decoder import Model, backward, forward
from refpeft.peft_format import read_peft_adapter, write_peft_adapter
from tests.support import one_layer_llama, vjp_check

ROOT = Path(__file__).resolve().parents[1]


def _module(rng, d: int) -> ModuleAdapter:
    return ModuleAdapter("scale", {"gamma": rng.uniform(-0.5, 0.5, d)})


def test_nothing_outside_its_module_names_the_toy_method():
    sources = [p for folder in ("refpeft", "export", "conformance") for p in (ROOT / folder).rglob("*.py")]
    assert sources
    for path in sources:
        text = path.read_text()
        assert "use_scale" not in text and "scale_gamma" not in text and "toy_scale" not in text, path
    assert METHODS["scale"] is toy.SCALE


def test_toy_backward_matches_finite_differences():
    rng = np.random.default_rng(0)
    x, W0, gamma, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4), rng.standard_normal(4)
    dy = rng.standard_normal((2, 3, 4))
    y, cache = toy.scale_forward(x, W0, gamma, bias=b)
    g = toy.scale_backward(dy, cache)
    vjp_check(lambda x, gamma: toy.scale_forward(x, W0, gamma, bias=b)[0], {"x": x, "gamma": gamma},
              {"x": g.dx, "gamma": g.dgamma}, dy)


def test_peft_files_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    adapter = Adapter({"model.l1": _module(rng, 4), "model.l2": _module(rng, 6)})
    write_peft_adapter(tmp_path, adapter)
    back = read_peft_adapter(tmp_path)
    assert back.methods == {"scale"}
    for path, m in adapter.modules.items():
        assert np.array_equal(back.modules[path].gamma, m.gamma)


def test_checkpoint_merge_computes_the_forward(tmp_path):
    rng = np.random.default_rng(2)
    W0 = rng.standard_normal((6, 5))
    write_safetensors(tmp_path / "base.safetensors", {"l.weight": W0, "l.bias": rng.standard_normal(6)})
    module = _module(rng, 6)
    merge_into_checkpoint(Adapter({"l": module}), SafetensorsFile(tmp_path / "base.safetensors"), tmp_path / "out.safetensors")
    W = SafetensorsFile(tmp_path / "out.safetensors").read("l.weight")
    x = rng.standard_normal((3, 5))
    y, _ = method_spec("scale").forward(x, W0, module)
    assert np.allclose(x @ W.T, y, rtol=1e-13, atol=1e-13)
    assert np.allclose(method_spec("scale").unmerge(W, module), W0, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("form", ["merged", "unmerged"])
def test_onnx_export_agrees_with_the_reference(form):
    pytest.importorskip("onnxruntime")
    from refpeft_onnx.graph import build_model
    from refpeft_onnx.stack import single_layer
    from refpeft_onnx.verify import verify_model

    rng = np.random.default_rng(3)
    stack = single_layer(rng.standard_normal((6, 5)), rng.standard_normal(6))
    adapter = Adapter({"linear": _module(rng, 6)})
    report = verify_model(build_model(stack, adapter, form=form), stack, adapter)
    assert report.passed, report.summary()


def test_whole_model_gradients_match_finite_differences():
    rng = np.random.default_rng(4)
    config, weights = one_layer_llama(rng, vocab_size=23, hidden_size=16, intermediate_size=24)
    paths = ("model.layers.0.self_attn.v_proj", "model.layers.0.mlp.down_proj")
    gammas = {p: rng.uniform(-0.5, 0.5, weights[p + ".weight"].shape[0]) for p in paths}
    ids = rng.integers(0, 23, size=(2, 5))
    dy = rng.standard_normal((2, 5, 23))

    def run(**g):
        model = Model(config, weights, Adapter({p: ModuleAdapter("scale", {"gamma": g[p.split(".")[-1]]})
                                                for p in paths}))
        return model, forward(model, ids)

    inputs = {p.split(".")[-1]: gammas[p] for p in paths}
    model, (logits, tape, _) = run(**inputs)
    grads = backward(model, dy, tape)
    vjp_check(lambda **g: run(**g)[1][0], inputs, {p.split(".")[-1]: grads[p + ".gamma"] for p in paths}, dy)


def test_every_method_row_has_the_same_parts_and_prefixed_names():
    import importlib

    for name, spec in METHODS.items():
        assert spec.name == name and set(spec.trainable) <= set(spec.suffixes())
        if name == "scale":
            continue
        module = importlib.import_module(f"refpeft.methods.{name}")
        for part in ("init", "forward", "backward", "delta_weight", "merge", "unmerge", "parameter_count"):
            assert callable(getattr(module, f"{name}_{part}")), f"{name}_{part}"


def test_only_dora_rescales_the_whole_output_by_a_magnitude():
    from refpeft.methods import METHODS

    assert {name for name, spec in METHODS.items() if spec.rescaled} == {"dora"}
