"""Conformance families `{lora,dora,vera}_bf16_{forward,backward}`: a bfloat16 layer in HF PEFT's rounding order.

What a bfloat16 model with a PEFT adapter computes on torch (PEFT 0.21, `autocast_adapter_dtype=True`,
the default): the base layer and x, dy stay bfloat16, the adapter weights are upcast to float32
(`cast_adapter_dtype`), x is cast to float32 before the adapter branch (`_cast_input_dtype`), the
branch runs in float32, `result + branch` promotes to float32 and `.to(bf16)` rounds once at the
end. The base `F.linear` in bfloat16 sums in float32 with the bias inside and rounds once (measured
on torch 2.13 CPU: identical to bf16(exact x W0^T + b) on every element of a 64 x 96 x 128 case).
Letters as in refpeft.methods.lora, n rows after flattening the batch, bf(.) = round to bfloat16,
f(.) = round to float32:

    base = bf(x W0^T + b)                                               (n, d)
    LoRA  xa = f(x A^T);  t = f(xa B^T);  y = bf(f(base + f(t * s)))
    DoRA  lw = f(B A);  nu = f(||f(W0 + f(s lw))||) per row;  g = f(m / nu)   (float32, detached)
          lr = f(f(x A^T) B^T);  bo = base, or bf(base - b) with a bias
          y  = bf(f(base + f(f(f(g - 1) * bo) + f(f(g * lr) * s))))
    VeRA  u = f(x A^T);  v = f(ld * u);  w = f(v B^T);  y = bf(f(base + f(lb * w)))

Backward is torch autograd of the same graph, for dy (bfloat16 values):

    LoRA  dt = f(dy s);  dB = f(dt^T xa);  dxa = f(dt B);  dA = f(dxa^T x);  da = f(dxa A);  dbase = dy
    DoRA  dq = f(dy s);  dlr = f(dq * g);  dB = f(dlr^T xa);  dxa = f(dlr B);  dA = f(dxa^T x);  da = f(dxa A)
          dbase = bf(dy + bf(f(dy * f(g - 1))));  dmagnitude = f(f(sum_n f(dy * bo) + sum_n f(dq * lr)) / nu)
    VeRA  dw = f(dy * lb);  dlambda_b = f(sum_n f(dy * w));  dv = f(dw B);  dlambda_d = f(sum_n f(dv * u))
          da = f(f(dv * ld) A)
    all   dx = bf(bf(dbase W0) + bf(da))

Expected results are this order with every reduction (matmul, sum, norm) computed exactly and
rounded once to the format named (refpeft.conformance.exact gives it correctly rounded in float64;
the value is then rounded to float32, and for bf(.) on to bfloat16, as a float32-accumulating
kernel rounds), so a kernel in PEFT's order matches them to the last bit or nearly.

Bounds, for kernels that round differently: |actual - golden| <= |actual - exact| + |golden - exact|.
The first term is the method's own bound in bfloat16 (`lora_forward_bound(dtype="bfloat16")` and so
on: float32 accumulation with *every* intermediate rounded to bfloat16, which also covers PEFT's
keeping the branch in float32), times (1 + 2^-15) because a value rounded to float32 and then to
bfloat16 may be off by u_bf16 (1 + 2^-16 + u_f32) rather than u_bf16; the second is known exactly
(exact = refpeft's float64 result, as the float `lora_forward`, `dora_forward`... cases expect it). Inputs are
all bfloat16 (the adapter's values upcast to float32 exactly). No dropout, frozen bias (PEFT's
`bias="none"`): the cases are eval-mode layers and their adapter gradients.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refpeft.conformance.case import Case, Family, Vectors, draw, exact_inputs, plain_results
from refpeft.conformance.exact import ExactArray, exact_array
from refpeft.methods import method_spec
from refpeft.methods.lora import lora_backward, lora_backward_bound, lora_forward, lora_forward_bound, lora_scaling

DOUBLE_ROUNDING = 1.0 + 2.0**-15     # f32 then bf16 rounding versus one bf16 rounding (module docstring)


def bfloat16_values(a: np.ndarray) -> np.ndarray:
    """Round float values to bfloat16 through float32 (ml_dtypes, nearest even), stored as bfloat16."""
    import ml_dtypes

    return np.asarray(a, dtype=np.float32).astype(ml_dtypes.bfloat16)


def _rounded(a: Any, *, bf16: bool) -> Any:
    """a's float64 values rounded to float32 (and on to bfloat16), float64 again, ExactArray kept."""
    out = np.asarray(a).view(np.ndarray).astype(np.float32)
    out = (bfloat16_values(out) if bf16 else out).astype(np.float64)
    return exact_array(out) if isinstance(a, ExactArray) else out


