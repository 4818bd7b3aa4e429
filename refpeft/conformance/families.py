"""Case families: for each capability, how a case's inputs are drawn and its expected results computed.

A family turns a `Case` (sizes, options, dtype, seed) into `Vectors`:
- inputs, drawn from NumPy's PCG64 seeded with the case's seed as uniform values in [-scale, scale)
  (`rng.random`: 53 random bits, no libm involved) rounded once to the case's dtype, so every
  input is exactly representable in the precision an implementation computes in;
- expected results, from refpeft's own functions run in float64 on `ExactArray` inputs (every
  reduction correctly rounded, refpeft.conformance.exact), so the bytes are machine-independent;
- per-element bounds from the methods' `*_bound` functions (refpeft.tolerance's algebra) for every
  result checked by bound, in the case's precision (plus refpeft's own float64 error), computed the
  same way;
- results checked bit for bit (4-bit codes, absmaxes) carry no bound;
- parameters: derived numbers an implementation needs (the LoRA scaling as a float64), which
  the manifest records so no implementation has to re-derive them.
These families say where they depart from this: `fusion_cat` (its factors are elementwise, computed
on plain NumPy), `export_forward` (its bounds come from the exporter's own `graph_bound`, rounded
up to 20 significant bits, see `round_up`; refpeft.conformance.export_families), the `*_bf16_*`
families (expected values in PEFT's bfloat16 rounding order; refpeft.conformance.bf16_families)
and the other fusion families (plain NumPy; `fusion_svd`'s bound a perturbation bound;
refpeft.conformance.fusion_families).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refpeft import tolerance
from refpeft.conformance.batch_families import SUMMARY as MULTI_ADAPTER_SUMMARY, multi_adapter_vectors
from refpeft.conformance.bf16_families import FAMILIES as BF16_FAMILIES, bfloat16_values as bfloat16
from refpeft.conformance.bottleneck_families import FAMILIES as BOTTLENECK_FAMILIES
from refpeft.conformance.case import Case, Family, Vectors, draw, exact_inputs, plain_results
from refpeft.conformance.config_families import SUMMARY as ADAPTER_CONFIG_SUMMARY, adapter_config_vectors
from refpeft.conformance.exact import exact_array, plain
from refpeft.conformance.export_families import SUMMARY as EXPORT_SUMMARY, export_forward_vectors
from refpeft.conformance.fusion_families import FUSION_FAMILIES
from refpeft.conformance.method_families import METHOD_FAMILIES
from refpeft.conformance.model_families import SUMMARY as MODEL_LORA_SUMMARY, model_lora_vectors
from refpeft.conformance.moe_families import BACKWARD as MOE_BACKWARD, FORWARD as MOE_FORWARD, \
    MERGE as MOE_MERGE, moe_lora_vectors
from refpeft.conformance.optim_quant_families import absmax_tensors, adam_step_vectors, dequantize_4bit_vectors, \
    quant_weight, quantize_4bit_vectors
from refpeft.errors import ConfigError
from refpeft.methods.linear import dropout_mask
from refpeft.methods.lora import lora_backward, lora_backward_bound, lora_forward, lora_forward_bound, lora_merge, \
    lora_merge_bound, lora_scaling, lora_unmerge


# ---------------------------------------------------------------- LoRA

def _lora_inputs(case: Case, *, with_dy: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """x, W0, A, B (and bias, dropout_mask, dy per options) and the keyword options of refpeft.methods.lora."""
    s, o = case.sizes, case.options
    rng = np.random.default_rng(case.seed)
    batch, k, d, r = tuple(s["batch"]), s["k"], s["d"], s["r"]
    fan_in_fan_out = o.get("fan_in_fan_out", False)
    inputs = {
        "x": draw(rng, (*batch, k), dtype=case.dtype),
        "W0": draw(rng, (k, d) if fan_in_fan_out else (d, k), dtype=case.dtype, scale=0.25),
        "A": draw(rng, (r, k), dtype=case.dtype, scale=0.25),
        "B": draw(rng, (d, r), dtype=case.dtype, scale=0.5),
    }
    if o.get("bias", False):
        inputs["bias"] = draw(rng, (d,), dtype=case.dtype)
    if o.get("dropout", 0.0):
        inputs["dropout_mask"] = dropout_mask((*batch, k), o["dropout"], seed=case.seed, dtype=case.dtype)
    if with_dy:
        inputs["dy"] = draw(rng, (*batch, d), dtype=case.dtype)
    options = {"fan_in_fan_out": fan_in_fan_out}
    if "alpha" in o:  # LoRA and DoRA; VeRA has no scaling
        options["scaling"] = lora_scaling(o["alpha"], r, rslora=o.get("rslora", False))
    return inputs, options


def lora_forward_vectors(case: Case) -> Vectors:
    inputs, options = _lora_inputs(case, with_dy=False)
    e = exact_inputs(inputs)
    args = dict(bias=e.get("bias"), dropout_mask=e.get("dropout_mask"), **options)
    y, _ = lora_forward(e["x"], e["W0"], e["A"], e["B"], **args)
    bound = lora_forward_bound(e["x"], e["W0"], e["A"], e["B"], dtype=case.dtype, **args)
    return Vectors(inputs, plain_results({"y": y}), plain_results({"y": bound}), {"scaling": options["scaling"]})


def lora_backward_vectors(case: Case) -> Vectors:
    inputs, options = _lora_inputs(case, with_dy=True)
    e = exact_inputs(inputs)
    trainable = "bias" in inputs
    _, cache = lora_forward(e["x"], e["W0"], e["A"], e["B"], bias=e.get("bias"), dropout_mask=e.get("dropout_mask"),
                            bias_trainable=trainable, **options)
    grads = lora_backward(e["dy"], cache)
    bounds = lora_backward_bound(e["dy"], e["x"], e["W0"], e["A"], e["B"], dropout_mask=e.get("dropout_mask"),
                                 bias_trainable=trainable, dtype=case.dtype, **options)
    expected = {"dx": grads.dx, "dA": grads.dA, "dB": grads.dB, "dbias": grads.dbias}
    return Vectors(inputs, plain_results(expected), plain_results(bounds), {"scaling": options["scaling"]})


def lora_merge_vectors(case: Case) -> Vectors:
    """merge: W = W0 + s B A; with options unmerge=True the input is W and the result W0 = W - s B A."""
    inputs, options = _lora_inputs(case, with_dy=False)
    inputs.pop("x")
    e = exact_inputs(inputs)
    undo = case.options.get("unmerge", False)
    if undo:
        inputs["W"] = inputs.pop("W0")
        W = lora_unmerge(e["W0"], e["A"], e["B"], **options)
    else:
        W = lora_merge(e["W0"], e["A"], e["B"], **options)
    bound = lora_merge_bound(e["W0"], e["A"], e["B"], dtype=case.dtype, unmerge=undo, **options)
    name = "W0" if undo else "W"
    return Vectors(inputs, plain_results({name: W}), plain_results({name: bound}), {"scaling": options["scaling"]})


# ---------------------------------------------------------------- DoRA

def _dora_inputs(case: Case, *, with_dy: bool) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """LoRA's inputs plus the magnitude m (d,), drawn in [1/2, 3/2)."""
    inputs, options = _lora_inputs(case, with_dy=with_dy)
    rng = np.random.default_rng(case.seed + 1)
    inputs["magnitude"] = (rng.random(case.sizes["d"]) + 0.5).astype(case.dtype)
    return inputs, options


