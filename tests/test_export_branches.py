"""The unmerged ONNX branches of IA3, OFT, LoKr, Pre-Diag and LoHa, and the merged export of every method.

Specifications:
- Each branch kind's graph passes onnx.checker and computes refpeft's float64 forward within the
  derived bound, in ONNX Runtime and onnx.reference, with the adapter fed and with none (the base).
- A second adapter of the same method, written as an .onnx_adapter file, swaps in on the same
  session and gives its own output: IA3 with the other layers' sides, OFT with another block size
  (and one shared block), LoKr with another factorisation (low-rank factors), Pre-Diag and LoHa
  with another rank.
- The same on fan_in_fan_out (Conv1D-layout) layers and on NF4 bases (MatMulBnb4 and standard ops).
- The bound is not vacuous: a transposed OFT rotation or a doubled LoKr scaling is caught.
- Every mergeable method of the table exports merged and verifies; a merged-only kind (SORA) is
  refused unmerged with a ConfigError, and so is an input-transforming branch on a given x W0^T.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_export_adapters import assert_serves
from test_export_cases import build_stack, StackCase

from refpeft.adapter import Adapter, ModuleAdapter  # noqa: E402
from refpeft.errors import ConfigError  # noqa: E402
from refpeft.methods import METHODS, method_spec  # noqa: E402
from refpeft.tolerance import compare  # noqa: E402

from refpeft_onnx.branches import BRANCHES  # noqa: E402
from refpeft_onnx.builder import GraphBuilder  # noqa: E402
from refpeft_onnx.exporter import export_adapter_file, export_model  # noqa: E402
from refpeft_onnx.graph import adapter_inputs, build_model, unmerged_linear  # noqa: E402
from refpeft_onnx.nf4 import quantize_stack  # noqa: E402
from refpeft_onnx.serving import AdapterSession  # noqa: E402
from refpeft_onnx.stack import LinearStack, reference_forward  # noqa: E402
from refpeft_onnx.verify import adapter_feeds, graph_bound, session, verify_model  # noqa: E402

SIZES = (16, 12, 8)


def _stack(activation: str = "gelu"):
    return build_stack(StackCase(SIZES, 1, "lora", True, activation, 5))


def trained_adapter(stack, method: str, *, rank: int, seed: int, **options) -> Adapter:
    """The row's own init on every layer (PEFT's shapes and layouts), every trainable tensor then moved off
    its initial value, so the adapter is not the identity."""
    spec = method_spec(method)
    W0s = {layer.name: layer.weight for layer in stack.layers}
    modules, shared, _ = spec.init_modules(W0s, ranks={p: rank for p in W0s}, alphas={p: 3.0 for p in W0s}, **options)
    rng = np.random.default_rng(seed)
    moved = {path: m.replace(**{n: m.tensors[n] + 0.3 * rng.standard_normal(m.tensors[n].shape)
                                for n in spec.trainable if n in m.tensors})
             for path, m in modules.items()}
    return Adapter(moved, **shared)


def _one_shared_block(adapter: Adapter) -> Adapter:
    """OFT with block_share: one rotation block (oft_R's first row) used along the whole input."""
    return Adapter({p: m.replace(oft_R=m.oft_R[:1]) for p, m in adapter.modules.items()})


# name -> (method, first adapter's rank and options, second adapter's); "rank" is OFT's block size
CASES = {
    "ia3": ("ia3", (1, {"feedforward_modules": ("layers.1",)}), (1, {"feedforward_modules": ("layers.0",)})),
    "oft": ("oft", (2, {}), (4, {})),
    "lokr": ("lokr", (2, {}), (1, {"decompose_both": True, "decompose_factor": 2})),
    "prediag": ("prediag", (2, {}), (3, {})),
    "loha": ("loha", (2, {}), (1, {})),
}


def _pair(name: str, stack) -> tuple[Adapter, Adapter]:
    method, (r1, o1), (r2, o2) = CASES[name]
    first = trained_adapter(stack, method, rank=r1, seed=1, **o1)
    second = trained_adapter(stack, method, rank=r2, seed=2, **o2)
    return first, (_one_shared_block(second) if name == "oft" else second)


@pytest.mark.parametrize("name", CASES)
def test_unmerged_branch_verifies_and_a_second_adapter_file_swaps_in(tmp_path, name) -> None:
    stack = _stack()
    first, second = _pair(name, stack)
    result = export_model(tmp_path / "model.onnx", stack, first, form="unmerged")   # checker + ORT + onnx.reference
    assert result.report.passed and {c.run for c in result.report.checks} == {"no adapter", "adapter fed as inputs"}
    assert "onnx.reference" in {c.executor for c in result.report.checks}
    export_adapter_file(tmp_path / "second.onnx_adapter", stack, second, model=result.model_path)
    server = AdapterSession(result.model_path)
    server.load("first", result.adapter_path)
    server.load("second", tmp_path / "second.onnx_adapter")
    x = np.random.default_rng(0).standard_normal((3, 4, SIZES[0])).astype(np.float32)
    for _ in range(2):   # back and forth: nothing of one adapter stays behind
        assert_serves(server, stack, first, "first", x)
        assert_serves(server, stack, None, None, x)
        assert_serves(server, stack, second, "second", x)
    # the two adapters really differ, and differ from the base, by more than the bound
    outputs = [server.run(x, adapter=a) for a in ("first", None, "second")]
    bound = graph_bound(stack, first, x, form="unmerged", dtype="float32")
    assert np.max(np.abs(outputs[0] - outputs[1]) - bound) > 0 and np.max(np.abs(outputs[2] - outputs[1]) - bound) > 0


@settings(max_examples=25, deadline=None)
@given(method=st.sampled_from(["ia3", "oft", "lokr", "prediag", "loha"]), halves=st.lists(st.integers(1, 7), min_size=2,
       max_size=3), rank=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_unmerged_branches_verify_on_any_layer_sizes(method, halves, rank, seed) -> None:
    """Sizes 2..14 (even, so OFT's block size 2 divides every k; LoKr meets prime halves: factors (1, n))."""
    stack = build_stack(StackCase(tuple(2 * h for h in halves), 1, "lora", seed % 2 == 0, "tanh", seed))
    adapter = trained_adapter(stack, method, rank=2 if method == "oft" else min(rank, min(2 * h for h in halves)),
                              seed=seed)
    report = verify_model(build_model(stack, adapter, form="unmerged"), stack, adapter, shapes=((1, 3),))
    assert report.passed, report.summary()


@pytest.mark.parametrize("name", CASES)
def test_float16_unmerged_branches_verify(name) -> None:
    stack = _stack("relu")
    first, second = _pair(name, stack)
    for adapter in (first, second):
        report = verify_model(build_model(stack, adapter, form="unmerged", dtype="float16"), stack, adapter)
        assert report.passed, report.summary()


def test_graph_inputs_are_the_adapter_file_names_with_symbolic_block_and_factor_axes() -> None:
    stack = _stack()
    for name in ("ia3", "oft", "lokr"):
        method = CASES[name][0]
        inputs = adapter_inputs(build_model(stack, None, form="unmerged", method=method))
        for layer in stack.layers:
            shapes = {key[len(layer.name) + 1:]: dims for key, (_, dims) in inputs.items()
                      if key.startswith(layer.name + ".")}
            assert set(shapes) == set(BRANCHES[method_spec(method).onnx_branch].inputs)
            if method == "ia3":
                assert shapes == {"ia3_input_scale": [layer.k], "ia3_output_scale": [layer.d]}
            elif method == "oft":
                assert all(isinstance(s, str) for s in shapes["oft_rotation"])
            else:
                assert all(isinstance(s, str) for s in shapes["lokr_w1"] + shapes["lokr_w2_t"])
        for adapter in _pair(name, stack):
            assert set(adapter_feeds(stack, adapter, "float32")) == set(inputs)


@pytest.mark.parametrize("method", ["ia3", "oft", "lokr", "prediag"])
def test_the_default_inputs_give_the_base_model(method) -> None:
    stack = _stack()
    model = build_model(stack, None, form="unmerged", method=method)
    x = np.random.default_rng(3).standard_normal((2, 3, SIZES[0])).astype(np.float32)
    result = compare(session(model).run(None, {"x": x})[0], reference_forward(stack, None, x),
                     graph_bound(stack, None, x, form="unmerged", dtype="float32"))
    assert result.passed, f"{result.ratio:.3g} of the bound"


def _fed_ratio(stack, adapter, change) -> float:
    model = build_model(stack, adapter, form="unmerged")
    x = np.random.default_rng(4).standard_normal((2, 3, SIZES[0])).astype(np.float32)
    feeds = {key: change(key, value) for key, value in adapter_feeds(stack, adapter, "float32").items()}
    y = session(model).run(None, {"x": x, **feeds})[0]
    return compare(y, reference_forward(stack, adapter, x), graph_bound(stack, adapter, x, form="unmerged",
                                                                         dtype="float32")).ratio


@pytest.mark.parametrize("name", CASES)
def test_fan_in_fan_out_layers_and_nf4_bases_verify(name) -> None:
    stack = _stack()
    adapter = _pair(name, stack)[0]
    transposed = LinearStack(tuple(replace(layer, weight=np.ascontiguousarray(layer.weight.T), fan_in_fan_out=True)
                                   for layer in stack.layers), activation=stack.activation)
    conv1d = Adapter({path: ModuleAdapter(m.method, m.tensors, alpha=m.alpha, fan_in_fan_out=True, rank=m.rank)
                      for path, m in adapter.modules.items()})
    report = verify_model(build_model(transposed, conv1d, form="unmerged"), transposed, conv1d)
    assert report.passed, report.summary()
    nf4 = quantize_stack(stack, blocksize=64, double_quant=True)
    for ops in ("bnb4", "standard"):
        report = verify_model(build_model(nf4, adapter, form="unmerged", nf4_ops=ops), nf4, adapter)
        assert report.passed, f"{ops}: {report.summary()}"


def test_a_transposed_rotation_or_a_doubled_kronecker_scaling_is_caught() -> None:
    stack = _stack()
    oft = trained_adapter(stack, "oft", rank=4, seed=5)
    assert _fed_ratio(stack, oft, lambda key, v: v) <= 1
    assert _fed_ratio(stack, oft, lambda key, v: np.ascontiguousarray(np.swapaxes(v, -1, -2))) > 1
    lokr = trained_adapter(stack, "lokr", rank=2, seed=6)
    assert _fed_ratio(stack, lokr, lambda key, v: 2 * v if key.endswith("lokr_scaling") else v) > 1


@pytest.mark.parametrize("method", [name for name, spec in METHODS.items() if spec.mergeable])
def test_every_mergeable_method_exports_merged_and_verifies(tmp_path, method) -> None:
    stack = _stack()
    adapter = trained_adapter(stack, method, rank=2, seed=7)
    result = export_model(tmp_path / "model.onnx", stack, adapter, form="merged")
    assert result.report.passed and result.adapter_path is None
    assert {c.run for c in result.report.checks} == {"adapted"}


@pytest.mark.parametrize("method", [name for name, spec in METHODS.items()
                                    if spec.mergeable and spec.onnx_branch not in BRANCHES])
def test_a_merged_only_method_is_refused_unmerged(tmp_path, method) -> None:
    stack = _stack()
    adapter = trained_adapter(stack, method, rank=2, seed=8)
    with pytest.raises(ConfigError, match="merged"):
        build_model(stack, adapter, form="unmerged")
    with pytest.raises(ConfigError, match="merged"):
        export_adapter_file(tmp_path / "a.onnx_adapter", stack, adapter)
    assert export_model(tmp_path / "m.onnx", stack, adapter, form="merged").report.passed


def test_sora_is_merged_only() -> None:
    assert method_spec("sora").onnx_branch not in BRANCHES


@pytest.mark.parametrize("method", ["ia3", "oft"])
def test_an_input_transforming_branch_refuses_a_given_base_product(method) -> None:
    layer = _stack().layers[0]
    g = GraphBuilder("float32")
    h = g.input("x", ["batch", "sequence", layer.k])
    given = g.op("MatMul", [h, g.const("w_t", layer.weight.T)], "given_base")
    with pytest.raises(ConfigError, match="own MatMul"):
        unmerged_linear(g, h, layer, method, vera_t=None, nf4_ops="standard", swappable_bias=False, base=given)
    # an additive branch takes it
    assert unmerged_linear(g, h, layer, "lokr", vera_t=None, nf4_ops="standard", swappable_bias=False, base=given)