def f(a: Any) -> Any:
    """f(.) of the module docstring: rounded to float32."""
    return _rounded(a, bf16=False)


def bf(a: Any) -> Any:
    """bf(.) of the module docstring: rounded to float32, then to bfloat16."""
    return _rounded(a, bf16=True)


def _rows(a: Any) -> Any:
    return np.reshape(a, (-1, a.shape[-1]))


def _linear(x: Any, W: Any, bias: Any) -> Any:
    """x W^T + b as one reduction (the bias a last term of each sum: one rounding, as torch's addmm)."""
    if bias is None:
        return x @ W.T
    ones = np.ones_like(x[:, :1])
    return np.concatenate([x, ones], axis=1) @ np.concatenate([W, bias[:, None]], axis=1).T


def peft_bf16_layer(method: str, v: dict[str, Any], *, scaling: float = 1.0, backward: bool) -> dict[str, Any]:
    """The module docstring's forward (y) or backward (dx and the adapter's gradients) of one layer.

    `v` holds float64 arrays (ExactArray for the golden values) with bfloat16 values: x, W0, [bias],
    the method's tensors (A, B, [magnitude] or vera_A, vera_B, lambda_d, lambda_b), [dy].
    """
    spec = method_spec(method)                     # LoRA; DoRA rescales its rows; VeRA's projections are shared
    x, W0, bias = _rows(v["x"]), v["W0"], v.get("bias")
    base = bf(_linear(x, W0, bias))                                                 # (n, d)
    if spec.shared:
        u = f(x @ v["vera_A"].T)                                                    # (n, r)
        w = f(f(v["lambda_d"] * u) @ v["vera_B"].T)                                 # (n, d)
        branch = f(v["lambda_b"] * w)
    elif not spec.rescaled:
        xa = f(x @ v["A"].T)                                                        # (n, r)
        t = f(xa @ v["B"].T)                                                        # (n, d)
        branch = f(t * scaling)
    else:
        A, B, m = v["A"], v["B"], v["magnitude"]
        nu = f(np.linalg.vector_norm(f(W0 + f(scaling * f(B @ A))), axis=1))       # (d,)
        g = f(m / nu)
        xa = f(x @ A.T)
        lr = f(xa @ B.T)
        bo = base if bias is None else bf(base - bias)
        branch = f(f(f(g - 1.0) * bo) + f(f(g * lr) * scaling))
    if not backward:
        y = bf(f(base + branch))
        return {"y": np.reshape(y, (*v["x"].shape[:-1], y.shape[-1]))}
    dy = _rows(v["dy"])
    if spec.shared:
        dw = f(dy * v["lambda_b"])
        dv = f(dw @ v["vera_B"])                                                    # (n, r)
        grads = {"dlambda_d": f(np.sum(f(dv * u), axis=0)), "dlambda_b": f(np.sum(f(dy * w), axis=0))}
        da, dbase = f(f(dv * v["lambda_d"]) @ v["vera_A"]), dy
    elif not spec.rescaled:
        dt = f(dy * scaling)
        grads = {"dB": f(dt.T @ xa), "dA": None}
        dxa, dbase = f(dt @ v["B"]), dy
    else:
        dq = f(dy * scaling)
        dlr = f(dq * g)
        dxa = f(dlr @ B)
        grads = {"dB": f(dlr.T @ xa), "dA": None,
                 "dmagnitude": f(f(f(np.sum(f(dy * bo), axis=0)) + f(np.sum(f(dq * lr), axis=0))) / nu)}
        dbase = bf(dy + bf(f(dy * f(g - 1.0))))
    if not spec.shared:
        grads["dA"] = f(dxa.T @ x)
        da = f(dxa @ v["A"])
    dx = bf(bf(dbase @ W0) + bf(da))
    return {"dx": np.reshape(dx, v["x"].shape), **grads}