def dora_forward_vectors(case: Case) -> Vectors:
    from refpeft.methods.dora import dora_forward, dora_forward_bound

    inputs, options = _dora_inputs(case, with_dy=False)
    e = exact_inputs(inputs)
    args = dict(bias=e.get("bias"), dropout_mask=e.get("dropout_mask"), **options)
    y, _ = dora_forward(e["x"], e["W0"], e["A"], e["B"], e["magnitude"], **args)
    bound = dora_forward_bound(e["x"], e["W0"], e["A"], e["B"], e["magnitude"], dtype=case.dtype, **args)
    return Vectors(inputs, plain_results({"y": y}), plain_results({"y": bound}), {"scaling": options["scaling"]})


def dora_backward_vectors(case: Case) -> Vectors:
    """Gradients with the norm detached (PEFT's) or differentiated (option gradient = "exact")."""
    from refpeft.methods.dora import dora_backward, dora_backward_bound, dora_forward

    inputs, options = _dora_inputs(case, with_dy=True)
    e = exact_inputs(inputs)
    trainable = "bias" in inputs
    gradient = case.options.get("gradient", "detached")
    args = dict(bias=e.get("bias"), dropout_mask=e.get("dropout_mask"), **options)
    _, cache = dora_forward(e["x"], e["W0"], e["A"], e["B"], e["magnitude"], gradient=gradient,
                            bias_trainable=trainable, **args)
    g = dora_backward(e["dy"], cache)
    bounds = dora_backward_bound(e["dy"], e["x"], e["W0"], e["A"], e["B"], e["magnitude"], gradient=gradient,
                                 bias_trainable=trainable, dtype=case.dtype, **args)
    expected = {"dx": g.dx, "dA": g.dA, "dB": g.dB, "dmagnitude": g.dmagnitude, "dbias": g.dbias}
    return Vectors(inputs, plain_results(expected), plain_results(bounds), {"scaling": options["scaling"]})


