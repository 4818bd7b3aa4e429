"""The LoRA paper's section 7 analyses: subspace similarity between adapters, and the amplification factor.

Hu et al. 2021 (arXiv 2106.09685), section 7, ask what a trained Delta W = s B A (B (d, r), A (r, k))
learns. Letters: d outputs, k inputs, r the rank; U^i the first i columns of U.

Subspace similarity (section 7.2, eq. 4). Let A = U_A S_A V_A^T be A's SVD, so the rows of V_A^T are
A's right-singular vectors, orthonormal vectors of R^k (the input directions the adapter reads):

    phi(A1, A2, i, j) = ||V1^{i T} V2^j||_F^2 / min(i, j)      V1 = V_{A1} (k, r1), V2 = V_{A2} (k, r2)

(the paper writes U for these right-singular matrices). ||V1^{iT} V2^j||_F^2 = sum of the squared
cosines of the principal angles between span(V1^i) and span(V2^j), and there are min(i, j) of them,
each cosine in [0, 1], so phi is in [0, 1]: 1 when one span contains the other, 0 when orthogonal.
It depends on the spans only (a rotation or sign flip within a span leaves it unchanged) and
phi(A1, A2, i, j) = phi(A2, A1, j, i). `subspace_similarity_grid` gives every (i, j) at once from
M = V1^T V2 (r1, r2): the numerator is the 2-D cumulative sum of M * M.

Random baseline: for independent, uniformly random subspaces of dimensions i and j in R^k,
E ||P_i Q_j||_F^2 = trace(E[P P^T] E[Q Q^T]) = trace((i / k) I (j / k) I) = i j / k (by rotation
invariance E[P P^T] = (i / k) I_k), so E phi = i j / (k min(i, j)) = max(i, j) / k. An observed phi far
above that is overlap beyond chance (`random_subspace_similarity`).

Amplification factor (section 7.3). With Delta W = U S V^T its thin SVD truncated to its top `rank`
directions (U (d, rank), V^T (rank, k); refpeft.spectrum.factored_svd, never forming Delta W), project
the frozen W onto those directions and compare:

    amplification = ||Delta W||_F / ||U^T W V||_F

A large factor says Delta W mostly amplifies directions that W itself barely uses. For reference the
report also gives ||U_W^T W V_W||_F = sqrt(sum_{i <= rank} sigma_i(W)^2), the projection on W's own top
directions (the largest any rank-`rank` projection can be), as the paper's table does.

Magnitude and direction change (the DoRA paper, Liu et al. 2024, section 2.2). Write a weight by rows
(PEFT's layout (d, k): row i feeds output i) as magnitude times direction, W_i = m_i W_i / ||W_i||. A
tuned weight W' (LoRA's W0 + s B A, DoRA's merged m V / ||V||, any method's merge) moves each row's
magnitude and turns its direction:

    Delta M = (1 / d) sum_i | ||W'_i|| - ||W0_i|| |
    Delta D = (1 / d) sum_i (1 - cos(W'_i, W0_i)),   cos(a, b) = a . b / (||a|| ||b||)

Full fine-tuning shows a negative correlation between the two across steps; LoRA a positive one
(it cannot change magnitude without turning the direction); DoRA, which trains m apart, the former.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from refpeft.backend import check_float_array, namespace
from refpeft.errors import RankError, ShapeError
from refpeft.spectrum import factored_svd


def right_singular_vectors(A: Any) -> Any:
    """V (k, m), A's right-singular vectors as columns, singular values descending; m = min(r, k)."""
    xp = namespace(A)
    check_float_array("A", A, xp=xp, shape=(None, None))
    return xp.matrix_transpose(xp.linalg.svd(A, full_matrices=False)[2])


def subspace_similarity_grid(A1: Any, A2: Any) -> Any:
    """phi(A1, A2, i, j) for every i <= m1, j <= m2, as an (m1, m2) array: entry [i - 1, j - 1]."""
    xp = namespace(A1, A2)
    if A1.shape[-1] != A2.shape[-1]:
        raise ShapeError(f"A1 {tuple(A1.shape)} and A2 {tuple(A2.shape)} read different input sizes k")
    M = xp.matmul(xp.matrix_transpose(right_singular_vectors(A1)), right_singular_vectors(A2))   # (m1, m2)
    overlap = xp.cumulative_sum(xp.cumulative_sum(M * M, axis=0), axis=1)                    # ||V1^{iT} V2^j||_F^2
    m1, m2 = M.shape
    i = xp.reshape(xp.arange(1, m1 + 1, dtype=M.dtype), (m1, 1))
    j = xp.reshape(xp.arange(1, m2 + 1, dtype=M.dtype), (1, m2))
    return overlap / xp.minimum(i, j)


