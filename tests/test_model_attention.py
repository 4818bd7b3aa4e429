"""Causal GQA attention: gradients, padding rows, the KV-cache offset, torch SDPA and transformers' eager."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.masking_utils import eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from refpeft.backend import UNIT_ROUNDOFF, to_numpy
from refpeft.errors import DTypeError, InputError, ShapeError
from refpeft.model.attention import attention_backward, attention_forward, attention_probs
from support import BACKENDS, BACKEND_IDS, assert_close, vjp_check

FAST = settings(max_examples=25, deadline=None)
U32 = UNIT_ROUNDOFF["float32"]


@st.composite
def attentions(draw, *, padded: bool | None = None):
    """q, k, v, dout for GQA with sq <= sk, and a left-padding mask (rows may be fully masked)."""
    b, kv_heads, group = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    sk = draw(st.integers(1, 6))
    sq, d = draw(st.integers(1, sk)), draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    h = kv_heads * group
    pad = draw(st.booleans()) if padded is None else padded
    mask = None
    if pad:
        lengths = rng.integers(1, sk + 1, b)            # every sequence keeps at least one real token
        mask = (np.arange(sk)[None, :] >= sk - lengths[:, None]).astype(np.int64)
    return dict(q=rng.standard_normal((b, h, sq, d)), k=rng.standard_normal((b, kv_heads, sk, d)),
                v=rng.standard_normal((b, kv_heads, sk, d)), dout=rng.standard_normal((b, h, sq, d)), mask=mask)


def fully_masked(mask, sq, sk):
    """(b, sq) bool: query rows with no real key at or before them (their position is i + sk - sq)."""
    positions = np.arange(sq) + sk - sq
    return ~np.any((np.arange(sk)[None, None, :] <= positions[None, :, None]) & (mask[:, None, :] == 1), axis=-1)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@FAST
@given(case=attentions())
def test_gradients_match_finite_differences(backend, case):
    mask = backend(case["mask"])
    _, cache = attention_forward(backend(case["q"]), backend(case["k"]), backend(case["v"]), attention_mask=mask)
    grads = attention_backward(backend(case["dout"]), cache)

    def f(q, k, v):
        return attention_forward(backend(q), backend(k), backend(v), attention_mask=mask)[0]

    vjp_check(f, {"q": case["q"], "k": case["k"], "v": case["v"]},
              {"q": grads.dq, "k": grads.dk, "v": grads.dv}, case["dout"])


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@FAST
@given(case=attentions(padded=False))
def test_forward_agrees_with_torch_sdpa_in_float64(backend, case):
    sq, sk = case["q"].shape[2], case["k"].shape[2]
    allowed = torch.tensor(np.arange(sk)[None, :] <= np.arange(sq)[:, None] + sk - sq)
    expected = torch.nn.functional.scaled_dot_product_attention(
        torch.tensor(case["q"]), torch.tensor(case["k"]), torch.tensor(case["v"]), attn_mask=allowed, enable_gqa=True)
    out, _ = attention_forward(backend(case["q"]), backend(case["k"]), backend(case["v"]))
    assert_close(out, expected.numpy(), rtol=1e-12, like=backend(case["q"]))


@FAST
@given(case=attentions(padded=True))
def test_padded_rows_agree_with_torch_sdpa_in_float64(case):
    mask, (sq, sk) = case["mask"], (case["q"].shape[2], case["k"].shape[2])
    allowed = (np.arange(sk)[None, :] <= np.arange(sq)[:, None] + sk - sq)[None, None] & (mask[:, None, None] == 1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        torch.tensor(case["q"]), torch.tensor(case["k"]), torch.tensor(case["v"]), attn_mask=torch.tensor(allowed),
        enable_gqa=True).numpy()
    out, _ = attention_forward(case["q"], case["k"], case["v"], attention_mask=mask)
    real = ~fully_masked(mask, sq, sk)                   # (b, sq): rows with a key to attend to
    assert_close(out.transpose(0, 2, 1, 3)[real], expected.transpose(0, 2, 1, 3)[real], rtol=1e-12)


@FAST
@given(case=attentions(padded=True))
def test_a_fully_masked_row_averages_every_value_and_passes_no_gradient_to_q(case):
    q, k, v, mask = case["q"], case["k"], case["v"], case["mask"]
    sq, sk = q.shape[2], k.shape[2]
    out, cache = attention_forward(q, k, v, attention_mask=mask)
    grads = attention_backward(case["dout"], cache)
    group = q.shape[1] // k.shape[1]
    mean_v = np.repeat(v, group, axis=1).mean(axis=2, keepdims=True)             # (b, h, 1, D)
    for b, i in zip(*np.nonzero(fully_masked(mask, sq, sk))):
        assert_close(out[b, :, i], mean_v[b, :, 0], rtol=1e-14)
        assert np.all(grads.dq[b, :, i] == 0.0)
    assert np.all(np.isfinite(out))


@FAST
@given(case=attentions())
def test_queries_are_the_last_positions_of_the_keys(case):
    # A KV-cache step: the last sq queries of a full pass give the same rows as the full pass.
    q_full = np.concatenate([np.zeros((*case["q"].shape[:2], case["k"].shape[2] - case["q"].shape[2],
                                       case["q"].shape[3])), case["q"]], axis=2)
    full, _ = attention_forward(q_full, case["k"], case["v"], attention_mask=case["mask"])
    step, _ = attention_forward(case["q"], case["k"], case["v"], attention_mask=case["mask"])
    assert_close(step, full[:, :, -case["q"].shape[2]:], rtol=1e-13)


class _EagerModule:
    """The attributes eager_attention_forward reads from its module."""

    def __init__(self, group: int):
        self.num_key_value_groups = group
        self.training = False


@FAST
@given(case=attentions())
def test_forward_agrees_with_transformers_eager_within_its_float32_error(case):
    # eager runs its softmax in float32 (and in float64 turns finfo(float64).min into -inf there, a NaN
    # for fully masked rows), so the peer runs in float32 on float32-representable inputs, with
    # transformers' own eager_mask. To first order, a score error |ds| <= gamma_{D+1} |q||k| D^-0.5 moves
    # P_j by at most P_j (2 max|ds| + (sk + 3) u) and P v adds gamma_sk: per output entry
    # |dO| <= (2 max|ds| + (2 sk + 4) u) (P |v|), with P refpeft's float64 probabilities.
    c = {n: (None if a is None else a.astype(np.float32).astype(np.float64)) for n, a in case.items()}
    b, h, sq, d = c["q"].shape
    sk, group = c["k"].shape[2], h // c["k"].shape[1]
    mask_2d = None if c["mask"] is None else torch.tensor(case["mask"]).bool()
    mask4 = eager_mask(batch_size=b, q_length=sq, kv_length=sk, q_offset=sk - sq, attention_mask=mask_2d,
                       dtype=torch.float32)
    peer, _ = eager_attention_forward(_EagerModule(group), *(torch.tensor(c[n]).float() for n in "qkv"),
                                      mask4, scaling=d**-0.5)
    out, cache = attention_forward(c["q"], c["k"], c["v"], attention_mask=case["mask"])
    kr, vr = np.repeat(c["k"], group, axis=1), np.repeat(c["v"], group, axis=1)
    gamma = (d + 1) * U32 / (1 - (d + 1) * U32)
    ds = gamma * d**-0.5 * np.max(np.linalg.norm(c["q"], axis=-1)[..., None] * np.linalg.norm(kr, axis=-1)[:, :, None],
                                  axis=-1, keepdims=True)               # (b, h, sq, 1); sum|q||k| <= ||q|| ||k||
    bound = (2 * ds + (2 * sk + 4) * U32) * (attention_probs(cache) @ np.abs(vr)) * (1 + 1e-2)  # 1% for 2nd order
    err = np.abs(peer.double().numpy().transpose(0, 2, 1, 3) - out)
    assert np.all(err <= bound + 1e-45), float(np.max(err / bound))


def test_the_cache_keeps_no_score_sized_array_and_recomputes_the_probabilities():
    # Memory: the cache keeps each row's softmax max and sum, not P (b, h, sq, sk); attention_probs
    # (and backward) recompute P from q, k and those, and it is the softmax the output was made from.
    rng = np.random.default_rng(2)
    q, k, v = rng.standard_normal((2, 4, 5, 3)), rng.standard_normal((2, 2, 6, 3)), rng.standard_normal((2, 2, 6, 3))
    mask = np.array([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out, cache = attention_forward(q, k, v, attention_mask=mask)
    arrays = [getattr(cache, f.name) for f in dataclasses.fields(cache) if f.name != "scaling"]
    assert max(np.size(a) for a in arrays) < 2 * 4 * 5 * 6
    kr, vr = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)
    allowed = (np.arange(6)[None, :] <= np.arange(5)[:, None] + 1) & (mask[:, None, None, :] == 1)
    S = np.where(allowed, q @ kr.transpose(0, 1, 3, 2) * 3**-0.5, np.finfo(np.float64).min)
    P = np.exp(S - S.max(axis=-1, keepdims=True))
    assert_close(attention_probs(cache), P / P.sum(axis=-1, keepdims=True), rtol=1e-14)
    assert_close(attention_probs(cache) @ vr, out, rtol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_bool_and_integer_masks_mean_the_same(backend):
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((2, 2, 3, 4)), rng.standard_normal((2, 1, 3, 4)), rng.standard_normal((2, 1, 3, 4))
    mask = np.array([[0, 1, 1], [1, 1, 1]])
    a, _ = attention_forward(backend(q), backend(k), backend(v), attention_mask=backend(mask))
    b, _ = attention_forward(backend(q), backend(k), backend(v), attention_mask=backend(mask.astype(bool)))
    assert_close(a, to_numpy(b), rtol=0.0, like=backend(q))


def test_bad_input_is_refused():
    q, kv = np.zeros((1, 3, 2, 4)), np.zeros((1, 2, 2, 4))
    with pytest.raises(ShapeError, match="3 query heads cannot be shared evenly by 2"):
        attention_forward(q, kv, kv)
    q = np.zeros((1, 4, 2, 4))
    with pytest.raises(ShapeError, match="k has shape"):
        attention_forward(q, kv, np.zeros((1, 2, 3, 4)))
    with pytest.raises(ShapeError, match="head_dim"):
        attention_forward(q, np.zeros((1, 2, 2, 5)), np.zeros((1, 2, 2, 5)))
    with pytest.raises(ShapeError, match="3 queries but only 2 keys"):
        attention_forward(np.zeros((1, 4, 3, 4)), kv, kv)
    with pytest.raises(ShapeError, match="attention_mask"):
        attention_forward(q, kv, kv, attention_mask=np.ones((1, 3), dtype=np.int64))
    with pytest.raises(InputError, match=r"attention_mask\[0, 1\] = 2"):
        attention_forward(q, kv, kv, attention_mask=np.array([[1, 2]]))
    with pytest.raises(DTypeError, match="attention_mask"):
        attention_forward(q, kv, kv, attention_mask=np.ones((1, 2)))
    _, cache = attention_forward(q, kv, kv)
    with pytest.raises(ShapeError, match="dout"):
        attention_backward(np.zeros((1, 2, 2, 4)), cache)
