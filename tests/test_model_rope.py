"""Rotary embedding: the gradient, the inverse rotation, backends, and transformers' rope functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from refpeft.backend import UNIT_ROUNDOFF, namespace, to_numpy
from refpeft.errors import ConfigError, DTypeError, ShapeError
from refpeft.model.rope import rope_backward, rope_forward, rope_inverse_frequencies, rope_tables
from support import BACKENDS, BACKEND_IDS, assert_close, vjp_check

FAST = settings(max_examples=25, deadline=None)
U32 = UNIT_ROUNDOFF["float32"]
LLAMA3 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)   # Llama 3.1's published rope_parameters


@st.composite
def rotations(draw):
    """x (b, heads, s, D), dy, and position ids (b or 1, s) that need not start at 0."""
    b, heads, s = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 6))
    d = 2 * draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = draw(st.sampled_from([1, b]))
    positions = rng.integers(0, 64, (rows, 1)) + np.arange(s)
    scaled = draw(st.booleans())
    return dict(x=rng.standard_normal((b, heads, s, d)), dy=rng.standard_normal((b, heads, s, d)),
                positions=positions, params=LLAMA3 if scaled else dict(rope_theta=10000.0))


def tables(case, backend):
    xp = namespace(backend(np.zeros(1)))
    inv = rope_inverse_frequencies(case["x"].shape[-1], **case["params"], xp=xp)
    return rope_tables(backend(case["positions"]), inv)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@FAST
@given(case=rotations())
def test_gradient_matches_finite_differences(backend, case):
    cos, sin = tables(case, backend)
    _, cache = rope_forward(backend(case["x"]), cos, sin)
    dx = rope_backward(backend(case["dy"]), cache)

    def f(x):
        return rope_forward(backend(x), cos, sin)[0]

    vjp_check(f, {"x": case["x"]}, {"x": dx}, case["dy"])


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@FAST
@given(case=rotations())
def test_backward_is_the_inverse_rotation(backend, case):
    # The rotation is orthogonal, so its vector-Jacobian product undoes it.
    cos, sin = tables(case, backend)
    x = backend(case["x"])
    y, cache = rope_forward(x, cos, sin)
    assert_close(rope_backward(y, cache), case["x"], rtol=1e-14, like=x)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@FAST
@given(case=rotations())
def test_forward_agrees_with_apply_rotary_pos_emb_in_float64(backend, case):
    cos, sin = tables(case, backend)
    y, _ = rope_forward(backend(case["x"]), cos, sin)
    t = torch.tensor(case["x"])
    expected, _ = apply_rotary_pos_emb(t, t, torch.tensor(to_np(cos)), torch.tensor(to_np(sin)))
    assert_close(y, expected.numpy(), rtol=1e-12, like=backend(case["x"]))


def inv_freq_bound(theta: float, *, factor: float = 1.0, low: float = 1.0, high: float = 2.0,
                   scaled: bool = False) -> float:
    """Relative error of transformers' float32 inverse frequencies, to first order.

    theta^(2i/D): the exponent is rounded once (relative u), which theta^e turns into a relative
    error ln(theta) e u <= ln(theta) u; pow and the reciprocal round once each. llama3's medium band
    mixes inv / f and inv with weight m = (L / lambda - lo) / (hi - lo); an error d in lambda moves m
    by at most (hi / (hi - lo)) d, and the result (at least inv / f) by at most f hi / (hi - lo) d,
    plus five more roundings.
    """
    base = (math.log(theta) + 2) * U32
    return (base * (1 + factor * high / (high - low)) + 7 * U32) if scaled else base


def test_default_inverse_frequencies_agree_with_transformers():
    config = LlamaConfig(hidden_size=128, num_attention_heads=2, rope_parameters=dict(rope_theta=100000.0))
    peer, scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    ours = rope_inverse_frequencies(64, rope_theta=100000.0)
    assert scaling == 1.0
    assert np.all(np.abs(ours - peer.double().numpy()) <= inv_freq_bound(1e5) * ours)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_llama3_inverse_frequencies_agree_with_transformers(head_dim):
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=131072,
                         rope_parameters=dict(LLAMA3))
    peer, scaling = ROPE_INIT_FUNCTIONS["llama3"](config)
    ours = rope_inverse_frequencies(head_dim, **LLAMA3)
    assert scaling == 1.0
    bound = inv_freq_bound(5e5, factor=8.0, low=1.0, high=4.0, scaled=True)
    assert np.all(np.abs(ours - peer.double().numpy()) <= bound * ours)


def test_llama3_keeps_high_frequencies_and_divides_low_ones_by_the_factor():
    plain = rope_inverse_frequencies(128, rope_theta=500000.0)
    scaled = rope_inverse_frequencies(128, **LLAMA3)
    wavelength = 2 * np.pi / plain
    high, low = wavelength < 8192 / 4, wavelength > 8192 / 1
    assert high.any() and low.any() and (~high & ~low).any()
    np.testing.assert_array_equal(scaled[high], plain[high])
    np.testing.assert_array_equal(scaled[low], plain[low] / 8.0)
    medium = ~high & ~low
    assert np.all((scaled[medium] < plain[medium]) & (scaled[medium] > plain[medium] / 8.0))


def test_tables_agree_with_llama_rotary_embedding_within_its_float32_error():
    # transformers forms p * inv and its cos/sin in float32. The angle's error is p inv (eps_inv + u)
    # (eps_inv from inv_freq_bound, u for the product) and cos/sin add one rounding: the bound below.
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=131072,
                         rope_parameters=dict(LLAMA3))
    module = LlamaRotaryEmbedding(config)
    positions = np.array([[0, 1, 2, 3, 100, 1000], [7, 8, 9, 10, 11, 12]])
    cos_t, sin_t = module(torch.zeros(1, dtype=torch.float32), torch.tensor(positions))
    inv = rope_inverse_frequencies(64, **LLAMA3)
    cos, sin = rope_tables(positions, inv)
    angle = positions[..., None] * np.concatenate([inv, inv])
    bound = angle * (inv_freq_bound(5e5, factor=8.0, low=1.0, high=4.0, scaled=True) + U32) + 2 * U32
    assert np.all(np.abs(cos_t.double().numpy() - cos) <= bound)
    assert np.all(np.abs(sin_t.double().numpy() - sin) <= bound)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_tables_keep_the_namespace_and_dtype(backend):
    xp = namespace(backend(np.zeros(1)))
    for dtype in ("float64", "float32"):
        inv = rope_inverse_frequencies(8, **LLAMA3, dtype=dtype, xp=xp)
        cos, sin = rope_tables(backend(np.arange(5)[None]), inv)
        expected = np.cos(np.arange(5)[None, :, None] * np.concatenate([to_np(inv)] * 2))
        assert_close(cos, expected, rtol=4 * UNIT_ROUNDOFF[dtype], like=inv)


def to_np(x):
    return np.asarray(to_numpy(x), dtype=np.float64)


def test_bad_configurations_and_shapes_are_refused():
    with pytest.raises(ConfigError, match="rope_type"):
        rope_inverse_frequencies(8, rope_theta=1e4, rope_type="yarn")
    with pytest.raises(ConfigError, match="even"):
        rope_inverse_frequencies(7, rope_theta=1e4)
    with pytest.raises(ConfigError, match="low_freq_factor"):
        rope_inverse_frequencies(8, rope_theta=1e4, rope_type="llama3", factor=8.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192)
    inv = rope_inverse_frequencies(8, rope_theta=1e4)
    with pytest.raises(DTypeError, match="position_ids"):
        rope_tables(np.zeros((1, 3)), inv)
    cos, sin = rope_tables(np.arange(3)[None], inv)
    with pytest.raises(ShapeError, match="cos/sin"):
        rope_forward(np.zeros((1, 2, 4, 8)), cos, sin)             # 4 positions, tables for 3
    with pytest.raises(ShapeError, match="batch, heads, seq, head_dim"):
        rope_forward(np.zeros((2, 3, 8)), cos, sin)
    _, cache = rope_forward(np.zeros((1, 2, 3, 8)), cos, sin)
    with pytest.raises(ShapeError, match="dy"):
        rope_backward(np.zeros((1, 2, 3, 6)), cache)
