"""The frozen linear layer every adapter sits on: layout, validation and its own two products.

Shapes (the letters used across refpeft):
    k   input features          d   output features          r   adapter rank
    ... any number of leading batch dimensions (0 or more)
    x   (..., k)    W0  (d, k), or (k, d) with fan_in_fan_out    b   (d,)

    base(x) = x W0^T + b          d base/dx = dy W0

`fan_in_fan_out=True` is GPT-2's Conv1D layout (W0 stored transposed); only W0 is affected,
adapter factors keep PyTorch's (r, k) / (d, r) layout, as in HF PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refpeft.backend import check_float_array, namespace, same_dtype
from refpeft.errors import ConfigError, RankError, ShapeError


@dataclass(frozen=True)
class LinearShape:
    """Sizes of an adapted linear layer."""

    k: int  # input features
    d: int  # output features


def linear_shape(W0: Any, *, fan_in_fan_out: bool) -> LinearShape:
    """(k, d) of a frozen weight in the given layout; W0 must be 2-D."""
    if len(W0.shape) != 2:
        raise ShapeError(f"W0 must be 2-D, got shape {tuple(W0.shape)}")
    rows, cols = W0.shape
    return LinearShape(k=rows, d=cols) if fan_in_fan_out else LinearShape(k=cols, d=rows)


def check_linear_inputs(x: Any, W0: Any, *, bias: Any, fan_in_fan_out: bool,
                        **adapter: Any) -> tuple[Any, LinearShape]:
    """Validate x, W0, bias and the named adapter arrays: one namespace, one dtype, finite.

    Returns the namespace and the layer's sizes. Adapter arrays are checked for dtype and
    finiteness here; their shapes are the caller's to check (they differ per method).
    """
    xp = namespace(x, W0, bias, *adapter.values())
    shape = linear_shape(W0, fan_in_fan_out=fan_in_fan_out)
    if len(x.shape) < 1 or x.shape[-1] != shape.k:
        raise ShapeError(f"x has shape {tuple(x.shape)}; its last axis must be the {shape.k} input features of W0")
    check_float_array("x", x, xp=xp)
    check_float_array("W0", W0, xp=xp)
    if bias is not None:
        check_float_array("bias", bias, xp=xp, shape=(shape.d,))
    for name, array in adapter.items():
        if array is not None:
            check_float_array(name, array, xp=xp)
    same_dtype({"x": x, "W0": W0, "bias": bias, **adapter})
    return xp, shape


def check_rank(r: int, shape: LinearShape) -> None:
    """A rank must be at least 1. A rank above min(d, k) adds parameters but no expressiveness; PEFT
    allows it (an r = 8 adapter on a 4-wide layer), and so does refpeft, so its files load."""
    if r < 1:
        raise RankError(f"rank r must be at least 1, got {r}")


def base_forward(x2: Any, W0: Any, bias: Any, *, fan_in_fan_out: bool, xp: Any) -> Any:
    """x W0^T + b for a 2-D x: (n, k) -> (n, d)."""
    y = xp.matmul(x2, W0 if fan_in_fan_out else xp.matrix_transpose(W0))
    return y if bias is None else y + bias


def base_input_grad(g2: Any, W0: Any, *, fan_in_fan_out: bool, xp: Any) -> Any:
    """dy W0 for a 2-D dy: (n, d) -> (n, k)."""
    return xp.matmul(g2, xp.matrix_transpose(W0) if fan_in_fan_out else W0)


def weight_rows(W0: Any, *, fan_in_fan_out: bool, xp: Any) -> Any:
    """W0 as (d, k) whatever its storage layout (a view, no copy on NumPy)."""
    return xp.matrix_transpose(W0) if fan_in_fan_out else W0


def flatten_rows(x: Any, *, xp: Any) -> Any:
    """(..., n) -> (rows, n): the leading batch dimensions folded into one."""
    return xp.reshape(x, (-1, x.shape[-1]))


def dropped_rows(x: Any, dropout_mask: Any, *, xp: Any) -> tuple[Any, Any, Any]:
    """x (..., k) and its dropout mask as rows: (x2 (n, k), mask (n, k) or None, xd = x2 * mask), xd = x2
    without a mask. An adapter reads xd; its input gradient is masked again on the way back."""
    x2 = flatten_rows(x, xp=xp)
    mask = None if dropout_mask is None else flatten_rows(dropout_mask, xp=xp)
    return x2, mask, (x2 if mask is None else x2 * mask)


def dropout_mask(shape: tuple[int, ...], p: float, *, seed: int, dtype: str = "float64", xp: Any = None) -> Any:
    """An inverted-dropout mask: each entry 0 with probability p, else 1/(1-p) (torch's convention).

    Passing the mask explicitly makes forward and backward deterministic; draw a new one per step.
    """
    import numpy as np

    from refpeft.init import as_parameter

    if not 0.0 <= p < 1.0:
        raise ConfigError(f"dropout probability must be in [0, 1), got {p}")
    keep = np.random.default_rng(seed).random(shape) >= p
    return as_parameter(keep / (1.0 - p), dtype=dtype, xp=xp)
