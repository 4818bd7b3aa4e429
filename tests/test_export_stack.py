"""The exported model description: base files, adapter/base agreement, trained biases.

Specifications:
- A stack saved with `save_stack` loads back identically (order, activation, fan_in_fan_out, biases).
- A base file with several weights and no recorded order is refused with the names it holds.
- An adapter that names unknown layers, has the wrong sizes or a LoRA bias is refused, naming it.
- Trained base biases (PEFT's bias="lora_only"/"all") replace the frozen ones: folded in merged
  graphs, a swappable input (default: the frozen bias) in unmerged ones, shipped in adapter files.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from test_export_cases import StackCase, build_adapter, build_stack

from refpeft.adapter import Adapter, ModuleAdapter  # noqa: E402
from refpeft.errors import ConfigError, FormatError, ShapeError  # noqa: E402
from refpeft.io import write_safetensors  # noqa: E402

from refpeft.tolerance import compare  # noqa: E402

from refpeft_onnx.exporter import export_adapter_file  # noqa: E402
from refpeft_onnx.graph import adapter_inputs, build_model  # noqa: E402
from refpeft_onnx.serving import AdapterSession  # noqa: E402
from refpeft_onnx.stack import BaseLinear, LinearStack, load_stack, reference_forward, save_stack  # noqa: E402
from refpeft_onnx.verify import graph_bound, verify_model  # noqa: E402


def test_save_and_load_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(0)
    stack = LinearStack((BaseLinear("a", rng.standard_normal((5, 4)), rng.standard_normal(5)),
                         BaseLinear("b", rng.standard_normal((5, 3)), None, fan_in_fan_out=True)), activation="tanh")
    save_stack(tmp_path / "base.safetensors", stack)
    back = load_stack(tmp_path / "base.safetensors")
    assert back.activation == "tanh" and [l.name for l in back.layers] == ["a", "b"]
    for old, new in zip(stack.layers, back.layers):
        assert new.fan_in_fan_out == old.fan_in_fan_out and np.array_equal(new.weight, old.weight)
        assert (new.bias is None) == (old.bias is None)
    assert load_stack(tmp_path / "base.safetensors", layers=["a"], activation="relu").out_features == 5


def test_unordered_base_files_are_refused(tmp_path) -> None:
    write_safetensors(tmp_path / "two.safetensors", {"p.weight": np.ones((2, 2)), "q.weight": np.ones((2, 2))})
    with pytest.raises(FormatError, match=r"\['p', 'q'\].*--layers"):
        load_stack(tmp_path / "two.safetensors")
    with pytest.raises(FormatError, match="no weight for layer"):
        load_stack(tmp_path / "two.safetensors", layers=["p", "r"])
    write_safetensors(tmp_path / "one.safetensors", {"p.weight": np.ones((3, 2))})
    assert load_stack(tmp_path / "one.safetensors").layers[0].name == "p"


def test_layers_must_chain() -> None:
    with pytest.raises(ShapeError, match="4 outputs"):
        LinearStack((BaseLinear("a", np.ones((4, 3))), BaseLinear("b", np.ones((2, 5)))))


def test_an_order_that_leaves_a_layer_out_says_so(tmp_path) -> None:
    """--layers naming layers the file has, in an order that does not chain, names what it left out,
    repeated or reordered: the layer is in the file, not missing from it."""
    stack = LinearStack((BaseLinear("a", np.ones((5, 4))), BaseLinear("b", np.ones((6, 5))), BaseLinear("c", np.ones((3, 6)))))
    path = save_stack(tmp_path / "base.safetensors", stack)
    with pytest.raises(ShapeError, match=r"'a' has 5 outputs but 'c' takes 6 inputs; --layers a,c leaves out b "
                                         r"\(the file's layers, in order: a,b,c\)"):
        load_stack(path, layers=["a", "c"])
    with pytest.raises(ConfigError, match="--layers a,a names a more than once"):
        load_stack(path, layers=["a", "a"])
    with pytest.raises(ShapeError, match=r"--layers c,b,a reorders the file's layers \(a,b,c\)"):
        load_stack(path, layers=["c", "b", "a"])


def test_adapters_that_do_not_fit_are_refused() -> None:
    stack = build_stack(StackCase((6, 4), 1, "lora", False, "relu", 0))
    with pytest.raises(ConfigError, match="not layers of the base"):
        build_model(stack, Adapter({"elsewhere": ModuleAdapter("lora", {"A": np.ones((1, 6)), "B": np.ones((4, 1))})}))
    with pytest.raises(ShapeError, match="do not fit"):
        build_model(stack, Adapter({"layers.0": ModuleAdapter("lora", {"A": np.ones((1, 5)), "B": np.ones((4, 1))})}))
    with pytest.raises(ConfigError, match="lora_bias"):
        build_model(stack, Adapter({"layers.0": ModuleAdapter("lora", {"A": np.ones((1, 6)), "B": np.ones((4, 1)), "bias": np.ones(4)})}))


def test_trained_base_biases_replace_the_frozen_ones(tmp_path) -> None:
    stack = build_stack(StackCase((6, 5, 4), 1, "lora", True, "relu", 3))
    adapter = build_adapter(stack, "lora", 2, seed=4, layers=("layers.0",))
    trained = replace(adapter, base_biases={"layers.1": np.full(4, 2.0)})     # a layer without an adapter
    x = np.ones((1, 2, 6))
    assert not np.allclose(reference_forward(stack, trained, x), reference_forward(stack, adapter, x))
    for form in ("merged", "unmerged"):
        report = verify_model(build_model(stack, trained, form=form), stack, trained)
        assert report.passed, report.summary()
    model = build_model(stack, trained, form="unmerged")
    assert "layers.1.bias" in adapter_inputs(model)           # swappable, default the frozen bias
    export_adapter_file(tmp_path / "t.onnx_adapter", stack, trained, model=model)
    server = AdapterSession(model)
    server.load("trained", tmp_path / "t.onnx_adapter")
    y = server.run(x.astype(np.float32), adapter="trained")
    result = compare(y, reference_forward(stack, trained, x), graph_bound(stack, trained, x, form="unmerged",
                                                                         dtype="float32"))
    assert result.passed


def test_load_stack_reads_only_the_layers_it_builds(tmp_path, monkeypatch):
    """Issue 17: exporting one layer of a large base must not load the others."""
    from refpeft.checkpoint import SafetensorsFile
    from refpeft.quant import quantize_4bit, to_state_dict

    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((4, 8)).astype(np.float32), "a.bias": np.zeros(4, np.float32),
               "b.weight": rng.standard_normal((4, 4)).astype(np.float32),
               **to_state_dict(quantize_4bit(rng.standard_normal((4, 64)).astype(np.float32)), prefix="c.weight")}
    write_safetensors(tmp_path / "base.safetensors", tensors)
    read = []
    original = SafetensorsFile.read
    monkeypatch.setattr(SafetensorsFile, "read", lambda self, name: read.append(name) or original(self, name))
    stack = load_stack(tmp_path / "base.safetensors", layers=["a"])
    assert [layer.name for layer in stack.layers] == ["a"] and sorted(read) == ["a.bias", "a.weight"]
    read.clear()
    assert load_stack(tmp_path / "base.safetensors", layers=["c"]).layers[0].nf4 is not None
    assert all(name.startswith("c.weight") for name in read) and read


def test_an_adapted_layer_that_layers_leaves_out_is_named(tmp_path) -> None:
    """export --layers a with an adapter on b: the adapter's layer was left out, not missing from the base."""
    from refpeft.peft_format import write_peft_adapter
    from refpeft_onnx.exporter import load_inputs

    stack = LinearStack((BaseLinear("a", np.ones((5, 4))), BaseLinear("b", np.ones((6, 5)))))
    path = save_stack(tmp_path / "base.safetensors", stack)
    write_peft_adapter(tmp_path / "adapter", Adapter({"b": ModuleAdapter("lora", {"A": np.ones((1, 5)),
                                                                                   "B": np.zeros((6, 1))})}))
    with pytest.raises(ConfigError, match="the adapter adapts b, which --layers a leaves out"):
        load_inputs(path, tmp_path / "adapter", layers=["a"])
    loaded, adapter = load_inputs(path, tmp_path / "adapter")
    assert [layer.name for layer in loaded.layers] == ["a", "b"] and set(adapter.modules) == {"b"}
