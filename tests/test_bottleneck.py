"""Bottleneck adapters: the block's and the whole model's backward against finite differences, backends, configs.

The peer (AdapterHub's `adapters`, in its own environment) is tests/test_bottleneck_vs_adapters.py;
here the hand-written gradients meet float64 finite differences (refpeft.gradcheck) on hypothesis
shapes, with relu's kink kept out of reach of the finite-difference steps.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from refpeft.errors import ConfigError, DTypeError, ShapeError
from refpeft.methods.bottleneck import (HOULSBY, NON_LINEARITIES, PFEIFFER, BottleneckParams, block_backward,
                                        block_forward, bottleneck_config, bottleneck_forward, bottleneck_init,
                                        parameter_count)
from refpeft.model.bottleneck_adapters import (adapter_paths, bottleneck_adapters, init_bottleneck_adapters,
                                               residual_add)
from refpeft.model.config import config_from_dict
from refpeft.model.decoder import Model, backward, forward
from refpeft.model.generate import decode_step, prefill
from tests.support import BACKEND_IDS, BACKENDS, assert_close, vjp_check

FAST = settings(max_examples=25, deadline=None)
KINK = 1e-3     # relu cases keep every pre-activation this far from 0; their steps (h = 1e-5) move it by < 1e-4


def _params(rng, H: int, m: int) -> dict[str, np.ndarray]:
    return {"W_down": 0.5 * rng.standard_normal((m, H)), "b_down": 0.5 * rng.standard_normal(m),
            "W_up": 0.5 * rng.standard_normal((H, m)), "b_up": 0.5 * rng.standard_normal(H)}


@st.composite
def blocks(draw):
    """o, r, dy of one shape (0 to 2 leading axes), the four tensors, a placement and an activation."""
    H = draw(st.integers(1, 24))
    m = draw(st.integers(1, 8))
    shape = (*draw(st.lists(st.integers(1, 4), max_size=2)), H)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    config = bottleneck_config(draw(st.sampled_from(["houlsby", "pfeiffer"])),
                               non_linearity=draw(st.sampled_from(NON_LINEARITIES)),
                               scaling=draw(st.sampled_from([1.0, 0.5, 3.0])))
    arrays = {k: rng.standard_normal(shape) for k in ("o", "r", "dy")}
    return config, arrays, _params(rng, H, m)


# The difference quotient's floor relative to the gradient (rounding eps |L| / (h |g|) at relu's small step,
# truncation of order h^2 at the smooth ones) reaches 1e-7 when a gradient (b_down's, a sum over rows)
# nearly cancels: CI met 1.2e-7 with tanh. A wrong gradient is off by O(1).
FD_TOL = 1e-6


def _h(config) -> float:
    return 1e-5 if config.non_linearity == "relu" else 1e-4


@FAST
@given(case=blocks())
def test_block_gradients_match_finite_differences(case):
    config, x, p = case
    e, cache = block_forward(x["o"], x["r"], BottleneckParams(**p), config)
    if config.non_linearity == "relu":
        assume(float(np.min(np.abs(cache.adapter.z))) > KINK)
    do, dr, grads = block_backward(x["dy"], cache)

    def f(o, r, W_down, b_down, W_up, b_up):
        return block_forward(o, r, BottleneckParams(W_down, b_down, W_up, b_up), config)[0]

    vjp_check(f, {"o": x["o"], "r": x["r"], **p}, {"o": do, "r": dr, **grads}, x["dy"], h=_h(config),
              tol=FD_TOL)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@FAST
@given(case=blocks())
def test_every_backend_computes_what_numpy_does(backend, case):
    config, x, p = case
    e, cache = block_forward(x["o"], x["r"], BottleneckParams(**p), config)
    do, dr, grads = block_backward(x["dy"], cache)
    e_b, cache_b = block_forward(backend(x["o"]), backend(x["r"]),
                                 BottleneckParams(**{k: backend(v) for k, v in p.items()}), config)
    do_b, dr_b, grads_b = block_backward(backend(x["dy"]), cache_b)
    like = backend(x["o"])
    for ours, numpy_result in ((e_b, e), (do_b, do), (dr_b, dr), *((grads_b[k], grads[k]) for k in grads)):
        assert_close(ours, numpy_result, rtol=1e-13, like=like)


def test_the_two_placements():
    # Houlsby: A(o) + r; Pfeiffer: A(o + r); a zero adapter (mam_adapter's init) is the plain residual sum.
    rng = np.random.default_rng(0)
    o, r = rng.standard_normal((3, 8)), rng.standard_normal((3, 8))
    p = BottleneckParams(**_params(rng, 8, 2))
    houlsby, _ = block_forward(o, r, p, HOULSBY)
    pfeiffer, _ = block_forward(o, r, p, PFEIFFER)
    adapter_at = block_forward(o, np.zeros_like(r), p, HOULSBY)[0]          # A(o) = o + up(o)
    assert_close(houlsby, adapter_at + r, rtol=1e-15)
    houlsby_relu = bottleneck_config("houlsby", non_linearity="relu")
    assert_close(pfeiffer, block_forward(o + r, np.zeros_like(r), p, houlsby_relu)[0], rtol=1e-15)
    zero = bottleneck_init(8, bottleneck_config("houlsby", init_weights="mam_adapter"), seed=1)
    assert np.array_equal(block_forward(o, r, zero, HOULSBY)[0], o + r)
    assert float(np.max(np.abs(zero.W_down))) > 0.0


def test_bert_init_is_small_normal_weights_and_zero_biases():
    p = bottleneck_init(256, PFEIFFER, seed=3)
    assert p.W_down.shape == (16, 256) and p.W_up.shape == (256, 16)       # m = 256 // 16
    assert not p.b_down.any() and not p.b_up.any()
    for W in (p.W_down, p.W_up):
        assert abs(float(np.std(W)) - 0.02) < 0.002 and abs(float(np.mean(W))) < 0.002
    assert parameter_count(256, PFEIFFER) == 2 * 16 * 256 + 16 + 256


# --- configs ---------------------------------------------------------------------------------------


def test_the_named_architectures_are_the_libraries_defaults():
    assert bottleneck_config("double_seq_bn") == bottleneck_config("houlsby") == HOULSBY
    assert (HOULSBY.mh_adapter, HOULSBY.output_adapter, HOULSBY.original_ln_before, HOULSBY.non_linearity) == \
        (True, True, False, "swish")
    assert (PFEIFFER.mh_adapter, PFEIFFER.output_adapter, PFEIFFER.original_ln_before, PFEIFFER.non_linearity) == \
        (False, True, True, "relu")
    assert HOULSBY.reduction_factor == PFEIFFER.reduction_factor == 16


@pytest.mark.parametrize("option,value", [("ln_before", True), ("ln_after", True), ("is_parallel", True),
                                          ("use_gating", True), ("phm_layer", True), ("dropout", 0.1),
                                          ("residual_before_ln", "post_add"), ("original_ln_after", False),
                                          ("inv_adapter", "nice"), ("adapter_residual_before_ln", True)])
def test_options_that_change_the_math_are_refused_by_name(option, value):
    spec = {"mh_adapter": False, "output_adapter": True, "original_ln_before": True, "non_linearity": "relu",
            option: value}
    with pytest.raises(ConfigError, match=option):
        bottleneck_config(spec)


@pytest.mark.parametrize("overrides,word", [(dict(non_linearity="gelu"), "non_linearity"),
                                            (dict(scaling="learned"), "scaling"),
                                            (dict(reduction_factor={"default": 16}), "reduction_factor"),
                                            (dict(init_weights="houlsby"), "init_weights"),
                                            (dict(mh_adapter=False, output_adapter=False), "neither")])
def test_unsupported_values_are_refused(overrides, word):
    with pytest.raises(ConfigError, match=word):
        bottleneck_config("houlsby", **overrides)


def test_shapes_dtypes_and_names_are_checked():
    p = bottleneck_init(8, HOULSBY, seed=0)
    with pytest.raises(ShapeError, match="W_down"):
        block_forward(np.zeros((2, 9)), np.zeros((2, 9)), p, HOULSBY)
    with pytest.raises(DTypeError):
        block_forward(np.zeros((2, 8), np.float32), np.zeros((2, 8), np.float32), p, HOULSBY)
    with pytest.raises(ConfigError, match="gelu"):
        bottleneck_forward(np.zeros((2, 8)), p, non_linearity="gelu")
    with pytest.raises(ConfigError, match="reduction"):
        bottleneck_config("houlsby", reduction=4)
    with pytest.raises(ConfigError, match="missing"):
        bottleneck_adapters(HOULSBY, {}, num_layers=1, hidden=8)


# --- the whole model -------------------------------------------------------------------------------


def _tiny(rng, *, layers: int, H: int, heads: int, kv: int) -> Model:
    cfg = config_from_dict(dict(model_type="llama", vocab_size=23, hidden_size=H, intermediate_size=12,
                                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                max_position_embeddings=32))
    D, V = H // heads, cfg.vocab_size
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
                       f"{p}.self_attn.q_proj.weight": (heads * D, H), f"{p}.self_attn.k_proj.weight": (kv * D, H),
                       f"{p}.self_attn.v_proj.weight": (kv * D, H), f"{p}.self_attn.o_proj.weight": (H, heads * D),
                       f"{p}.mlp.gate_proj.weight": (12, H), f"{p}.mlp.up_proj.weight": (12, H),
                       f"{p}.mlp.down_proj.weight": (H, 12)})
    weights = {n: 1.0 + 0.2 * rng.standard_normal(s) if n.endswith("norm.weight") else 0.3 * rng.standard_normal(s)
               for n, s in shapes.items()}
    return Model(cfg, weights)


@st.composite
def models(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    heads = draw(st.sampled_from([1, 2]))
    model = _tiny(rng, layers=draw(st.integers(1, 2)), H=4 * heads * draw(st.integers(1, 2)), heads=heads,
                  kv=draw(st.sampled_from([1, heads])))
    config = bottleneck_config(draw(st.sampled_from(["houlsby", "pfeiffer"])),
                               non_linearity=draw(st.sampled_from(NON_LINEARITIES)),
                               reduction_factor=draw(st.sampled_from([2, 4, 16])),
                               leave_out=tuple(draw(st.lists(st.integers(0, 1), max_size=1))))
    c = model.config
    fresh = init_bottleneck_adapters(c.num_hidden_layers, c.hidden_size, config).tensors()
    tensors = {n: 0.5 * rng.standard_normal(a.shape) for n, a in fresh.items()}
    ids = rng.integers(0, c.vocab_size, size=(draw(st.integers(1, 2)), draw(st.integers(1, 5))))
    return model, config, tensors, ids


@FAST
@given(case=models())
def test_model_gradients_match_finite_differences(case):
    model, config, tensors, ids = case
    c = model.config
    assume(adapter_paths(c.num_hidden_layers, config))                       # leave_out may leave none

    def with_adapters(values):
        return Model(c, model.weights, bottleneck=bottleneck_adapters(config, values, num_layers=c.num_hidden_layers,
                                                                      hidden=c.hidden_size))

    logits, tape, _ = forward(with_adapters(tensors), ids)
    if config.non_linearity == "relu":
        zs = [cache.adapter.z for kind, cache in tape.entries if kind.startswith("bottleneck:")]
        assume(min(float(np.min(np.abs(z))) for z in zs) > KINK)
    dy = np.random.default_rng(1).standard_normal(logits.shape)
    grads = backward(with_adapters(tensors), dy, tape)
    assert set(grads) == set(tensors)                                       # the base is frozen

    def f(**values):
        return forward(with_adapters(values), ids, record=False)[0]

    vjp_check(f, tensors, grads, dy, h=_h(config), tol=FD_TOL)


def test_no_adapter_at_a_place_is_the_plain_residual_sum():
    rng = np.random.default_rng(4)
    model = _tiny(rng, layers=2, H=8, heads=2, kv=1)
    ids = rng.integers(0, 23, size=(2, 4))
    config = bottleneck_config("pfeiffer", init_weights="mam_adapter")
    fresh = init_bottleneck_adapters(2, 8, config)
    adapted = Model(model.config, model.weights, bottleneck=fresh)
    assert np.array_equal(forward(adapted, ids)[0], forward(model, ids)[0])   # zero W_up, b_up: e + o exactly
    entries: list = []
    e, o = rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 4, 8))
    assert np.array_equal(residual_add(fresh, "model.layers.0", "attention", e, o, entries), e + o) and not entries


def test_cached_decoding_applies_the_adapters_as_the_full_forward_does():
    rng = np.random.default_rng(6)
    model = _tiny(rng, layers=2, H=8, heads=2, kv=1)
    config = bottleneck_config("houlsby", reduction_factor=2)
    fresh = init_bottleneck_adapters(2, 8, config).tensors()
    tensors = {n: 0.5 * rng.standard_normal(a.shape) for n, a in fresh.items()}
    adapted = Model(model.config, model.weights,
                    bottleneck=bottleneck_adapters(config, tensors, num_layers=2, hidden=8))
    ids = rng.integers(0, 23, size=(2, 6))
    full = forward(adapted, ids)[0]
    last, state = prefill(adapted, ids[:, :5])
    step, _ = decode_step(adapted, ids[:, 5:], state)
    assert_close(last, full[:, 4, :], rtol=1e-13)
    assert_close(step, full[:, 5, :], rtol=1e-13)
    assert float(np.max(np.abs(full - forward(model, ids)[0]))) > 1e-2     # the adapters do change the logits


def test_the_onnx_decoder_refuses_a_model_with_bottleneck_adapters_rather_than_dropping_them():
    pytest.importorskip("onnx")
    from refpeft_onnx.decoder_graph import build_decoder

    rng = np.random.default_rng(5)
    model = _tiny(rng, layers=2, H=8, heads=2, kv=1)
    adapted = Model(model.config, model.weights, bottleneck=init_bottleneck_adapters(2, 8, bottleneck_config("houlsby")))
    with pytest.raises(ConfigError, match="bottleneck adapters"):
        build_decoder(adapted)
    assert build_decoder(model).graph.output[0].name == "logits"
