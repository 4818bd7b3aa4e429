"""Conformance families `bottleneck_forward`, `bottleneck_backward`: one bottleneck adapter block in a decoder layer.

The block is refpeft.methods.bottleneck's `block_forward` / `block_backward` (AdapterHub's
`adapters` library: `BottleneckLayer.forward(o, r, None)`, the adapter placed after a sub-block
with output o and residual-stream input r):

    u = o + r (Pfeiffer: parameters.original_ln_before true)   or   u = o (Houlsby: false)
    z = u W_down^T + b_down                                      # (..., m)
    y = u + s (f(z) W_up^T + b_up)                               # (..., H)
    e = y (Pfeiffer)   or   e = y + r (Houlsby)

with f = parameters.non_linearity (relu, swish) and s = parameters.scaling. Inputs o, r (..., H),
W_down (m, H), b_down (m,), W_up (H, m), b_up (H,), and for backward dy (..., H); results e as "y",
or the gradients of sum(e * dy): do, dr (..., H), dW_down, db_down, dW_up, db_up (the tensors'
shapes). Options: architecture (the library's "double_seq_bn" = Houlsby, "seq_bn" = Pfeiffer),
non_linearity, scaling; sizes: batch, hidden H, bottleneck m (reduction factor H / m).

Expected results: refpeft on ExactArray inputs (correctly rounded matmuls and sums; exp and tanh as
NumPy computes them in float64). Bounds: `block_forward_bound` / `block_backward_bound` (rigorous;
exp and tanh within 4 u of the true value, refpeft.methods.bottleneck says why). relu cases keep
every pre-activation z farther from 0 than its own bound (`preactivation_bound`), so no
implementation within the bounds can land on the other side of the kink; the generator refuses a
draw that does not.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refpeft.conformance.case import Case, Family, Vectors, draw, exact_inputs, plain_results
from refpeft.errors import ConfigError
from refpeft.methods.bottleneck import (BottleneckConfig, BottleneckParams, block_backward, block_backward_bound,
                                        block_forward, block_forward_bound, bottleneck_config, preactivation_bound)

TENSOR_INPUTS = ("W_down", "b_down", "W_up", "b_up")
GRADIENTS = {"W_down": "dW_down", "b_down": "db_down", "W_up": "dW_up", "b_up": "db_up"}
FORWARD = ("y = e, the residual stream after the block: u = o + r (original_ln_before) or o, "
           "y = u + s (f(u W_down^T + b_down) W_up^T + b_up), e = y (original_ln_before) or y + r")
BACKWARD = "do, dr, dW_down, db_down, dW_up, db_up of sum(e * dy), e as bottleneck_forward"


def case_config(case: Case) -> BottleneckConfig:
    """The block's config: the architecture's, with the case's non-linearity, scaling and H / m."""
    s, o = case.sizes, case.options
    return bottleneck_config(o["architecture"], non_linearity=o["non_linearity"], scaling=o["scaling"],
                             reduction_factor=s["hidden"] // s["bottleneck"])


def bottleneck_inputs(case: Case) -> dict[str, np.ndarray]:
    """o, r (..., H) in [-1, 1); W_down in [-1/4, 1/4), W_up, b_down, b_up in [-1/2, 1/2); dy for backward."""
    s = case.sizes
    rng = np.random.default_rng(case.seed)
    batch, H, m = tuple(s["batch"]), s["hidden"], s["bottleneck"]
    inputs = {"o": draw(rng, (*batch, H), dtype=case.dtype), "r": draw(rng, (*batch, H), dtype=case.dtype),
              "W_down": draw(rng, (m, H), dtype=case.dtype, scale=0.25),
              "b_down": draw(rng, (m,), dtype=case.dtype, scale=0.5),
              "W_up": draw(rng, (H, m), dtype=case.dtype, scale=0.5),
              "b_up": draw(rng, (H,), dtype=case.dtype, scale=0.5)}
    if case.family == "bottleneck_backward":
        inputs["dy"] = draw(rng, (*batch, H), dtype=case.dtype)
    return inputs


def _params(inputs: dict[str, Any]) -> BottleneckParams:
    return BottleneckParams(**{name: inputs[name] for name in TENSOR_INPUTS})


def bottleneck_results(case: Case, inputs: dict[str, Any]) -> dict[str, Any]:
    """refpeft's block on a case's inputs (any float arrays): y, or the six gradients."""
    e, cache = block_forward(inputs["o"], inputs["r"], _params(inputs), case_config(case))
    if case.family == "bottleneck_forward":
        return {"y": e}
    do, dr, grads = block_backward(inputs["dy"], cache)
    return {"do": do, "dr": dr, **{GRADIENTS[name]: g for name, g in grads.items()}}


def _check_margin(case: Case, z: Any, bound: Any) -> None:
    """A relu case's |z| must exceed z's bound everywhere (module docstring)."""
    close = np.argwhere(np.abs(np.asarray(z)) <= np.asarray(bound))
    if close.size:
        row, j = (int(i) for i in close[0])
        raise ConfigError(f"case {case.name!r}: pre-activation z[{row}, {j}] = {float(np.asarray(z)[row, j])!r} "
                          f"is within its bound {float(np.asarray(bound)[row, j]):.3e} of relu's kink; choose another "
                          "seed")


def bottleneck_vectors(case: Case) -> Vectors:
    inputs = bottleneck_inputs(case)
    e = exact_inputs(inputs)
    config, params = case_config(case), _params(e)
    if config.non_linearity == "relu":
        _, cache = block_forward(e["o"], e["r"], params, config)
        _check_margin(case, cache.adapter.z, preactivation_bound(e["o"], e["r"], params, config, dtype=case.dtype))
    expected = plain_results(bottleneck_results(case, e))
    if case.family == "bottleneck_forward":
        bounds = {"y": block_forward_bound(e["o"], e["r"], params, config, dtype=case.dtype)}
    else:
        b = block_backward_bound(e["dy"], e["o"], e["r"], params, config, dtype=case.dtype)
        bounds = {"do": b["do"], "dr": b["dr"], **{GRADIENTS[name]: b[name] for name in TENSOR_INPUTS}}
    parameters = {"original_ln_before": config.original_ln_before, "non_linearity": config.non_linearity,
                  "scaling": config.scaling}
    return Vectors(inputs, expected, plain_results(bounds), parameters)


FAMILIES: tuple[Family, ...] = (
    Family("bottleneck_forward", "bottleneck", FORWARD, bottleneck_vectors),
    Family("bottleneck_backward", "bottleneck", BACKWARD, bottleneck_vectors),
)


def bottleneck_cases() -> list[Case]:
    """Houlsby (swish, e = A(o) + r) and Pfeiffer (relu, e = A(o + r)) at their defaults, and each
    placement with the other's non-linearity and a scaling, forward and backward, float32 and float64."""
    default = {"batch": [2, 3], "hidden": 64, "bottleneck": 4}          # reduction factor 16, the default
    other = {"batch": [5], "hidden": 48, "bottleneck": 6}               # reduction factor 8
    variants = [
        ("houlsby", default, {"architecture": "double_seq_bn", "non_linearity": "swish", "scaling": 1.0}),
        ("pfeiffer", default, {"architecture": "seq_bn", "non_linearity": "relu", "scaling": 1.0}),
        ("houlsby-relu-scaled", other, {"architecture": "double_seq_bn", "non_linearity": "relu", "scaling": 0.5}),
        ("pfeiffer-swish-scaled", other, {"architecture": "seq_bn", "non_linearity": "swish", "scaling": 2.5}),
    ]
    return [Case(f"bottleneck-{direction}-{label}-{dtype}", f"bottleneck_{direction}", dtype, seed, sizes, options)
            for seed, (label, sizes, options) in enumerate(variants, start=1400)
            for dtype in ("float32", "float64") for direction in ("forward", "backward")]
