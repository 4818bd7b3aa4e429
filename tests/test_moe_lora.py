"""refpeft.methods.moe_lora: PEFT's expert LoRA layout, routed forward, hand-written backward, merge."""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.errors import ConfigError, DTypeError, InputError, ShapeError
from refpeft.methods.lora import lora_forward
from refpeft.methods.moe_lora import expert_factors, moe_lora_backward, moe_lora_delta_weight, moe_lora_forward, \
    moe_lora_merge, moe_lora_unmerge, route_top_k
from support import BACKENDS, BACKEND_IDS, assert_close, vjp_check

E, R, IN, OUT, N, K = 4, 3, 7, 5, 6, 2


def _layer(layout: str = "out_in", seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((E, OUT, IN) if layout == "out_in" else (E, IN, OUT))
    index = np.array([[0, 2], [2, 0], [1, 2], [2, 1], [0, 1], [2, 0]], dtype=np.int32)   # expert 3 unused
    return {"x": rng.standard_normal((N, IN)), "W": W, "A": rng.standard_normal((R * E, IN)),
            "B": rng.standard_normal((OUT, R * E)), "top_k_index": index, "g": rng.random((N, K)),
            "dy": rng.standard_normal((N, OUT))}


def test_factors_are_expert_major_for_A_and_expert_minor_for_B():
    A = np.arange(R * E * 2, dtype=np.float64).reshape(R * E, 2)
    B = np.arange(3 * R * E, dtype=np.float64).reshape(3, R * E)
    A_e, B_e = expert_factors(A, B, num_experts=E)
    assert np.array_equal(A_e[1], A[R:2 * R])              # rows e*r .. (e+1)*r
    assert np.array_equal(B_e[1], B[:, 1::E])              # columns e, e+E, e+2E
    assert not np.array_equal(B_e[1], B[:, R:2 * R])


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_each_token_gets_the_weighted_sum_of_its_experts_lora_outputs(layout):
    a = _layer(layout)
    s = 0.75
    y, _ = moe_lora_forward(a["x"], a["W"], a["A"], a["B"], top_k_index=a["top_k_index"], top_k_weights=a["g"],
                            scaling=s, layout=layout)
    merged = moe_lora_merge(a["W"], a["A"], a["B"], scaling=s, layout=layout)
    for t in range(N):
        want = 0.0
        for k, e in enumerate(a["top_k_index"][t]):
            W_e = merged[e] if layout == "out_in" else merged[e].T      # (out, in)
            want = want + a["g"][t, k] * (W_e @ a["x"][t])
        np.testing.assert_allclose(y[t], want, rtol=1e-12, atol=1e-12)


def test_per_expert_rows_are_lora_forward_on_that_expert():
    a = _layer()
    A_e, B_e = expert_factors(a["A"], a["B"], num_experts=E)
    one = np.array([[1], [1], [1], [1], [1], [1]], dtype=np.int32)
    y, _ = moe_lora_forward(a["x"], a["W"], a["A"], a["B"], top_k_index=one, top_k_weights=np.ones((N, 1)),
                            scaling=2.0)
    want, _ = lora_forward(a["x"], a["W"][1], A_e[1], B_e[1], scaling=2.0)
    np.testing.assert_allclose(y, want, rtol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_gradients_match_finite_differences(backend, layout):
    a = _layer(layout, seed=1)
    index = backend(a["top_k_index"])
    y, cache = moe_lora_forward(backend(a["x"]), backend(a["W"]), backend(a["A"]), backend(a["B"]), top_k_index=index,
                                top_k_weights=backend(a["g"]), scaling=0.5, layout=layout)
    grads = moe_lora_backward(backend(a["dy"]), cache)
    assert_close(grads.dA[R * 3:, :], np.zeros((R, IN)), rtol=0.0, like=y)   # expert 3 got no token

    def f(x, A, B, g):
        return moe_lora_forward(backend(x), backend(a["W"]), backend(A), backend(B), top_k_index=index,
                                top_k_weights=backend(g), scaling=0.5, layout=layout)[0]

    inputs = {"x": a["x"], "A": a["A"], "B": a["B"], "g": a["g"]}
    wanted = {"x": grads.dx, "A": grads.dA, "B": grads.dB, "g": grads.dtop_k_weights}
    vjp_check(f, inputs, wanted, a["dy"], tol=1e-7)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_unmerge_undoes_merge_and_delta_is_in_the_weights_layout(layout):
    a = _layer(layout)
    delta = moe_lora_delta_weight(a["A"], a["B"], num_experts=E, scaling=1.5, layout=layout)
    assert delta.shape == a["W"].shape
    merged = moe_lora_merge(a["W"], a["A"], a["B"], scaling=1.5, layout=layout)
    np.testing.assert_allclose(moe_lora_unmerge(merged, a["A"], a["B"], scaling=1.5, layout=layout), a["W"],
                               rtol=0, atol=1e-13)
    # the merged layer with no adapter gives the adapted forward
    y, _ = moe_lora_forward(a["x"], a["W"], a["A"], a["B"], top_k_index=a["top_k_index"], top_k_weights=a["g"],
                            scaling=1.5, layout=layout)
    zero_B = np.zeros_like(a["B"])
    y_merged, _ = moe_lora_forward(a["x"], merged, a["A"], zero_B, top_k_index=a["top_k_index"],
                                   top_k_weights=a["g"], scaling=1.5, layout=layout)
    np.testing.assert_allclose(y_merged, y, rtol=1e-12, atol=1e-12)


def test_router_picks_the_largest_probabilities_lower_index_first_on_ties():
    logits = np.array([[0.0, 2.0, 1.0, 2.0], [3.0, -1.0, 0.0, 0.5]])
    index, weights = route_top_k(logits, top_k=2)
    assert index.tolist() == [[1, 3], [0, 3]]
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    _, raw = route_top_k(logits, top_k=2, normalize=False)
    p = np.exp(logits[1]) / np.exp(logits[1]).sum()
    np.testing.assert_allclose(raw[1], p[[0, 3]])


def test_bad_inputs_are_refused_with_refpeft_errors():
    a = _layer()
    args = dict(top_k_weights=a["g"], scaling=1.0)
    with pytest.raises(InputError, match="top_k_index"):
        moe_lora_forward(a["x"], a["W"], a["A"], a["B"], top_k_index=a["top_k_index"] + 2, **args)
    with pytest.raises(DTypeError, match="top_k_index"):
        moe_lora_forward(a["x"], a["W"], a["A"], a["B"], top_k_index=a["top_k_index"].astype(float), **args)
    with pytest.raises(ShapeError, match="r\\*E"):
        expert_factors(a["A"][:-1], a["B"], num_experts=E)
    with pytest.raises(ShapeError, match="out_in"):
        moe_lora_forward(a["x"], np.swapaxes(a["W"], 1, 2), a["A"], a["B"], top_k_index=a["top_k_index"], **args)
    with pytest.raises(ConfigError, match="layout"):
        moe_lora_merge(a["W"], a["A"], a["B"], scaling=1.0, layout="oi")
