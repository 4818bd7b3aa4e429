"""The `export_forward` family: y of refpeft_onnx's exported one-layer graph, every branch kind.

A case is one linear layer (W0 (d, k), [bias (d)]) with one adapter module of `options.method`,
exported merged or unmerged (`options.form`; refpeft_onnx.graph) and run on x (..., k). Its
inputs are the method's own forward-case draws (the same PCG64 order as the method's family:
refpeft.conformance.families for LoRA/DoRA/VeRA, method_families for IA3/LoKr/OFT, `_prediag_inputs`
below), and, for an unmerged case, the values the graph's swappable inputs take for this module,
each named `branch.<input>` (refpeft_onnx.branches: `lora_A_t`, `ia3_input_scale`, `oft_rotation`,
`lokr_w2_t`, ...) and rounded once to the case's dtype, exactly what the module's .onnx_adapter
file holds: an adapter-switching runtime is checked on the branch alone by computing y from x,
W0, [bias] and the `branch.*` inputs; the method's tensors are there to check its conversion too.

Expected y: the method's table row forward on the layer's float weight (an NF4 base's dequantised
W0, what the graph multiplies by), computed exactly (ExactArray). Bound: the exporter's own
refpeft_onnx.verify.graph_bound for the form (each branch kind's nodes in refpeft.tolerance's
algebra: every input stored once in the dtype, each MatMul a dot product of its inner length,
each Add/Mul one rounding), rounded up to 20 bits (refpeft.conformance.families.round_up).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refpeft.conformance.case import Case, Vectors, draw, exact_inputs, plain_results
from refpeft.methods import method_spec

BRANCH_PREFIX = "branch."
LAYER_INPUTS = ("x", "W0", "bias")   # the layer's own inputs: "bias" is W0's bias, never LoRA's optional lora_B.bias


def export_adapter(inputs: dict[str, np.ndarray], options: dict[str, Any], sizes: dict[str, Any]):
    """The one-layer stack and refpeft Adapter an export case describes (the exporter's own types)."""
    from refpeft.adapter import Adapter, ModuleAdapter
    from refpeft_onnx.nf4 import quantize_stack
    from refpeft_onnx.stack import single_layer

    stack = single_layer(inputs["W0"], inputs.get("bias"))
    if options.get("nf4_blocksize"):   # stored as bitsandbytes would (CUDA semantics, double quantised)
        stack = quantize_stack(stack, blocksize=options["nf4_blocksize"], double_quant=True)
    spec = method_spec(options["method"])
    module = ModuleAdapter(spec.name, {name: inputs[name] for name in spec.suffixes()
                                       if name in inputs and name not in LAYER_INPUTS},
                           alpha=options.get("alpha", 8.0), rslora=options.get("rslora", False), rank=sizes.get("r"))
    return stack, Adapter({"linear": module}, **{name: inputs[name] for name in spec.shared})


def branch_inputs(stack, adapter, dtype: str) -> dict[str, np.ndarray]:
    """The unmerged graph's swappable inputs for the case's module, as `branch.<input>` in `dtype`."""
    from refpeft_onnx.verify import adapter_feeds

    layer = stack.layers[0].name
    return {BRANCH_PREFIX + name.removeprefix(f"{layer}."): value
            for name, value in adapter_feeds(stack, adapter, dtype).items()}


def export_forward_vectors(case: Case) -> Vectors:
    """y of the exported graph (module docstring), its bound and, unmerged, the branch's inputs."""
    from refpeft.conformance.families import round_up
    from refpeft.conformance.optim_quant_families import quant_weight
    from refpeft_onnx.verify import graph_bound

    o = case.options
    inputs = EXPORT_INPUTS[o["method"]](case)
    if o.get("nf4_blocksize"):
        inputs["W0"] = quant_weight(Case(case.name, case.family, "float32", case.seed,
                                         {"shape": [case.sizes["d"], case.sizes["k"]]},
                                         {"blocksize": o["nf4_blocksize"], "quant_type": "nf4"}))
    stack, adapter = export_adapter(inputs, o, case.sizes)
    layer, module = stack.layers[0], adapter.modules["linear"]
    e = exact_inputs({**inputs, "W": layer.weight})       # W: the float weight the graph multiplies by
    exact_module = module.replace(**{name: e[name] for name in module.tensors})
    y, _ = module.spec.forward(e["x"], e["W"], exact_module, shared={n: e[n] for n in module.spec.shared},
                               bias=e.get("bias"))
    bound = graph_bound(stack, adapter, inputs["x"], form=o["form"], dtype=case.dtype, nf4_ops=o.get("nf4_ops", "bnb4"))
    if o["form"] == "unmerged":
        inputs.update(branch_inputs(stack, adapter, case.dtype))
    parameters = {"scaling": module.scaling} if module.spec.scaled else {}
    return Vectors(inputs, plain_results({"y": y}), {"y": round_up(np.asarray(bound, dtype=np.float64))}, parameters)


def _method_inputs(case: Case) -> dict[str, np.ndarray]:
    """The draws of the method's own `<method>_forward` case with these sizes, options and seed."""
    from refpeft.conformance.method_families import method_inputs

    method = case.options["method"]
    return method_inputs(Case(case.name, f"{method}_forward", case.dtype, case.seed, case.sizes, case.options))[1]


def _prediag_inputs(case: Case) -> dict[str, np.ndarray]:
    """x (..., k), W0 (d, k) in [-1/4, 1/4), [bias (d)], A (r, k) in [-1/4, 1/4), B (d, r) in [-1/2, 1/2),
    prediag_D (d) in [1/2, 3/2) (a row scale away from 0, which Pre-Diag's unmerge refuses)."""
    s = case.sizes
    rng = np.random.default_rng(case.seed)
    inputs = {"x": draw(rng, (*s["batch"], s["k"]), dtype=case.dtype),
              "W0": draw(rng, (s["d"], s["k"]), dtype=case.dtype, scale=0.25)}
    if case.options.get("bias", False):
        inputs["bias"] = draw(rng, (s["d"],), dtype=case.dtype)
    inputs["A"] = draw(rng, (s["r"], s["k"]), dtype=case.dtype, scale=0.25)
    inputs["B"] = draw(rng, (s["d"], s["r"]), dtype=case.dtype, scale=0.5)
    inputs["prediag_D"] = (rng.random(s["d"]) + 0.5).astype(case.dtype)
    return inputs


def _lora_inputs(case: Case) -> dict[str, np.ndarray]:
    from refpeft.conformance.families import _lora_inputs as lora   # (families imports this module)

    return lora(case, with_dy=False)[0]


def _dora_inputs(case: Case) -> dict[str, np.ndarray]:
    from refpeft.conformance.families import _dora_inputs as dora

    return dora(case, with_dy=False)[0]


def _vera_inputs(case: Case) -> dict[str, np.ndarray]:
    from refpeft.conformance.families import _vera_inputs as vera

    return vera(case, with_dy=False)


# The inputs each method's export case draws (the same draws as its forward cases).
EXPORT_INPUTS = {
    "lora": _lora_inputs,
    "dora": _dora_inputs,
    "vera": _vera_inputs,
    "ia3": _method_inputs,
    "lokr": _method_inputs,
    "oft": _method_inputs,
    "prediag": _prediag_inputs,
}

SUMMARY = ("y of refpeft_onnx's exported one-layer graph (options: method, form merged/unmerged, NF4 base); "
           "unmerged cases give the branch's swappable inputs as branch.<input>; the expected y is the "
           "adapter's exact forward")
