"""refpeft.train.gradients: clipping equals torch.nn.utils.clip_grad_norm_; accumulation sums by name.

- Gradients far above, just above, at and below max_norm, in float64 and float32, several tensors
  of different shapes: the clipped gradients and the returned total norm equal what
  clip_grad_norm_ leaves in `.grad` and returns (bit for bit in the element-wise scaling; the norm
  to the last bits of a reduction). Below max_norm the gradients come back unchanged, as torch's
  multiplication by 1.0 leaves them.
- Inputs are not modified (read-only arrays).
- Accumulation sums gradients name by name and refuses micro-batches that disagree on the names.
"""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.errors import ConfigError
from refpeft.train.gradients import add_gradients, clip_by_global_norm, global_norm

torch = pytest.importorskip("torch", reason="torch's clip_grad_norm_ is the peer")

SHAPES = {"a": (4, 7), "b": (7,), "c": (3, 2, 5)}


def grads(dtype, scale, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in SHAPES.items():
        g = (scale * rng.standard_normal(shape)).astype(dtype)
        g.setflags(write=False)
        out[name] = g
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("max_norm_factor", [0.01, 0.999, 1.0, 1.5, 100.0])
def test_clipping_equals_clip_grad_norm(dtype, max_norm_factor):
    g = grads(dtype, 0.3)
    params = []
    for name, value in g.items():
        p = torch.nn.Parameter(torch.zeros(value.shape, dtype=torch.float64 if dtype == np.float64 else torch.float32))
        p.grad = torch.from_numpy(value.copy())
        params.append(p)
    true_norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in g.values())))
    max_norm = max_norm_factor * true_norm
    torch_total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    clipped, total = clip_by_global_norm(g, max_norm)
    assert total.dtype == dtype
    tol = 4 * np.finfo(dtype).eps
    assert abs(float(total) - float(torch_total)) <= tol * float(torch_total)
    for p, (name, value) in zip(params, clipped.items()):
        assert value.dtype == dtype and value.shape == SHAPES[name]
        np.testing.assert_allclose(value, p.grad.numpy(), rtol=tol, atol=0)
        if max_norm_factor > 1.0:
            assert np.array_equal(value, g[name])                # scaled by exactly 1


def test_clipping_an_exact_norm():
    g = {"x": np.array([3.0, 4.0]), "y": np.array([[0.0, 12.0]])}           # total norm exactly 13
    p = [torch.nn.Parameter(torch.zeros_like(torch.from_numpy(v))) for v in g.values()]
    for q, v in zip(p, g.values()):
        q.grad = torch.from_numpy(v.copy())
    assert float(torch.nn.utils.clip_grad_norm_(p, 6.5)) == float(global_norm(g)) == 13.0
    clipped, _ = clip_by_global_norm(g, 6.5)
    assert all(np.array_equal(c, q.grad.numpy()) for c, q in zip(clipped.values(), p))


def test_accumulation_and_refusals():
    a, b = grads(np.float64, 1.0, seed=1), grads(np.float64, 1.0, seed=2)
    total = add_gradients(add_gradients(None, a), b)
    assert all(np.array_equal(total[n], a[n] + b[n]) for n in a)
    with pytest.raises(ConfigError, match="disagree"):
        add_gradients(a, {"a": a["a"]})
    with pytest.raises(ConfigError, match="max_norm must be positive"):
        clip_by_global_norm(a, 0.0)
    with pytest.raises(ConfigError, match="no gradients"):
        global_norm({})
