"""Extracting a LoRA from a fully fine-tuned weight: the truncated SVD of W - W0, exact or randomized.

The fine-tuned change of a layer is the dense matrix (letters as in refpeft.methods.linear)

    Delta = W - W0                                        (d, k)

and by Eckart-Young-Mirsky its best rank-r approximation in the Frobenius norm is the truncated
SVD Delta_r = U_r S_r V_r^T, with error sqrt(sum_{i > r} S_i^2). The adapter is PEFT's split of
it (the same as `svd` fusion, refpeft.fusion): B = U_r S_r (d, r), A = V_r^T (r, k), alpha = r,
so s = 1 and s B A = Delta_r. The rank is given, or the smallest keeping a fraction of the
energy (refpeft.spectrum.rank_for_energy).

method="svd": the thin SVD of Delta (LAPACK on NumPy): O(d k min(d, k)) time, exact spectrum.

method="randomized": Halko, Martinsson and Tropp (2011), Algorithm 4.4 (randomized subspace
iteration) then Algorithm 5.1, with l = r + oversample columns:

    Omega ~ N(0, 1)                     (k, l)   from numpy.random.default_rng(seed), host side
    Q     = qr(Delta Omega)             (d, l)   an orthonormal basis of Delta's range, roughly
    repeat q = power_iterations times:           each pass raises the spectrum's decay to the
        Q = qr(Delta qr(Delta^T Q))              power 2q + 1; re-orthonormalised every time
    C     = Q^T Delta                   (l, k)
    C     = U_c S V^T                            a small SVD
    U     = Q U_c                       (d, l)   then truncate to rank r

Cost O(d k l (2q + 2)) instead of O(d k min(d, k)). Only the top l singular values are estimated,
so the report's error is *measured* on the formed residual ||Delta - B A||_F (Delta is dense
anyway) and the optimum is left unknown; compare with method="svd" where it is affordable.

Numeric choices: the computation runs in the weights' dtype; an energy target needs the whole
spectrum, so it requires method="svd".
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.backend import check_float_array, from_numpy, namespace, same_dtype
from refpeft.errors import ConfigError, ShapeError
from refpeft.methods.linear import weight_rows
from refpeft.spectrum import CompressionReport, ThinSVD, choose_rank, compression_report, thin_svd

EXTRACTION_METHODS = ("svd", "randomized")


def extract_lora(W: Any, W0: Any, *, rank: int | None = None, energy: float | None = None, method: str = "svd",
                 oversample: int = 10, power_iterations: int = 2, seed: int = 0,
                 fan_in_fan_out: bool = False) -> tuple[ModuleAdapter, CompressionReport]:
    """A LoRA (alpha = r, scaling 1) whose B A is the truncated SVD of W - W0, and its error report.

    W and W0 share W0's layout ((d, k), or (k, d) with fan_in_fan_out); the factors are PyTorch's
    (r, k) / (d, r) either way. Give `rank`, or `energy` (method="svd" only).
    """
    xp = namespace(W, W0)
    check_float_array("W", W, xp=xp, shape=(None, None))
    check_float_array("W0", W0, xp=xp, shape=tuple(W.shape))
    same_dtype({"W": W, "W0": W0})
    if method not in EXTRACTION_METHODS:
        raise ConfigError(f"unknown extraction method {method!r}; choose one of {', '.join(EXTRACTION_METHODS)}")
    if rank is None and energy is None:
        raise ConfigError("give the adapter's rank or the energy fraction it must keep")
    delta = weight_rows(W, fan_in_fan_out=fan_in_fan_out, xp=xp) - \
        weight_rows(W0, fan_in_fan_out=fan_in_fan_out, xp=xp)              # (d, k)
    if method == "svd":
        svd = thin_svd(delta)
        r = choose_rank(svd.S, rank=rank, energy=energy, default=1)
        A, B = svd.truncate(r)
        report = compression_report(svd.S, r, error=_residual_norm(delta, A, B, xp=xp))
    else:
        if energy is not None:
            raise ConfigError("an energy target needs the whole spectrum: use method='svd', or give a rank")
        if oversample < 0 or power_iterations < 0:
            raise ConfigError(f"oversample and power_iterations must be >= 0, got {oversample}, {power_iterations}")
        svd = randomized_svd(delta, rank=min(rank + oversample, *delta.shape), power_iterations=power_iterations,
                             seed=seed)
        r = choose_rank(svd.S, rank=rank, energy=None, default=1)
        A, B = svd.truncate(r)
        norm = float(xp.linalg.matrix_norm(delta, ord="fro"))
        report = compression_report(svd.S, r, error=_residual_norm(delta, A, B, xp=xp), norm=norm)
    return ModuleAdapter("lora", {"A": A, "B": B}, alpha=float(r), fan_in_fan_out=fan_in_fan_out), report


def randomized_svd(M: Any, *, rank: int, power_iterations: int = 2, seed: int = 0) -> ThinSVD:
    """An approximate thin SVD of M (d, k) with `rank` components (Halko et al.; module doc)."""
    xp = namespace(M)
    check_float_array("M", M, xp=xp, shape=(None, None))
    d, k = M.shape
    if not 1 <= rank <= min(d, k):
        raise ShapeError(f"randomized SVD rank {rank} must be in 1..min(d, k) = {min(d, k)}")
    omega = from_numpy(np.random.default_rng(seed).standard_normal((k, rank)), xp=xp, like=M)
    Q, _ = xp.linalg.qr(xp.matmul(M, xp.astype(omega, M.dtype)))                      # (d, l)
    Mt = xp.matrix_transpose(M)
    for _ in range(power_iterations):
        P, _ = xp.linalg.qr(xp.matmul(Mt, Q))                                          # (k, l)
        Q, _ = xp.linalg.qr(xp.matmul(M, P))                                           # (d, l)
    U_c, S, Vh = xp.linalg.svd(xp.matmul(xp.matrix_transpose(Q), M), full_matrices=False)   # (l, l), (l,), (l, k)
    return ThinSVD(U=xp.matmul(Q, U_c), S=S, Vh=Vh)


def extract_adapter(finetuned: Mapping[str, Any], base: Mapping[str, Any], *, rank: int | None = None,
                    energy: float | None = None, method: str = "svd", oversample: int = 10,
                    power_iterations: int = 2, seed: int = 0,
                    fan_in_fan_out: bool = False) -> tuple[Adapter, dict[str, CompressionReport]]:
    """`extract_lora` for every layer path of `finetuned` (each must exist in `base`)."""
    missing = sorted(set(finetuned) - set(base))
    if missing:
        raise ConfigError(f"no base weight for {', '.join(missing)}")
    modules, reports = {}, {}
    for path, W in finetuned.items():
        modules[path], reports[path] = extract_lora(
            W, base[path], rank=rank, energy=energy, method=method, oversample=oversample,
            power_iterations=power_iterations, seed=seed, fan_in_fan_out=fan_in_fan_out)
    return Adapter(modules=modules), reports


def _residual_norm(delta: Any, A: Any, B: Any, *, xp: Any) -> float:
    """||Delta - B A||_F on the formed residual (one more d x k array; Delta is dense already)."""
    return float(xp.linalg.matrix_norm(delta - xp.matmul(B, A), ord="fro"))
