"""Causal-LM cross-entropy: the gradient, transformers' ForCausalLMLoss, the shift, ignored labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.loss.loss_utils import ForCausalLMLoss

from refpeft.backend import UNIT_ROUNDOFF
from refpeft.errors import ConfigError, DTypeError, InputError, ShapeError
from refpeft.model import loss as loss_module
from refpeft.model.loss import causal_lm_loss_backward, causal_lm_loss_forward
from support import BACKENDS, BACKEND_IDS, assert_close, vjp_check

FAST = settings(max_examples=25, deadline=None)
U32 = UNIT_ROUNDOFF["float32"]


@st.composite
def batches(draw, scales=(1.0, 30.0)):
    """logits (b, s, V) of scale up to 30, labels with some -100 (at least one counted), maybe N."""
    b, s, V = draw(st.integers(1, 3)), draw(st.integers(2, 6)), draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    labels = rng.integers(0, V, (b, s))
    labels[rng.random((b, s)) < 0.3] = -100
    labels[0, 1] = rng.integers(0, V)                   # the first target always counts
    scale = draw(st.sampled_from(scales))
    n_items = draw(st.one_of(st.none(), st.integers(1, 40)))
    return dict(logits=scale * rng.standard_normal((b, s, V)), labels=labels, n_items=n_items,
                dloss=float(rng.standard_normal()))


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@FAST
@given(case=batches(scales=(0.3, 3.0)))  # a saturated softmax has gradients below the differences' rounding
def test_gradient_matches_finite_differences(backend, case):
    labels, n = backend(case["labels"]), case["n_items"]
    _, cache = causal_lm_loss_forward(backend(case["logits"]), labels, num_items_in_batch=n)
    dlogits = causal_lm_loss_backward(backend(np.asarray(case["dloss"])), cache)

    def f(logits):
        return causal_lm_loss_forward(backend(logits), labels, num_items_in_batch=n)[0]

    vjp_check(f, {"logits": case["logits"]}, {"logits": dlogits}, np.asarray(case["dloss"]))


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@FAST
@given(case=batches())
def test_loss_agrees_with_torch_cross_entropy_on_shifted_labels_in_float64(backend, case):
    # The specification: position i is scored against label i + 1; ignored labels do not count.
    V = case["logits"].shape[-1]
    z, t = torch.tensor(case["logits"][:, :-1]).reshape(-1, V), torch.tensor(case["labels"][:, 1:]).reshape(-1)
    n = case["n_items"]
    expected = (torch.nn.functional.cross_entropy(z, t, reduction="sum") / n if n is not None
                else torch.nn.functional.cross_entropy(z, t))
    loss, cache = causal_lm_loss_forward(backend(case["logits"]), backend(case["labels"]), num_items_in_batch=n)
    # A near-zero loss is a difference of two O(max|z|) numbers: an absolute floor of a few u max|z| per token.
    count = int(np.sum(case["labels"][:, 1:] != -100))
    floor = (2 * np.max(np.abs(case["logits"])) + V + 2) * UNIT_ROUNDOFF["float64"] * count / cache.denominator
    assert_close(loss, expected.numpy(), rtol=1e-12, atol=floor, like=backend(case["logits"]))


@FAST
@given(case=batches())
def test_loss_and_gradient_agree_with_for_causal_lm_loss_within_its_float32_error(case):
    # ForCausalLMLoss computes in float32 (`logits.float()`, a downcast for float64 logits), so it
    # runs on float32-representable logits against refpeft in float64. Per counted token the float32
    # log-softmax errs by at most u (|z_t| + |m|) for the subtractions, gamma_V for the sum of
    # exponentials (which the log turns into an absolute error) and u |log-sum| for the log: the mean
    # of those, plus gamma_n of the final sum relative to the loss.
    z = case["logits"].astype(np.float32).astype(np.float64)
    V = z.shape[-1]
    zt = torch.tensor(z, dtype=torch.float32, requires_grad=True)
    n = case["n_items"]
    peer = ForCausalLMLoss(zt, torch.tensor(case["labels"]), vocab_size=V, num_items_in_batch=n)
    peer.backward()
    loss, cache = causal_lm_loss_forward(z, case["labels"], num_items_in_batch=n)
    counted = np.concatenate([case["labels"][:, 1:], np.full((z.shape[0], 1), -100)], axis=1) != -100
    m = np.max(np.abs(z), axis=-1)
    per_token = (2 * m + np.log(V) + 2) * U32 + (V + 1) * U32 / (1 - (V + 1) * U32)
    count = counted.sum()
    bound = per_token[counted].sum() / cache.denominator + (count + 1) * U32 * abs(float(loss))
    assert abs(float(peer.detach()) - float(loss)) <= bound * (1 + 1e-3)
    # dlogits = c / N (softmax - onehot): one float32 softmax entry errs by (2 max|z| + V + 3) u.
    dlogits = causal_lm_loss_backward(1.0, cache)
    grad_bound = (2 * m + V + 3)[..., None] * U32 / cache.denominator * (1 + 1e-3)
    assert np.all(np.abs(zt.grad.double().numpy() - dlogits) <= grad_bound)


def test_the_first_label_is_never_a_target_and_the_last_position_predicts_nothing():
    rng = np.random.default_rng(0)
    z, labels = rng.standard_normal((2, 4, 5)), rng.integers(0, 5, (2, 4))
    loss, cache = causal_lm_loss_forward(z, labels)
    other = labels.copy()
    other[:, 0] = -7                                   # not even a valid label: it is never read
    assert causal_lm_loss_forward(z, other)[0] == loss
    assert np.all(causal_lm_loss_backward(1.0, cache)[:, -1] == 0.0)


def test_the_cache_keeps_no_vocabulary_sized_array_and_chunking_changes_no_bit(monkeypatch):
    # Memory: the cache refers to the caller's logits and keeps one number per row, no (n, V) array
    # of its own (no probabilities); backward recomputes softmax from the logits and lse. The rows go
    # in chunks, and a row's max, sum and exponentials do not depend on the chunking.
    rng = np.random.default_rng(3)
    z, labels = 4.0 * rng.standard_normal((3, 5, 7)), rng.integers(0, 7, (3, 5))
    labels[1, 2] = -100
    loss, cache = causal_lm_loss_forward(z, labels)
    dz = causal_lm_loss_backward(0.7, cache)
    assert np.shares_memory(cache.logits, z)
    assert all(np.size(a) == 15 for a in (cache.lse, cache.targets, cache.counted))
    for chunk in (1, 7, 20, 2**20):                      # one row per chunk (at least one) .. all rows at once
        monkeypatch.setattr(loss_module, "_CHUNK_ELEMENTS", chunk)
        loss_c, cache_c = causal_lm_loss_forward(z, labels)
        assert loss_c == loss and np.array_equal(causal_lm_loss_backward(0.7, cache_c), dz)


def test_every_label_ignored_raises_for_the_mean_and_gives_zero_for_a_sum():
    z, labels = np.zeros((1, 3, 4)), np.array([[1, -100, -100]])
    with pytest.raises(InputError, match="NaN"):
        causal_lm_loss_forward(z, labels)
    loss, cache = causal_lm_loss_forward(z, labels, num_items_in_batch=8)
    assert float(loss) == 0.0
    assert np.all(causal_lm_loss_backward(1.0, cache) == 0.0)


def test_bad_input_is_refused():
    z = np.zeros((1, 3, 4))
    with pytest.raises(InputError, match=r"labels\[:, 1:\]\[0, 1\] = 4"):
        causal_lm_loss_forward(z, np.array([[0, 1, 4]]))
    with pytest.raises(InputError, match="-1"):
        causal_lm_loss_forward(z, np.array([[0, -1, 2]]))
    with pytest.raises(ShapeError, match="labels has shape"):
        causal_lm_loss_forward(z, np.array([[0, 1]]))
    with pytest.raises(ShapeError, match="logits has shape"):
        causal_lm_loss_forward(np.zeros((3, 4)), np.array([[0, 1, 2]]))
    with pytest.raises(DTypeError, match="labels"):
        causal_lm_loss_forward(z, np.array([[0.0, 1.0, 2.0]]))
    with pytest.raises(ConfigError, match="num_items_in_batch"):
        causal_lm_loss_forward(z, np.array([[0, 1, 2]]), num_items_in_batch=0)
    _, cache = causal_lm_loss_forward(z, np.array([[0, 1, 2]]))
    with pytest.raises(ShapeError, match="dloss"):
        causal_lm_loss_backward(np.ones(2), cache)
