"""Verification of exported graphs, the runtime accuracy it assumes, the CUDA provider, the demo step.

Specifications:
- A graph the checker refuses (full shape inference) is a VerificationError naming the problem.
- The report counts every run (shapes x runs x executors) and its worst ratio is what the runs show.
- The activation rule in refpeft_onnx.verify holds for ONNX Runtime's Tanh and Gelu on a dense grid
  (float32 and float16): the one runtime constant the bound relies on, re-measured.
- On CUDA (onnxruntime-gpu with a GPU) the same graphs pass within the same bounds.
- The demo's export step exports, serves and agrees; without the extra it says why it is skipped.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_export_cases import StackCase, build_adapter, build_case, build_stack

import onnx  # noqa: E402  (test_export_cases skips the module without the onnx extra)
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from refpeft.tolerance import Bounded, Precision, exact  # noqa: E402

from refpeft_onnx.demo import export_and_check, skip_reason  # noqa: E402
from refpeft_onnx.graph import build_model  # noqa: E402
from refpeft_onnx.nf4 import quantize_stack  # noqa: E402
from refpeft_onnx.verify import ACTIVATION_ERROR, VerificationError, activation_bound, graph_bound, session, \
    verify_model  # noqa: E402

CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_checker_refusal_is_a_verification_error() -> None:
    stack, adapter = build_case(StackCase((6, 4), 2, "lora", False, "relu", 1))
    model = build_model(stack, adapter)
    model.graph.node[0].input[1] = "no_such_tensor"
    with pytest.raises(VerificationError, match="onnx.checker refuses"):
        verify_model(model, stack, adapter)


def test_report_counts_runs_and_names_the_worst() -> None:
    stack, adapter = build_case(StackCase((6, 5), 2, "lora", True, "relu", 2))
    report = verify_model(build_model(stack, adapter, form="unmerged"), stack, adapter, shapes=((1, 1), (2, 3), (1, 7)))
    # 3 shapes x (no adapter, adapter fed) x (CPU + onnx.reference)
    assert len(report.checks) == 3 * 2 * 2 and report.passed
    assert report.worst.comparison.ratio == max(c.comparison.ratio for c in report.checks)
    assert f"{report.worst.comparison.ratio:.3g} of the derived float32 bound" in report.summary()


def test_contrib_op_graphs_skip_the_reference_evaluator() -> None:
    stack = quantize_stack(build_stack(StackCase((64, 8), 1, "lora", False, "relu", 3)))
    report = verify_model(build_model(stack, None, nf4_ops="bnb4"), stack)
    assert {c.executor for c in report.checks} == {"CPUExecutionProvider"}


@pytest.mark.parametrize("name", ["tanh", "gelu", "relu"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_activation_rule_holds_for_onnx_runtime(name, dtype) -> None:
    op = {"tanh": "Tanh", "gelu": "Gelu", "relu": "Relu"}[name]
    elem = TensorProto.FLOAT if dtype == "float32" else TensorProto.FLOAT16
    graph = helper.make_graph([helper.make_node(op, ["h"], ["y"])], "act", [helper.make_tensor_value_info("h", elem, ["n"])],
                              [helper.make_tensor_value_info("y", elem, ["n"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    rng = np.random.default_rng(0)
    h = np.concatenate([np.linspace(-12, 12, 100001), 3 * rng.standard_normal(50000),
                        np.logspace(-8, 1, 5000), -np.logspace(-8, 1, 5000)]).astype(dtype)
    y = session(model).run(None, {"h": h})[0]
    bound = activation_bound(exact(h.astype(np.float64)), name, Precision(dtype))
    assert isinstance(bound, Bounded)
    err = np.abs(y.astype(np.float64) - bound.value)
    assert np.all(err <= bound.error), f"{name} {dtype}: worst {np.max(err / np.maximum(bound.error, 1e-300)):.3g} of the rule"
    if ACTIVATION_ERROR[name][1] == 0.0:
        assert np.array_equal(err, np.zeros_like(err))


def test_onnx_runtime_float16_matmul_accumulates_in_float32() -> None:
    """The float16 bound assumes float32 accumulation (refpeft.tolerance's default for float16):
    with k = 4096 that leaves the result within a couple of float16 ulps of the exact value, where
    float16 accumulation would be off by tens of ulps (and has no gamma_k bound at all: k u > 1)."""
    rng = np.random.default_rng(0)
    k = 4096
    W = (rng.standard_normal((k, 64)) / np.sqrt(k)).astype(np.float16)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [16, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [16, 64])],
                              initializer=[onnx.numpy_helper.from_array(W, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    x = rng.standard_normal((16, k)).astype(np.float16)
    exact = x.astype(np.float64) @ W.astype(np.float64)
    y = session(model).run(None, {"x": x})[0].astype(np.float64)
    ulps = np.abs(y - exact) / np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64)
    assert ulps.max() < 4


@pytest.mark.skipif(not CUDA, reason="CUDAExecutionProvider is not available (needs onnxruntime-gpu and a GPU)")
@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_provider_matches_reference_within_bound(method, dtype) -> None:
    stack, adapter = build_case(StackCase((32, 24, 16), 4, method, True, "gelu", 4))
    for form in ("merged", "unmerged"):
        report = verify_model(build_model(stack, adapter, form=form, dtype=dtype), stack, adapter,
                              providers=["CUDAExecutionProvider"])
        assert report.passed, report.summary()


@pytest.mark.parametrize("method", ["lora", "dora", "vera"])
def test_demo_export_step_agrees(tmp_path, method) -> None:
    stack = build_stack(StackCase((24, 16), 1, "lora", True, "relu", 6))
    adapter = build_adapter(stack, method, 4, seed=7)
    layer = stack.layers[0]
    passed = adapter if method == "vera" else adapter.modules[layer.name]
    lines = export_and_check(tmp_path, W0=layer.weight, bias=layer.bias, adapter=passed)
    assert len(lines) == 4 and not any("FAILED" in line or "DISAGREES" in line for line in lines)
    assert (tmp_path / "merged.onnx").exists() and (tmp_path / "unmerged.onnx_adapter").exists()


def test_demo_says_why_export_is_skipped_without_the_extra(monkeypatch) -> None:
    assert skip_reason() is None
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    assert skip_reason().startswith("ONNX export skipped: the `onnx` extra is not installed")


def test_probabilistic_bound_is_tighter_and_still_met() -> None:
    stack, adapter = build_case(StackCase((256, 64), 8, "lora", True, "relu", 8))
    x = np.random.default_rng(0).standard_normal((2, 3, 256)).astype(np.float32)
    rigorous = graph_bound(stack, adapter, x, form="unmerged", dtype="float32")
    probabilistic = graph_bound(stack, adapter, x, form="unmerged", dtype="float32", model="probabilistic")
    assert np.all(probabilistic < rigorous)
    report = verify_model(build_model(stack, adapter, form="unmerged"), stack, adapter, bound_model="probabilistic")
    assert report.passed and "(probabilistic)" in report.summary()
