"""Shared hypothesis strategies: layer shapes, float64 arrays with controlled magnitudes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st


@dataclass(frozen=True)
class LayerCase:
    """One adapted linear layer: sizes, batch dims and the options under test."""

    batch: tuple[int, ...]  # leading batch dimensions (0 to 3 of them)
    k: int
    d: int
    r: int
    bias: bool
    rslora: bool
    fan_in_fan_out: bool
    dropout: bool
    seed: int


@st.composite
def layer_cases(draw, *, max_features: int = 64, max_batch_dims: int = 3) -> LayerCase:
    k = draw(st.integers(1, max_features))
    d = draw(st.integers(1, max_features))
    return LayerCase(
        batch=tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=max_batch_dims))),
        k=k,
        d=d,
        r=draw(st.integers(1, min(k, d))),
        bias=draw(st.booleans()),
        rslora=draw(st.booleans()),
        fan_in_fan_out=draw(st.booleans()),
        dropout=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def normal_arrays(case: LayerCase, *names_and_shapes: tuple[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Independent N(0, 1) float64 arrays for each (name, shape), from the case's seed."""
    rng = np.random.default_rng(case.seed)
    return {name: rng.standard_normal(shape) for name, shape in names_and_shapes}
