"""SwiGLU: gradients vs finite differences, backends, LlamaMLP in float64, no overflow at large gates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from refpeft.errors import DTypeError, ShapeError
from refpeft.model.mlp import swiglu_backward, swiglu_forward
from support import BACKENDS, BACKEND_IDS, assert_close, vjp_check

FAST = settings(max_examples=25, deadline=None)


@st.composite
def gates(draw):
    """gate, up, dh of one shape (0 to 3 leading axes), gates spread over [-8 s, 8 s]."""
    shape = (*draw(st.lists(st.integers(1, 4), max_size=3)), draw(st.integers(1, 16)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    spread = draw(st.sampled_from([0.1, 1.0, 8.0]))
    return dict(gate=spread * rng.standard_normal(shape), up=rng.standard_normal(shape), dh=rng.standard_normal(shape))


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@FAST
@given(case=gates())
def test_gradients_match_finite_differences(backend, case):
    _, cache = swiglu_forward(backend(case["gate"]), backend(case["up"]))
    grads = swiglu_backward(backend(case["dh"]), cache)

    def f(gate, up):
        return swiglu_forward(backend(gate), backend(up))[0]

    vjp_check(f, {"gate": case["gate"], "up": case["up"]}, {"gate": grads.dgate, "up": grads.dup}, case["dh"])


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@FAST
@given(case=gates())
def test_forward_agrees_with_torch_silu(backend, case):
    expected = torch.nn.functional.silu(torch.tensor(case["gate"])) * torch.tensor(case["up"])
    h, _ = swiglu_forward(backend(case["gate"]), backend(case["up"]))
    assert_close(h, expected.numpy(), rtol=1e-12, like=backend(case["gate"]))


def test_llama_mlp_is_down_of_swiglu_of_gate_and_up_in_float64():
    config = LlamaConfig(hidden_size=12, num_attention_heads=2, intermediate_size=20, hidden_act="silu")
    mlp = LlamaMLP(config).double()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 12))
    with torch.no_grad():
        expected = mlp(torch.tensor(x)).numpy()
    Wg, Wu, Wd = (m.weight.detach().numpy() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    h, _ = swiglu_forward(x @ Wg.T, x @ Wu.T)
    assert_close(h @ Wd.T, expected, rtol=1e-12)


def test_large_gates_neither_overflow_nor_lose_the_limits():
    gate = np.array([-1000.0, -40.0, 0.0, 40.0, 1000.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is exact enough
        h, cache = swiglu_forward(gate, np.ones(5))
        grads = swiglu_backward(np.ones(5), cache)
    assert_close(h, [0.0, -40.0 * np.exp(-40.0), 0.0, 40.0, 1000.0], rtol=1e-15)
    assert_close(grads.dgate, [0.0, 0.0, 0.5, 1.0, 1.0], rtol=1e-15, atol=1e-15)


def test_the_cache_is_the_two_inputs_by_reference():
    # Memory: the sigmoid is recomputed in backward, not kept (one (..., I) array fewer per layer).
    gate, up = np.linspace(-3.0, 3.0, 12).reshape(3, 4), np.ones((3, 4))
    _, cache = swiglu_forward(gate, up)
    assert cache.gate is gate and cache.up is up and len(dataclasses.fields(cache)) == 2


def test_bad_input_is_refused():
    with pytest.raises(ShapeError, match="gate has shape"):
        swiglu_forward(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(DTypeError):
        swiglu_forward(np.ones(3), np.ones(3, dtype=np.float32))
    _, cache = swiglu_forward(np.ones(3), np.ones(3))
    with pytest.raises(ShapeError, match="dh"):
        swiglu_backward(np.ones(4), cache)
