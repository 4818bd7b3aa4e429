"""ONNX graphs of a stack of adapted linear layers: merged, unmerged (swappable adapters), NF4 bases.

Every graph maps x (batch, sequence, k) to y (batch, sequence, d), both leading axes symbolic, in
one dtype T (float32 or float16). Per layer, for an input h (shapes at line ends):

merged (the adapter folded into the weight initializer by refpeft's own merge of its method; every
mergeable method of the table exports this way):
    y = MatMul(h, W^T) + b          W = the row's merge (W0 + delta in W0's layout)        # (..., d)
    (IA3: b = l * b on output-scaled layers too, its row's merge_bias)

unmerged (the base and the adapter branch as separate nodes; every adapter tensor is a graph input
with an initializer default of the same name, so ONNX Runtime can swap it per run): the branch of
the method's `onnx_branch` kind, refpeft_onnx.branches (its docstring has every kind's nodes,
inputs and defaults: low-rank LoRA/LoHa, DoRA, Pre-Diag, VeRA, IA3, OFT, LoKr). The defaults give
the base output, and symbolic rank / block / factor axes let adapters of any size share a session.
A method whose kind has no branch (SORA's "merged-only") is refused with a ConfigError.
When the adapter trains base biases (PEFT's bias="lora_only"/"all"), those layers' b becomes a
swappable input too ({layer}.bias, default: the frozen bias).

NF4 base (a layer with `nf4`): `base` comes from refpeft_onnx.nf4 (MatMulBnb4 or standard ops).

Between layers: Relu, Gelu (approximate="none") or Tanh; none after the last layer.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx

from refpeft import __version__
from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.checkpoint import merged_weight as checkpoint_merged_weight
from refpeft.methods import method_spec
from refpeft.quant import quantize_4bit
from refpeft.errors import ConfigError

from refpeft_onnx.branches import BRANCHES, Branch
from refpeft_onnx.builder import DEFAULT_OPSET, GraphBuilder
from refpeft_onnx.nf4 import NF4_OPS, nf4_matmul
from refpeft_onnx.stack import BaseLinear, LinearStack, as_float64, as_float64_module, check_adapter, \
    dequantized_weight, with_trained_biases

FORMS = ("merged", "unmerged")
ONNX_ACTIVATIONS = {"relu": "Relu", "gelu": "Gelu", "tanh": "Tanh"}


def adapter_input_names(layer: str, method: str) -> tuple[str, ...]:
    """The swappable inputs of one layer's branch, in the order the unmerged graph declares them
    (and the method's `branch_values` gives their values)."""
    return tuple(f"{layer}.{name}" for name in method_branch(method).inputs)


def method_branch(method: str) -> Branch:
    """The branch of `method`'s onnx_branch kind; ConfigError for a method that exports merged only."""
    spec = method_spec(method)
    if spec.onnx_branch not in BRANCHES:
        raise ConfigError(f"{method} adapters have no unmerged ONNX branch (kind {spec.onnx_branch!r}: "
                          f"{spec.summary}); export them merged (without --unmerged)")
    return BRANCHES[spec.onnx_branch]


def bias_input_name(layer: str) -> str:
    """The swappable bias of a layer whose bias an adapter trains (PEFT's bias="lora_only"/"all")."""
    return f"{layer}.bias"


def branch_values(layer: BaseLinear, module: ModuleAdapter) -> dict[str, np.ndarray]:
    """One module's values for the unmerged graph's inputs (float64; cast when fed or written)."""
    values = module.spec.branch_values(as_float64(layer.weight), as_float64_module(module))
    return dict(zip(adapter_input_names(layer.name, module.method), (as_float64(v) for v in values)))


def merged_weight(layer: BaseLinear, module: ModuleAdapter, adapter: Adapter) -> np.ndarray:
    """W0 + delta in W0's layout, float64: refpeft.checkpoint's merge of one module (each method's own merge)."""
    return checkpoint_merged_weight(module, as_float64(layer.weight), shared=adapter.shared)


def refuse_nf4_merge(layer: BaseLinear, module: ModuleAdapter, adapter: Adapter) -> None:
    """ConfigError for a merge into an NF4 layer, with the error re-quantising the merged weight would cost.

    A merged QLoRA weight must be quantised again (PEFT's merge does this): every block gets a new
    absmax and every element a new code, so the served model is no longer the trained one. The
    message gives max |dequant(quant(W0 + delta)) - (W0 + delta)| against max |delta|.
    """
    state = layer.nf4
    if state is None:
        return
    W = merged_weight(layer, module, adapter)
    requantized = quantize_4bit(W.astype(np.float32), quant_type="nf4", blocksize=state.blocksize,
                                double_quant=state.nested)
    error = float(np.max(np.abs(dequantized_weight(requantized) - W)))
    delta = float(np.max(np.abs(W - as_float64(layer.weight))))
    raise ConfigError(f"{layer.name}: merging into the NF4 base means re-quantising the merged weight, which changes every "
                      f"block's absmax: max error {error:.3g} against the adapter's largest update {delta:.3g} "
                      "(PEFT's QLoRA merge does this); export it unmerged to serve the trained model exactly")


def build_model(stack: LinearStack, adapter: Adapter | None = None, *, form: str = "merged",
                dtype: str = "float32", method: str | None = None, nf4_ops: str = "bnb4",
                opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The ONNX model of `stack` with `adapter` (None: the base alone, or empty branches when unmerged).

    form: "merged" folds each adapted layer's delta into its weight; "unmerged" builds swappable
      branches on the adapter's layers (on every layer, of `method`, when there is no adapter).
    nf4_ops: for layers stored as NF4, "bnb4" (com.microsoft.MatMulBnb4, ONNX Runtime) or
      "standard" (standard ops only).
    """
    if form not in FORMS:
        raise ConfigError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if nf4_ops not in NF4_OPS:
        raise ConfigError(f"nf4_ops must be one of {', '.join(NF4_OPS)}, got {nf4_ops!r}")
    check_adapter(stack, adapter)
    trained_biases = set() if adapter is None else set(adapter.base_biases)
    if form == "merged":
        stack = with_trained_biases(stack, adapter)
        trained_biases = set()
    else:
        with_trained_biases(stack, adapter)                          # checks the names
    targets = _branch_methods(stack, adapter, form=form, method=method)
    g = GraphBuilder(dtype)
    h = g.input("x", ["batch", "sequence", stack.in_features])
    vera_t = vera_projections(g, adapter) if any(method_spec(m).onnx_branch == "shared-projections"
                                                  for m in targets.values()) else None
    for i, layer in enumerate(stack.layers):
        module = None if adapter is None else adapter.modules.get(layer.name)
        if form == "merged":
            h = merged_linear(g, h, layer, module, adapter, nf4_ops=nf4_ops)
        else:
            h = unmerged_linear(g, h, layer, targets.get(layer.name), vera_t=vera_t, nf4_ops=nf4_ops,
                                swappable_bias=layer.name in trained_biases)
        if i < len(stack.layers) - 1 and stack.activation != "identity":
            h = g.op(ONNX_ACTIVATIONS[stack.activation], [h], f"{layer.name}.{stack.activation}")
    y = g.op("Identity", [h], "y")
    metadata = {"refpeft.version": __version__, "refpeft.form": form, "refpeft.dtype": dtype,
                "refpeft.opset": str(opset), "refpeft.activation": stack.activation,
                "refpeft.branches": json.dumps(targets), "refpeft.adapter_inputs": json.dumps(g.swappable_names),
                "refpeft.nf4_ops": nf4_ops if any(l.nf4 is not None for l in stack.layers) else "none"}
    return g.model({y: ["batch", "sequence", stack.out_features]}, opset=opset, name="refpeft_stack",
                   metadata=metadata)


def _branch_methods(stack: LinearStack, adapter: Adapter | None, *, form: str, method: str | None) -> dict[str, str]:
    """Which layers get an unmerged branch, and of which method ({} for merged graphs)."""
    if form == "merged":
        for name, module in ({} if adapter is None else adapter.modules).items():
            refuse_nf4_merge(stack.layer(name), module, adapter)
        return {}
    if adapter is not None:
        if method is not None and adapter.methods != {method}:
            raise ConfigError(f"method={method!r} disagrees with the adapter's {adapter.method!r}")
        return {name: module.method for name, module in adapter.modules.items()}
    spec = method_spec(method or "lora")
    if spec.shared:
        raise ConfigError(f"an unmerged {spec.name} graph needs an adapter: its shared "
                          f"{' and '.join(spec.shared)} are part of the graph")
    return {layer.name: spec.name for layer in stack.layers}


def vera_projections(g: GraphBuilder, adapter: Adapter) -> tuple[str, str, int]:
    """The shared projections, once, as constants: vera_A^T (k_max, r), vera_B^T (r, d_max); and r."""
    vera_A = as_float64(adapter.vera_A)
    return (g.const("vera_A_t", vera_A.T), g.const("vera_B_t", as_float64(adapter.vera_B).T), vera_A.shape[0])


def _base_matmul(g: GraphBuilder, h: str, layer: BaseLinear, weight_t: np.ndarray | None, *, nf4_ops: str) -> str:
    """h W^T without the bias: a float initializer W^T (k, d), or the layer's NF4 weight."""
    if layer.nf4 is not None and weight_t is None:
        return nf4_matmul(g, h, layer, ops=nf4_ops)
    wt = g.const(f"{layer.name}.weight_t", layer.weight_rows.T if weight_t is None else weight_t)
    return g.op("MatMul", [h, wt], f"{layer.name}.base")


def _add_bias(g: GraphBuilder, h: str, layer: BaseLinear, *, swappable: bool = False) -> str:
    """h + b; a swappable b (default: the frozen bias, or zeros) when adapters train the layer's bias."""
    if swappable:
        default = np.zeros(layer.d) if layer.bias is None else as_float64(layer.bias)
        return g.op("Add", [h, g.swappable(bias_input_name(layer.name), default, [layer.d])], f"{layer.name}.out")
    if layer.bias is None:
        return h
    return g.op("Add", [h, g.const(f"{layer.name}.bias", layer.bias)], f"{layer.name}.out")


def merged_linear(g: GraphBuilder, h: str, layer: BaseLinear, module: ModuleAdapter | None,
                  adapter: Adapter | None, *, nf4_ops: str, base: str | None = None) -> str:
    """h W^T + b with the module's delta folded into W (`base`: h W0^T, used when there is no module)."""
    if module is None:
        return _add_bias(g, base or _base_matmul(g, h, layer, None, nf4_ops=nf4_ops), layer)
    W = merged_weight(layer, module, adapter)
    weight_t = W if layer.fan_in_fan_out else W.T                     # (k, d)
    if module.spec.merge_bias is not None and layer.bias is not None:  # IA3's output scaling scales b too
        layer = replace(layer, bias=module.spec.merge_bias(as_float64(layer.bias), as_float64_module(module)))
    return _add_bias(g, _base_matmul(g, h, layer, weight_t, nf4_ops=nf4_ops), layer)


def unmerged_linear(g: GraphBuilder, h: str, layer: BaseLinear, method: str | None, *,
                    vera_t: tuple[str, str, int] | None, nf4_ops: str, swappable_bias: bool,
                    base: str | None = None) -> str:
    """The layer's base product plus `method`'s swappable branch (refpeft_onnx.branches).

    base: h W0^T when the caller already has it (a tied head, a graph exported elsewhere); a branch
    that transforms the layer's input (IA3's input scale, OFT's rotation) needs the layer's own
    MatMul and is refused there with a ConfigError.
    """
    def base_of(x: str) -> str:
        if base is None:
            return _base_matmul(g, x, layer, None, nf4_ops=nf4_ops)
        if x != h:
            raise ConfigError(f"{layer.name}: the {method} branch transforms the layer's input, so it needs the "
                              "layer's own MatMul, not a given x W0^T (a tied lm_head, a graph exported elsewhere); "
                              "export this adapter merged")
        return base

    def add_bias(total: str) -> str:
        return _add_bias(g, total, layer, swappable=swappable_bias)

    if method is None:
        return add_bias(base_of(h))
    return method_branch(method).build(g, h, layer, adapter_input_names(layer.name, method), base_of=base_of,
                                 add_bias=add_bias, vera_t=vera_t)


def graph_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The refpeft.* metadata a model was exported with."""
    return {p.key: p.value for p in model.metadata_props}


def adapter_inputs(model: onnx.ModelProto) -> dict[str, tuple[int, list[int | str]]]:
    """Swappable inputs of a model: name -> (ONNX element type, shape with symbolic axes as strings)."""
    defaults = {t.name for t in model.graph.initializer}
    found = {}
    for value in model.graph.input:
        if value.name in defaults:
            dims = [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]
            found[value.name] = (value.type.tensor_type.elem_type, dims)
    return found
