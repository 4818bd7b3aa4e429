"""OFT's error bounds: per-element bounds on |peer - refpeft| for the forward, backward and merge of
refpeft.methods.oft's Neumann variant, composed from refpeft.tolerance's algebra (docs/tolerance.md).

The rotation is evaluated as the Neumann series on the k x k block-diagonal skew matrix Q (exact zeros
off the blocks), so each product's gamma is gamma_k rather than gamma_b: valid for refpeft's order and
PEFT's, looser than needed. The exact (solve) variant has no a-priori bound here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refpeft.backend import namespace
from refpeft.methods.linear import linear_shape
from refpeft.methods.oft import oft_block_size, oft_neumann_coefficients, oft_rotation_matrix
from refpeft.tolerance import Bounded, Precision, add, exact, exact_or_none, gradient_bounds, matmul, output_bound, \
    row_sum, rows, scale, transpose, with_reference


def _block_diagonal_skew(V: Any, k: int) -> Any:
    """diag(Q_1, ..., Q_nb) (k, k): the Neumann transform with T = 2 is I + 2 Q, and both steps are exact."""
    xp = namespace(V)
    return (oft_rotation_matrix(V, k, cayley="neumann", terms=2) - xp.eye(k, dtype=V.dtype)) / 2.0


def _neumann_bounded(Qbd: Any, terms: int, p: Precision) -> Bounded:
    """The Neumann series on the exact block-diagonal Q, each product and sum rounded once."""
    xp = namespace(Qbd)
    Q = exact(Qbd)
    R, power = exact(xp.eye(Qbd.shape[0], dtype=Qbd.dtype)), None
    for c in oft_neumann_coefficients(terms)[1:]:
        power = Q if power is None else matmul(power, Q, p)
        R = add(R, scale(power, c, p), p)
    return R


def oft_forward_bound(x: Any, W0: Any, V: Any, *, bias: Any = None, terms: int = 5, fan_in_fan_out: bool = False,
                      dtype: str = "float32", accumulation: str | None = None, model: str = "rigorous") -> Any:
    """Per-element bound on |y_peer - y_refpeft| for the Neumann variant. The series is evaluated on the
    k x k block-diagonal Q (exact zeros off the blocks), so each product's gamma is gamma_k, not gamma_b:
    valid for either order, looser than needed. The exact (solve) variant has no a-priori bound here."""
    k = x.shape[-1]
    Qbd = _block_diagonal_skew(V, k)

    def chain(p: Precision) -> Bounded:
        xr = matmul(rows(exact(x)), _neumann_bounded(Qbd, terms, p), p)
        W0_t = exact(W0) if fan_in_fan_out else transpose(exact(W0))
        return matmul(xr, W0_t, p, bias=exact_or_none(bias))

    return output_bound(chain, Precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def oft_backward_bound(dy: Any, x: Any, W0: Any, V: Any, *, terms: int = 5, fan_in_fan_out: bool = False,
                       bias_trainable: bool = False, dtype: str = "float32", accumulation: str | None = None,
                       model: str = "rigorous") -> dict[str, Any]:
    """Per-element bounds on dx, doft_R (and dbias) of `oft_backward` (Neumann variant, no block_share).

    dQ = sum_j c_j sum_a (Q^T)^a G (Q^T)^{j-1-a} is a sum of products with non-negative coefficients, so
    in any association and order (refpeft's, or autograd's Horner-like pass back through PEFT's power
    loop) each of its terms meets at most N = J (b + 2) + sum_j j roundings (J the highest power, b the
    block size): |dQ_hat - dQ| <= gamma_N P(|Q|, |G| + eG) + P(|Q|, eG), P the same polynomial."""
    xp, k, b, c = namespace(x), x.shape[-1], oft_block_size(V.shape[1]), oft_neumann_coefficients(terms)
    Qbd = _block_diagonal_skew(V, k)
    upper = tuple(np.arange(V.shape[0])[:, None] * b + i[None, :] for i in np.triu_indices(b, 1))   # (p, q) of dV

    def poly(Qa: Any, Ga: Any) -> Any:                       # sum_j c_j sum_a (Qa^T)^a Ga (Qa^T)^{j-1-a}
        powers = [xp.eye(k, dtype=Qa.dtype)]
        for _ in range(len(c) - 2):
            powers.append(xp.matmul(powers[-1], xp.matrix_transpose(Qa)))
        return sum((cj * xp.matmul(xp.matmul(powers[a], Ga), powers[j - 1 - a])
                    for j, cj in enumerate(c[1:], start=1) for a in range(j)), xp.zeros_like(Ga))

    def chain(p: Precision) -> dict[str, Bounded]:
        x2, g2 = rows(exact(x)), rows(exact(dy))
        gr = matmul(g2, transpose(exact(W0)) if fan_in_fan_out else exact(W0), p)           # (n, k)  dL/dx'
        G = matmul(transpose(x2), gr, p)                     # (k, k); only its diagonal blocks reach dQ
        J = len(c) - 1
        gamma = p.gamma(J * (b + 2) + J * (J + 1) // 2)                                   # N in the docstring
        dQ = Bounded(poly(Qbd, G.value), gamma * poly(xp.abs(Qbd), xp.abs(G.value) + G.error)
                     + poly(xp.abs(Qbd), G.error))
        lower = upper[::-1]                                                                 # dQ[p, q] - dQ[q, p]
        dV = add(Bounded(dQ.value[upper], dQ.error[upper]), Bounded(-dQ.value[lower], dQ.error[lower]), p)
        grads = {"dx": matmul(gr, transpose(_neumann_bounded(Qbd, terms, p)), p), "doft_R": dV}
        if bias_trainable:
            grads["dbias"] = row_sum(g2, p)
        return grads

    return gradient_bounds(chain, Precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def oft_merge_bound(W0: Any, V: Any, *, terms: int = 5, fan_in_fan_out: bool = False, dtype: str = "float32",
                    accumulation: str | None = None, model: str = "rigorous") -> Any:
    """Per-element bound on PEFT's merge diag(R) W0^T (Neumann variant), in W0's layout."""
    k = linear_shape(W0, fan_in_fan_out=fan_in_fan_out).k
    Qbd = _block_diagonal_skew(V, k)

    def chain(p: Precision) -> Bounded:
        R = _neumann_bounded(Qbd, terms, p)
        Wt = exact(W0) if fan_in_fan_out else transpose(exact(W0))
        out = matmul(R, Wt, p)
        return out if fan_in_fan_out else transpose(out)

    return with_reference(chain, Precision(dtype, accumulation, model))
