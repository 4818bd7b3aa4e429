"""AdaLoRA: gradients and the regulariser's gradient vs finite differences, merge properties, backends,
the budget schedule's properties, masking to a budget, bad input."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refpeft.errors import ConfigError, ShapeError
from refpeft.methods.adalora import (ADALORA, adalora_backward, adalora_forward, adalora_forward_bound, adalora_init,
                                     adalora_merge, adalora_merge_bound, adalora_orthogonality,
                                     adalora_parameter_count, adalora_scaling, adalora_unmerge)
from refpeft.methods.adalora_allocator import AdaloraSchedule, adalora_budget, adalora_mask_to_budget
from refpeft.methods.linear import dropout_mask
from strategies import LayerCase, layer_cases, normal_arrays
from support import BACKENDS, BACKEND_IDS, assert_close, vjp_check

FAST = settings(max_examples=30, deadline=None)
NAMES = ("lora_A", "lora_E", "lora_B")


def adalora_layer(case: LayerCase) -> dict:
    w_shape = (case.k, case.d) if case.fan_in_fan_out else (case.d, case.k)
    return normal_arrays(case, ("x", (*case.batch, case.k)), ("W0", w_shape), ("lora_A", (case.r, case.k)),
                         ("lora_E", (case.r, 1)), ("lora_B", (case.d, case.r)), ("bias", (case.d,)),
                         ("dy", (*case.batch, case.d)))


@FAST
@given(layer_cases(max_features=24), st.floats(0.5, 16.0))
def test_adalora_gradients_match_finite_differences(case, ranknum):
    a = adalora_layer(case)
    bias = a["bias"] if case.bias else None
    mask = dropout_mask(a["x"].shape, 0.3, seed=case.seed % 1000) if case.dropout else None

    def f(x, lora_A, lora_E, lora_B, ranknum, bias=None):
        rn = float(ranknum[0])
        return adalora_forward(x, a["W0"], lora_A, lora_E, lora_B, scaling=adalora_scaling(3.0, rn, case.r),
                               ranknum=rn, bias=bias, dropout_mask=mask, fan_in_fan_out=case.fan_in_fan_out)[0]

    _, cache = adalora_forward(a["x"], a["W0"], *(a[n] for n in NAMES), scaling=adalora_scaling(3.0, ranknum, case.r),
                               ranknum=ranknum, bias=bias, dropout_mask=mask, fan_in_fan_out=case.fan_in_fan_out,
                               bias_trainable=case.bias)
    g = adalora_backward(a["dy"], cache)
    inputs = {"x": a["x"], **{n: a[n] for n in NAMES}, "ranknum": np.array([ranknum])}
    wanted = {"x": g.dx, **{n: getattr(g, f"d{n}") for n in NAMES}}
    if case.bias:
        inputs["bias"], wanted["bias"] = bias, g.dbias
    vjp_check(f, inputs, wanted, a["dy"], tol=1e-7)
    # ranknum is one scalar that moves only the (small) branch of a large output: the difference
    # quotient's rounding floor, eps |L| / (h |dL/dranknum|), reaches 1e-7 on some draws.
    vjp_check(f, inputs, {"ranknum": g.dranknum}, a["dy"], tol=1e-6)


@FAST
@given(st.integers(1, 6), st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_orthogonality_gradient_matches_finite_differences(r, k, d, seed):
    rng = np.random.default_rng(seed)
    A1, B1, A2, B2 = (rng.standard_normal(s) for s in ((r, k), (d, r), (r + 1, d), (k, r + 1)))
    value, g = adalora_orthogonality({"p": (A1, B1), "q": (A2, B2)}, weight=0.7)
    def f(A1, B1, A2, B2):
        return np.array([adalora_orthogonality({"p": (A1, B1), "q": (A2, B2)}, weight=0.7)[0]])

    vjp_check(f, {"A1": A1, "B1": B1, "A2": A2, "B2": B2},
              {"A1": g.dlora_A["p"], "B1": g.dlora_B["p"], "A2": g.dlora_A["q"], "B2": g.dlora_B["q"]}, np.ones(1))


def test_orthogonality_is_zero_with_zero_gradient_at_orthonormal_factors():
    Q = np.eye(7)[:, [4, 0, 2]]                     # (7, 3), exactly orthonormal columns: ||Q^T Q - I||_F = 0
    value, g = adalora_orthogonality({"p": (Q.T.copy(), Q)}, weight=2.0)
    assert value == 0.0 and not np.any(g.dlora_A["p"]) and not np.any(g.dlora_B["p"])   # torch's subgradient 0
    with pytest.raises(ConfigError):
        adalora_orthogonality({"p": (Q.T, Q)}, weight=-1.0)


@FAST
@given(layer_cases(max_features=24))
def test_merged_forward_equals_unmerged_and_unmerge_restores_w0(case):
    a = adalora_layer(case)
    factors, fifo = [a[n] for n in NAMES], case.fan_in_fan_out
    s = adalora_scaling(5.0, 4.0, case.r)
    y, _ = adalora_forward(a["x"], a["W0"], *factors, scaling=s, ranknum=4.0, fan_in_fan_out=fifo)
    W = adalora_merge(a["W0"], *factors, scaling=s, fan_in_fan_out=fifo)
    merged = a["x"] @ (W if fifo else W.T)
    bound = adalora_forward_bound(a["x"], a["W0"], *factors, scaling=s, fan_in_fan_out=fifo, dtype="float64")
    merge = adalora_merge_bound(a["W0"], *factors, scaling=s, fan_in_fan_out=fifo, dtype="float64")
    extra = np.abs(a["x"]) @ (merge if fifo else merge.T)
    assert np.all(np.abs(merged - y) <= bound + 2 * extra + 1e-300)
    back = adalora_unmerge(W, *factors, scaling=s, fan_in_fan_out=fifo)
    assert np.all(np.abs(back - a["W0"]) <= merge + adalora_merge_bound(W, *factors, scaling=s, fan_in_fan_out=fifo,
                                                                        dtype="float64", unmerge=True))


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_forward_over_backends_and_init_is_zero_delta(backend):
    rng = np.random.default_rng(3)
    x, W0 = rng.standard_normal((2, 5)), rng.standard_normal((4, 5))
    A, E, B = adalora_init(5, 4, 3, seed=1)
    assert not np.any(E) and abs(np.std(A) - 0.02) < 0.01
    E = rng.standard_normal((3, 1))
    y, _ = adalora_forward(backend(x), backend(W0), backend(A), backend(E), backend(B), scaling=0.5, ranknum=3.0)
    assert_close(y, x @ W0.T + 0.5 * x @ (A * E).T @ B.T, rtol=1e-13, like=backend(x))
    y0, _ = adalora_forward(x, W0, *adalora_init(5, 4, 3, seed=1), scaling=0.5, ranknum=3.0)
    assert np.array_equal(y0, x @ W0.T)


def test_table_row_uses_init_r_as_ranknum_on_a_pruned_module():
    rng = np.random.default_rng(5)
    x, W0 = rng.standard_normal((3, 6)), rng.standard_normal((4, 6))
    A, E, B = rng.standard_normal((2, 6)), rng.standard_normal((2, 1)), rng.standard_normal((4, 2))
    module = SimpleNamespace(lora_A=A, lora_E=E, lora_B=B, alpha=3.0, rank=5, fan_in_fan_out=False)  # pruned 5 -> 2
    y, _ = ADALORA.forward(x, W0, module)
    s = 3.0 / (5 + 1e-5)
    assert_close(y, x @ W0.T + s * (x @ (A * E).T) @ B.T, rtol=1e-13)
    assert_close(x @ ADALORA.merge(W0, module).T, y, rtol=1e-12)
    assert ADALORA.rank(module) == 2 and ADALORA.parameter_count(6, 4, SimpleNamespace(r=2)) == 2 * 11


def test_scaling_parameter_count_and_bad_input():
    assert adalora_scaling(8, 12.0, 12) == 8 / (12 + 1e-5) and adalora_scaling(0, 12.0, 5) == 5 / (12 + 1e-5)
    assert adalora_parameter_count(10, 6, 4) == 4 * 17 and ADALORA.parameter_count is not None
    x, W0 = np.ones((2, 5)), np.ones((4, 5))
    with pytest.raises(ShapeError, match="lora_E"):
        adalora_forward(x, W0, np.ones((3, 5)), np.ones((3,)), np.ones((4, 3)), scaling=1.0, ranknum=3.0)
    with pytest.raises(ShapeError, match="lora_B"):
        adalora_forward(x, W0, np.ones((3, 5)), np.ones((3, 1)), np.ones((4, 2)), scaling=1.0, ranknum=3.0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(0, 7), st.integers(0, 5), st.integers(0, 5), st.integers(1, 4),
       st.integers(1, 60), st.integers(1, 5))
def test_budget_schedule_properties(init_r, target_r, tinit, tfinal, deltaT, extra, modules):
    target_r = min(target_r, init_r)
    s = AdaloraSchedule(init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=deltaT,
                        total_step=tinit + tfinal + extra)
    b0, bT = init_r * modules, target_r * modules
    budgets = [adalora_budget(t, s, modules=modules) for t in range(s.total_step + 3)]
    values = [b for b, _ in budgets]
    assert all(x >= y for x, y in zip(values, values[1:]))                    # never increases
    assert all(b == b0 and not m for b, m in budgets[: tinit + 1])            # warm-up: full budget, no masking
    assert all(b == bT and m for b, m in budgets[s.total_step - tfinal + 1:])  # final phase: target, masked
    assert values[s.total_step - tfinal] == bT                                 # the schedule reaches the target
    for t in range(tinit + 1, s.total_step - tfinal + 1):
        assert budgets[t][1] == (t % deltaT == 0) and bT <= values[t] <= b0
        if b0 > bT:
            assert values[t] < b0                                             # the first reduction step cuts


def test_mask_to_budget_keeps_the_highest_scores_and_refuses_an_empty_cut():
    scores = {"p": np.array([0.5, 0.1, 0.9]), "q": np.array([0.3, 0.7])}
    masks = adalora_mask_to_budget(scores, 3, init_budget=5)
    assert [list(masks["p"]), list(masks["q"])] == [[True, False, True], [False, True]]
    tied = adalora_mask_to_budget({"p": np.array([0.2, 0.2, 0.9])}, 2, init_budget=3)
    assert list(tied["p"]) == [False, False, True]                             # ties at the threshold all go
    with pytest.raises(ConfigError, match="at least one"):
        adalora_mask_to_budget(scores, 5, init_budget=5)
    with pytest.raises(ConfigError, match="tinit"):
        AdaloraSchedule(init_r=4, target_r=2, total_step=10, tinit=6, tfinal=4)


def test_files_refuse_masks_that_disagree_with_the_tensors_and_unknown_options(tmp_path):
    import json

    from refpeft.adalora_format import read_adalora_adapter, write_adalora_adapter

    rng = np.random.default_rng(6)
    schedule = AdaloraSchedule(init_r=3, target_r=1, total_step=10)
    full = {"l": (rng.standard_normal((3, 5)), rng.standard_normal((3, 1)), rng.standard_normal((4, 3)))}
    write_adalora_adapter(tmp_path, full, schedule=schedule, lora_alpha=2, rank_pattern={"l": [True, False, True]})
    read = read_adalora_adapter(tmp_path)
    assert np.array_equal(read.modules["l"][2], full["l"][2][:, [0, 2]]) and read.init_r == 3
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for change, error in (({"rank_pattern": {"l.lora_E": [True, True, True]}}, ShapeError),
                          ({"use_dora": True}, ConfigError), ({"rank_pattern": {"l.lora_E": [1, 0, 1]}}, ConfigError)):
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(error):
            read_adalora_adapter(tmp_path)


def test_a_budget_larger_than_the_rank_is_refused_when_the_schedule_is_made():
    with pytest.raises(ConfigError, match=r"target_r = 12 .* init_r = 8"):
        AdaloraSchedule(init_r=8, target_r=12, total_step=100, tinit=10, tfinal=10)
    assert AdaloraSchedule(init_r=8, target_r=8, total_step=100).target_r == 8


def test_the_rows_init_makes_modules_that_answer_with_the_row():
    """AdaLoRA's row is not in METHODS: its init must still give modules whose spec is the row."""
    W0s = {"q": np.ones((5, 7)), "v": np.ones((3, 7))}
    modules, shared, config = ADALORA.init_modules(W0s, ranks={"q": 4, "v": 2}, alphas={"q": 8.0, "v": 8.0}, seed=3)
    assert shared == {} and config == {}
    assert {p: (m.spec is ADALORA, m.r, m.lora_A.shape) for p, m in modules.items()} == \
        {"q": (True, 4, (4, 7)), "v": (True, 2, (2, 7))}
    assert modules["q"].replace(lora_E=np.ones((4, 1))).spec is ADALORA
