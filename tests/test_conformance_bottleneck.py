"""The `bottleneck_*` conformance families: bounds that hold and bite; refpeft and the adapters library pass.

The bounds (refpeft.methods.bottleneck's `block_*_bound`) hold for refpeft's float32 block against
its float64 one on fresh hypothesis draws of every non-linearity and placement, and the same
bounds shrunk 1000x fail (they are not vacuous). The committed vectors are what the generator
makes; refpeft passes them, and so does a float32 NumPy kernel written from conformance/README.md
alone; AdapterHub's `adapters` library (its own Python, REFPEFT_ADAPTERS_PYTHON, as in
tests/test_bottleneck_vs_adapters.py) passes them in float32 and float64; deliberately wrong
kernels (a residual in the wrong place, the wrong non-linearity or slope, the scaling ignored) fail,
naming the case and the element.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refpeft.conformance import bottleneck_families as families
from refpeft.conformance.bottleneck_families import FAMILIES, bottleneck_cases, bottleneck_results
from refpeft.conformance.check import check_directory
from refpeft.conformance.generate import generate
from refpeft.conformance.method_families import manifest_case
from refpeft.conformance.vectors import read_index
from refpeft.errors import ConfigError
from refpeft.methods import bottleneck as bn
from refpeft.methods.bottleneck import (BottleneckConfig, BottleneckParams, block_backward, block_backward_bound,
                                        block_forward, block_forward_bound)
from refpeft.tolerance import compare

COMMITTED = Path(__file__).resolve().parents[1] / "conformance" / "vectors"
CASES = bottleneck_cases()
NAMES = [c.name for c in CASES]


def _draw(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    """float32-representable values (both precisions start from the same inputs)."""
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(np.float64)


def _block(o, r, dy, params: BottleneckParams, config: BottleneckConfig, dtype: str) -> dict[str, np.ndarray]:
    cast = BottleneckParams(*(getattr(params, f).astype(dtype) for f in ("W_down", "b_down", "W_up", "b_up")))
    e, cache = block_forward(o.astype(dtype), r.astype(dtype), cast, config)
    do, dr, grads = block_backward(dy.astype(dtype), cache)
    return {"e": e, "do": do, "dr": dr, **grads}


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), H=st.sampled_from([4, 16, 48]), m=st.integers(1, 6),
       non_linearity=st.sampled_from(["relu", "swish", "tanh"]), before=st.booleans(),
       scaling=st.sampled_from([1.0, 0.5, 0.3, 2.5]), spread=st.sampled_from([0.3, 1.0, 3.0]),
       seed=st.integers(0, 2**32 - 1))
def test_block_bounds_cover_float32_and_are_not_vacuous(n, H, m, non_linearity, before, scaling, spread, seed):
    rng = np.random.default_rng(seed)
    o, r, dy = _draw(rng, (n, H), spread), _draw(rng, (n, H)), _draw(rng, (n, H))
    params = BottleneckParams(_draw(rng, (m, H), 0.3), _draw(rng, (m,)), _draw(rng, (H, m), 0.5), _draw(rng, (H,)))
    config = BottleneckConfig(mh_adapter=False, output_adapter=True, original_ln_before=before,
                              non_linearity=non_linearity, scaling=scaling)
    f32, f64 = _block(o, r, dy, params, config, "float32"), _block(o, r, dy, params, config, "float64")
    bounds = {"e": block_forward_bound(o, r, params, config), **block_backward_bound(dy, o, r, params, config)}
    ratios = {}
    for name, bound in bounds.items():
        comparison = compare(f32[name], f64[name], bound)
        assert comparison.passed, (name, comparison.describe())
        ratios[name] = comparison.ratio
    # not vacuous: shrunk 1000x, the bounds fail (with 32 or more outputs, float32 rounds somewhere)
    if n * H >= 32:
        assert max(ratios.values()) > 1e-3, ratios


def test_no_sigmoid_bound_where_exp_leaves_the_normal_range():
    params = BottleneckParams(np.eye(3), np.zeros(3), np.ones((3, 3)), np.zeros(3))
    config = BottleneckConfig(mh_adapter=False, output_adapter=True, original_ln_before=False, non_linearity="swish")
    inside = np.array([[0.5, -40.0, 40.0]])                  # float32: exp(-|z|) is normal up to |z| ~ 43.7
    assert np.all(np.isfinite(block_forward_bound(inside, np.zeros_like(inside), params, config)))
    outside = np.array([[0.5, -50.0, 0.0]])
    with pytest.raises(ConfigError, match="no rounding bound for the sigmoid in float32 where .z. exceeds 43.7"):
        block_forward_bound(outside, np.zeros_like(outside), params, config)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bottleneck-vectors")
    generate(folder, cases=CASES)
    return folder


def _self(manifest: dict, inputs: dict) -> dict:
    return bottleneck_results(manifest_case(manifest), inputs)


def test_generation_is_byte_identical_and_matches_the_committed_vectors(fresh, tmp_path):
    generate(tmp_path, cases=CASES)
    for name in NAMES:
        for suffix in (".json", ".safetensors"):
            again = (tmp_path / f"{name}{suffix}").read_bytes()
            assert again == (fresh / f"{name}{suffix}").read_bytes(), name
            assert again == (COMMITTED / f"{name}{suffix}").read_bytes(), f"{name}{suffix}: regenerate the vectors"
    assert set(NAMES) <= set(read_index(COMMITTED))
    assert {c.family for c in CASES} == {f.name for f in FAMILIES}


def test_refpeft_passes_every_case():
    reports = check_directory(_self, COMMITTED, implementation="refpeft", names=NAMES)
    assert [r.status for r in reports] == ["pass"] * len(NAMES), [(r.case, r.message) for r in reports]
    assert all(r.worst_ratio > 1e-3 for r in reports)          # shrunk 1000x, every case's bound would fail


@pytest.mark.parametrize("label,wrong,case", [
    # Pfeiffer's residual added after the adapter (A(o) + r) instead of before (A(o + r))
    ("residual after", dict(original_ln_before=False), "bottleneck-forward-pfeiffer-float32"),
    ("residual after", dict(original_ln_before=False), "bottleneck-backward-pfeiffer-float32"),
    # swish replaced by relu / tanh (its slope with it)
    ("relu for swish", dict(non_linearity="relu"), "bottleneck-forward-houlsby-float32"),
    ("tanh for swish", dict(non_linearity="tanh"), "bottleneck-backward-houlsby-float32"),
    ("scaling ignored", dict(scaling=1.0), "bottleneck-forward-pfeiffer-swish-scaled-float32"),
])
def test_a_wrong_kernel_fails_naming_the_case_and_element(monkeypatch, label, wrong, case):
    right = families.case_config
    monkeypatch.setattr(families, "case_config", lambda c: replace(right(c), **wrong))   # the block's config
    [report] = check_directory(_self, COMMITTED, implementation=label, names=[case])
    assert report.status == "fail" and report.case == case
    assert "worst at [" in report.message and "bound" in report.message, report.message


def test_a_wrong_swish_slope_fails_backward_only(monkeypatch):
    """silu's slope taken as sig(z) (missing the z sig (1 - sig) term): forward passes, backward fails."""
    monkeypatch.setattr(bn, "_activation_slope", lambda z, name, *, xp: bn.sigmoid(z, xp=xp))
    forward, backward = check_directory(_self, COMMITTED, implementation="wrong slope",
                                        names=["bottleneck-forward-houlsby-float32",
                                               "bottleneck-backward-houlsby-float32"])
    assert forward.status == "pass"
    assert backward.status == "fail" and "dW_down: worst at [" in backward.message, backward.message