def dora_merge_vectors(case: Case) -> Vectors:
    """merge: W = diag(m / n) (W0 + s B A). With options unmerge=True the inputs are the merged W
    (rounded to the dtype) and the norm n cached at merge time (PEFT keeps it), the result W0."""
    from refpeft.methods.dora import dora_merge, dora_merge_bound, dora_unmerge, dora_unmerge_bound, dora_weight_norm

    inputs, options = _dora_inputs(case, with_dy=False)
    inputs.pop("x")
    e = exact_inputs(inputs)
    W = dora_merge(e["W0"], e["A"], e["B"], e["magnitude"], **options)
    if not case.options.get("unmerge", False):
        bound = dora_merge_bound(e["W0"], e["A"], e["B"], e["magnitude"], dtype=case.dtype, **options)
        return Vectors(inputs, plain_results({"W": W}), plain_results({"W": bound}), {"scaling": options["scaling"]})
    norm = dora_weight_norm(e["W0"], e["A"], e["B"], **options)
    inputs["W"], inputs["weight_norm"] = plain(W).astype(case.dtype), plain(norm).astype(case.dtype)
    inputs.pop("W0")
    e = exact_inputs(inputs)
    W0 = dora_unmerge(e["W"], e["A"], e["B"], e["magnitude"], weight_norm=e["weight_norm"], **options)
    bound = dora_unmerge_bound(e["W"], e["A"], e["B"], e["magnitude"], e["weight_norm"], dtype=case.dtype, **options)
    return Vectors(inputs, plain_results({"W0": W0}), plain_results({"W0": bound}), {"scaling": options["scaling"]})


# ---------------------------------------------------------------- VeRA

def _vera_inputs(case: Case, *, with_dy: bool) -> dict[str, np.ndarray]:
    """x, W0, the shared vera_A (r, k) / vera_B (d, r), lambda_d (r,), lambda_b (d,) (+ bias, mask, dy)."""
    inputs, _ = _lora_inputs(case, with_dy=with_dy)
    rng = np.random.default_rng(case.seed + 2)
    inputs["vera_A"], inputs["vera_B"] = inputs.pop("A"), inputs.pop("B")
    inputs["lambda_d"] = draw(rng, (case.sizes["r"],), dtype=case.dtype)
    inputs["lambda_b"] = draw(rng, (case.sizes["d"],), dtype=case.dtype)
    return inputs


def _vera_args(e: dict[str, Any]) -> tuple[Any, ...]:
    return e["vera_A"], e["vera_B"], e["lambda_d"], e["lambda_b"]


def vera_forward_vectors(case: Case) -> Vectors:
    from refpeft.methods.vera import vera_forward, vera_forward_bound

    inputs = _vera_inputs(case, with_dy=False)
    e = exact_inputs(inputs)
    args = dict(bias=e.get("bias"), dropout_mask=e.get("dropout_mask"),
                fan_in_fan_out=case.options.get("fan_in_fan_out", False))
    y, _ = vera_forward(e["x"], e["W0"], *_vera_args(e), **args)
    bound = vera_forward_bound(e["x"], e["W0"], *_vera_args(e), dtype=case.dtype, **args)
    return Vectors(inputs, plain_results({"y": y}), plain_results({"y": bound}))


