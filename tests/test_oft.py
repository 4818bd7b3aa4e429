"""OFT: gradients (through the Cayley transform) vs finite differences, orthogonality, merge properties, bad input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refpeft.errors import ConfigError, ShapeError
from refpeft.methods.oft import (oft_backward, oft_block_size, oft_blocks, oft_coft_project, oft_delta_weight,
                                 oft_forward, oft_init, oft_merge, oft_neumann_coefficients, oft_parameter_count,
                                 oft_rotation, oft_rotation_matrix, oft_skew, oft_unmerge)
from refpeft.methods.oft_bounds import oft_forward_bound, oft_merge_bound
from refpeft.tolerance import compare
from support import BACKENDS, BACKEND_IDS, assert_close, vjp_check

FAST = settings(max_examples=30, deadline=None)


@dataclass(frozen=True)
class OftCase:
    batch: tuple[int, ...]
    b: int                 # block size
    nb: int                # blocks: k = nb * b
    d: int
    block_share: bool
    cayley: str
    terms: int
    bias: bool
    fan_in_fan_out: bool
    seed: int

    @property
    def k(self) -> int:
        return self.nb * self.b

    def arrays(self, scale: float = 0.3) -> dict:
        rng = np.random.default_rng(self.seed)
        m, n = (1 if self.block_share else self.nb), self.b * (self.b - 1) // 2
        return {"x": rng.standard_normal((*self.batch, self.k)),
                "W0": rng.standard_normal((self.k, self.d) if self.fan_in_fan_out else (self.d, self.k)),
                "V": scale * rng.standard_normal((m, n)), "bias": rng.standard_normal(self.d),
                "dy": rng.standard_normal((*self.batch, self.d))}


@st.composite
def oft_cases(draw, *, cayley: str | None = None) -> OftCase:
    return OftCase(batch=tuple(draw(st.lists(st.integers(1, 3), max_size=2))), b=draw(st.integers(2, 5)),
                   nb=draw(st.integers(1, 4)), d=draw(st.integers(1, 8)), block_share=draw(st.booleans()),
                   cayley=cayley or draw(st.sampled_from(["neumann", "exact"])), terms=draw(st.integers(1, 7)),
                   bias=draw(st.booleans()), fan_in_fan_out=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


def _options(case: OftCase) -> dict:
    return {"cayley": case.cayley, "terms": case.terms, "fan_in_fan_out": case.fan_in_fan_out}


@FAST
@given(oft_cases())
def test_oft_gradients_match_finite_differences_through_the_cayley_transform(case):
    a = case.arrays()
    bias = a["bias"] if case.bias else None

    def f(x, oft_R, bias=None):
        return oft_forward(x, a["W0"], oft_R, bias=bias, **_options(case))[0]

    _, cache = oft_forward(a["x"], a["W0"], a["V"], bias=bias, bias_trainable=case.bias, **_options(case))
    g = oft_backward(a["dy"], cache)
    inputs, wanted = {"x": a["x"], "oft_R": a["V"]}, {"x": g.dx, "oft_R": g.doft_R}
    if case.bias:
        inputs["bias"], wanted["bias"] = bias, g.dbias
    vjp_check(f, inputs, wanted, a["dy"], tol=1e-7)


@FAST
@given(oft_cases(cayley="exact"), st.floats(0.01, 3.0))
def test_the_exact_cayley_rotation_is_orthogonal_to_rounding(case, size):
    V = case.arrays(scale=size)["V"]
    R = oft_rotation(oft_skew(V, xp=np), cayley="exact")
    eye = np.broadcast_to(np.eye(case.b), R.shape)
    assert_close(np.matmul(np.swapaxes(R, -1, -2), R), eye, rtol=1e-13 * (1 + size) ** 2)
    Rk = oft_rotation_matrix(V, case.k, cayley="exact")
    assert_close(Rk.T @ Rk, np.eye(case.k), rtol=1e-13 * (1 + size) ** 2)


def test_the_neumann_series_is_orthogonal_only_to_its_truncation_order():
    Q = oft_skew(np.array([[1e-2, -2e-2, 3e-2]]), xp=np)
    for terms, order in ((3, 3), (5, 4), (8, 7)):
        R = oft_rotation(Q, terms=terms)
        err = np.abs(R[0].T @ R[0] - np.eye(3)).max()
        assert 1e-3 ** order < err < 1e-1 ** order       # a truncation, not rounding: |Q|^order-sized
    assert oft_neumann_coefficients(3) == oft_neumann_coefficients(4) == [1.0, 2.0, 2.0, 1.0]


@FAST
@given(oft_cases())
def test_merged_forward_equals_unmerged_within_the_bound(case):
    a = {n: v.astype(np.float32).astype(np.float64) for n, v in case.arrays().items()}   # exact in float32
    bias = a["bias"] if case.bias else None
    y, _ = oft_forward(a["x"], a["W0"], a["V"], bias=bias, **_options(case))
    W = oft_merge(a["W0"], a["V"], **_options(case))
    y_merged, _ = oft_forward(a["x"], W, np.zeros_like(a["V"]), bias=bias, fan_in_fan_out=case.fan_in_fan_out)
    assert_close(y_merged, y, rtol=1e-12)
    assert_close(oft_delta_weight(a["W0"], a["V"], **_options(case)), W - a["W0"], rtol=0.0)
    if case.cayley == "neumann":
        bound = oft_forward_bound(a["x"], a["W0"], a["V"], bias=bias, terms=case.terms,
                                  fan_in_fan_out=case.fan_in_fan_out, dtype="float32")
        y32, _ = oft_forward(*(a[n].astype(np.float32) for n in ("x", "W0", "V")), terms=case.terms,
                             bias=None if bias is None else bias.astype(np.float32), fan_in_fan_out=case.fan_in_fan_out)
        assert compare(y32, y, bound).passed
        merge_bound = oft_merge_bound(a["W0"], a["V"], terms=case.terms, fan_in_fan_out=case.fan_in_fan_out)
        W32 = oft_merge(a["W0"].astype(np.float32), a["V"].astype(np.float32), **_options(case))
        assert compare(W32, W, merge_bound).passed


@FAST
@given(oft_cases())
def test_unmerge_undoes_merge(case):
    a = case.arrays()
    W = oft_merge(a["W0"], a["V"], **_options(case))
    assert_close(oft_unmerge(W, a["V"], **_options(case)), a["W0"], rtol=1e-12)
    assert case.terms == 1 or not np.allclose(W, a["W0"])      # a real rotation (T = 1 truncates R to I)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("cayley", ["neumann", "exact"])
def test_forward_backward_and_merge_run_on_every_backend(backend, cayley):
    case = OftCase(batch=(2,), b=3, nb=2, d=4, block_share=False, cayley=cayley, terms=5, bias=True,
                   fan_in_fan_out=False, seed=1)
    a = case.arrays()
    y, cache = oft_forward(a["x"], a["W0"], a["V"], bias=a["bias"], cayley=cayley)
    g = oft_backward(a["dy"], cache)
    args = {n: backend(a[n]) for n in ("x", "W0", "V", "bias", "dy")}
    y_b, cache_b = oft_forward(args["x"], args["W0"], args["V"], bias=args["bias"], cayley=cayley)
    g_b = oft_backward(args["dy"], cache_b)
    assert_close(y_b, y, rtol=1e-14, like=args["x"])
    assert_close(g_b.doft_R, g.doft_R, rtol=1e-13, like=args["V"])
    assert_close(g_b.dx, g.dx, rtol=1e-13, like=args["x"])
    assert_close(oft_merge(args["W0"], args["V"], cayley=cayley), oft_merge(a["W0"], a["V"], cayley=cayley),
                 rtol=1e-14, like=args["W0"])


def test_initial_oft_is_the_identity_and_counts_its_parameters():
    x, W0 = np.random.default_rng(0).standard_normal((3, 12)), np.random.default_rng(1).standard_normal((5, 12))
    V = oft_init(12, 4)
    assert V.shape == (3, 6) and oft_parameter_count(12, 4) == V.size == 18
    assert oft_init(12, 4, block_share=True).shape == (1, 6) and oft_parameter_count(12, 4, block_share=True) == 6
    assert_close(oft_forward(x, W0, V)[0], x @ W0.T, rtol=1e-15)


def test_coft_projects_each_block_onto_the_eps_ball():
    V = np.array([[3.0, 4.0, 0.0], [1e-4, 0.0, 0.0]])
    P = oft_coft_project(V, 0.5)
    radius = float(np.float32(1.0) / np.sqrt(np.float32(2.0)) * np.float32(0.5))
    assert np.sqrt(2.0) * np.linalg.norm(P[0]) == pytest.approx(radius, rel=1e-15)
    assert_close(P[0] / np.linalg.norm(P[0]), V[0] / 5.0, rtol=1e-15)
    assert (P[1] == V[1]).all()                                       # inside the ball: unchanged
    _, cache = oft_forward(np.ones((1, 6)), np.ones((2, 6)), V, coft=True, eps=0.5)
    assert_close(cache.V, P, rtol=0.0)


def test_bad_block_sizes_and_variants_raise_refpeft_errors():
    x, W0 = np.ones((2, 10)), np.ones((3, 10))
    with pytest.raises(ShapeError, match="does not divide"):
        oft_forward(x, W0, np.zeros((3, 3)))               # b = 3 does not divide k = 10
    with pytest.raises(ShapeError, match="not b \\(b - 1\\) / 2"):
        oft_block_size(4)
    with pytest.raises(ShapeError, match="needs 5"):
        oft_blocks(10, np.zeros((3, 1)))
    with pytest.raises(ConfigError, match="Cayley variant"):
        oft_forward(x, W0, np.zeros((5, 1)), cayley="pade")
    with pytest.raises(ConfigError, match="divide k = 10"):
        oft_init(10, 4)
