"""Conformance families for multi-adapter batches (refpeft.multi_adapter): BGMV and SGMV layouts.

Both families draw S adapter slots (LoRA or DoRA, each with its own rank, alpha and rsLoRA flag),
stack them zero-padded to the largest rank, and a batch of n tokens of which some use no adapter.
`multi_adapter_bgmv` gives each token's slot (`token_slots`, -1 = none); `multi_adapter_sgmv`
gives the tokens sorted into segments (`segment_starts`, `segment_slots`). The expected results
are refpeft.multi_adapter.mixed_forward on ExactArray inputs (correctly rounded reductions), the
bounds mixed_forward_bound in the case's dtype, as for every other family.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refpeft.conformance.case import Case, Vectors, draw, plain_results
from refpeft.conformance.exact import exact_array
from refpeft.methods import method_spec
from refpeft.methods.lora import lora_scaling
from refpeft.multi_adapter import SlotStack, mixed_forward, mixed_forward_bound, segment_token_slots

INDEX_DTYPE = "int32"


def _in_dtype(rng: np.random.Generator, shape: tuple[int, ...], dtype: str, scale: float = 1.0) -> np.ndarray:
    """A draw rounded once to `dtype` (bfloat16 through ml_dtypes, stored as safetensors' BF16)."""
    if dtype != "bfloat16":
        return draw(rng, shape, dtype=dtype, scale=scale)
    import ml_dtypes

    return draw(rng, shape, dtype="float32", scale=scale).astype(ml_dtypes.bfloat16)


def slot_scalings(case: Case) -> list[float]:
    """s_j = alpha_j / r_j (alpha_j / sqrt(r_j) for rsLoRA slots), float64."""
    o = case.options
    return [lora_scaling(alpha, r, rslora=rs) for alpha, r, rs in zip(o["alphas"], case.sizes["ranks"], o["rslora"])]


def _slot_inputs(case: Case, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A_stack (S, r_max, k), B_stack (S, d, r_max) zero-padded, and magnitude (S, d) when a slot is DoRA."""
    s, dtype = case.sizes, case.dtype
    k, d, ranks = s["k"], s["d"], s["ranks"]
    r_max = max(ranks)
    A = np.zeros((len(ranks), r_max, k), dtype=np.float64)
    B = np.zeros((len(ranks), d, r_max), dtype=np.float64)
    for j, r in enumerate(ranks):
        A[j, :r, :] = _in_dtype(rng, (r, k), dtype, 0.25)
        B[j, :, :r] = _in_dtype(rng, (d, r), dtype, 0.5)
    inputs = {"A_stack": _cast(A, dtype), "B_stack": _cast(B, dtype)}
    if any(method_spec(m).rescaled for m in case.options["methods"]):
        magnitude = np.zeros((len(ranks), d))
        for j, method in enumerate(case.options["methods"]):
            if method_spec(method).rescaled:
                magnitude[j] = rng.random(d) + 0.5
        inputs["magnitude"] = _cast(magnitude, dtype)
    return inputs


def _cast(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        import ml_dtypes

        return a.astype(np.float32).astype(ml_dtypes.bfloat16)
    return a.astype(dtype)


def batch_inputs(case: Case) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The case's inputs and each token's slot (BGMV's token_slots, or SGMV's segments expanded)."""
    s, o = case.sizes, case.options
    rng = np.random.default_rng(case.seed)
    S = len(s["ranks"])
    if case.family == "multi_adapter_bgmv":
        n = s["tokens"]
        # every slot and "no adapter" occur; the order is shuffled so no two slots are contiguous blocks
        slots = np.array([(i % (S + 1)) - 1 for i in range(n)], dtype=INDEX_DTYPE)[rng.permutation(n)]
        index = {"token_slots": slots}
    else:
        lengths, seg_slots = s["segment_lengths"], o["segment_slots"]
        n = sum(lengths)
        index = {"segment_starts": np.array(np.cumsum([0, *lengths]), dtype=INDEX_DTYPE),
                 "segment_slots": np.array(seg_slots, dtype=INDEX_DTYPE)}
        slots = np.asarray(segment_token_slots(index["segment_starts"], index["segment_slots"], n))
    inputs = {"x": _in_dtype(rng, (n, s["k"]), case.dtype), "W0": _in_dtype(rng, (s["d"], s["k"]), case.dtype, 0.25)}
    if o.get("bias", False):
        inputs["bias"] = _in_dtype(rng, (s["d"],), case.dtype)
    inputs.update(_slot_inputs(case, rng))
    inputs.update(index)
    return inputs, slots


def slot_stack(inputs: dict[str, Any], case_sizes: dict, options: dict, scalings: list[float]) -> SlotStack:
    """The SlotStack of a case's (possibly converted) input arrays."""
    return SlotStack(A=inputs["A_stack"], B=inputs["B_stack"], magnitude=inputs.get("magnitude"),
                     scalings=tuple(scalings), ranks=tuple(case_sizes["ranks"]), methods=tuple(options["methods"]))


def token_slots_of(family: str, inputs: dict[str, Any]) -> np.ndarray:
    """Each token's slot from a case's index inputs (BGMV's directly, SGMV's segments expanded), int64."""
    if family == "multi_adapter_bgmv":
        return np.asarray(inputs["token_slots"], dtype=np.int64)
    n = int(inputs["segment_starts"][-1])
    return np.asarray(segment_token_slots(inputs["segment_starts"], inputs["segment_slots"], n), dtype=np.int64)


def multi_adapter_vectors(case: Case) -> Vectors:
    """y, shrink, expand (and dora_scale when a slot is DoRA) of a mixed batch, exact, with bounds."""
    inputs, slots = batch_inputs(case)
    scalings = slot_scalings(case)
    e = {name: exact_array(a) for name, a in inputs.items() if name in ("x", "W0", "bias", "A_stack", "B_stack",
                                                                         "magnitude")}
    stack = slot_stack(e, case.sizes, case.options, scalings)
    token_slots = np.asarray(slots, dtype=np.int64)
    out = mixed_forward(e["x"], e["W0"], stack, token_slots, bias=e.get("bias"))
    bounds = mixed_forward_bound(e["x"], e["W0"], stack, token_slots, bias=e.get("bias"), dtype=case.dtype)
    expected = {"y": out.y, "shrink": out.shrink, "expand": out.expand}
    if any(method_spec(m).rescaled for m in case.options["methods"]):
        expected["dora_scale"] = out.dora_scale
    else:
        bounds.pop("dora_scale")
    return Vectors(inputs, plain_results(expected), plain_results(bounds), {"scalings": scalings})


SUMMARY = ("per token i with slot j = its slot (-1: no adapter): shrink_i = x_i A_j^T (zero-padded to r_max), "
           "expand_i = s_j (shrink_i B_j^T), y_i = x_i W0^T + b + expand_i (LoRA slot) or "
           "+ (g_j - 1) (x_i W0^T) + g_j expand_i (DoRA slot, g_j = dora_scale_j = m_j / ||W0 + s_j B_j A_j|| "
           "row-wise); no adapter: y_i = x_i W0^T + b, shrink_i = 0, expand_i = 0")