# ---------------------------------------------------------------- cases

def _inputs(case: Case, *, backward: bool) -> dict[str, np.ndarray]:
    """x, W0, [bias], the method's tensors, [dy]: every one drawn in float32 and rounded to bfloat16."""
    s, o, spec = case.sizes, case.options, method_spec(case.family.split("_")[0])
    rng = np.random.default_rng(case.seed)
    batch, k, d, r = tuple(s["batch"]), s["k"], s["d"], s["r"]
    drawn = {"x": ((*batch, k), 1.0), "W0": ((d, k), 0.25)}
    if o.get("bias", False):
        drawn["bias"] = ((d,), 1.0)
    if spec.shared:
        drawn.update(vera_A=((r, k), 0.25), vera_B=((d, r), 0.5), lambda_d=((r,), 1.0), lambda_b=((d,), 1.0))
    else:
        drawn.update(A=((r, k), 0.25), B=((d, r), 0.5))
    if backward:
        drawn["dy"] = ((*batch, d), 1.0)
    inputs = {name: bfloat16_values(draw(rng, shape, dtype="float32", scale=scale))
              for name, (shape, scale) in drawn.items()}
    if spec.rescaled:                                   # magnitudes in [1/2, 3/2), as the float DoRA cases
        inputs["magnitude"] = bfloat16_values(rng.random(d) + 0.5)
    return inputs


def _scaling(case: Case) -> float:
    return lora_scaling(case.options["alpha"], case.sizes["r"], rslora=case.options.get("rslora", False))


def _exact_and_bounds(method: str, e: dict[str, Any], *, scaling: float, backward: bool) -> tuple[dict, dict]:
    """refpeft's float64 result of the layer and its bfloat16 bound (the method's *_bound functions)."""
    spec = method_spec(method)
    x, W0, bias, dy = e["x"], e["W0"], e.get("bias"), e.get("dy")
    if not (spec.shared or spec.rescaled):
        y, cache = lora_forward(x, W0, e["A"], e["B"], scaling=scaling, bias=bias)
        if not backward:
            return {"y": y}, {"y": lora_forward_bound(x, W0, e["A"], e["B"], scaling=scaling, bias=bias,
                                                      dtype="bfloat16")}
        g = lora_backward(dy, cache)
        return ({"dx": g.dx, "dA": g.dA, "dB": g.dB},
                lora_backward_bound(dy, x, W0, e["A"], e["B"], scaling=scaling, dtype="bfloat16"))
    if spec.rescaled:
        from refpeft.methods.dora import dora_backward, dora_backward_bound, dora_forward, dora_forward_bound

        layer = (x, W0, e["A"], e["B"], e["magnitude"])
        y, cache = dora_forward(*layer, scaling=scaling, bias=bias)
        if not backward:
            return {"y": y}, {"y": dora_forward_bound(*layer, scaling=scaling, bias=bias, dtype="bfloat16")}
        g = dora_backward(dy, cache)
        return ({"dx": g.dx, "dA": g.dA, "dB": g.dB, "dmagnitude": g.dmagnitude},
                dora_backward_bound(dy, *layer, scaling=scaling, bias=bias, dtype="bfloat16"))
    from refpeft.methods.vera import vera_backward, vera_backward_bound, vera_forward, vera_forward_bound

    shared = (e["vera_A"], e["vera_B"], e["lambda_d"], e["lambda_b"])
    y, cache = vera_forward(x, W0, *shared, bias=bias)
    if not backward:
        return {"y": y}, {"y": vera_forward_bound(x, W0, *shared, bias=bias, dtype="bfloat16")}
    g = vera_backward(dy, cache)
    return ({"dx": g.dx, "dlambda_d": g.dlambda_d, "dlambda_b": g.dlambda_b},
            vera_backward_bound(dy, x, W0, *shared, dtype="bfloat16"))


