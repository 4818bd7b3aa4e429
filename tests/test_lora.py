"""LoRA: gradients vs finite differences, merge properties, the cache, backends, bad input, PEFT."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refpeft.errors import DTypeError, NamespaceError, NonFiniteError, RankError, ShapeError
from refpeft.methods.linear import dropout_mask
from refpeft.methods.lora import (
    lora_delta_weight,
    full_parameter_count,
    lora_init,
    lora_backward,
    lora_forward,
    lora_parameter_count,
    lora_scaling,
    lora_merge,
    lora_unmerge,
)
from strategies import LayerCase, layer_cases, normal_arrays
from support import BACKENDS, BACKEND_IDS, assert_close, vjp_check

FAST = settings(max_examples=40, deadline=None)


def layer(case: LayerCase) -> dict[str, np.ndarray]:
    """Random float64 inputs and parameters for one hypothesis case (B non-zero, so it matters)."""
    w_shape = (case.k, case.d) if case.fan_in_fan_out else (case.d, case.k)
    arrays = normal_arrays(case, ("x", (*case.batch, case.k)), ("W0", w_shape), ("A", (case.r, case.k)),
                           ("B", (case.d, case.r)), ("bias", (case.d,)), ("dy", (*case.batch, case.d)))
    if not case.bias:
        arrays["bias"] = None
    arrays["dropout_mask"] = dropout_mask((*case.batch, case.k), 0.25, seed=case.seed) if case.dropout else None
    return arrays


def options(case: LayerCase) -> dict:
    return dict(scaling=lora_scaling(16.0, case.r, rslora=case.rslora), fan_in_fan_out=case.fan_in_fan_out)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@FAST
@given(case=layer_cases())
def test_gradients_match_finite_differences(backend, case):
    a = layer(case)
    b = {n: backend(v) for n, v in a.items()}
    y, cache = lora_forward(b["x"], b["W0"], b["A"], b["B"], bias=b["bias"], dropout_mask=b["dropout_mask"],
                            bias_trainable=case.bias, **options(case))
    grads = lora_backward(b["dy"], cache)

    def f(x, A, B, bias=None):
        return lora_forward(backend(x), b["W0"], backend(A), backend(B), bias=backend(bias),
                            dropout_mask=b["dropout_mask"], **options(case))[0]

    inputs = {"x": a["x"], "A": a["A"], "B": a["B"]}
    wanted = {"x": grads.dx, "A": grads.dA, "B": grads.dB}
    if case.bias:
        inputs["bias"], wanted["bias"] = a["bias"], grads.dbias
    else:
        assert grads.dbias is None
    vjp_check(f, inputs, wanted, a["dy"], tol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@FAST
@given(case=layer_cases())
def test_merged_forward_equals_unmerged_forward(backend, case):
    a = layer(case)
    b = {n: backend(v) for n, v in a.items()}
    opts = options(case)
    y, _ = lora_forward(b["x"], b["W0"], b["A"], b["B"], bias=b["bias"], **opts)
    W = lora_merge(b["W0"], b["A"], b["B"], **opts)
    zero_B = backend(np.zeros_like(a["B"]))
    y_merged, _ = lora_forward(b["x"], W, b["A"], zero_B, bias=b["bias"], **opts)
    assert_close(y_merged, y, rtol=1e-12, atol=1e-12 * _scale(a, opts["scaling"]), like=b["x"])


def _scale(a, s):
    """A magnitude for absolute tolerances: |x| (|W0| + s |B||A|) summed over k (plus |b|)."""
    W_rows = a["W0"] if a["W0"].shape[0] == a["B"].shape[0] else a["W0"].T
    mag = np.abs(W_rows) + abs(s) * np.abs(a["B"]) @ np.abs(a["A"])
    return float(np.max(np.abs(a["x"]).reshape(-1, mag.shape[1]) @ mag.T, initial=1.0))


@FAST
@given(layer_cases())
def test_unmerge_restores_the_frozen_weight(case):
    a = layer(case)
    opts = options(case)
    W = lora_merge(a["W0"], a["A"], a["B"], **opts)
    restored = lora_unmerge(W, a["A"], a["B"], **opts)
    # One rounding of W0 + delta and one of the difference: |error| <= 2u (|W0| + |delta|) per entry.
    delta = lora_delta_weight(a["A"], a["B"], **opts)
    bound = 2 * 2.0**-53 * (np.abs(a["W0"]) + np.abs(delta)) * (1 + 1e-12)
    assert np.all(np.abs(restored - a["W0"]) <= bound)


@FAST
@given(layer_cases(), st.sampled_from(["default", "gaussian"]))
def test_initial_adapter_gives_exactly_the_base_output(case, init):
    a = layer(case)
    A, B = lora_init(case.k, case.d, case.r, init=init, seed=case.seed)
    y, _ = lora_forward(a["x"], a["W0"], A, B, bias=a["bias"], dropout_mask=a["dropout_mask"], **options(case))
    W_rows = a["W0"].T if case.fan_in_fan_out else a["W0"]
    rows = a["x"].reshape(-1, case.k) @ W_rows.T + (0 if a["bias"] is None else a["bias"])
    np.testing.assert_array_equal(y, rows.reshape(*case.batch, case.d))


@FAST
@given(layer_cases())
def test_cache_never_holds_a_d_by_k_array(case):
    a = layer(case)
    _, cache = lora_forward(a["x"], a["W0"], a["A"], a["B"], bias=a["bias"], dropout_mask=a["dropout_mask"],
                            **options(case))
    owned = {"x": cache.x, "dropout_mask": cache.dropout_mask, "xa": cache.xa}
    for name, array in owned.items():
        if array is not None:
            assert array.size <= a["x"].size or array.shape[-1] == case.r, name
    # Parameters are held by reference, never copied or combined.
    assert cache.W0 is a["W0"] and cache.A is a["A"] and cache.B is a["B"]
    assert cache.xa.shape == (math.prod(case.batch), case.r)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_every_backend_gives_the_numpy_result(backend):
    case = LayerCase(batch=(2, 3), k=7, d=5, r=3, bias=True, rslora=False, fan_in_fan_out=False, dropout=True, seed=3)
    a = layer(case)
    opts = options(case)
    ref_y, ref_cache = lora_forward(a["x"], a["W0"], a["A"], a["B"], bias=a["bias"], dropout_mask=a["dropout_mask"],
                                    bias_trainable=True, **opts)
    ref = lora_backward(a["dy"], ref_cache)
    b = {n: backend(v) for n, v in a.items()}
    y, cache = lora_forward(b["x"], b["W0"], b["A"], b["B"], bias=b["bias"], dropout_mask=b["dropout_mask"],
                            bias_trainable=True, **opts)
    grads = lora_backward(b["dy"], cache)
    assert_close(y, ref_y, rtol=1e-13, like=b["x"])
    for name in ("dx", "dA", "dB", "dbias"):
        assert_close(getattr(grads, name), getattr(ref, name), rtol=1e-13, like=b["x"])
    W = lora_merge(b["W0"], b["A"], b["B"], **opts)
    assert_close(W, lora_merge(a["W0"], a["A"], a["B"], **opts), rtol=1e-15, like=b["W0"])


def test_same_seed_gives_the_same_arrays_and_documented_bounds():
    A1, B1 = lora_init(300, 20, 8, seed=42)
    A2, _ = lora_init(300, 20, 8, seed=42)
    np.testing.assert_array_equal(A1, A2)
    assert np.all(B1 == 0) and np.max(np.abs(A1)) <= 1 / math.sqrt(300)
    assert np.max(np.abs(A1)) > 0.9 / math.sqrt(300)  # the whole range is used
    G, _ = lora_init(4000, 20, 8, init="gaussian", seed=1)
    assert abs(np.std(G) - 1 / 8) < 0.01 * (1 / 8) * 5
    Z, _ = lora_init(5, 4, 2, init="zeros")
    assert not np.any(Z)
    A32, _ = lora_init(300, 20, 8, seed=42, dtype="float32")
    assert A32.dtype == np.float32


def test_torch_cpu_generator_reproduces_peft_initialisation():
    torch = pytest.importorskip("torch", reason="torch is in the conformance extra")
    pytest.importorskip("peft", reason="peft is in the conformance extra")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(37, 11))
    torch.manual_seed(1234)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["0"]))
    peft_A = model.base_model.model[0].lora_A["default"].weight.detach().numpy()
    A, B = lora_init(37, 11, 4, generator="torch-cpu", seed=1234, dtype="float32")
    np.testing.assert_array_equal(A, peft_A)


def test_parameter_counts():
    assert lora_parameter_count(4096, 4096, 16) == 16 * 8192
    assert lora_parameter_count(20, 10, 2, bias=True) == 2 * 30 + 10   # (k, d, r): the bias adds d
    assert full_parameter_count(4096, 4096, bias=True) == 4096 * 4096 + 4096


class TestBadInput:
    def setup_method(self):
        rng = np.random.default_rng(0)
        self.x, self.W0 = rng.standard_normal((4, 6)), rng.standard_normal((5, 6))
        self.A, self.B = rng.standard_normal((2, 6)), rng.standard_normal((5, 2))

    def forward(self, **changes):
        args = dict(x=self.x, W0=self.W0, A=self.A, B=self.B)
        args.update(changes)
        return lora_forward(args.pop("x"), args.pop("W0"), args.pop("A"), args.pop("B"), scaling=1.0, **args)

    def test_mismatched_shapes(self):
        with pytest.raises(ShapeError, match="x has shape"):
            self.forward(x=np.ones((4, 5)))
        with pytest.raises(ShapeError, match=r"B has shape \(4, 2\)"):
            self.forward(B=np.ones((4, 2)))
        with pytest.raises(ShapeError, match="dropout_mask"):
            self.forward(dropout_mask=np.ones((4, 5)))
        with pytest.raises(ShapeError, match="bias"):
            self.forward(bias=np.ones(3))

    def test_ranks(self):
        with pytest.raises(RankError, match="at least 1"):
            self.forward(A=np.ones((0, 6)), B=np.ones((5, 0)))

    def test_non_finite_values(self):
        x = self.x.copy()
        x[1, 2] = np.nan
        with pytest.raises(NonFiniteError, match="x holds 1 non-finite"):
            self.forward(x=x)
        with pytest.raises(NonFiniteError, match="W0"):
            self.forward(W0=np.full_like(self.W0, np.inf))

    def test_integer_and_mixed_dtypes(self):
        with pytest.raises(DTypeError, match="x has dtype int64"):
            self.forward(x=np.ones((4, 6), dtype=np.int64))
        with pytest.raises(DTypeError, match="share one dtype"):
            self.forward(A=self.A.astype(np.float32))

    def test_arrays_from_two_namespaces(self):
        array_api_strict = pytest.importorskip("array_api_strict", reason="array-api-strict is in the test extra")
        with pytest.raises(NamespaceError, match="different libraries"):
            self.forward(A=array_api_strict.asarray(self.A))


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_equals_peft_lora_layer_in_float64(rslora, fan_in_fan_out):
    torch = pytest.importorskip("torch", reason="torch is in the conformance extra")
    pytest.importorskip("peft", reason="peft is in the conformance extra")
    from peft import LoraConfig, get_peft_model

    rng = np.random.default_rng(7)
    k, d, r, alpha = 24, 16, 4, 12.0
    W0, b = rng.standard_normal((d, k)), rng.standard_normal(d)
    A, B = rng.standard_normal((r, k)), rng.standard_normal((d, r))
    x, dy = rng.standard_normal((3, 5, k)), rng.standard_normal((3, 5, d))

    if fan_in_fan_out:  # GPT-2's Conv1D stores the weight as (k, d)
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(d, k)
    else:
        base = torch.nn.Linear(k, d)
    base = base.to(torch.float64)
    with torch.no_grad():
        base.weight.copy_(torch.tensor(W0.T if fan_in_fan_out else W0))
        base.bias.copy_(torch.tensor(b))
    model = get_peft_model(torch.nn.Sequential(base), LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, fan_in_fan_out=fan_in_fan_out, target_modules=["0"]))
    layer_ = model.base_model.model[0]
    with torch.no_grad():
        layer_.lora_A["default"].weight.copy_(torch.tensor(A))
        layer_.lora_B["default"].weight.copy_(torch.tensor(B))
    tx = torch.tensor(x, requires_grad=True)
    ty = layer_(tx)
    (ty * torch.tensor(dy)).sum().backward()

    W0_stored = W0.T if fan_in_fan_out else W0
    y, cache = lora_forward(x, W0_stored, A, B, bias=b, scaling=lora_scaling(alpha, r, rslora=rslora),
                            fan_in_fan_out=fan_in_fan_out)
    grads = lora_backward(dy, cache)
    assert_close(y, ty.detach().numpy(), rtol=1e-12)
    assert_close(grads.dx, tx.grad.numpy(), rtol=1e-12)
    assert_close(grads.dA, layer_.lora_A["default"].weight.grad.numpy(), rtol=1e-12)
    assert_close(grads.dB, layer_.lora_B["default"].weight.grad.numpy(), rtol=1e-12)
    layer_.merge()
    merged = lora_merge(W0_stored, A, B, scaling=lora_scaling(alpha, r, rslora=rslora), fan_in_fan_out=fan_in_fan_out)
    assert_close(merged, layer_.base_layer.weight.detach().numpy(), rtol=1e-13)


def test_rank_larger_than_the_layer_is_accepted_as_peft_accepts_it():
    """PEFT builds an r = 8 adapter on a 4-wide layer; refpeft trains, merges and unmerges it too."""
    rng = np.random.default_rng(0)
    k, d, r = 6, 4, 8
    A, B = lora_init(k, d, r, seed=1)
    B = rng.standard_normal((d, r))
    x, W0 = rng.standard_normal((3, k)), rng.standard_normal((d, k))
    y, cache = lora_forward(x, W0, A, B, scaling=2.0)
    assert np.allclose(y, x @ lora_merge(W0, A, B, scaling=2.0).T, rtol=1e-13, atol=1e-13)
    grads = lora_backward(np.ones_like(y), cache)
    assert grads.dA.shape == (r, k) and grads.dB.shape == (d, r)
    assert np.allclose(lora_unmerge(lora_merge(W0, A, B, scaling=2.0), A, B, scaling=2.0), W0, rtol=1e-13, atol=1e-13)
