"""Token embedding: the gradient vs finite differences and torch autograd, backends, chunking, bad ids."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import refpeft.model.embedding as embedding_module
from refpeft.backend import to_numpy
from refpeft.errors import ConfigError, DTypeError, InputError, ShapeError
from refpeft.model.embedding import embedding_backward, embedding_forward
from support import BACKENDS, BACKEND_IDS, assert_close, vjp_check

FAST = settings(max_examples=25, deadline=None)


@st.composite
def lookups(draw):
    """A (vocab, hidden) table, (batch, seq) ids with repeats likely, dout, and maybe a padding row."""
    vocab, hidden = draw(st.integers(1, 30)), draw(st.integers(1, 8))
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    padding_idx = draw(st.one_of(st.none(), st.integers(0, vocab - 1)))
    return dict(weight=rng.standard_normal((vocab, hidden)), ids=rng.integers(0, vocab, (batch, seq)),
                dout=rng.standard_normal((batch, seq, hidden)), padding_idx=padding_idx)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@FAST
@given(case=lookups())
def test_weight_gradient_matches_finite_differences(backend, case):
    ids = backend(case["ids"])
    _, cache = embedding_forward(ids, backend(case["weight"]))
    dW = embedding_backward(backend(case["dout"]), cache)

    def f(weight):
        return embedding_forward(ids, backend(weight))[0]

    vjp_check(f, {"weight": case["weight"]}, {"weight": dW}, case["dout"])
    if case["padding_idx"] is not None:  # the padding row is frozen, every other row is unchanged
        _, padded = embedding_forward(ids, backend(case["weight"]), padding_idx=case["padding_idx"])
        expected = to_numpy(dW).copy()
        expected[case["padding_idx"]] = 0.0
        assert_close(embedding_backward(backend(case["dout"]), padded), expected, rtol=0.0, like=dW)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@FAST
@given(case=lookups())
def test_forward_and_gradient_agree_with_torch_embedding(backend, case):
    W = torch.tensor(case["weight"], requires_grad=True)
    ids = torch.tensor(case["ids"])
    expected = torch.nn.functional.embedding(ids, W, padding_idx=case["padding_idx"])
    expected.backward(torch.tensor(case["dout"]))
    out, cache = embedding_forward(backend(case["ids"]), backend(case["weight"]), padding_idx=case["padding_idx"])
    assert_close(out, expected.detach().numpy(), rtol=0.0, like=backend(case["weight"]))  # a copy of rows
    dW = embedding_backward(backend(case["dout"]), cache)
    assert_close(dW, W.grad.numpy(), rtol=1e-12, like=backend(case["weight"]))


def test_the_one_hot_chunks_never_change_the_gradient(monkeypatch):
    rng = np.random.default_rng(3)
    W, ids, dout = rng.standard_normal((40, 5)), rng.integers(0, 40, (3, 9)), rng.standard_normal((3, 9, 5))
    _, cache = embedding_forward(ids, W)
    whole = embedding_backward(dout, cache)
    monkeypatch.setattr(embedding_module, "_CHUNK_ELEMENTS", 7)  # chunks of one distinct id at a time
    expected = np.zeros_like(W)
    np.add.at(expected, ids.reshape(-1), dout.reshape(-1, 5))
    assert_close(embedding_backward(dout, cache), expected, rtol=1e-15)
    assert_close(whole, expected, rtol=1e-15)


def test_a_large_vocabulary_needs_no_tokens_by_vocabulary_array():
    vocab, hidden = 49152, 4
    W = np.zeros((vocab, hidden))
    ids = np.array([[0, 49151, 7, 7]])
    _, cache = embedding_forward(ids, W)
    dW = embedding_backward(np.ones((1, 4, hidden)), cache)
    assert dW.shape == (vocab, hidden)
    np.testing.assert_array_equal(dW[[0, 7, 49151]], [[1.0] * 4, [2.0] * 4, [1.0] * 4])
    assert np.count_nonzero(dW) == 3 * hidden


@pytest.mark.parametrize("bad, error, words", [
    (np.array([[0, 5]]), InputError, "ids[0, 1] = 5"),
    (np.array([[-1, 2]]), InputError, "ids[0, 0] = -1"),
    (np.array([[0.0, 1.0]]), DTypeError, "integers"),
    (np.array([0, 1]), ShapeError, "2 dimensions"),
])
def test_bad_ids_are_refused_with_the_offending_value(bad, error, words):
    with pytest.raises(error, match=re.escape(words)):
        embedding_forward(bad, np.zeros((5, 3)))


def test_bad_tables_and_padding_rows_are_refused():
    ids = np.array([[0, 1]])
    with pytest.raises(ShapeError, match="vocab_size, hidden_size"):
        embedding_forward(ids, np.zeros(5))
    with pytest.raises(ConfigError, match="padding_idx 5"):
        embedding_forward(ids, np.zeros((5, 3)), padding_idx=5)
    _, cache = embedding_forward(ids, np.zeros((5, 3)))
    with pytest.raises(ShapeError, match="dout"):
        embedding_backward(np.zeros((1, 2, 4)), cache)