def subspace_similarity(A1: Any, A2: Any, i: int, j: int) -> float:
    """phi(A1, A2, i, j) (module docstring); RankError unless 1 <= i <= min(r1, k) and 1 <= j <= min(r2, k)."""
    m1, m2 = min(A1.shape), min(A2.shape)
    if not (1 <= i <= m1 and 1 <= j <= m2):
        raise RankError(f"(i, j) = ({i}, {j}) is outside 1..{m1} x 1..{m2}, the directions A1 and A2 hold")
    return float(subspace_similarity_grid(A1, A2)[i - 1, j - 1])


def random_subspace_similarity(k: int, i: int, j: int) -> float:
    """E phi for independent uniformly random i- and j-dimensional subspaces of R^k: max(i, j) / k."""
    if not (1 <= i <= k and 1 <= j <= k):
        raise RankError(f"subspaces of dimensions {i} and {j} do not fit in R^{k}")
    return max(i, j) / k


@dataclass(frozen=True)
class Amplification:
    """Section 7.3's numbers for one module: the factor and its inputs (Frobenius norms)."""

    rank: int                # the top directions of Delta W used for U, V
    delta_norm: float        # ||Delta W||_F
    projected_norm: float    # ||U^T W V||_F: W on Delta W's top directions
    weight_top_norm: float   # ||U_W^T W V_W||_F: W on its own top `rank` directions
    factor: float            # delta_norm / projected_norm (inf when W has nothing in those directions)


def amplification_factor(W: Any, A: Any, B: Any, *, scaling: float = 1.0, rank: int | None = None) -> Amplification:
    """||Delta W||_F / ||U^T W V||_F for Delta W = s B A against the frozen W (d, k) (module docstring).

    `rank` (default: all of Delta W's directions) picks U, V from Delta W's top singular directions;
    ||Delta W||_F is always the whole update's, as in the paper.
    """
    xp = namespace(W, A, B)
    check_float_array("W", W, xp=xp, shape=(B.shape[0], A.shape[-1]))
    svd = factored_svd(A, B, scaling=scaling)                                   # never forms Delta W
    rank = svd.max_rank if rank is None else rank
    if not 1 <= rank <= svd.max_rank:
        raise RankError(f"rank {rank} is outside 1..{svd.max_rank}, the directions Delta W has")
    U, Vh = svd.U[:, :rank], svd.Vh[:rank, :]                                   # (d, rank), (rank, k)
    projected = xp.matmul(xp.matmul(xp.matrix_transpose(U), W), xp.matrix_transpose(Vh))   # (rank, rank)
    delta_norm = float(xp.sqrt(xp.sum(svd.S * svd.S)))
    projected_norm = float(xp.sqrt(xp.sum(projected * projected)))
    top = xp.linalg.svdvals(W)[:rank]
    return Amplification(rank=rank, delta_norm=delta_norm, projected_norm=projected_norm,
                         weight_top_norm=float(xp.sqrt(xp.sum(top * top))),
                         factor=delta_norm / projected_norm if projected_norm > 0 else math.inf)


def random_orthonormal(n: int, m: int, *, seed: int) -> np.ndarray:
    """(n, m) with orthonormal columns spanning a uniformly random m-dimensional subspace (QR of a Gaussian)."""
    if not 1 <= m <= n:
        raise RankError(f"cannot fit {m} orthonormal columns in R^{n}")
    Q, R = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, m)))
    return Q * np.sign(np.diag(R))                                              # Haar: fix QR's sign choice


@dataclass(frozen=True)
class DecompositionChange:
    """The DoRA paper's per-module change of a tuned weight against its base (module docstring)."""

    magnitude_change: float   # Delta M: mean | ||W'_i|| - ||W0_i|| | over the d rows
    direction_change: float   # Delta D: mean (1 - cos(W'_i, W0_i)) over the d rows


def decomposition_change(W0: Any, W: Any) -> DecompositionChange:
    """Delta M and Delta D of the tuned W (d, k) against the base W0 (d, k); ShapeError on a size
    mismatch, RankError when a row of W0 or W is zero (it has no direction)."""
    xp = namespace(W0, W)
    check_float_array("W0", W0, xp=xp, shape=(None, None))
    check_float_array("W", W, xp=xp, shape=tuple(W0.shape))
    norm0 = xp.linalg.vector_norm(W0, axis=1)
    norm = xp.linalg.vector_norm(W, axis=1)
    if bool(xp.any(norm0 == 0)) or bool(xp.any(norm == 0)):
        raise RankError("a row of the weight is zero: its direction, and so Delta D, is undefined")
    cosine = xp.sum(W * W0, axis=1) / (norm * norm0)
    return DecompositionChange(magnitude_change=float(xp.mean(xp.abs(norm - norm0))),
                               direction_change=float(xp.mean(1 - cosine)))
