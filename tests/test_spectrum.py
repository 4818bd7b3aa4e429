"""refpeft.spectrum: the factored thin SVD is an SVD of s B A, Eckart-Young, energy and rank choice."""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.errors import ConfigError, NonFiniteError, RankError, ShapeError
from refpeft.spectrum import choose_rank, compression_report, energy_curve, factored_svd, product_norm, \
    rank_for_energy, singular_values


def factors(R=5, k=30, d=20, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((R, k)), rng.standard_normal((d, R))


def test_factored_svd_is_a_thin_svd_of_the_product():
    A, B = factors()
    svd = factored_svd(A, B, scaling=0.5)
    delta = 0.5 * B @ A
    assert svd.U.shape == (20, 5) and svd.S.shape == (5,) and svd.Vh.shape == (5, 30)
    assert np.allclose(svd.U.T @ svd.U, np.eye(5), atol=1e-12)
    assert np.allclose(svd.Vh @ svd.Vh.T, np.eye(5), atol=1e-12)
    assert np.all(np.diff(svd.S) <= 0)
    assert np.allclose((svd.U * svd.S) @ svd.Vh, delta, atol=1e-12 * np.abs(delta).max())
    assert np.allclose(svd.S, np.linalg.svd(delta, compute_uv=False)[:5], rtol=1e-12)
    assert np.allclose(singular_values(A, B, scaling=0.5), svd.S, rtol=1e-12)


def test_truncation_reaches_the_eckart_young_floor():
    A, B = factors()
    svd = factored_svd(A, B)
    delta = B @ A
    for r in range(1, 6):
        A_r, B_r = svd.truncate(r)
        assert A_r.shape == (r, 30) and B_r.shape == (20, r)
        error = np.linalg.norm(delta - B_r @ A_r)
        assert error == pytest.approx(np.sqrt(np.sum(svd.S[r:] ** 2)), abs=1e-10)
    for bad in (0, 6):
        with pytest.raises(RankError):
            svd.truncate(bad)


def test_product_norm_is_the_frobenius_norm():
    A, B = factors(seed=1)
    assert product_norm(B, A) == pytest.approx(np.linalg.norm(B @ A), rel=1e-12)


def test_energy_curve_and_rank_for_energy():
    S = np.array([3.0, 2.0, 1.0, 0.0])
    E = energy_curve(S)
    assert np.allclose(E, [9 / 14, 13 / 14, 1.0, 1.0], rtol=1e-15) and E[-1] == 1.0
    assert [rank_for_energy(S, f) for f in (0.5, 9 / 14, 0.9, 0.95, 1.0)] == [1, 1, 2, 3, 3]
    assert np.all(energy_curve(np.zeros(3)) == 1.0) and rank_for_energy(np.zeros(3), 0.9) == 0
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="energy fraction"):
            rank_for_energy(S, bad)


def test_choose_rank():
    S = np.array([3.0, 2.0, 1.0])
    assert choose_rank(S, rank=None, energy=None, default=2) == 2
    assert choose_rank(S, rank=10, energy=None, default=2) == 3       # clipped to the spectrum
    assert choose_rank(S, rank=None, energy=0.9, default=1) == 2
    with pytest.raises(ConfigError, match="not both"):
        choose_rank(S, rank=1, energy=0.5, default=1)
    with pytest.raises(RankError):
        choose_rank(S, rank=0, energy=None, default=1)


def test_compression_report():
    S = np.array([3.0, 2.0, 1.0])
    report = compression_report(S, 1, error=np.sqrt(5.0))
    assert report.optimal_error == pytest.approx(np.sqrt(5.0)) and report.discarded_energy == pytest.approx(5 / 14)
    assert report.relative_error == pytest.approx(np.sqrt(5 / 14))
    assert compression_report(S, 1, error=1.0, norm=10.0).optimal_error is None


def test_refusals():
    A, B = factors()
    with pytest.raises(ShapeError, match="inner rank"):
        factored_svd(A, B[:, :4])
    with np.errstate(over="ignore"), pytest.raises(NonFiniteError, match="overflows"):
        singular_values(A * 1e200, B * 1e200)
