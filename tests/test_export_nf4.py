"""NF4 frozen weights in ONNX: both variants reproduce refpeft's dequantised matmul.

Specifications:
- The standard-ops dequantisation in the graph gives refpeft.quant's dequantised weight bit for
  bit (ONNX Runtime and onnx.reference), and the in-graph double-quantised absmax is refpeft's.
- com.microsoft.MatMulBnb4 and the standard-ops variant both reproduce x W_dq^T (+ b) within the
  derived float32 (and float16) bound, alone and under an unmerged LoRA adapter (QLoRA serving).
- The stored weight takes ~4.127 bits per parameter with double quantisation at block 64 (4.5
  without), the same count as refpeft.quant's.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_export_cases import StackCase, build_adapter, build_stack

from onnx.reference import ReferenceEvaluator  # noqa: E402

from refpeft.errors import ConfigError  # noqa: E402
from refpeft.quant import bits_per_parameter as quant_bits_per_parameter  # noqa: E402
from refpeft.quant.state import absmax_values  # noqa: E402

from refpeft_onnx.builder import GraphBuilder  # noqa: E402
from refpeft_onnx.graph import build_model  # noqa: E402
from refpeft_onnx.nf4 import bits_per_parameter, dequantize_graph, nf4_absmax, quantize_layer, \
    quantize_stack  # noqa: E402
from refpeft_onnx.stack import BaseLinear, LinearStack, dequantized_weight  # noqa: E402
from refpeft_onnx.verify import session, verify_model  # noqa: E402


def _run_piece(build, output_shape) -> list[np.ndarray]:
    """Run a graph with no inputs but x (unused) whose output is `build(g)`, in ORT and onnx.reference."""
    g = GraphBuilder("float32")
    g.input("x", [1])
    out = g.op("Identity", [build(g)], "y")
    model = g.model({out: output_shape}, opset=21, name="piece", metadata={})
    model.graph.output[0].type.tensor_type.elem_type = 1
    feeds = {"x": np.zeros(1, np.float32)}
    return [session(model).run(None, feeds)[0], ReferenceEvaluator(model).run(None, feeds)[0]]


@settings(max_examples=15, deadline=None)
@given(d=st.integers(1, 40), k=st.integers(1, 40), blocksize=st.sampled_from([32, 64, 128]),
       double_quant=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_standard_ops_dequantise_bit_for_bit(d, k, blocksize, double_quant, seed) -> None:
    layer = BaseLinear("w", np.random.default_rng(seed).standard_normal((d, k)))
    q = quantize_layer(layer, blocksize=blocksize, double_quant=double_quant)
    expected = dequantized_weight(q.nf4)

    def weight(g):
        packed = g.const("w.weight.nf4", np.asarray(q.nf4.packed).reshape(-1), cast=False)
        return dequantize_graph(g, packed, nf4_absmax(g, q), q.nf4, name="w.weight")

    for actual in _run_piece(weight, [d, k]):
        assert actual.dtype == np.float32 and np.array_equal(actual.view(np.uint32), expected.view(np.uint32))


def test_in_graph_absmax_is_refpeft_double_dequantisation() -> None:
    layer = BaseLinear("w", np.random.default_rng(3).standard_normal((300, 129)))   # 605 blocks: 3 nested, partial
    q = quantize_layer(layer, blocksize=64, double_quant=True)
    expected = np.asarray(absmax_values(q.nf4))
    for actual in _run_piece(lambda g: nf4_absmax(g, q), [expected.shape[0]]):
        assert np.array_equal(actual.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("ops", ["bnb4", "standard"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@settings(max_examples=5, deadline=None)
@given(sizes=st.lists(st.integers(1, 48), min_size=2, max_size=3), bias=st.booleans(),
       blocksize=st.sampled_from([32, 64, 128, 256]), double_quant=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_nf4_graph_reproduces_the_dequantised_matmul(ops, dtype, sizes, bias, blocksize, double_quant, seed) -> None:
    stack = quantize_stack(build_stack(StackCase(tuple(sizes), 1, "lora", bias, "relu", seed)),
                           blocksize=blocksize, double_quant=double_quant)
    report = verify_model(build_model(stack, None, dtype=dtype, nf4_ops=ops), stack)
    assert report.passed, report.summary()


@pytest.mark.parametrize("ops", ["bnb4", "standard"])
def test_qlora_serving_nf4_base_with_unmerged_adapter(ops) -> None:
    stack = quantize_stack(build_stack(StackCase((64, 32, 16), 1, "lora", True, "gelu", 4)))
    adapter = build_adapter(stack, "lora", 4, seed=5)
    report = verify_model(build_model(stack, adapter, form="unmerged", nf4_ops=ops), stack, adapter)
    assert report.passed, report.summary()
    assert {c.run for c in report.checks} == {"no adapter", "adapter fed as inputs"}


@pytest.mark.parametrize("double_quant, nominal", [(True, 4 + 8 / 64 + 32 / (64 * 256)), (False, 4.5)])
def test_stored_weight_bits_per_parameter(double_quant, nominal) -> None:
    layer = BaseLinear("big", np.random.default_rng(0).standard_normal((1024, 1024)) * 0.02)
    q = quantize_layer(layer, blocksize=64, double_quant=double_quant)
    model = build_model(LinearStack((q,)), None, nf4_ops="bnb4")
    bits = bits_per_parameter(model, q)
    offset_bits = 32 / q.nf4.numel if double_quant else 0.0   # the graph also stores the float32 offset
    assert bits == pytest.approx(quant_bits_per_parameter(q.nf4) + offset_bits, abs=1e-12)
    assert bits == pytest.approx(nominal + offset_bits, abs=1e-12)
    assert round(bits, 3) == (4.127 if double_quant else 4.5)


def test_bnb4_refuses_block_sizes_its_cpu_kernel_lacks() -> None:
    stack = quantize_stack(build_stack(StackCase((64, 16), 1, "lora", False, "relu", 1)), blocksize=512)
    with pytest.raises(ConfigError, match="block sizes"):
        build_model(stack, None, nf4_ops="bnb4")
    report = verify_model(build_model(stack, None, nf4_ops="standard"), stack)
    assert report.passed, report.summary()
