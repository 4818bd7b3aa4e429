"""Boundary checks of the integer inputs of the model ops: token ids, labels, attention masks.

Float inputs go through refpeft.backend (`check_float_array`, `same_dtype`); these are the checks
for the other arrays a decoder takes, each raising refpeft's own error with the offending value.
"""

from __future__ import annotations

from typing import Any

from refpeft.errors import DTypeError, InputError, ShapeError


def require_integer(name: str, x: Any, *, xp: Any, ndim: int | None = None) -> None:
    """Refuse a non-integer dtype (DTypeError) or, when `ndim` is given, another rank (ShapeError)."""
    if not xp.isdtype(x.dtype, "integral"):
        raise DTypeError(f"{name} has dtype {x.dtype}; it must hold integers")
    if ndim is not None and len(x.shape) != ndim:
        raise ShapeError(f"{name} has shape {tuple(x.shape)}, expected {ndim} dimensions")


def require_in_range(name: str, x: Any, low: int, high: int, *, xp: Any, allowed: int | None = None) -> None:
    """Every entry of `x` lies in [low, high), or equals `allowed`; else InputError naming the first bad one."""
    bad = (x < low) | (x >= high)
    if allowed is not None:
        bad = bad & (x != allowed)
    if bool(xp.any(bad)):
        flat_bad = xp.reshape(bad, (-1,))
        first = int(xp.argmax(xp.astype(flat_bad, xp.int8)))
        value = int(xp.reshape(x, (-1,))[first])
        where = _unravel(first, tuple(x.shape))
        extra = f" and is not {allowed}" if allowed is not None else ""
        raise InputError(f"{name}{list(where)} = {value} is outside [{low}, {high}){extra}")


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The multi-index of flat position `flat` in a C-ordered array of `shape`."""
    index = []
    for size in reversed(shape):
        index.append(flat % size)
        flat //= size
    return tuple(reversed(index))
