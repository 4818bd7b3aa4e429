"""refpeft itself, computing in the case's dtype (float32 in float32): the oracle checked by its own bounds.

This is the first implementation every case must pass: it shows the bounds hold for a plain
NumPy implementation and gives the baseline error / bound figures the peers are compared with.
"""

from __future__ import annotations

import numpy as np

from refpeft.conformance.bf16_families import FAMILIES as BF16_FAMILIES, bf16_layer_results
from refpeft.conformance.bottleneck_families import FAMILIES as BOTTLENECK_FAMILIES, bottleneck_results
from refpeft.conformance.check import Unsupported
from refpeft.conformance.fusion_families import FUSION_FAMILIES
from refpeft.conformance.method_families import METHOD_FAMILIES, manifest_case, method_results
from refpeft_peers import Runner
from refpeft.methods.lora import lora_backward, lora_forward, lora_merge, lora_unmerge
from refpeft.optim import AdamConfig, AdamState, ParamGroup, adam_step
from refpeft.quant import NestedAbsmax, QuantState4bit, dequantize_4bit, quantize_4bit


def _lora(manifest: dict, inputs: dict) -> dict:
    family, o, p = manifest["family"], manifest["options"], manifest["parameters"]
    common = dict(scaling=p["scaling"], fan_in_fan_out=o.get("fan_in_fan_out", False))
    if family == "lora_merge":
        if o.get("unmerge", False):
            return {"W0": lora_unmerge(inputs["W"], inputs["A"], inputs["B"], **common)}
        return {"W": lora_merge(inputs["W0"], inputs["A"], inputs["B"], **common)}
    trainable = "bias" in inputs
    y, cache = lora_forward(inputs["x"], inputs["W0"], inputs["A"], inputs["B"], bias=inputs.get("bias"),
                            dropout_mask=inputs.get("dropout_mask"), bias_trainable=trainable, **common)
    if family == "lora_forward":
        return {"y": y}
    g = lora_backward(inputs["dy"], cache)
    return {"dx": g.dx, "dA": g.dA, "dB": g.dB, **({"dbias": g.dbias} if trainable else {})}


def _dora(manifest: dict, inputs: dict) -> dict:
    from refpeft.methods.dora import dora_backward, dora_forward, dora_merge, dora_unmerge

    family, o, p = manifest["family"], manifest["options"], manifest["parameters"]
    common = dict(scaling=p["scaling"], fan_in_fan_out=o.get("fan_in_fan_out", False))
    if family == "dora_merge" and o.get("unmerge", False):
        return {"W0": dora_unmerge(inputs["W"], inputs["A"], inputs["B"], inputs["magnitude"],
                                   weight_norm=inputs["weight_norm"], **common)}
    layer = (inputs["W0"], inputs["A"], inputs["B"], inputs["magnitude"])
    if family == "dora_merge":
        return {"W": dora_merge(*layer, **common)}
    trainable = "bias" in inputs
    y, cache = dora_forward(inputs["x"], *layer, bias=inputs.get("bias"), dropout_mask=inputs.get("dropout_mask"),
                            gradient=o.get("gradient", "detached"), bias_trainable=trainable, **common)
    if family == "dora_forward":
        return {"y": y}
    g = dora_backward(inputs["dy"], cache)
    return {"dx": g.dx, "dA": g.dA, "dB": g.dB, "dmagnitude": g.dmagnitude, **({"dbias": g.dbias} if trainable else {})}


def _vera(manifest: dict, inputs: dict) -> dict:
    from refpeft.methods.vera import vera_backward, vera_forward, vera_merge, vera_unmerge

    family, ffo = manifest["family"], manifest["options"].get("fan_in_fan_out", False)
    shared = (inputs["vera_A"], inputs["vera_B"], inputs["lambda_d"], inputs["lambda_b"])
    if family == "vera_merge" and manifest["options"].get("unmerge", False):
        return {"W0": vera_unmerge(inputs["W"], *shared, fan_in_fan_out=ffo)}
    if family == "vera_merge":
        return {"W": vera_merge(inputs["W0"], *shared, fan_in_fan_out=ffo)}
    trainable = "bias" in inputs
    y, cache = vera_forward(inputs["x"], inputs["W0"], *shared, bias=inputs.get("bias"),
                            dropout_mask=inputs.get("dropout_mask"), fan_in_fan_out=ffo, bias_trainable=trainable)
    if family == "vera_forward":
        return {"y": y}
    g = vera_backward(inputs["dy"], cache)
    return {"dx": g.dx, "dlambda_d": g.dlambda_d, "dlambda_b": g.dlambda_b, **({"dbias": g.dbias} if trainable else {})}


