"""Finite-difference checks of hand-written gradients (float64, NumPy on the host).

For a function f and an upstream gradient dy, the scalar L(inputs) = sum(f(inputs) * dy) has
dL/d(input) = the vector-Jacobian product a backward pass returns. Along a random direction v,

    D_h   = (L(p + h v) - L(p - h v)) / (2h)                 central difference, error O(h^2)
    D     = (4 D_{h/2} - D_h) / 3                            Richardson extrapolation, O(h^4)

is compared with <g, v> for the hand-written g. The relative error is

    |D - <g, v>| / (||g|| ||v||)

(||g|| ||v|| bounds |<g, v>| by Cauchy-Schwarz), so a direction in which the derivative happens
to vanish cannot inflate it. The step is relative to the input's scale, h_p = h max(1, max|p|):
with h = 1e-4 in float64 the truncation error is ~h_p^4 and the rounding error ~e_L / h_p, where
e_L is the forward's own rounding error in L (hundreds of ulps of |L| for a layer). A fixed step
would let e_L / h grow with the input's scale: a DoRA magnitude of 65 (it starts at ||W0||, per row)
gave 1.2e-7 at h = 1e-4, all of it rounding (it falls as h grows), and 1.4e-9 at h = 1e-2.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from refpeft.backend import to_numpy


def directional_derivative(loss: Callable[[dict[str, np.ndarray]], float], inputs: dict[str, np.ndarray],
                           name: str, v: np.ndarray, *, h: float) -> float:
    """d/dt loss(inputs with `name` moved to inputs[name] + t v) at t = 0 (see the module doc)."""

    def at(t: float) -> float:
        moved = dict(inputs)
        moved[name] = inputs[name] + t * v
        return loss(moved)

    d_h = (at(h) - at(-h)) / (2 * h)
    d_h2 = (at(h / 2) - at(-h / 2)) / h
    return (4 * d_h2 - d_h) / 3


def gradient_errors(f: Callable[..., Any], inputs: dict[str, np.ndarray], grads: dict[str, Any],
                    dy: np.ndarray, *, directions: int = 2, seed: int = 0, h: float = 1e-4) -> dict[str, float]:
    """Worst relative error of each hand-written gradient in `grads` over random directions.

    `f(**inputs)` returns the forward output; `grads[name]` is the claimed dL/d(inputs[name]).
    A zero gradient is compared absolutely: its finite difference must be zero too.
    """
    rng = np.random.default_rng(seed)
    dy64 = np.asarray(to_numpy(dy), dtype=np.float64)

    def loss(values: dict[str, np.ndarray]) -> float:
        return float(np.sum(np.asarray(to_numpy(f(**values)), dtype=np.float64) * dy64))

    errors = {}
    for name, grad in grads.items():
        g = np.asarray(to_numpy(grad), dtype=np.float64)
        if g.shape != np.shape(inputs[name]):
            raise ValueError(f"d{name} has shape {g.shape}, but the input has shape {np.shape(inputs[name])}")
        worst = 0.0
        for _ in range(directions):
            v = rng.standard_normal(g.shape)
            scale = float(np.linalg.norm(g) * np.linalg.norm(v))
            step = h * max(1.0, float(np.max(np.abs(np.asarray(to_numpy(inputs[name]), dtype=np.float64)),
                                                initial=0.0)))
            fd = directional_derivative(loss, inputs, name, v, h=step)
            worst = max(worst, abs(fd - float(np.sum(g * v))) / scale if scale > 0.0 else abs(fd))
        errors[name] = worst
    return errors
