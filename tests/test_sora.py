"""SORA (no peer library has it): gradients vs finite differences through the Cayley rotation, R orthogonal,
merge properties, SORA with R = I is Pre-Diag, identity init, bad input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refpeft.errors import ConfigError, NonFiniteError, ShapeError
from refpeft.methods.lora import lora_forward
from refpeft.methods.oft import oft_rotation_matrix
from refpeft.methods.prediag import prediag_forward
from refpeft.methods.sora import SORA, sora_backward, sora_forward, sora_forward_bound, sora_init, sora_merge, \
    sora_merge_bound, sora_parameter_count, sora_rotation, sora_unmerge
from refpeft.tolerance import compare
from support import BACKENDS, BACKEND_IDS, assert_close, vjp_check

FAST = settings(max_examples=30, deadline=None)


@dataclass(frozen=True)
class SoraCase:
    batch: tuple[int, ...]
    k: int
    b: int
    nb: int
    r: int
    bias: bool
    dropout: bool
    fan_in_fan_out: bool
    seed: int

    @property
    def d(self) -> int:
        return self.b * self.nb

    def arrays(self, size: float = 0.4) -> dict:
        rng = np.random.default_rng(self.seed)
        d, k = self.d, self.k
        return {"x": rng.standard_normal((*self.batch, k)),
                "W0": rng.standard_normal((k, d) if self.fan_in_fan_out else (d, k)),
                "A": rng.standard_normal((self.r, k)), "B": rng.standard_normal((d, self.r)),
                "s": rng.uniform(0.5, 1.5, d), "V": size * rng.standard_normal((self.nb, self.b * (self.b - 1) // 2)),
                "bias": rng.standard_normal(d), "mask": (rng.random((*self.batch, k)) > 0.3) / 0.7,
                "dy": rng.standard_normal((*self.batch, d))}


@st.composite
def sora_cases(draw) -> SoraCase:
    return SoraCase(batch=tuple(draw(st.lists(st.integers(1, 3), max_size=2))), k=draw(st.integers(1, 7)),
                    b=draw(st.integers(2, 4)), nb=draw(st.integers(1, 3)), r=draw(st.integers(1, 3)),
                    bias=draw(st.booleans()), dropout=draw(st.booleans()), fan_in_fan_out=draw(st.booleans()),
                    seed=draw(st.integers(0, 2**32 - 1)))


@FAST
@given(sora_cases())
def test_sora_gradients_match_finite_differences_through_the_rotation(case):
    a = case.arrays()
    opts = {"scaling": 0.8, "fan_in_fan_out": case.fan_in_fan_out, "dropout_mask": a["mask"] if case.dropout else None}

    def f(x, A, B, sora_s, sora_R, bias=None):
        return sora_forward(x, a["W0"], A, B, sora_s, sora_R, bias=bias, **opts)[0]

    _, cache = sora_forward(a["x"], a["W0"], a["A"], a["B"], a["s"], a["V"], bias=a["bias"] if case.bias else None,
                            bias_trainable=case.bias, **opts)
    g = sora_backward(a["dy"], cache)
    inputs = {"x": a["x"], "A": a["A"], "B": a["B"], "sora_s": a["s"], "sora_R": a["V"]}
    wanted = {"x": g.dx, "A": g.dA, "B": g.dB, "sora_s": g.dsora_s, "sora_R": g.dsora_R}
    if case.bias:
        inputs["bias"], wanted["bias"] = a["bias"], g.dbias
    vjp_check(f, inputs, wanted, a["dy"])


@FAST
@given(sora_cases(), st.floats(0.01, 3.0))
def test_R_is_orthogonal_for_any_skew_parameters(case, size):
    V = case.arrays(size=size)["V"]
    _, R = sora_rotation(V)
    assert_close(np.matmul(np.swapaxes(R, -1, -2), R), np.broadcast_to(np.eye(case.b), R.shape),
                 rtol=1e-13 * (1 + size) ** 2)
    assert np.all(np.linalg.det(R) > 0)                 # a rotation: Cayley never reaches a reflection


@FAST
@given(sora_cases())
def test_merged_forward_equals_unmerged_within_the_bound_and_unmerge_undoes_merge(case):
    a = {n: v.astype(np.float32).astype(np.float64) for n, v in case.arrays().items()}    # exact in float32
    bias = a["bias"] if case.bias else None
    opts = {"scaling": 0.5, "fan_in_fan_out": case.fan_in_fan_out}
    args = (a["A"], a["B"], a["s"], a["V"])
    y, _ = sora_forward(a["x"], a["W0"], *args, bias=bias, **opts)
    W = sora_merge(a["W0"], *args, **opts)
    y_merged, _ = lora_forward(a["x"], W, a["A"], np.zeros_like(a["B"]), scaling=0.0, bias=bias,
                               fan_in_fan_out=case.fan_in_fan_out)
    assert_close(y_merged, y, rtol=1e-12)
    assert_close(sora_unmerge(W, *args, **opts), a["W0"], rtol=1e-12)
    R = oft_rotation_matrix(a["V"], case.d, cayley="exact")           # the definition, formed in full
    W_rows = a["W0"].T if case.fan_in_fan_out else a["W0"]
    expected = a["s"][:, None] * (R @ W_rows) + 0.5 * a["B"] @ a["A"]
    assert_close(W, expected.T if case.fan_in_fan_out else expected, rtol=1e-12)
    f32 = {n: v.astype(np.float32) for n, v in a.items()}
    y32, _ = sora_forward(f32["x"], f32["W0"], f32["A"], f32["B"], f32["s"], f32["V"],
                          bias=None if bias is None else f32["bias"], **opts)
    assert compare(y32, y, sora_forward_bound(a["x"], a["W0"], *args, bias=bias, **opts)).passed
    W32 = sora_merge(f32["W0"], f32["A"], f32["B"], f32["s"], f32["V"], **opts)
    assert compare(W32, W, sora_merge_bound(a["W0"], *args, **opts)).passed


@FAST
@given(sora_cases())
def test_sora_without_rotation_is_prediag(case):
    a = case.arrays()
    opts = {"scaling": 1.3, "fan_in_fan_out": case.fan_in_fan_out, "bias": a["bias"] if case.bias else None}
    y_sora, _ = sora_forward(a["x"], a["W0"], a["A"], a["B"], a["s"], np.zeros_like(a["V"]), **opts)
    y_prediag, _ = prediag_forward(a["x"], a["W0"], a["A"], a["B"], a["s"], **opts)
    assert_close(y_sora, y_prediag, rtol=1e-14)
    y_rotated, _ = sora_forward(a["x"], a["W0"], a["A"], a["B"], a["s"], a["V"], **opts)
    assert not np.allclose(y_rotated, y_prediag)       # a real rotation changes the output


def test_initial_sora_is_the_base_layer_and_counts_its_parameters():
    rng = np.random.default_rng(1)
    W0, x = rng.standard_normal((6, 5)), rng.standard_normal((3, 5))
    A, B, s, V = sora_init(5, 6, 2, 3, seed=4)
    assert V.shape == (2, 3)
    assert np.array_equal(sora_merge(W0, A, B, s, V, scaling=2.0), W0)
    assert_close(sora_forward(x, W0, A, B, s, V, scaling=2.0)[0], x @ W0.T, rtol=1e-15)
    assert sora_parameter_count(5, 6, 2, 3) == 2 * (5 + 6) + 6 + 2 * 3
    modules, _, _ = SORA.init_modules({"l": W0}, ranks={"l": 2}, alphas={"l": 4.0}, block_size=3)
    assert SORA.parameter_count(5, 6, modules["l"]) == sora_parameter_count(5, 6, 2, 3)
    assert SORA.peft_type is None


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_forward_backward_and_merge_run_on_every_backend(backend):
    raw = SoraCase(batch=(2,), k=5, b=2, nb=2, r=2, bias=False, dropout=False, fan_in_fan_out=False, seed=7).arrays()
    names = ("A", "B", "s", "V")
    a = {n: backend(v) for n, v in raw.items()}
    y, cache = sora_forward(a["x"], a["W0"], *(a[n] for n in names), scaling=0.5)
    y_ref, cache_ref = sora_forward(raw["x"], raw["W0"], *(raw[n] for n in names), scaling=0.5)
    assert_close(y, y_ref, rtol=1e-13, like=a["x"])
    assert_close(sora_backward(a["dy"], cache).dsora_R, sora_backward(raw["dy"], cache_ref).dsora_R,
                 rtol=1e-12, like=a["x"])
    W = sora_merge(a["W0"], *(a[n] for n in names), scaling=0.5)
    assert_close(sora_unmerge(W, *(a[n] for n in names), scaling=0.5), raw["W0"], rtol=1e-13, like=a["W0"])


def test_bad_input_raises_refpeft_errors():
    rng = np.random.default_rng(3)
    W0, A, B, x = rng.standard_normal((6, 5)), rng.standard_normal((2, 5)), rng.standard_normal((6, 2)), np.ones((1, 5))
    with pytest.raises(ShapeError, match="b to divide d"):
        sora_forward(x, W0, A, B, np.ones(6), np.zeros((1, 6)), scaling=1.0)    # block size 4 does not divide 6
    with pytest.raises(ConfigError, match="block size"):
        sora_init(5, 6, 2, 4)
    with pytest.raises(NonFiniteError, match="sora_s has 2 zero entries"):
        sora_unmerge(W0, A, B, np.array([1.0, 0.0, 2.0, 0.0, 1.0, 1.0]), np.zeros((3, 1)), scaling=1.0)