def _fusion_cat(manifest: dict, inputs: dict) -> dict:
    from refpeft.adapter import ModuleAdapter
    from refpeft.fusion import combine_modules

    o = manifest["options"]
    modules = [ModuleAdapter("lora", {"A": inputs[f"A{i}"], "B": inputs[f"B{i}"]}, alpha=alpha)
               for i, alpha in enumerate(o["alphas"], start=1)]
    fused, _ = combine_modules(modules, o["weights"], combination="cat")
    return {"A": fused.A, "B": fused.B}


def _fusion_combination(manifest: dict, inputs: dict) -> dict:
    """refpeft.fusion.combine_modules with PEFT's float32 weights; DARE draws refpeft's own masks
    (dare_generator(seed, "layer"), the ones the case gives)."""
    from refpeft.adapter import ModuleAdapter
    from refpeft.fusion import combine_modules, dare_generator

    o, s = manifest["options"], manifest["sizes"]
    ranks = s.get("ranks") or [s["r"]] * len(o["alphas"])
    modules = [ModuleAdapter("lora", {"A": inputs[f"A{i}"], "B": inputs[f"B{i}"]}, alpha=alpha)
               for i, (r, alpha) in enumerate(zip(ranks, o["alphas"]), start=1)]
    combination = manifest["family"].removeprefix("fusion_")
    fused, _ = combine_modules(modules, o["weights"], combination=combination, rank=o.get("rank"),
                               density=o.get("density"), majority_sign_method=o.get("majority_sign_method", "total"),
                               rng=dare_generator(manifest["seed"], "layer"), weight_dtype="float32")
    return {"delta": fused.B @ fused.A} if combination.endswith("svd") else {"A": fused.A, "B": fused.B}


def _qlora(manifest: dict, inputs: dict) -> dict:
    from refpeft_peers.peft_torch import quant_state
    from refpeft.methods.qlora import qlora_backward, qlora_forward

    f32 = {name: np.asarray(a, dtype=np.float32) for name, a in inputs.items() if name in ("x", "A", "B", "bias", "dy")}
    y, cache = qlora_forward(f32["x"], quant_state(manifest, inputs), f32["A"], f32["B"],
                             scaling=manifest["parameters"]["scaling"], bias=f32.get("bias"), precision="bfloat16")
    if manifest["family"] == "qlora_forward":
        return {"y": y}
    g = qlora_backward(f32["dy"], cache)
    return {"dx": g.dx, "dA": g.dA, "dB": g.dB}


def _multi_adapter(manifest: dict, inputs: dict) -> dict:
    """refpeft.multi_adapter.mixed_forward in the case's dtype (bfloat16 cases in float32)."""
    from refpeft.conformance.batch_families import slot_stack, token_slots_of
    from refpeft.multi_adapter import mixed_forward

    dtype = np.float32 if manifest["dtype"] == "bfloat16" else manifest["dtype"]
    f = {name: np.asarray(a, dtype=dtype) for name, a in inputs.items() if name not in INDEX_INPUTS}
    stack = slot_stack(f, manifest["sizes"], manifest["options"], manifest["parameters"]["scalings"])
    out = mixed_forward(f["x"], f["W0"], stack, token_slots_of(manifest["family"], inputs), bias=f.get("bias"))
    return {name: getattr(out, name) for name in manifest["results"]}


INDEX_INPUTS = ("token_slots", "segment_starts", "segment_slots")


def _moe_lora(manifest: dict, inputs: dict) -> dict:
    """refpeft.methods.moe_lora in the case's dtype (bfloat16 cases in float32)."""
    from refpeft.methods.moe_lora import moe_lora_backward, moe_lora_forward, moe_lora_merge

    dtype = np.float32 if manifest["dtype"] == "bfloat16" else manifest["dtype"]
    f = {name: np.asarray(a, dtype=dtype) for name, a in inputs.items() if name != "top_k_index"}
    s, layout = manifest["parameters"]["scaling"], manifest["options"]["layout"]
    if manifest["family"] == "moe_lora_merge":
        return {"W_merged": moe_lora_merge(f["W"], f["A"], f["B"], scaling=s, layout=layout)}
    y, cache = moe_lora_forward(f["x"], f["W"], f["A"], f["B"], top_k_index=inputs["top_k_index"],
                                top_k_weights=f["top_k_weights"], scaling=s, layout=layout)
    if manifest["family"] == "moe_lora_forward":
        return {"y": y}
    g = moe_lora_backward(f["dy"], cache)
    return {"dx": g.dx, "dA": g.dA, "dB": g.dB, "dtop_k_weights": g.dtop_k_weights}