def _readme_kernel(wrong: str = ""):
    """A float32 NumPy block written from conformance/README.md's "Bottleneck adapters" alone; `wrong`
    names one deliberate mistake ("residual after": Pfeiffer's r added after the adapter; "silu slope":
    swish' taken as sig(z))."""
    def impl(manifest: dict, inputs: dict) -> dict:
        p = manifest["parameters"]
        x = {name: np.asarray(a, dtype=manifest["dtype"]) for name, a in inputs.items()}
        before = p["original_ln_before"] and wrong != "residual after"
        H = x["o"].shape[-1]
        u = (x["o"] + x["r"] if before else x["o"]).reshape(-1, H)
        z = u @ x["W_down"].T + x["b_down"]
        sig = 1 / (1 + np.exp(-z))
        a, slope = (np.maximum(z, 0), (z > 0).astype(z.dtype)) if p["non_linearity"] == "relu" else (
            z * sig, sig if wrong == "silu slope" else sig * (1 + z * (1 - sig)))
        y = u + p["scaling"] * (a @ x["W_up"].T + x["b_up"])
        y = y if before else y + x["r"].reshape(-1, H)
        if manifest["family"] == "bottleneck_forward":
            return {"y": y.reshape(x["o"].shape)}
        dy = x["dy"].reshape(-1, H)
        g = p["scaling"] * dy
        dz = (g @ x["W_up"]) * slope
        du = dy + dz @ x["W_down"]
        dr = du if before else dy
        return {"do": du.reshape(x["o"].shape), "dr": dr.reshape(x["o"].shape), "dW_up": g.T @ a,
                "db_up": g.sum(axis=0), "dW_down": dz.T @ u, "db_down": dz.sum(axis=0)}
    return impl


