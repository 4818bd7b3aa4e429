"""Singular spectra of low-rank products, computed on the factors: thin SVD, energy curve, rank choice.

A LoRA delta (or a weighted sum of them, stacked as one pair of factors)

    Delta = s B A        B: (d, R)   A: (R, k)   R << min(d, k)

has at most R non-zero singular values, and all of them can be found without forming the d x k
product (letters: d output features, k input features, R the inner rank):

    B   = Q_B R_B        reduced QR    Q_B: (d, p) orthonormal columns   R_B: (p, R)   p = min(d, R)
    A^T = Q_A R_A        reduced QR    Q_A: (k, q)                       R_A: (q, R)   q = min(k, R)
    C   = s R_B R_A^T                  the core                          (p, q)
    C   = U_c S V_c^T    SVD of the core
    Delta = Q_B C Q_A^T = (Q_B U_c) S (Q_A V_c)^T

U = Q_B U_c and V = Q_A V_c have orthonormal columns, so this *is* a thin SVD of Delta. Cost:
O((d + k) R^2 + R^3) time and O((d + k) R) memory, against O(d k min(d, k)) time and O(d k) memory
for the SVD of the formed Delta.

Eckart-Young-Mirsky: the best rank-r approximation of Delta in the Frobenius norm is the truncation
Delta_r = U_r S_r V_r^T, and its error sqrt(sum_{i > r} S_i^2) is the least any rank-r matrix can reach.

The energy curve is the fraction of ||Delta||_F^2 = sum_i S_i^2 that rank r keeps:

    E(r) = sum_{i <= r} S_i^2 / sum_i S_i^2 = 1 - (||Delta - Delta_r||_F / ||Delta||_F)^2

and `rank_for_energy(S, f)` is the smallest r with E(r) >= f.

The Frobenius norm of any factored product P Q (P: (d, m), Q: (m, k)) comes the same way, with no
cancellation: ||P Q||_F = ||R_P R_Q^T||_F after P = Q_P R_P and Q^T = Q_Q R_Q. Fusion uses it to
*measure* the error of a result, independently of the spectrum that predicts it.

Numeric choices:
- QR and SVD come from the namespace's `linalg` (LAPACK on NumPy). Singular vectors are unique only
  up to sign (and rotation within repeated singular values): compare reconstructions, not vectors.
- E(r) divides the running sum by its own last entry, so E(R) == 1 exactly.
- A zero Delta has no energy to keep: E(r) = 1 for every r and `rank_for_energy` returns 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from refpeft.backend import check_float_array, namespace, same_dtype
from refpeft.errors import ConfigError, NonFiniteError, RankError, ShapeError


@dataclass(frozen=True)
class ThinSVD:
    """A thin SVD Delta = U diag(S) Vh, singular values descending."""

    U: Any    # (d, m) orthonormal columns
    S: Any    # (m,)   m = min(d, k, R)
    Vh: Any   # (m, k) orthonormal rows

    @property
    def max_rank(self) -> int:
        return int(self.S.shape[0])

    def truncate(self, rank: int) -> tuple[Any, Any]:
        """The best rank-`rank` factors (A, B) = (Vh_r, U_r S_r), PEFT's split, so Delta_r = B A."""
        if not 1 <= rank <= self.max_rank:
            raise RankError(f"rank {rank} is outside 1..{self.max_rank}, the ranks this SVD holds")
        return self.Vh[:rank, :], self.U[:, :rank] * self.S[:rank]


def factored_svd(A: Any, B: Any, *, scaling: float = 1.0) -> ThinSVD:
    """The thin SVD of s B A from its factors (see the module doc); never forms the d x k product."""
    xp = _checked_factors(A, B)
    Q_B, R_B = xp.linalg.qr(B)                                     # (d, p), (p, R)
    Q_A, R_A = xp.linalg.qr(xp.matrix_transpose(A))                # (k, q), (q, R)
    core = _finite_core(xp.matmul(R_B, xp.matrix_transpose(R_A)) * scaling, xp=xp)   # (p, q)
    U_c, S, Vh_c = xp.linalg.svd(core, full_matrices=False)        # (p, m), (m,), (m, q)
    U = xp.matmul(Q_B, U_c)                                        # (d, m)
    Vh = xp.matrix_transpose(xp.matmul(Q_A, xp.matrix_transpose(Vh_c)))  # (m, k)
    return ThinSVD(U=U, S=S, Vh=Vh)


def thin_svd(M: Any) -> ThinSVD:
    """The thin SVD of a formed (dense) matrix M (d, k): for deltas that exist only densely."""
    xp = namespace(M)
    check_float_array("M", M, xp=xp, shape=(None, None))
    U, S, Vh = xp.linalg.svd(M, full_matrices=False)
    return ThinSVD(U=U, S=S, Vh=Vh)


def singular_values(A: Any, B: Any, *, scaling: float = 1.0) -> Any:
    """The singular values of s B A (descending, min(d, k, R) of them), computed on the factors."""
    xp = _checked_factors(A, B)
    _, R_B = xp.linalg.qr(B)
    _, R_A = xp.linalg.qr(xp.matrix_transpose(A))
    return xp.linalg.svdvals(_finite_core(xp.matmul(R_B, xp.matrix_transpose(R_A)) * scaling, xp=xp))


