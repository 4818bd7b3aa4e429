"""Adam vectors carry their bias corrections: no kernel's pow (nor the generator's) enters the expected values."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from refpeft.conformance.check import check_directory
from refpeft.conformance.vectors import read_case, read_index
from refpeft.optim import bias_corrections, power

COMMITTED = Path(__file__).resolve().parent.parent / "conformance" / "vectors"
ADAM = [name for name in read_index(COMMITTED) if read_case(COMMITTED, name).manifest["family"] == "adam_step"]


def _exact_power(beta: float, t: int) -> float:
    """beta^t in exact rational arithmetic, rounded once (int / int true division is correctly rounded)."""
    return float(Fraction(beta) ** t)


def test_every_adam_manifest_carries_the_correctly_rounded_bias_corrections():
    assert any(read_case(COMMITTED, n).manifest["parameters"]["step"] == 1270 for n in ADAM)
    for name in ADAM:
        m = read_case(COMMITTED, name).manifest
        beta1, beta2 = m["options"].get("betas", (0.9, 0.999))
        t = m["parameters"]["step"]
        assert m["parameters"]["bias_correction1"] == 1.0 - _exact_power(beta1, t), name
        assert m["parameters"]["bias_correction2_sqrt"] == math.sqrt(1.0 - _exact_power(beta2, t)), name


@pytest.mark.parametrize("beta", [0.9, 0.999, 0.95, 0.99, 0.98])
def test_power_is_the_correctly_rounded_power_where_libm_pow_is_not(beta):
    steps = range(1, 3001)
    assert [power(beta, t) for t in steps] == [_exact_power(beta, t) for t in steps]


def _pow_free_adam(manifest: dict, inputs: dict, *, pow_: object = None) -> dict:
    """A NumPy Adam/AdamW step in the case's dtype from the README alone. Its bias corrections are the
    manifest's, or with `pow_` computed from the given power function (a kernel using its own pow)."""
    o, p = manifest["options"], manifest["parameters"]
    dtype = np.dtype(manifest["dtype"]).type
    beta1, beta2 = o.get("betas", (0.9, 0.999))
    eps, t = o.get("eps", 1e-8), p["step"]
    if pow_ is None:
        c1, c2_sqrt = p["bias_correction1"], p["bias_correction2_sqrt"]
    else:
        c1, c2_sqrt = 1.0 - pow_(beta1, t), math.sqrt(1.0 - pow_(beta2, t))
    out = {}
    for group in p["groups"]:
        lr, wd = group["lr"], group["weight_decay"]
        for n in group["names"]:
            w, g, m, v = (np.asarray(inputs[k], dtype=dtype)
                          for k in (n, f"grad.{n}", f"exp_avg.{n}", f"exp_avg_sq.{n}"))
            if wd and o.get("adamw", False):
                w = w * dtype(1.0 - lr * wd)
            elif wd:
                g = g + dtype(wd) * w
            m = m + dtype(1.0 - beta1) * (g - m)
            v = v * dtype(beta2) + dtype(1.0 - beta2) * g * g
            w = w + dtype(-lr / c1) * m / (np.sqrt(v) / dtype(c2_sqrt) + dtype(eps))
            out.update({n: w, f"exp_avg.{n}": m, f"exp_avg_sq.{n}": v})
    return out


def test_a_kernel_that_never_calls_pow_passes_every_adam_case():
    reports = check_directory(_pow_free_adam, COMMITTED, implementation="pow-free", names=ADAM)
    assert [r.status for r in reports] == ["pass"] * len(ADAM), [(r.case, r.message) for r in reports]


def test_a_kernel_with_a_different_pow_computes_the_same_result_from_the_given_corrections():
    """Replace pow by a deliberately different one (exp(t log beta), off by ulps): a kernel deriving its
    corrections from it drifts from the vector's constants; fed the vector's constants it gives the same
    bits as with the correctly rounded pow, so nothing of either pow is in the expected values."""
    def other_pow(beta: float, t: int) -> float:
        return math.exp(t * math.log(beta)) * (1 + 2.0**-50)

    moved = 0
    for name in ADAM:
        case = read_case(COMMITTED, name)
        given = _pow_free_adam(case.manifest, case.inputs)
        own = _pow_free_adam(case.manifest, case.inputs, pow_=other_pow)
        exact = _pow_free_adam(case.manifest, case.inputs, pow_=_exact_power)
        assert all(np.array_equal(given[n], exact[n]) for n in given), name
        moved += any(not np.array_equal(given[n], own[n]) for n in given)
        p, betas = case.manifest["parameters"], tuple(case.manifest["options"].get("betas", (0.9, 0.999)))
        assert bias_corrections(betas, p["step"]) == (p["bias_correction1"], p["bias_correction2_sqrt"])
    assert moved > 0