def _adapter_config(manifest: dict, inputs: dict) -> dict:
    """refpeft.peft_resolve.resolve_modules; a ConfigError is the result `refused`."""
    import json

    from refpeft.errors import ConfigError
    from refpeft.peft_resolve import resolve_modules

    try:
        return {"modules": resolve_modules(json.loads(inputs["adapter_config"]), inputs["modules"])}
    except ConfigError:
        return {"refused": True}


def _adam(manifest: dict, inputs: dict) -> dict:
    o, p = manifest["options"], manifest["parameters"]
    t = p["step"]
    base = AdamConfig(lr=o["lr"], betas=tuple(o.get("betas", (0.9, 0.999))), eps=o.get("eps", 1e-8),
                      decoupled_weight_decay=o.get("adamw", False))
    groups = [ParamGroup(tuple(g["names"]), AdamConfig(**{**vars(base), "lr": g["lr"], "weight_decay": g["weight_decay"]}))
              for g in p["groups"]]
    names = [n for g in groups for n in g.names]
    state = AdamState() if t == 1 else AdamState(step={n: t - 1 for n in names},
                                                 exp_avg={n: inputs[f"exp_avg.{n}"] for n in names},
                                                 exp_avg_sq={n: inputs[f"exp_avg_sq.{n}"] for n in names})
    params, new = adam_step({n: inputs[n] for n in names}, {n: inputs[f"grad.{n}"] for n in names}, state, groups)
    out = dict(params)
    out.update({f"exp_avg.{n}": new.exp_avg[n] for n in names})
    out.update({f"exp_avg_sq.{n}": new.exp_avg_sq[n] for n in names})
    return out


def _quantize(manifest: dict, inputs: dict) -> dict:
    o = manifest["options"]
    state = quantize_4bit(inputs["W"], quant_type=o["quant_type"], blocksize=o["blocksize"],
                          double_quant=o.get("double_quant", False), rounding=o["rounding"])
    if state.nested:
        return {"packed": state.packed, "absmax.codes": state.absmax.codes, "absmax.nested": state.absmax.nested_absmax,
                "absmax.offset": np.asarray([state.absmax.offset], dtype=np.float32)}
    return {"packed": state.packed, "absmax": state.absmax}


def _dequantize(manifest: dict, inputs: dict) -> dict:
    o = manifest["options"]
    absmax = (NestedAbsmax(codes=inputs["absmax.codes"], nested_absmax=inputs["absmax.nested"],
                           offset=float(inputs["absmax.offset"][0])) if o.get("double_quant", False) else inputs["absmax"])
    state = QuantState4bit(packed=inputs["packed"], absmax=absmax, shape=tuple(manifest["sizes"]["shape"]),
                           dtype=manifest["dtype"], blocksize=o["blocksize"], quant_type=o["quant_type"])
    return {"W": dequantize_4bit(state)}


def _model_lora(manifest: dict, inputs: dict) -> dict:
    """refpeft.model's decoder in float64 (BLAS reductions, not the generator's correctly rounded ones)."""
    from refpeft.conformance.model_families import case_options, run_case

    return run_case(inputs, **case_options(manifest["options"]))


HANDLERS = {
    "lora_forward": _lora, "lora_backward": _lora, "lora_merge": _lora,
    "dora_forward": _dora, "dora_backward": _dora, "dora_merge": _dora,
    "vera_forward": _vera, "vera_backward": _vera, "vera_merge": _vera,
    "qlora_forward": _qlora, "qlora_backward": _qlora,
    "quantize_4bit": _quantize, "dequantize_4bit": _dequantize,
    "fusion_cat": _fusion_cat, "adam_step": _adam,
    "multi_adapter_bgmv": _multi_adapter, "multi_adapter_sgmv": _multi_adapter,
    "adapter_config": _adapter_config,
    "moe_lora_forward": _moe_lora, "moe_lora_backward": _moe_lora, "moe_lora_merge": _moe_lora,
    "model_lora": _model_lora,
    **{family.name: bf16_layer_results for family in BF16_FAMILIES},
    **{family.name: lambda manifest, inputs: method_results(manifest_case(manifest), inputs)
       for family in METHOD_FAMILIES},
    **{family.name: lambda manifest, inputs: bottleneck_results(manifest_case(manifest), inputs)
       for family in BOTTLENECK_FAMILIES},
    **{family.name: _fusion_combination for family in FUSION_FAMILIES},
}


def run(manifest: dict, inputs: dict[str, np.ndarray]) -> dict:
    handler = HANDLERS.get(manifest["family"])
    if handler is None:
        raise Unsupported(f"no refpeft runner for family {manifest['family']!r}")
    return handler(manifest, inputs)


def implementations() -> list[Runner]:
    return [Runner("refpeft-numpy", run)]
