"""Conformance families for MoE expert LoRA (refpeft.methods.moe_lora): PEFT's target_parameters on 3-D experts.

A case is one expert parameter of E experts with LoRA in PEFT's storage (A (r*E, in) expert-major,
B (out, r*E) expert-minor), n tokens each routed to K experts (`top_k_index` int32, `top_k_weights`
in the case's dtype; one expert gets no token). Option `layout`: "out_in" (W (E, out, in),
Qwen3-MoE's down_proj) or "in_out" (W (E, in, out), is_transposed experts such as GPT-OSS).
`moe_lora_forward` gives y, `moe_lora_backward` dx, dA, dB, dtop_k_weights of sum(y * dy),
`moe_lora_merge` the merged W. Expected results are refpeft's functions on ExactArray inputs, the
bounds the module's `*_bound` in the case's dtype, as for every other family.
"""

from __future__ import annotations

import numpy as np

from refpeft.conformance.batch_families import INDEX_DTYPE, _in_dtype
from refpeft.conformance.case import Case, Vectors, exact_inputs, plain_results
from refpeft.methods.lora import lora_scaling
from refpeft.methods.moe_lora import moe_lora_backward, moe_lora_backward_bound, moe_lora_forward, \
    moe_lora_forward_bound, moe_lora_merge, moe_lora_merge_bound


def moe_routing(tokens: int, top_k: int, experts: int, rng: np.random.Generator) -> np.ndarray:
    """Each token's K distinct experts among 0..E-2 (expert E-1 is never chosen), int32."""
    return np.array([rng.permutation(experts - 1)[:top_k] for _ in range(tokens)], dtype=INDEX_DTYPE)


def moe_inputs(case: Case) -> dict[str, np.ndarray]:
    """x, W, A, B, top_k_index, top_k_weights (and dy for backward) of a case."""
    s, dtype = case.sizes, case.dtype
    rng = np.random.default_rng(case.seed)
    E, n, K, r, inn, out = s["experts"], s["tokens"], s["top_k"], s["r"], s["in"], s["out"]
    shape = (E, out, inn) if case.options["layout"] == "out_in" else (E, inn, out)
    inputs = {"x": _in_dtype(rng, (n, inn), dtype), "W": _in_dtype(rng, shape, dtype, 0.25),
              "A": _in_dtype(rng, (r * E, inn), dtype, 0.25), "B": _in_dtype(rng, (out, r * E), dtype, 0.5),
              "top_k_index": moe_routing(n, K, E, rng), "top_k_weights": _in_dtype(rng, (n, K), dtype, 0.5)}
    if case.family == "moe_lora_backward":
        inputs["dy"] = _in_dtype(rng, (n, out), dtype)
    return inputs


def moe_scaling(case: Case) -> float:
    return lora_scaling(case.options["alpha"], case.sizes["r"], rslora=case.options.get("rslora", False))


def moe_lora_vectors(case: Case) -> Vectors:
    inputs = moe_inputs(case)
    e = exact_inputs({k: v for k, v in inputs.items() if k != "top_k_index"})
    s, layout = moe_scaling(case), case.options["layout"]
    route = dict(top_k_index=inputs["top_k_index"], top_k_weights=e["top_k_weights"], scaling=s, layout=layout)
    if case.family == "moe_lora_merge":
        expected = {"W_merged": moe_lora_merge(e["W"], e["A"], e["B"], scaling=s, layout=layout)}
        bounds = {"W_merged": moe_lora_merge_bound(e["W"], e["A"], e["B"], scaling=s, layout=layout, dtype=case.dtype)}
    elif case.family == "moe_lora_forward":
        expected = {"y": moe_lora_forward(e["x"], e["W"], e["A"], e["B"], **route)[0]}
        bounds = {"y": moe_lora_forward_bound(e["x"], e["W"], e["A"], e["B"], dtype=case.dtype, **route)}
    else:
        _, cache = moe_lora_forward(e["x"], e["W"], e["A"], e["B"], **route)
        g = moe_lora_backward(e["dy"], cache)
        expected = {"dx": g.dx, "dA": g.dA, "dB": g.dB, "dtop_k_weights": g.dtop_k_weights}
        bounds = moe_lora_backward_bound(e["dy"], e["x"], e["W"], e["A"], e["B"], dtype=case.dtype, **route)
    return Vectors(inputs, plain_results(expected), plain_results(bounds), {"scaling": s})


def moe_lora_cases() -> list[Case]:
    """4 experts (one unused), 6 tokens routed to 2 each, r = 4; both layouts, float32/float16/bfloat16."""
    sizes = {"experts": 4, "tokens": 6, "top_k": 2, "r": 4, "in": 16, "out": 12}
    cases = []
    for seed, (family, verb) in enumerate((("moe_lora_forward", "forward"), ("moe_lora_backward", "backward"),
                                           ("moe_lora_merge", "merge")), start=1100):
        for layout, dtypes in (("out_in", ("float32", "float16", "bfloat16")), ("in_out", ("float32",))):
            cases += [Case(f"moe-{verb}-{layout.replace('_', '-')}-{dtype}", family, dtype, seed, sizes,
                           {"layout": layout, "alpha": 8.0}) for dtype in dtypes]
    return cases


LAYOUT = ("A (r*E, in): A_e = rows e*r..e*r+r-1; B (out, r*E): B_e = columns e, e+E, ..; s = alpha/r; "
          "W_e (out, in) = W[e] (layout out_in) or W[e]^T (in_out)")
FORWARD = "y_t = sum_k g_tk (x_t W_e^T + s (x_t A_e^T) B_e^T), e = top_k_index[t, k], g = top_k_weights; " + LAYOUT
BACKWARD = "dx, dA, dB (PEFT's storage), dtop_k_weights of sum(y * dy), y as moe_lora_forward; " + LAYOUT
MERGE = "W_merged[e] = W[e] + s B_e A_e (out_in) or W[e] + (s B_e A_e)^T (in_out); " + LAYOUT