def vera_backward_vectors(case: Case) -> Vectors:
    from refpeft.methods.vera import vera_backward, vera_backward_bound, vera_forward

    inputs = _vera_inputs(case, with_dy=True)
    e = exact_inputs(inputs)
    trainable = "bias" in inputs
    ffo = case.options.get("fan_in_fan_out", False)
    _, cache = vera_forward(e["x"], e["W0"], *_vera_args(e), bias=e.get("bias"), dropout_mask=e.get("dropout_mask"),
                            fan_in_fan_out=ffo, bias_trainable=trainable)
    g = vera_backward(e["dy"], cache)
    bounds = vera_backward_bound(e["dy"], e["x"], e["W0"], *_vera_args(e), dropout_mask=e.get("dropout_mask"),
                                 fan_in_fan_out=ffo, bias_trainable=trainable, dtype=case.dtype)
    expected = {"dx": g.dx, "dlambda_d": g.dlambda_d, "dlambda_b": g.dlambda_b, "dbias": g.dbias}
    return Vectors(inputs, plain_results(expected), plain_results(bounds))


def vera_merge_vectors(case: Case) -> Vectors:
    """merge: W = W0 + (lambda_b B)(lambda_d A); with options unmerge=True the input is W, the result W0."""
    from refpeft.methods.vera import vera_merge, vera_merge_bound, vera_unmerge

    inputs = _vera_inputs(case, with_dy=False)
    inputs.pop("x")
    undo = case.options.get("unmerge", False)
    if undo:
        inputs["W"] = inputs.pop("W0")
    e = exact_inputs(inputs)
    ffo = case.options.get("fan_in_fan_out", False)
    weight = e["W"] if undo else e["W0"]
    W = (vera_unmerge if undo else vera_merge)(weight, *_vera_args(e), fan_in_fan_out=ffo)
    bound = vera_merge_bound(weight, *_vera_args(e), fan_in_fan_out=ffo, dtype=case.dtype, unmerge=undo)
    name = "W0" if undo else "W"
    return Vectors(inputs, plain_results({name: W}), plain_results({name: bound}))


# ---------------------------------------------------------------- QLoRA (refpeft.methods.qlora, precision "bfloat16")

def _qlora_inputs(case: Case, *, with_dy: bool) -> tuple[dict[str, np.ndarray], Any, float]:
    """x, bias, dy in bfloat16; A, B in float32 (PEFT's adapter dtype); the base as its 4-bit state
    (NF4/FP4, block 64, double quantised, bnb-cuda semantics: QLoRA's recipe) of a bfloat16 weight."""
    from refpeft.methods.qlora import quantize_base

    s, o = case.sizes, case.options
    rng = np.random.default_rng(case.seed)
    batch, k, d, r = tuple(s["batch"]), s["k"], s["d"], s["r"]
    W = quant_weight(Case(case.name, case.family, "float32", case.seed, {"shape": [d, k]},
                          {"blocksize": 64, "quant_type": o["quant_type"]}))
    state = quantize_base(np.asarray(bfloat16(W), dtype=np.float32), quant_type=o["quant_type"], blocksize=64,
                          double_quant=True, dtype="bfloat16")
    inputs = {"x": bfloat16(draw(rng, (*batch, k), dtype="float32")),
              "A": draw(rng, (r, k), dtype="float32", scale=0.25), "B": draw(rng, (d, r), dtype="float32", scale=0.5),
              "bias": bfloat16(draw(rng, (d,), dtype="float32")),
              "packed": np.asarray(state.packed), **absmax_tensors(state)}
    if with_dy:
        inputs["dy"] = bfloat16(draw(rng, (*batch, d), dtype="float32"))
    return inputs, state, lora_scaling(o["alpha"], r)


