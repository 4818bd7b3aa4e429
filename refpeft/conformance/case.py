"""A conformance case, the vectors a family makes of it, and the helpers every family draws and computes with.

See refpeft.conformance.families for how inputs, expected results and bounds are made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from refpeft.conformance.exact import exact_array, plain


@dataclass(frozen=True)
class Case:
    """One conformance case: a family, its sizes and options, the dtype computed in, a seed."""

    name: str
    family: str
    dtype: str
    seed: int
    sizes: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Vectors:
    """What a family makes of a case (see the module docstring)."""

    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    bounds: dict[str, np.ndarray]             # one per bound-checked result; absent for bit-exact ones
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    name: str
    method: str
    summary: str            # what an implementation must compute, in one line (goes to the manifest)
    make: Callable[[Case], Vectors]
    requires: tuple[str, ...] = ()   # importable modules the generator needs beyond the core (extras)


def draw(rng: np.random.Generator, shape: tuple[int, ...], *, dtype: str, scale: float = 1.0) -> np.ndarray:
    """Uniform values in [-scale, scale), rounded once to `dtype` (scale a power of two keeps this exact)."""
    return ((rng.random(shape) * 2.0 - 1.0) * scale).astype(dtype)


def exact_inputs(arrays: dict[str, np.ndarray | None]) -> dict[str, Any]:
    """Each array as an ExactArray (every reduction correctly rounded), None kept."""
    return {name: None if a is None else exact_array(a) for name, a in arrays.items()}


def plain_results(arrays: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each result as a contiguous float64 NumPy array, None dropped."""
    return {name: np.ascontiguousarray(plain(a), dtype=np.float64) for name, a in arrays.items() if a is not None}
