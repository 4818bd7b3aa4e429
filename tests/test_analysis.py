"""The LoRA paper's section 7 analyses: phi's defining properties and random baseline, the amplification factor."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refpeft.analysis import amplification_factor, random_orthonormal, random_subspace_similarity, \
    subspace_similarity, subspace_similarity_grid
from refpeft.errors import RankError, ShapeError
from support import BACKENDS, BACKEND_IDS, assert_close

FAST = settings(max_examples=30, deadline=None)


@st.composite
def adapter_pairs(draw):
    k = draw(st.integers(2, 12))
    r1, r2 = draw(st.integers(1, k)), draw(st.integers(1, k))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng, rng.standard_normal((r1, k)), rng.standard_normal((r2, k))


@FAST
@given(adapter_pairs())
def test_phi_is_in_0_1_symmetric_and_one_on_identical_subspaces(pair):
    rng, A1, A2 = pair
    grid = subspace_similarity_grid(A1, A2)
    assert grid.shape == (A1.shape[0], A2.shape[0])
    assert np.all(grid >= -1e-12) and np.all(grid <= 1 + 1e-12)
    assert_close(subspace_similarity_grid(A2, A1), grid.T, rtol=1e-12)          # phi(A1, A2, i, j) = phi(A2, A1, j, i)
    assert_close(np.diag(subspace_similarity_grid(A1, A1)), np.ones(A1.shape[0]), rtol=1e-12)


@FAST
@given(adapter_pairs())
def test_phi_depends_only_on_the_subspaces(pair):
    """A1 -> G A1 (G invertible) keeps A1's row space; with A1 of full row rank every top-i span it has is
    the whole row space when i = r1, so phi(., ., r1, j) is invariant; a sign flip keeps every phi."""
    rng, A1, A2 = pair
    r1 = A1.shape[0]
    G = rng.standard_normal((r1, r1)) + 3 * np.eye(r1)
    full = subspace_similarity_grid(A1, A2)[-1]
    assert_close(subspace_similarity_grid(G @ A1, A2)[-1], full, rtol=1e-8)
    assert_close(subspace_similarity_grid(-A1, A2), subspace_similarity_grid(A1, A2), rtol=1e-12)


def test_phi_is_zero_on_orthogonal_subspaces_and_one_on_nested_ones():
    e = np.eye(6)
    assert subspace_similarity(e[:2], e[2:5], 2, 3) == 0.0
    assert subspace_similarity(np.diag([3.0, 2.0, 1.0]) @ e[:3], e[:2] * [[5.0], [4.0]], 2, 2) == pytest.approx(1.0)
    assert subspace_similarity(e[:1] * 2.0, e[:4], 1, 4) == pytest.approx(1.0)   # span(e1) lies inside span(e1..e4)


@pytest.mark.parametrize("i, j", [(1, 1), (2, 5), (4, 4)])
def test_phi_of_random_subspaces_averages_max_i_j_over_k(i, j):
    k, samples = 16, 2000
    phis = [subspace_similarity(random_orthonormal(k, i, seed=2 * s).T, random_orthonormal(k, j, seed=2 * s + 1).T, i, j)
            for s in range(samples)]
    mean, sem = np.mean(phis), np.std(phis) / np.sqrt(samples)
    assert abs(mean - random_subspace_similarity(k, i, j)) < 4 * sem + 1e-12


def test_amplification_is_small_along_the_top_directions_and_large_along_random_ones():
    rng = np.random.default_rng(0)
    d, k, r = 40, 30, 4
    U_W, S_W, Vh_W = np.linalg.svd(rng.standard_normal((d, r)) @ rng.standard_normal((r, k)) * 3
                                   + 0.01 * rng.standard_normal((d, k)), full_matrices=False)
    W = U_W @ np.diag(S_W) @ Vh_W
    aligned = amplification_factor(W, Vh_W[:r], U_W[:, :r] * 0.5)               # Delta W on W's top directions
    A_rand, B_rand = random_orthonormal(k, r, seed=1).T, random_orthonormal(d, r, seed=2) * 0.5
    random = amplification_factor(W, A_rand, B_rand)
    assert aligned.delta_norm == pytest.approx(random.delta_norm)               # the same size of update
    assert aligned.projected_norm == pytest.approx(aligned.weight_top_norm)     # the largest projection there is
    assert random.factor > 4 * aligned.factor                                   # ~ sqrt(d k) / r = 8.7 expected
    assert amplification_factor(W, A_rand, B_rand, scaling=3.0).factor == pytest.approx(3 * random.factor)
    assert amplification_factor(W, A_rand, B_rand, rank=2).rank == 2


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_analyses_run_on_every_backend(backend):
    rng = np.random.default_rng(3)
    A1, A2, W, B = rng.standard_normal((3, 7)), rng.standard_normal((5, 7)), rng.standard_normal((6, 7)), \
        rng.standard_normal((6, 3))
    assert_close(subspace_similarity_grid(backend(A1), backend(A2)), subspace_similarity_grid(A1, A2), rtol=1e-12,
                 like=backend(A1))
    assert amplification_factor(backend(W), backend(A1), backend(B)).factor == \
        pytest.approx(amplification_factor(W, A1, B).factor, rel=1e-12)


def test_bad_input_raises_refpeft_errors():
    with pytest.raises(ShapeError, match="different input sizes"):
        subspace_similarity_grid(np.ones((2, 5)), np.ones((2, 4)))
    with pytest.raises(RankError, match="outside"):
        subspace_similarity(np.eye(4)[:2], np.eye(4)[:3], 3, 1)
    with pytest.raises(RankError, match="outside"):
        amplification_factor(np.ones((3, 4)), np.eye(4)[:2], np.ones((3, 2)), rank=3)