def qlora_vectors(case: Case) -> Vectors:
    """QLoRA forward (y) or backward (dx, dA, dB) on the dequantised bfloat16 base W0."""
    from refpeft.methods.qlora import base_weight, qlora_backward_bound, qlora_forward_bound

    backward = case.family == "qlora_backward"
    inputs, state, scaling = _qlora_inputs(case, with_dy=backward)
    W0 = np.asarray(base_weight(state), dtype=np.float64)                   # bf16 values, exact
    e = exact_inputs({name: np.asarray(a, dtype=np.float64) for name, a in inputs.items()
                if name in ("x", "A", "B", "bias", "dy")})
    W0e = exact_array(W0)
    y, cache = lora_forward(e["x"], W0e, e["A"], e["B"], scaling=scaling, bias=None if backward else e["bias"])
    if not backward:
        bound = qlora_forward_bound(e["x"], W0e, e["A"], e["B"], scaling=scaling, bias=e["bias"])
        return Vectors(inputs, plain_results({"y": y}), plain_results({"y": bound}), {"scaling": scaling})
    inputs.pop("bias")
    g = lora_backward(e["dy"], cache)
    bounds = qlora_backward_bound(e["dy"], e["x"], W0e, e["A"], e["B"], scaling=scaling)
    return Vectors(inputs, plain_results({"dx": g.dx, "dA": g.dA, "dB": g.dB}), plain_results(bounds), {"scaling": scaling})


# ---------------------------------------------------------------- fusion (refpeft.fusion, PEFT's add_weighted_adapter)

def fusion_cat_vectors(case: Case) -> Vectors:
    """`cat` of two LoRA adapters with weights w: A = [(A_1 w_1) s_1 ; (A_2 w_2) s_2], B = [B_1 | B_2].

    The factors are elementwise in the inputs (no reduction), so they are computed on plain NumPy;
    B is copied (bound 0: it must be exact) and each A row is two roundings of A_i."""
    from refpeft.adapter import ModuleAdapter
    from refpeft.fusion import combine_modules

    s, o = case.sizes, case.options
    rng = np.random.default_rng(case.seed)
    inputs, modules = {}, []
    for i, (r, alpha) in enumerate(zip(s["ranks"], o["alphas"]), start=1):
        inputs[f"A{i}"] = draw(rng, (r, s["k"]), dtype=case.dtype, scale=0.25)
        inputs[f"B{i}"] = draw(rng, (s["d"], r), dtype=case.dtype, scale=0.5)
        modules.append(ModuleAdapter("lora", {"A": inputs[f"A{i}"].astype(np.float64), "B": inputs[f"B{i}"].astype(np.float64)}, alpha=alpha))
    fused, _ = combine_modules(modules, o["weights"], combination="cat")
    p = tolerance.Precision(case.dtype)
    A_bounds = [tolerance.with_reference(
        lambda prec, m=m, w=w: tolerance.scale(tolerance.scale(tolerance.exact(m.A), w, prec), m.scaling, prec), p)
        for m, w in zip(modules, o["weights"])]
    expected = {"A": np.asarray(fused.A), "B": np.asarray(fused.B)}
    bounds = {"A": np.concatenate(A_bounds, axis=0), "B": np.zeros_like(expected["B"])}
    return Vectors(inputs, expected, bounds, {"scalings": [m.scaling for m in modules], "fused_alpha": fused.alpha})


# ---------------------------------------------------------------- exported ONNX graphs (refpeft_onnx)