def _finite_core(core: Any, *, xp: Any) -> Any:
    """The small core s R_B R_A^T, refused when it overflowed: an SVD of infinities does not converge."""
    if not bool(xp.all(xp.isfinite(core))):
        raise NonFiniteError(f"s B A overflows {core.dtype}: its core s R_B R_A^T holds non-finite values")
    return core


def product_norm(P: Any, Q: Any) -> float:
    """||P Q||_F for P: (d, m), Q: (m, k), from the factors: ||R_P R_Q^T||_F (no d x k product)."""
    xp = _checked_factors(Q, P)
    _, R_P = xp.linalg.qr(P)
    _, R_Q = xp.linalg.qr(xp.matrix_transpose(Q))
    return float(xp.linalg.matrix_norm(xp.matmul(R_P, xp.matrix_transpose(R_Q)), ord="fro"))


def energy_curve(S: Any) -> Any:
    """E(r) for r = 1..m: the fraction of sum S^2 kept by the first r singular values (E(m) == 1)."""
    xp = namespace(S)
    check_float_array("singular values", S, xp=xp, shape=(None,))
    running = xp.cumulative_sum(S * S)
    total = running[-1] if S.shape[0] else xp.asarray(0.0, dtype=S.dtype)
    if float(total) == 0.0:
        return xp.ones_like(S)
    return running / total


def rank_for_energy(S: Any, fraction: float) -> int:
    """The smallest rank r with E(r) >= fraction, 0 < fraction <= 1 (0 for an all-zero spectrum)."""
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"energy fraction must be in (0, 1], got {fraction}")
    xp = namespace(S)
    if S.shape[0] == 0 or float(xp.max(xp.abs(S))) == 0.0:
        return 0
    short = energy_curve(S) < fraction                    # True for every r that keeps too little
    return int(xp.sum(xp.astype(short, xp.int64))) + 1


def choose_rank(S: Any, *, rank: int | None, energy: float | None, default: int) -> int:
    """The target rank: `rank`, or the smallest keeping `energy`, or `default`; at most len(S), at least 1.

    A rank above the number of singular values available adds nothing (those directions are
    zero), so it is clipped to len(S).
    """
    if rank is not None and energy is not None:
        raise ConfigError("give a target rank or an energy fraction, not both")
    if energy is not None:
        chosen = rank_for_energy(S, energy)
    else:
        chosen = default if rank is None else rank
        if chosen < 1:
            raise RankError(f"target rank must be at least 1, got {chosen}")
    return max(1, min(chosen, int(S.shape[0])))


@dataclass(frozen=True)
class CompressionReport:
    """What replacing a target Delta by a rank-`rank` adapter cost, for one layer.

    `error` is measured (||Delta - B A||_F from the factors, or from the dense residual for dense
    extraction); `optimal_error` is the Eckart-Young floor sqrt(sum_{i > rank} S_i^2) for that rank.
    A truncated SVD reaches the floor (error == optimal_error to rounding); other combinations say
    how far from it they land. None where the full spectrum is not known (randomized SVD).
    """

    rank: int                     # rank of the result
    norm: float                   # ||Delta||_F of the target
    error: float                  # ||Delta - B A||_F, measured
    optimal_error: float | None   # sqrt(sum_{i > rank} S_i^2): the best any rank-`rank` adapter can do
    discarded_energy: float | None  # 1 - E(rank) = (optimal_error / norm)^2
    singular_values: Any          # the target's singular values known (all of them, or the top ones)

    @property
    def relative_error(self) -> float:
        """error / ||Delta||_F (0 for a zero target)."""
        return self.error / self.norm if self.norm > 0.0 else 0.0


def compression_report(S: Any, rank: int, *, error: float, norm: float | None = None) -> CompressionReport:
    """The report for a rank-`rank` result with measured `error`, from the target's singular values S.

    With `norm` given, S holds only the top singular values (randomized SVD): ||Delta||_F is that
    norm and the optimum is unknown (None). Otherwise S is the whole spectrum.
    """
    xp = namespace(S)
    if norm is not None:
        return CompressionReport(rank=rank, norm=norm, error=error, optimal_error=None,
                                 discarded_energy=None, singular_values=S)
    total = float(xp.sum(S * S))
    tail = float(xp.sum(S[rank:] * S[rank:]))
    return CompressionReport(rank=rank, norm=math.sqrt(total), error=error, optimal_error=math.sqrt(tail),
                             discarded_energy=tail / total if total > 0.0 else 0.0, singular_values=S)


def _checked_factors(A: Any, B: Any) -> Any:
    """Namespace of a factor pair A: (R, k), B: (d, R) after shape, dtype and finiteness checks."""
    xp = namespace(A, B)
    check_float_array("A", A, xp=xp)
    check_float_array("B", B, xp=xp)
    same_dtype({"A": A, "B": B})
    if len(A.shape) != 2 or len(B.shape) != 2 or A.shape[0] != B.shape[1]:
        raise ShapeError(f"factors must be A (R, k) and B (d, R) with one inner rank R, got A {tuple(A.shape)}"
                         f" and B {tuple(B.shape)}")
    return xp


def adapter_spectra(adapter: Any) -> dict[str, Any]:
    """The singular values of s B A for every LoRA/DoRA module of an Adapter, by module path.

    For DoRA this is the spectrum of the low-rank direction update s B A (the magnitude rescales
    rows on top of it). VeRA modules are left out: their layer's input size k is not recorded.
    """
    return {path: singular_values(m.A, m.B, scaling=m.scaling)
            for path, m in adapter.modules.items() if {"A", "B"} <= set(m.spec.tensors)}
