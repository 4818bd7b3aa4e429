"""The array backend: namespace discovery, the dtype policy, boundary checks, and NumPy for I/O.

This is the only module that imports array-api-compat. Every public refpeft function calls
`namespace(...)` once on its array arguments and then uses only array-API functions on the
namespace it gets back, so the same code runs on NumPy, array-api-strict, torch (CPU) and CuPy.

Dtype policy
------------
- float64 is the oracle's precision: references, golden vectors and gradient checks use it.
- float32 and float16 are computed natively in the input's dtype, as a peer computing in that
  dtype would (one rounding per array-API operation).
- bfloat16 is one named policy on every backend: values live in float32 arrays and
  `round_to(x, "bfloat16")` rounds them to the nearest bfloat16 (ties to even, the rounding torch
  and ml-dtypes use) exactly where the computation being reproduced rounds (refpeft.methods.qlora
  says where). NumPy and CuPy have no bfloat16 dtype; torch has one, but its native bfloat16
  arithmetic rounds after every operation, differently from the float32-accumulating kernels a
  peer runs, so torch emulates too (it only uses torch.bfloat16 to round). The same call gives the
  same bits on NumPy, array-api-strict and torch. A torch.bfloat16 input is accepted as a float
  array; computing with it is the caller's choice.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np

from refpeft.errors import DTypeError, NamespaceError, NonFiniteError, ShapeError

FLOAT_NAMES = ("float64", "float32", "float16", "bfloat16")

# Unit roundoff u = 2^-p of each floating format (p = significand bits including the hidden one).
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def namespace(*arrays: Any) -> Any:
    """The array-API namespace shared by `arrays` (None entries are ignored).

    Raises NamespaceError when an argument is not an array or when the arrays come from two
    different libraries (say a NumPy array and a torch tensor), naming the libraries involved.
    """
    present = [a for a in arrays if a is not None]
    if not present:
        raise NamespaceError("no arrays given: cannot tell which array library to compute with")
    for a in present:
        if not array_api_compat.is_array_api_obj(a):
            raise NamespaceError(f"expected an array, got {type(a).__name__}")
    try:
        return array_api_compat.array_namespace(*present)
    except TypeError as exc:
        libraries = sorted({type(a).__module__.split(".")[0] for a in present})
        raise NamespaceError(
            f"arrays from different libraries were mixed ({', '.join(libraries)}); "
            "convert them to one library first"
        ) from exc


def numpy_namespace() -> Any:
    """The array-API-compatible NumPy namespace (refpeft's default backend)."""
    return array_api_compat.array_namespace(np.empty(0))


def float_dtype(name: str, *, xp: Any) -> Any:
    """The dtype object `xp` uses for the float format `name` ("float64", "float32", ...).

    bfloat16 is emulated in float32 on every namespace (see the module docstring).
    """
    if name not in FLOAT_NAMES:
        raise DTypeError(f"unknown float format {name!r}; choose one of {', '.join(FLOAT_NAMES)}")
    return xp.float32 if name == "bfloat16" else getattr(xp, name)


def dtype_name(dtype: Any, *, xp: Any) -> str:
    """The refpeft name ("float32", ...) of a floating dtype of namespace `xp`."""
    for name in FLOAT_NAMES:
        if name == "bfloat16" and not hasattr(xp, "bfloat16"):
            continue
        if dtype == getattr(xp, name):
            return name
    raise DTypeError(f"dtype {dtype} is not a floating dtype refpeft computes in")


def require_float(name: str, x: Any, *, xp: Any) -> None:
    """Refuse integer, bool, complex and unknown dtypes with a DTypeError naming `name`."""
    try:
        dtype_name(x.dtype, xp=xp)
    except DTypeError:
        raise DTypeError(
            f"{name} has dtype {x.dtype}; refpeft computes in float64, float32, float16 "
            "(bfloat16 is emulated in float32, see refpeft.backend)"
        ) from None


def require_finite(name: str, x: Any, *, xp: Any) -> None:
    """Refuse arrays holding NaN or infinity, saying how many entries are bad."""
    finite = xp.isfinite(x)
    if not bool(xp.all(finite)):
        count = int(xp.sum(xp.astype(~finite, xp.int64)))
        raise NonFiniteError(f"{name} holds {count} non-finite value(s) (NaN or inf)")


def require_shape(name: str, x: Any, shape: tuple[int | None, ...]) -> None:
    """Check `x.shape` against `shape`, where None matches any size."""
    if len(x.shape) != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape)):
        wanted = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
        raise ShapeError(f"{name} has shape {tuple(x.shape)}, expected {wanted}")


def check_float_array(name: str, x: Any, *, xp: Any, shape: tuple[int | None, ...] | None = None) -> None:
    """The usual boundary check of one input: floating dtype, optional shape, all finite."""
    require_float(name, x, xp=xp)
    if shape is not None:
        require_shape(name, x, shape)
    require_finite(name, x, xp=xp)


def same_dtype(named: dict[str, Any]) -> None:
    """Refuse a mix of float dtypes (say a float32 x with a float64 W0) instead of promoting."""
    present = {n: a for n, a in named.items() if a is not None}
    dtypes = {str(a.dtype) for a in present.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{n}: {a.dtype}" for n, a in present.items())
        raise DTypeError(f"inputs must share one dtype, got {listing}")


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy copy (or view) of any supported array, for I/O and reporting."""
    if isinstance(x, np.ndarray):
        return x
    if array_api_compat.is_torch_array(x):
        if str(x.dtype) == "torch.bfloat16":
            import ml_dtypes

            return x.detach().cpu().float().numpy().astype(ml_dtypes.bfloat16)
        return x.detach().cpu().numpy()
    if array_api_compat.is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def from_numpy(a: np.ndarray, *, xp: Any, like: Any = None) -> Any:
    """`a` as an array of namespace `xp` (on the device of `like`, when given)."""
    device = array_api_compat.device(like) if like is not None else None
    if device is None:
        return xp.asarray(a)
    return xp.asarray(a, device=device)


def round_to(x: Any, name: str, *, xp: Any) -> Any:
    """Round every value of `x` to the nearest value of float format `name`, keeping x's dtype.

    This is the emulation step for a format the namespace lacks (bfloat16 on NumPy/CuPy), and a
    plain cast round trip for the others. Rounding is to nearest, ties to even.
    """
    if name not in FLOAT_NAMES:
        raise DTypeError(f"unknown float format {name!r}; choose one of {', '.join(FLOAT_NAMES)}")
    if name != "bfloat16" or hasattr(xp, "bfloat16"):            # a cast round trip; torch has bfloat16
        target = xp.bfloat16 if name == "bfloat16" else float_dtype(name, xp=xp)
        return xp.astype(xp.astype(x, target), x.dtype)
    import ml_dtypes  # bfloat16 rounding on NumPy; other namespaces go through NumPy

    rounded = to_numpy(x).astype(ml_dtypes.bfloat16).astype(np.float32)
    return xp.astype(from_numpy(rounded, xp=xp, like=x), x.dtype)


def leading_size(shape: tuple[int, ...]) -> int:
    """Number of rows when all but the last axis are flattened (1 for a 1-D array)."""
    return math.prod(shape[:-1])