def bf16_layer_vectors(case: Case) -> Vectors:
    """Golden values in PEFT's bfloat16 order and the bound DOUBLE_ROUNDING * bf16 bound + |golden - exact|."""
    method, backward = case.family.split("_")[0], case.family.endswith("_backward")
    inputs = _inputs(case, backward=backward)
    e = exact_inputs(inputs)
    scaling = _scaling(case) if method_spec(method).scaled else 1.0
    golden = plain_results(peft_bf16_layer(method, e, scaling=scaling, backward=backward))
    exact, model = _exact_and_bounds(method, e, scaling=scaling, backward=backward)
    exact, model = plain_results(exact), plain_results(model)
    bounds = {n: DOUBLE_ROUNDING * model[n] + np.abs(golden[n] - exact[n]) for n in golden}
    return Vectors(inputs, golden, bounds, {"scaling": scaling} if method_spec(method).scaled else {})


def bf16_layer_results(manifest: dict, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """An implementation of these families on plain float64 NumPy (BLAS sums, then PEFT's roundings)."""
    method, backward = manifest["family"].split("_")[0], manifest["family"].endswith("_backward")
    v = {name: np.asarray(a, dtype=np.float64) for name, a in inputs.items()}
    return peft_bf16_layer(method, v, scaling=manifest["parameters"].get("scaling", 1.0), backward=backward)


SUMMARY = {
    "forward": "y of a bfloat16 layer with a {method} adapter in HF PEFT's order: base bf16 (float32 sums, one "
               "rounding), adapter weights and branch in float32, y = bf16(f32(base + branch)) (see README)",
    "backward": "dx (bf16) and the adapter's gradients (float32) of sum(y * dy), y as {method}_bf16_forward, "
                "in torch autograd's order on PEFT's bfloat16 layer (see README)",
}

FAMILIES = [Family(f"{method}_bf16_{direction}", method, SUMMARY[direction].format(method=method),
                   bf16_layer_vectors) for method in ("lora", "dora", "vera") for direction in ("forward", "backward")]


def bf16_layer_cases() -> list[Case]:
    """LoRA (plain; bias + rsLoRA; wide), DoRA (plain; bias), VeRA (plain; bias), each forward and backward."""
    small = {"batch": [2, 3], "k": 32, "d": 24, "r": 4}
    square = {**small, "d": 32}      # DoRA: a norm over the wrong axis has the right shape and fails by value
    variants = [("lora", "basic", small, {"alpha": 8.0}),
                ("lora", "bias-rslora", small, {"alpha": 8.0, "rslora": True, "bias": True}),
                ("lora", "wide", {"batch": [16], "k": 128, "d": 96, "r": 16}, {"alpha": 32.0, "bias": True}),
                ("dora", "basic", square, {"alpha": 8.0}),
                ("dora", "bias", square, {"alpha": 16.0, "bias": True}),
                ("vera", "basic", {**small, "r": 8}, {}),
                ("vera", "bias", {**small, "r": 8}, {"bias": True})]
    return [Case(f"{method}-bf16-{direction}-{label}-bfloat16", f"{method}_bf16_{direction}", "bfloat16", seed,
                 sizes, options)
            for seed, (method, label, sizes, options) in enumerate(variants, start=1300)
            for direction in ("forward", "backward")]
