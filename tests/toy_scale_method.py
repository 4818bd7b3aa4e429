"""A toy method in one module, to show that a method is one module: per-output scaling of the frozen layer.

    y = x W0^T + b + gamma * (x W0^T)            # (n, d)   gamma (d,) trained, init 0
    dgamma = sum_n dy * (x W0^T)                 # (d,)
    dx     = (dy * (1 + gamma)) W0               # (n, k)
    merge: W = diag(1 + gamma) W0                unmerge: W0 = diag(1 / (1 + gamma)) W

Its table row reuses the exporter's "low-rank-rescaled" branch with rank-0 factors and the row
scale g = 1 + gamma, and stores gamma in LoRA-type PEFT files under its own flag `use_scale`.
Nothing outside this module knows it exists: tests/test_methods_table.py imports it and runs it
through file I/O, checkpoint merging, the exporter and the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refpeft.adapter import ModuleAdapter
from refpeft.backend import check_float_array, namespace
from refpeft.methods import register_method
from refpeft.methods.linear import base_forward, base_input_grad, check_linear_inputs, flatten_rows
from refpeft.methods.spec import Method


@dataclass(frozen=True)
class ScaleCache:
    x: Any        # (..., k)
    xw: Any       # (n, d)  x W0^T
    W0: Any
    gamma: Any
    fan_in_fan_out: bool


@dataclass(frozen=True)
class ScaleGrads:
    dx: Any       # (..., k)
    dgamma: Any   # (d,)


def scale_forward(x: Any, W0: Any, gamma: Any, *, bias: Any = None, fan_in_fan_out: bool = False) -> tuple[Any, ScaleCache]:
    xp, shape = check_linear_inputs(x, W0, bias=bias, fan_in_fan_out=fan_in_fan_out, gamma=gamma)
    check_float_array("gamma", gamma, xp=xp, shape=(shape.d,))
    xw = base_forward(flatten_rows(x, xp=xp), W0, None, fan_in_fan_out=fan_in_fan_out, xp=xp)
    y = xw + gamma * xw if bias is None else xw + bias + gamma * xw
    return xp.reshape(y, (*x.shape[:-1], shape.d)), ScaleCache(x, xw, W0, gamma, fan_in_fan_out)


def scale_backward(dy: Any, cache: ScaleCache) -> ScaleGrads:
    xp = namespace(dy, cache.x)
    g2 = flatten_rows(dy, xp=xp)
    dgamma = xp.sum(g2 * cache.xw, axis=0)
    dx = base_input_grad(g2 * (1 + cache.gamma), cache.W0, fan_in_fan_out=cache.fan_in_fan_out, xp=xp)
    return ScaleGrads(dx=xp.reshape(dx, cache.x.shape), dgamma=dgamma)


def _rows(gamma: Any, fan_in_fan_out: bool) -> Any:
    return gamma if fan_in_fan_out else gamma[:, None]


def scale_delta_weight(W0: Any, gamma: Any, *, fan_in_fan_out: bool = False) -> Any:
    return _rows(gamma, fan_in_fan_out) * W0


def scale_merge(W0: Any, gamma: Any, *, fan_in_fan_out: bool = False) -> Any:
    return W0 + scale_delta_weight(W0, gamma, fan_in_fan_out=fan_in_fan_out)


def scale_unmerge(W: Any, gamma: Any, *, fan_in_fan_out: bool = False) -> Any:
    return W / _rows(1 + gamma, fan_in_fan_out)


def _branch(W0: Any, m: Any, *, shared: Any = None) -> tuple[Any, ...]:
    xp = namespace(m.gamma)
    k, d = (W0.shape[0], W0.shape[1]) if m.fan_in_fan_out else (W0.shape[1], W0.shape[0])
    return (xp.zeros((k, 0), dtype=m.gamma.dtype), xp.zeros((0, d), dtype=m.gamma.dtype),
            xp.ones((1,), dtype=m.gamma.dtype), 1 + m.gamma)


SCALE = register_method(Method(
    name="scale", summary="toy: per-output scaling of the frozen layer",
    peft_type="LORA", peft_flags={"use_scale": True}, tensors={"gamma": "scale_gamma"},
    trainable=("gamma",), per_output=("gamma",), scaled=False, mergeable=True, onnx_branch="low-rank-rescaled",
    rank=lambda m: 1, out_features=lambda m: int(m.gamma.shape[0]), in_features=lambda m: None,
    forward=lambda x, W0, m, *, shared=None, bias=None, dropout_mask=None, bias_trainable=False:
        scale_forward(x, W0, m.gamma, bias=bias, fan_in_fan_out=m.fan_in_fan_out),
    backward=scale_backward,
    delta_weight=lambda W0, m, *, shared=None: scale_delta_weight(W0, m.gamma, fan_in_fan_out=m.fan_in_fan_out),
    merge=lambda W0, m, *, shared=None: scale_merge(W0, m.gamma, fan_in_fan_out=m.fan_in_fan_out),
    unmerge=lambda W, m, *, shared=None: scale_unmerge(W, m.gamma, fan_in_fan_out=m.fan_in_fan_out),
    parameter_count=lambda k, d, m: d,
    branch_values=_branch,
    init_modules=lambda W0s, *, ranks, alphas, **options: (
        {p: ModuleAdapter("scale", {"gamma": W0[:, 0] * 0}) for p, W0 in W0s.items()}, {}, {}),
))
