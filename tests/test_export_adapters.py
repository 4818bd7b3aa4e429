"""ONNX Runtime multi-LoRA: .onnx_adapter files for the unmerged graph, switched per run.

Specifications:
- One unmerged graph, two adapter files: with each file active ONNX Runtime gives that adapter's
  reference output, with none active the base output (LoRA; and DoRA, VeRA the same way).
- A file holds exactly the graph's swappable inputs, in its dtype; a file for another graph
  (other dtype, unknown names, wrong sizes) is refused before serving.
- Files round-trip through onnxruntime.AdapterFormat bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_export_cases import METHODS, StackCase, build_adapter, build_stack

from refpeft.errors import ConfigError, FormatError, ShapeError  # noqa: E402
from refpeft.tolerance import compare  # noqa: E402

from refpeft_onnx.adapter_files import adapter_parameters, check_against_model, read_onnx_adapter, \
    write_onnx_adapter  # noqa: E402
from refpeft_onnx.exporter import export_adapter_file, export_model  # noqa: E402
from refpeft_onnx.graph import adapter_inputs, build_model  # noqa: E402
from refpeft_onnx.serving import AdapterSession  # noqa: E402
from refpeft_onnx.stack import reference_forward  # noqa: E402
from refpeft_onnx.verify import graph_bound  # noqa: E402


def assert_serves(server, stack, adapter, name, x) -> None:
    """`server` run with adapter `name` (None: none active) gives refpeft's reference of the unmerged graph."""
    y = server.run(x, adapter=name)
    result = compare(y, reference_forward(stack, adapter, x), graph_bound(stack, adapter, x, form="unmerged",
                                                                          dtype=str(x.dtype)))
    assert result.passed, f"adapter {name}: {result.ratio:.3g} of the bound"


@pytest.mark.parametrize("method", METHODS)
def test_switching_two_adapter_files_per_run(tmp_path, method) -> None:
    stack = build_stack(StackCase((12, 10, 6), 1, method, True, "gelu", 11))
    first = build_adapter(stack, method, 4, seed=1)
    second = build_adapter(stack, method, 2 if method != "vera" else 4, seed=2)
    if method == "vera":   # VeRA adapters over one graph share its projections
        second = type(second)(second.modules, vera_A=first.vera_A, vera_B=first.vera_B)
    result = export_model(tmp_path / "model.onnx", stack, first, form="unmerged")
    export_adapter_file(tmp_path / "second.onnx_adapter", stack, second)
    server = AdapterSession(result.model_path)
    server.load("first", result.adapter_path)
    server.load("second", tmp_path / "second.onnx_adapter")
    x = np.random.default_rng(0).standard_normal((3, 5, 12)).astype(np.float32)
    for _ in range(2):   # switching back and forth leaves nothing behind
        assert_serves(server, stack, first, "first", x)
        assert_serves(server, stack, None, None, x)
        assert_serves(server, stack, second, "second", x)
    assert server.adapters == ("first", "second")


def test_adapter_on_some_layers_leaves_the_others_at_base(tmp_path) -> None:
    stack = build_stack(StackCase((8, 8, 8), 1, "lora", False, "relu", 3))
    model = build_model(stack, None, form="unmerged")
    partial = build_adapter(stack, "lora", 3, seed=4, layers=("layers.1",))
    export_adapter_file(tmp_path / "p.onnx_adapter", stack, partial, model=model)
    server = AdapterSession(model)
    server.load("partial", tmp_path / "p.onnx_adapter")
    assert_serves(server, stack, partial, "partial", np.ones((1, 2, 8), dtype=np.float32))


def test_float16_files_serve_a_float16_graph(tmp_path) -> None:
    stack = build_stack(StackCase((8, 6), 1, "lora", True, "relu", 5))
    adapter = build_adapter(stack, "lora", 3, seed=6)
    result = export_model(tmp_path / "m16.onnx", stack, adapter, form="unmerged", dtype="float16")
    server = AdapterSession(result.model_path)
    server.load("a", result.adapter_path)
    assert_serves(server, stack, adapter, "a", np.random.default_rng(1).standard_normal((2, 3, 8)).astype(np.float16))


def test_file_holds_exactly_the_graph_inputs_and_round_trips(tmp_path) -> None:
    stack = build_stack(StackCase((8, 6, 4), 1, "dora", False, "relu", 7))
    adapter = build_adapter(stack, "dora", 2, seed=8)
    model = build_model(stack, adapter, form="unmerged")
    parameters = adapter_parameters(stack, adapter)
    assert set(parameters) == set(adapter_inputs(model))
    write_onnx_adapter(tmp_path / "a.onnx_adapter", parameters)
    back = read_onnx_adapter(tmp_path / "a.onnx_adapter")
    assert set(back) == set(parameters)
    for name, value in parameters.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value)


def test_files_for_another_graph_are_refused(tmp_path) -> None:
    stack = build_stack(StackCase((8, 6), 1, "lora", False, "relu", 9))
    adapter = build_adapter(stack, "lora", 2, seed=1)
    model = build_model(stack, adapter, form="unmerged")
    with pytest.raises(ConfigError, match="dtype"):
        check_against_model(adapter_parameters(stack, adapter, dtype="float16"), model)
    with pytest.raises(ConfigError, match="not adapter inputs"):
        check_against_model({"other.lora_A_t": np.zeros((8, 2), np.float32)}, model)
    with pytest.raises(ShapeError, match="shape"):
        check_against_model({"layers.0.lora_A_t": np.zeros((7, 2), np.float32)}, model)
    dora = build_adapter(stack, "dora", 2, seed=1)
    write_onnx_adapter(tmp_path / "dora.onnx_adapter", adapter_parameters(stack, dora))
    server = AdapterSession(model)
    with pytest.raises(ConfigError, match="dora_scale"):
        server.load("dora", tmp_path / "dora.onnx_adapter")
    with pytest.raises(ConfigError, match="no adapter named"):
        server.run(np.zeros((1, 1, 8), np.float32), adapter="missing")


def test_unreadable_files_are_format_errors(tmp_path) -> None:
    with pytest.raises(FormatError, match="no such file"):
        read_onnx_adapter(tmp_path / "absent.onnx_adapter")
    (tmp_path / "bad.onnx_adapter").write_bytes(b"not a flatbuffer at all")
    with pytest.raises(FormatError, match="not a readable"):
        read_onnx_adapter(tmp_path / "bad.onnx_adapter")
