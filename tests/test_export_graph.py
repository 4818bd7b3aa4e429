"""ONNX graphs of adapted stacks: ONNX Runtime's output equals refpeft's reference within the derived bound.

Specifications:
- LoRA, DoRA, VeRA, with and without bias, merged and unmerged, float32 (and float16): ONNX
  Runtime's output is within refpeft.tolerance's bound of the float64 reference, on hypothesis
  shapes, and so is onnx.reference.ReferenceEvaluator's (an independent executor).
- Unmerged graphs with no adapter fed compute the base model; the rank axis is symbolic.
- Every graph passes onnx.checker with full shape inference, has symbolic batch and sequence axes,
  and records its opset; each supported opset runs.
- The bound is not vacuous: a graph with a wrong scaling is caught.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_export_cases import METHODS, build_adapter, build_case, build_stack, stack_cases, StackCase

import onnx  # noqa: E402  (test_export_cases skips the module without the onnx extra)
from onnx.reference import ReferenceEvaluator  # noqa: E402

from refpeft.errors import ConfigError  # noqa: E402
from refpeft.tolerance import compare  # noqa: E402

from refpeft_onnx.builder import OPSETS  # noqa: E402
from refpeft_onnx.graph import adapter_inputs, build_model  # noqa: E402
from refpeft_onnx.stack import reference_forward  # noqa: E402
from refpeft_onnx.verify import adapter_feeds, graph_bound, session, verify_model  # noqa: E402


def _x(stack, batch: int, sequence: int, dtype: str, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, sequence, stack.in_features)).astype(dtype)


def _check_run(model, stack, adapter, x, feeds, *, form, dtype) -> None:
    expected = reference_forward(stack, adapter, x)
    bound = graph_bound(stack, adapter, x, form=form, dtype=dtype)
    for name, runner in (("onnxruntime", session(model)), ("onnx.reference", ReferenceEvaluator(model))):
        result = compare(runner.run(None, {"x": x, **feeds})[0], expected, bound)
        assert result.passed, f"{name}: error {result.max_error:.3g} is {result.ratio:.3g} times the bound"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("form", ["merged", "unmerged"])
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_float32_graph_matches_reference_within_bound(method, bias, form, data) -> None:
    case = data.draw(stack_cases(methods=(method,)))
    case = StackCase(case.sizes, case.rank, method, bias, case.activation, case.seed)
    stack, adapter = build_case(case)
    batch, sequence = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
    x = _x(stack, batch, sequence, "float32", case.seed)
    model = build_model(stack, adapter, form=form, dtype="float32")
    onnx.checker.check_model(model, full_check=True)
    if form == "merged":
        _check_run(model, stack, adapter, x, {}, form=form, dtype="float32")
    else:
        _check_run(model, stack, None, x, {}, form=form, dtype="float32")          # no adapter: the base
        _check_run(model, stack, adapter, x, adapter_feeds(stack, adapter, "float32"), form=form, dtype="float32")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("form", ["merged", "unmerged"])
@settings(max_examples=3, deadline=None)
@given(case=stack_cases(max_features=10))
def test_float16_graph_matches_reference_within_bound(method, form, case) -> None:
    case = StackCase(case.sizes, case.rank, method, case.bias, case.activation, case.seed)
    stack, adapter = build_case(case)
    model = build_model(stack, adapter, form=form, dtype="float16")
    report = verify_model(model, stack, adapter)
    assert report.passed, report.summary()


def test_graph_has_symbolic_batch_sequence_and_rank_axes_and_records_its_opset() -> None:
    stack = build_stack(StackCase((6, 5, 4), 2, "lora", True, "relu", 0))
    model = build_model(stack, build_adapter(stack, "lora", 2, seed=1), form="unmerged", opset=22)
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert dims(model.graph.input[0]) == ["batch", "sequence", 6]
    assert dims(model.graph.output[0]) == ["batch", "sequence", 4]
    inputs = adapter_inputs(model)
    assert inputs["layers.0.lora_A_t"][1] == [6, "layers.0.rank"]
    assert inputs["layers.0.lora_B_t"][1] == ["layers.0.rank", 5]
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 22)]
    assert model.ir_version >= 4   # initializers may be overridden by inputs


@pytest.mark.parametrize("opset", OPSETS)
def test_every_supported_opset_checks_and_runs(opset) -> None:
    stack, adapter = build_case(StackCase((5, 7, 3), 2, "dora", True, "gelu", 3))
    for form in ("merged", "unmerged"):
        report = verify_model(build_model(stack, adapter, form=form, opset=opset), stack, adapter)
        assert report.passed, report.summary()


def test_unmerged_graph_serves_adapters_of_any_rank_on_one_session() -> None:
    stack = build_stack(StackCase((8, 8, 8), 1, "lora", False, "tanh", 5))
    model = build_model(stack, None, form="unmerged")             # empty branches on every layer
    runner = session(model)
    x = _x(stack, 2, 3, "float32", 0)
    for rank in (1, 4, 8):
        adapter = build_adapter(stack, "lora", rank, seed=rank)
        y = runner.run(None, {"x": x, **adapter_feeds(stack, adapter, "float32")})[0]
        result = compare(y, reference_forward(stack, adapter, x), graph_bound(stack, adapter, x, form="unmerged",
                                                                              dtype="float32"))
        assert result.passed, f"rank {rank}: {result.ratio:.3g} of the bound"


def test_a_wrong_scaling_is_caught_by_the_bound() -> None:
    stack, adapter = build_case(StackCase((16, 16), 4, "lora", True, "relu", 7))
    model = build_model(stack, None, form="unmerged")
    feeds = adapter_feeds(stack, adapter, "float32")
    feeds["layers.0.lora_scaling"] = feeds["layers.0.lora_scaling"] * np.float32(1.001)   # 0.1% off
    x = _x(stack, 2, 4, "float32", 1)
    result = compare(session(model).run(None, {"x": x, **feeds})[0], reference_forward(stack, adapter, x),
                     graph_bound(stack, adapter, x, form="unmerged", dtype="float32"))
    assert not result.passed and result.ratio > 2


def test_merged_graph_is_one_matmul_per_layer() -> None:
    stack, adapter = build_case(StackCase((6, 5, 4), 2, "vera", True, "relu", 2))
    ops = [n.op_type for n in build_model(stack, adapter, form="merged").graph.node]
    assert ops == ["MatMul", "Add", "Relu", "MatMul", "Add", "Identity"]


def test_unmerged_vera_swaps_only_the_two_vectors() -> None:
    stack, adapter = build_case(StackCase((6, 5, 4), 3, "vera", False, "relu", 2))
    model = build_model(stack, adapter, form="unmerged")
    assert sorted(adapter_inputs(model)) == sorted(f"layers.{i}.vera_lambda_{v}" for i in (0, 1) for v in "db")


def test_refuses_a_merged_nf4_adapter_and_unknown_options() -> None:
    from refpeft_onnx.nf4 import quantize_stack

    stack, adapter = build_case(StackCase((64, 64), 4, "lora", False, "relu", 2))
    with pytest.raises(ConfigError, match="re-quantising"):
        build_model(quantize_stack(stack), adapter, form="merged")
    with pytest.raises(ConfigError, match="form"):
        build_model(stack, adapter, form="folded")
    with pytest.raises(ConfigError, match="float32 or float16"):
        build_model(stack, adapter, dtype="bfloat16")
    with pytest.raises(ConfigError, match="opset"):
        build_model(stack, adapter, opset=13)
