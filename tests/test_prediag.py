"""Pre-Diag (no peer library has it): gradients vs finite differences, merge properties, identity init, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from refpeft.errors import NonFiniteError, ShapeError
from refpeft.methods.lora import lora_forward
from refpeft.methods.prediag import PREDIAG, prediag_backward, prediag_delta_weight, prediag_forward, \
    prediag_forward_bound, prediag_init, prediag_merge, prediag_merge_bound, prediag_parameter_count, prediag_unmerge
from refpeft.tolerance import compare
from strategies import layer_cases
from support import BACKENDS, BACKEND_IDS, assert_close, vjp_check

FAST = settings(max_examples=30, deadline=None)


def _arrays(case) -> dict:
    rng = np.random.default_rng(case.seed)
    return {"x": rng.standard_normal((*case.batch, case.k)),
            "W0": rng.standard_normal((case.k, case.d) if case.fan_in_fan_out else (case.d, case.k)),
            "A": rng.standard_normal((case.r, case.k)), "B": rng.standard_normal((case.d, case.r)),
            "D": rng.uniform(0.5, 1.5, case.d) * rng.choice([-1.0, 1.0], case.d), "bias": rng.standard_normal(case.d),
            "mask": (rng.random((*case.batch, case.k)) > 0.3) / 0.7, "dy": rng.standard_normal((*case.batch, case.d))}


@FAST
@given(layer_cases(max_features=12))
def test_prediag_gradients_match_finite_differences(case):
    a = _arrays(case)
    opts = {"scaling": 1.7, "fan_in_fan_out": case.fan_in_fan_out, "dropout_mask": a["mask"] if case.dropout else None}

    def f(x, A, B, prediag_D, bias=None):
        return prediag_forward(x, a["W0"], A, B, prediag_D, bias=bias, **opts)[0]

    inputs = {"x": a["x"], "A": a["A"], "B": a["B"], "prediag_D": a["D"]}
    _, cache = prediag_forward(a["x"], a["W0"], a["A"], a["B"], a["D"], bias=a["bias"] if case.bias else None,
                               bias_trainable=case.bias, **opts)
    g = prediag_backward(a["dy"], cache)
    wanted = {"x": g.dx, "A": g.dA, "B": g.dB, "prediag_D": g.dprediag_D}
    if case.bias:
        inputs["bias"], wanted["bias"] = a["bias"], g.dbias
    vjp_check(f, inputs, wanted, a["dy"])


@FAST
@given(layer_cases(max_features=12))
def test_merged_forward_equals_unmerged_within_the_bound_and_unmerge_undoes_merge(case):
    a = {n: v.astype(np.float32).astype(np.float64) for n, v in _arrays(case).items()}    # exact in float32
    bias = a["bias"] if case.bias else None
    opts = {"scaling": 0.5, "fan_in_fan_out": case.fan_in_fan_out}
    y, _ = prediag_forward(a["x"], a["W0"], a["A"], a["B"], a["D"], bias=bias, **opts)
    W = prediag_merge(a["W0"], a["A"], a["B"], a["D"], **opts)
    y_merged, _ = lora_forward(a["x"], W, a["A"], np.zeros_like(a["B"]), scaling=0.0, bias=bias,
                               fan_in_fan_out=case.fan_in_fan_out)
    assert_close(y_merged, y, rtol=1e-12)
    assert_close(prediag_unmerge(W, a["A"], a["B"], a["D"], **opts), a["W0"], rtol=1e-12)
    assert_close(prediag_delta_weight(a["W0"], a["A"], a["B"], a["D"], **opts), W - a["W0"], rtol=0.0)
    f32 = {n: v.astype(np.float32) for n, v in a.items()}
    y32, _ = prediag_forward(f32["x"], f32["W0"], f32["A"], f32["B"], f32["D"], bias=None if bias is None else
                             f32["bias"], **opts)
    assert compare(y32, y, prediag_forward_bound(a["x"], a["W0"], a["A"], a["B"], a["D"], bias=bias, **opts)).passed
    W32 = prediag_merge(f32["W0"], f32["A"], f32["B"], f32["D"], **opts)
    assert compare(W32, W, prediag_merge_bound(a["W0"], a["A"], a["B"], a["D"], **opts)).passed


def test_the_bound_is_not_vacuous():
    """A float32 result perturbed by more than the bound fails it: the check can fail."""
    rng = np.random.default_rng(0)
    x, W0, A, B, D = (rng.standard_normal(s) for s in ((3, 6), (5, 6), (2, 6), (5, 2), (5,)))
    y, _ = prediag_forward(x, W0, A, B, D, scaling=1.0)
    bound = prediag_forward_bound(x, W0, A, B, D, scaling=1.0)
    assert compare(y + 0.5 * bound, y, bound).passed and not compare(y + 3.0 * bound, y, bound).passed


def test_initial_prediag_is_the_base_layer_and_counts_its_parameters():
    rng = np.random.default_rng(1)
    W0, x = rng.standard_normal((4, 7)), rng.standard_normal((3, 7))
    A, B, D = prediag_init(7, 4, 2, seed=3)
    y, _ = prediag_forward(x, W0, A, B, D, scaling=2.0)
    assert np.array_equal(prediag_merge(W0, A, B, D, scaling=2.0), W0)
    assert_close(y, x @ W0.T, rtol=1e-15)
    assert prediag_parameter_count(7, 4, 2) == 2 * (7 + 4) + 4
    modules, _, _ = PREDIAG.init_modules({"l": W0}, ranks={"l": 2}, alphas={"l": 4.0})
    assert PREDIAG.parameter_count(7, 4, modules["l"]) == prediag_parameter_count(7, 4, 2)
    assert PREDIAG.peft_type is None                       # refpeft-only: no PEFT files hold it


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_forward_backward_and_merge_run_on_every_backend(backend):
    rng = np.random.default_rng(2)
    raw = {"x": rng.standard_normal((2, 3, 5)), "W0": rng.standard_normal((4, 5)), "A": rng.standard_normal((2, 5)),
           "B": rng.standard_normal((4, 2)), "D": rng.standard_normal(4), "dy": rng.standard_normal((2, 3, 4))}
    a = {n: backend(v) for n, v in raw.items()}
    y, cache = prediag_forward(a["x"], a["W0"], a["A"], a["B"], a["D"], scaling=0.5)
    y_ref, cache_ref = prediag_forward(raw["x"], raw["W0"], raw["A"], raw["B"], raw["D"], scaling=0.5)
    assert_close(y, y_ref, rtol=1e-13, like=a["x"])
    assert_close(prediag_backward(a["dy"], cache).dprediag_D, prediag_backward(raw["dy"], cache_ref).dprediag_D,
                 rtol=1e-13, like=a["x"])
    W = prediag_merge(a["W0"], a["A"], a["B"], a["D"], scaling=0.5)
    assert_close(prediag_unmerge(W, a["A"], a["B"], a["D"], scaling=0.5), raw["W0"], rtol=1e-13, like=a["W0"])


def test_bad_input_raises_refpeft_errors():
    rng = np.random.default_rng(3)
    W0, A, B, x = rng.standard_normal((4, 5)), rng.standard_normal((2, 5)), rng.standard_normal((4, 2)), np.ones((1, 5))
    with pytest.raises(ShapeError, match="D has shape"):
        prediag_forward(x, W0, A, B, np.ones(5), scaling=1.0)
    with pytest.raises(NonFiniteError, match="1 zero entry"):
        prediag_unmerge(W0, A, B, np.array([1.0, 0.0, 2.0, 3.0]), scaling=1.0)


def test_a_prediag_adapter_has_no_peft_file(tmp_path):
    """PEFT has no Pre-Diag: writing one as a PEFT folder is refused, and nothing is written."""
    from refpeft.adapter import Adapter, ModuleAdapter
    from refpeft.errors import ConfigError
    from refpeft.methods.prediag import prediag_init
    from refpeft.peft_format import write_peft_adapter

    A, B, D = prediag_init(4, 3, 2)
    module = ModuleAdapter("prediag", {"A": A, "B": B, "prediag_D": D}, alpha=2.0)
    with pytest.raises(ConfigError, match="prediag adapters have no PEFT file format"):
        write_peft_adapter(tmp_path / "out", Adapter({"layer": module}))
    assert not (tmp_path / "out").exists()