def round_up(bound: np.ndarray, *, bits: int = 20) -> np.ndarray:
    """`bound` rounded up to `bits` significant bits: still a bound, and immune to last-bit noise.

    The export bounds come from refpeft_onnx.verify.graph_bound, which evaluates its absolute-value
    products with the platform's float64 matmul; rounding up to 20 bits makes their bytes the same
    on any machine unless a value lies within ~1e-15 relative of a 20-bit grid point (odds ~1e-9).
    """
    mantissa, exponent = np.frexp(bound)
    return np.ldexp(np.ceil(mantissa * 2.0**bits) / 2.0**bits, exponent)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("lora_forward", "lora", "y = x W0^T + b + s * ((x * dropout_mask) A^T) B^T", lora_forward_vectors),
    Family("lora_backward", "lora", "dx, dA, dB (and dbias when a bias is given) of sum(y * dy), y as lora_forward",
           lora_backward_vectors),
    Family("lora_merge", "lora", "W = W0 + s B A (unmerge: W0 = W - s B A), in W0's layout", lora_merge_vectors),
    Family("dora_forward", "dora", "y = x W0^T + b + (g - 1) * ((x * mask) W0^T) + (g * ((x * mask) A^T) B^T) * s, "
           "g = magnitude / ||W0 + s B A|| (row norms over the input axis)", dora_forward_vectors),
    Family("dora_backward", "dora", "dx, dA, dB, dmagnitude (and dbias) of sum(y * dy), y as dora_forward; the norm "
           "detached (PEFT) or, with gradient = exact, differentiated", dora_backward_vectors),
    Family("dora_merge", "dora", "W = diag(magnitude / ||W0 + s B A||) (W0 + s B A), in W0's layout", dora_merge_vectors),
    Family("vera_forward", "vera", "y = x W0^T + b + lambda_b * ((lambda_d * ((x * mask) vera_A^T)) vera_B^T)",
           vera_forward_vectors),
    Family("vera_backward", "vera", "dx, dlambda_d, dlambda_b (and dbias) of sum(y * dy), y as vera_forward",
           vera_backward_vectors),
    Family("vera_merge", "vera", "W = W0 + (lambda_b vera_B)(lambda_d vera_A), in W0's layout", vera_merge_vectors),
    *BF16_FAMILIES,
    *METHOD_FAMILIES,
    *BOTTLENECK_FAMILIES,
    Family("qlora_forward", "qlora", "y = bf16(bf16(x W0^T + b) + bf16(((x A^T) B^T) * s)), W0 = bf16(dequantised "
           "4-bit base), adapters float32 (bitsandbytes Linear4bit + PEFT)", qlora_vectors),
    Family("qlora_backward", "qlora", "dx (bf16), dA, dB (float32) of sum(y * dy), y as qlora_forward without bias",
           qlora_vectors),
    Family("fusion_cat", "fusion", "the `cat` combination of LoRA adapters with weights w_i: A = rows "
           "(A_i * w_i) * s_i stacked, B = columns B_i stacked (fused alpha = total rank, scaling 1)",
           fusion_cat_vectors),
    *FUSION_FAMILIES,
    Family("export_forward", "export", EXPORT_SUMMARY, export_forward_vectors, requires=("refpeft_onnx", "onnx")),
    Family("multi_adapter_bgmv", "multi_adapter", "BGMV layout (token_slots): " + MULTI_ADAPTER_SUMMARY,
           multi_adapter_vectors),
    Family("multi_adapter_sgmv", "multi_adapter", "SGMV layout (segment_starts, segment_slots): "
           + MULTI_ADAPTER_SUMMARY, multi_adapter_vectors),
    Family("moe_lora_forward", "moe_lora", MOE_FORWARD, moe_lora_vectors),
    Family("moe_lora_backward", "moe_lora", MOE_BACKWARD, moe_lora_vectors),
    Family("moe_lora_merge", "moe_lora", MOE_MERGE, moe_lora_vectors),
    Family("adapter_config", "config", ADAPTER_CONFIG_SUMMARY, adapter_config_vectors),
    Family("model_lora", "model", MODEL_LORA_SUMMARY, model_lora_vectors),
    Family("adam_step", "optim", "one torch.optim.Adam/AdamW step per parameter group (LoRA+: B at lr * ratio)",
           adam_step_vectors),
    Family("quantize_4bit", "quant", "NF4/FP4 blockwise codes of W packed two per byte (first element high "
           "nibble) and the float32 absmax per block; with double_quant the absmax as 8-bit codes, nested "
           "float32 absmax per 256 and the float32 offset", quantize_4bit_vectors),
    Family("dequantize_4bit", "quant", "W = f32(code_value[code] * absmax[block]) rounded to W's dtype, from "
           "the packed codes and the (possibly double-quantised) absmax", dequantize_4bit_vectors),
)}


def missing_requirements(case: Case) -> list[str]:
    """The modules case's family needs that are not importable here ([] when it can be generated)."""
    import importlib.util

    return [m for m in FAMILIES[case.family].requires if importlib.util.find_spec(m) is None]


def make_vectors(case: Case) -> Vectors:
    """The vectors of one case (its family's `make`)."""
    if case.family not in FAMILIES:
        raise ConfigError(f"case {case.name!r} has unknown family {case.family!r}; known: {', '.join(FAMILIES)}")
    missing = missing_requirements(case)
    if missing:
        raise ConfigError(f"case {case.name!r} needs {', '.join(missing)} (install refpeft[onnx] for exported graphs)")
    return FAMILIES[case.family].make(case)