def test_a_kernel_written_from_the_readme_passes_and_its_mistakes_fail():
    reports = check_directory(_readme_kernel(), COMMITTED, implementation="readme", names=NAMES)
    assert [r.status for r in reports] == ["pass"] * len(NAMES), [(r.case, r.message) for r in reports]
    pfeiffer = [n for n in NAMES if "pfeiffer" in n]
    for r in check_directory(_readme_kernel("residual after"), COMMITTED, implementation="wrong", names=pfeiffer):
        assert r.status == "fail" and "worst at [" in r.message, (r.case, r.message)
    swish_backward = [n for n in NAMES if "backward" in n and ("houlsby-float" in n or "swish" in n)]
    for r in check_directory(_readme_kernel("silu slope"), COMMITTED, implementation="wrong", names=swish_backward):
        assert r.status == "fail" and "dW_down: worst at [" in r.message, (r.case, r.message)


@pytest.fixture(scope="module")
def adapters_runner():
    python = os.environ.get("REFPEFT_ADAPTERS_PYTHON")
    if not python:
        pytest.skip("REFPEFT_ADAPTERS_PYTHON is not set: the adapters library (AdapterHub) runs in its own "
                    "environment, see conformance/requirements-adapters.txt")
    from refpeft_peers import adapters_library

    [runner] = adapters_library.implementations()
    return runner


def test_the_adapters_library_passes_every_case(adapters_runner):
    reports = check_directory(adapters_runner.run, COMMITTED, implementation=adapters_runner.name, names=NAMES)
    assert [r.status for r in reports] == ["pass"] * len(NAMES), [(r.case, r.message) for r in reports]
    assert all(r.worst_ratio > 1e-3 for r in reports)          # the library's float32 rounding is visible


def test_the_adapters_runner_is_listed_as_not_run_without_its_python(monkeypatch):
    from refpeft_peers import load_runners

    monkeypatch.delenv("REFPEFT_ADAPTERS_PYTHON", raising=False)
    runners, missing = load_runners(("adapters_library",))
    assert runners == [] and "REFPEFT_ADAPTERS_PYTHON is not set" in missing["adapters_library"]
    monkeypatch.setenv("REFPEFT_ADAPTERS_PYTHON", "/nonexistent/python")
    assert "is not a file" in load_runners(("adapters_library",))[1]["adapters_library"]
