"""Case families of the optimiser (one Adam/AdamW/LoRA+ step) and of 4-bit quantisation (bit-exact codes).

Inputs, expected results and bounds are made as refpeft.conformance.families describes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refpeft.conformance.case import Case, Vectors, draw, exact_inputs, plain_results
from refpeft.optim import AdamConfig, AdamState, adam_step, adam_update_bound, bias_corrections, loraplus_groups, \
    single_group


# ---------------------------------------------------------------- Adam, AdamW, LoRA+

def _adam_config(o: dict[str, Any]) -> AdamConfig:
    return AdamConfig(lr=o["lr"], betas=tuple(o.get("betas", (0.9, 0.999))), eps=o.get("eps", 1e-8),
                      weight_decay=o.get("weight_decay", 0.0), decoupled_weight_decay=o.get("adamw", False))


def adam_step_vectors(case: Case) -> Vectors:
    """One step of Adam/AdamW from a given state: parameters A (r, k) and B (d, r), step t.

    Inputs: each parameter, its gradient `grad.NAME`, moments `exp_avg.NAME` and `exp_avg_sq.NAME`
    (the state after t - 1 steps; zeros when t = 1). Results: the updated parameter and moments.
    With option loraplus_ratio, the groups are PEFT's LoRA+ groups (B at lr * ratio).
    Parameters carry step t's bias corrections c1 = 1 - beta1^t and sqrt(c2) = sqrt(1 - beta2^t) as
    float64 numbers (refpeft.optim.bias_corrections: beta^t correctly rounded without libm's pow), so
    a kernel uses them as given and its platform's pow never enters the expected values.
    """
    s, o = case.sizes, case.options
    rng = np.random.default_rng(case.seed)
    t = o.get("step", 1)
    shapes = {"lora_A": (s["r"], s["k"]), "lora_B": (s["d"], s["r"])}
    inputs: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        inputs[name] = draw(rng, shape, dtype=case.dtype, scale=0.5)
        inputs[f"grad.{name}"] = draw(rng, shape, dtype=case.dtype, scale=2.0**-4)
        first = t == 1
        inputs[f"exp_avg.{name}"] = np.zeros(shape, case.dtype) if first else draw(rng, shape, dtype=case.dtype, scale=2.0**-5)
        inputs[f"exp_avg_sq.{name}"] = (np.zeros(shape, case.dtype) if first
                                        else np.abs(draw(rng, shape, dtype=case.dtype, scale=2.0**-10)))
    e = exact_inputs(inputs)
    config = _adam_config(o)
    params = {name: e[name] for name in shapes}
    groups = (loraplus_groups(params, config, lr_ratio=o["loraplus_ratio"],
                              loraplus_weight_decay=o.get("weight_decay", 0.0))
              if "loraplus_ratio" in o else single_group(params, config))
    state = AdamState(step={n: t - 1 for n in shapes} if t > 1 else {},
                      exp_avg={n: e[f"exp_avg.{n}"] for n in shapes} if t > 1 else {},
                      exp_avg_sq={n: e[f"exp_avg_sq.{n}"] for n in shapes} if t > 1 else {})
    new_params, new_state = adam_step(params, {n: e[f"grad.{n}"] for n in shapes}, state, groups)
    expected, bounds = {}, {}
    for group in groups:
        c = group.config
        for name in group.names:
            expected[name] = new_params[name]
            expected[f"exp_avg.{name}"] = new_state.exp_avg[name]
            expected[f"exp_avg_sq.{name}"] = new_state.exp_avg_sq[name]
            b = adam_update_bound(e[name], e[f"grad.{name}"], e[f"exp_avg.{name}"], e[f"exp_avg_sq.{name}"],
                                  t=t, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay,
                                  decoupled_weight_decay=c.decoupled_weight_decay, dtype=case.dtype)
            bounds.update({name: b["p"], f"exp_avg.{name}": b["m"], f"exp_avg_sq.{name}": b["v"]})
    groups_json = [{"names": list(g.names), "lr": g.config.lr, "weight_decay": g.config.weight_decay} for g in groups]
    c1, c2_sqrt = bias_corrections(config.betas, t)
    parameters = {"step": t, "groups": groups_json, "bias_correction1": c1, "bias_correction2_sqrt": c2_sqrt}
    return Vectors(inputs, plain_results(expected), plain_results(bounds), parameters)


# ---------------------------------------------------------------- 4-bit quantisation (bit-exact)

def quant_weight(case: Case) -> np.ndarray:
    """A weight that reaches the quantiser's branches, with an order-independent absmax mean.

    Each block's absmax is a multiple of 2^-6 in [1/4, 2) (the largest |value| of the block is set
    to it), so with a power-of-two block count the float32 mean of the absmaxes is exact in any
    summation order and every implementation's double-quantisation offset is the same number.
    Blocks whose absmax is a power of two carry values exactly on each decision threshold of both
    semantics and one float32 step either side of them; with option zero_block, block 1 is all zeros.
    """
    from refpeft.quant.codebooks import thresholds

    s, o = case.sizes, case.options
    rng = np.random.default_rng(case.seed)
    shape, bs = tuple(s["shape"]), o["blocksize"]
    flat = (rng.random(int(np.prod(shape))) * 2.0 - 1.0).astype(np.float32)
    n_blocks = -(-flat.size // bs)
    grid = (rng.integers(16, 128, size=n_blocks) / 64.0).astype(np.float32)
    special = [t for rounding in ("bnb-cuda", "bnb-cpu") for t in thresholds(o["quant_type"], rounding)]
    special = np.array(special, dtype=np.float32)
    special = np.concatenate([special, np.nextafter(special, np.float32(2)), np.nextafter(special, np.float32(-2))])
    for b in range(n_blocks):
        block = flat[b * bs:(b + 1) * bs]
        if b % 3 == 0:
            grid[b] = np.float32(2.0) ** -int(rng.integers(0, 3))   # a power of two: thresholds land exactly
            take = min(block.size - 1, special.size)
            block[1:1 + take] = rng.permutation(special)[:take] * grid[b]
        block *= grid[b] / np.max(np.abs(block))
        block[int(np.argmax(np.abs(block)))] = grid[b] * np.sign(block[int(np.argmax(np.abs(block)))])
    if o.get("zero_block", False) and n_blocks > 1:
        flat[bs:2 * bs] = 0.0
    return flat.reshape(shape).astype(case.dtype)


def _quant_state(case: Case, W: np.ndarray):
    from refpeft.quant.state import quantize_4bit

    o = case.options
    return quantize_4bit(W, quant_type=o["quant_type"], blocksize=o["blocksize"], double_quant=o.get("double_quant", False),
                         rounding=o["rounding"])


def absmax_tensors(state) -> dict[str, np.ndarray]:
    """A state's absmax as the vectors store it: plain float32, or the double-quantised codes, nested absmax and offset."""
    if state.nested:
        return {"absmax.codes": np.asarray(state.absmax.codes), "absmax.nested": np.asarray(state.absmax.nested_absmax),
                "absmax.offset": np.asarray([state.absmax.offset], dtype=np.float32)}
    return {"absmax": np.asarray(state.absmax)}


def quantize_4bit_vectors(case: Case) -> Vectors:
    """Blockwise NF4/FP4 of W (bitsandbytes' flat row-major blocks): packed bytes and absmax, bit for bit."""
    W = quant_weight(case)
    state = _quant_state(case, W)
    expected = {"packed": np.asarray(state.packed), **absmax_tensors(state)}
    return Vectors({"W": W}, expected, {}, {"numel": int(W.size)})


def dequantize_4bit_vectors(case: Case) -> Vectors:
    """The weight rebuilt from packed codes and absmax: f32(code_value * absmax) in W's dtype, bit for bit."""
    from refpeft.quant.state import dequantize_4bit

    W = quant_weight(case)
    state = _quant_state(case, W)
    inputs = {"packed": np.asarray(state.packed), **absmax_tensors(state)}
    return Vectors(inputs, {"W": np.asarray(dequantize_4bit(state))}, {}, {"numel": int(W.size)})
