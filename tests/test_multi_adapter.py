"""Multi-adapter batches (refpeft.multi_adapter): each token as its slot's merged layer, layouts agree, bad input refused."""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.adapter import ModuleAdapter
from refpeft.errors import ConfigError, InputError, ShapeError
from refpeft.methods.dora import dora_merge
from refpeft.methods.lora import lora_merge
from refpeft.multi_adapter import SlotStack, mixed_forward, mixed_forward_bound, segment_token_slots, stack_slots

K, D = 12, 10


def _modules(rng: np.random.Generator) -> list[ModuleAdapter]:
    return [ModuleAdapter("lora", {"A": rng.standard_normal((3, K)), "B": rng.standard_normal((D, 3))}, alpha=6.0),
            ModuleAdapter("dora", {"A": rng.standard_normal((5, K)), "B": rng.standard_normal((D, 5)),
                                   "magnitude": rng.random(D) + 0.5}, alpha=4.0, rslora=True),
            ModuleAdapter("lora", {"A": rng.standard_normal((1, K)), "B": rng.standard_normal((D, 1))}, alpha=2.0,
                          rslora=True)]


@pytest.fixture
def batch():
    rng = np.random.default_rng(7)
    modules = _modules(rng)
    x, W0, bias = rng.standard_normal((9, K)), rng.standard_normal((D, K)), rng.standard_normal(D)
    slots = np.array([2, -1, 0, 1, 1, -1, 0, 2, 1])
    return modules, x, W0, bias, slots


def test_each_token_equals_its_slots_merged_layer(batch):
    modules, x, W0, bias, slots = batch
    out = mixed_forward(x, W0, stack_slots(modules), slots, bias=bias)
    for i, j in enumerate(slots):
        if j < 0:
            W = W0
        elif modules[j].method == "dora":
            m = modules[j]
            W = dora_merge(W0, m.A, m.B, m.magnitude, scaling=m.scaling)
        else:
            W = lora_merge(W0, modules[j].A, modules[j].B, scaling=modules[j].scaling)
        np.testing.assert_allclose(out.y[i], x[i] @ W.T + bias, rtol=1e-12, atol=1e-12)


def test_shrink_is_padded_and_expand_is_the_lora_delta(batch):
    modules, x, W0, bias, slots = batch
    out = mixed_forward(x, W0, stack_slots(modules), slots, bias=bias)
    assert out.shrink.shape == (9, 5) and out.expand.shape == (9, D)
    for i, j in enumerate(slots):
        if j < 0:
            assert not out.shrink[i].any() and not out.expand[i].any()
            continue
        m = modules[j]
        np.testing.assert_allclose(out.shrink[i, : m.r], m.A @ x[i], rtol=1e-12)
        assert not out.shrink[i, m.r:].any()
        np.testing.assert_allclose(out.expand[i], m.scaling * (m.B @ (m.A @ x[i])), rtol=1e-12, atol=1e-12)
    # DoRA's scale: m / ||W0 + s B A|| row-wise; LoRA slots 1
    m = modules[1]
    V = W0 + m.scaling * m.B @ m.A
    np.testing.assert_allclose(out.dora_scale[1], m.magnitude / np.linalg.norm(V, axis=1), rtol=1e-13)
    assert (out.dora_scale[[0, 2]] == 1).all()


def test_permuting_tokens_permutes_results(batch):
    modules, x, W0, bias, slots = batch
    stack = stack_slots(modules)
    perm = np.random.default_rng(1).permutation(len(slots))
    a, b = mixed_forward(x, W0, stack, slots, bias=bias), mixed_forward(x[perm], W0, stack, slots[perm], bias=bias)
    for name in ("y", "shrink", "expand"):
        np.testing.assert_array_equal(getattr(a, name)[perm], getattr(b, name))


def test_sgmv_segments_expand_to_token_slots():
    starts, seg = np.array([0, 2, 2, 5, 6]), np.array([-1, 0, 0, 2])
    assert segment_token_slots(starts, seg, 6).tolist() == [-1, -1, 0, 0, 0, 2]
    with pytest.raises(InputError, match="rise from 0"):
        segment_token_slots(np.array([0, 3, 2, 6]), np.array([0, 1, 2]), 6)
    with pytest.raises(InputError, match="rise from 0"):
        segment_token_slots(np.array([0, 2, 5]), np.array([0, 1]), 6)
    with pytest.raises(ShapeError):
        segment_token_slots(np.array([0, 6]), np.array([0, 1]), 6)


def test_a_wider_stack_changes_no_result(batch):
    """Padding to a larger rank (a fourth, rank-8 slot) leaves every other token's result unchanged."""
    modules, x, W0, bias, slots = batch
    rng = np.random.default_rng(3)
    wide = modules + [ModuleAdapter("lora", {"A": rng.standard_normal((8, K)), "B": rng.standard_normal((D, 8))})]
    a, b = mixed_forward(x, W0, stack_slots(modules), slots, bias=bias), mixed_forward(x, W0, stack_slots(wide), slots,
                                                                                      bias=bias)
    np.testing.assert_allclose(a.y, b.y, rtol=1e-14, atol=1e-14)
    np.testing.assert_array_equal(a.shrink, b.shrink[:, :5])
    assert not b.shrink[:, 5:].any()


def test_float32_batch_is_within_its_bound(batch):
    modules, x, W0, bias, slots = batch
    stack64 = stack_slots(modules)
    f32 = lambda a: None if a is None else a.astype(np.float32)  # noqa: E731
    stack32 = SlotStack(f32(stack64.A), f32(stack64.B), f32(stack64.magnitude), stack64.scalings, stack64.ranks,
                        stack64.methods)
    x, W0, bias = (a.astype(np.float32).astype(np.float64) for a in (x, W0, bias))
    stack64 = SlotStack(*(a.astype(np.float64) for a in (stack32.A, stack32.B, stack32.magnitude)),
                        stack64.scalings, stack64.ranks, stack64.methods)
    exact, low = mixed_forward(x, W0, stack64, slots, bias=bias), mixed_forward(
        *(a.astype(np.float32) for a in (x, W0)), stack32, slots, bias=bias.astype(np.float32))
    bounds = mixed_forward_bound(x, W0, stack64, slots, bias=bias, dtype="float32")
    for name in ("y", "shrink", "expand", "dora_scale"):
        err = np.abs(getattr(low, name).astype(np.float64) - getattr(exact, name))
        assert (err <= bounds[name]).all(), name
        assert bounds[name].max() < 1e-4       # and not vacuous


def test_bad_input_is_refused_by_name(batch):
    modules, x, W0, bias, slots = batch
    stack = stack_slots(modules)
    with pytest.raises(InputError, match=r"token_slots\[0\] = 3"):
        mixed_forward(x, W0, stack, np.array([3, *slots[1:]]))
    with pytest.raises(ShapeError, match="token_slots"):
        mixed_forward(x, W0, stack, slots[:-1])
    dirty = np.array(stack.A, copy=True)
    dirty[0, 4, 0] = 1.0                                   # slot 0 has rank 3: row 4 is padding
    with pytest.raises(ConfigError, match="slot 0 .rank 3.: the padding"):
        mixed_forward(x, W0, SlotStack(dirty, stack.B, stack.magnitude, stack.scalings, stack.ranks, stack.methods),
                      slots)
    with pytest.raises(ConfigError, match="DoRA slots need"):
        mixed_forward(x, W0, SlotStack(stack.A, stack.B, None, stack.scalings, stack.ranks, stack.methods), slots)
    with pytest.raises(ConfigError, match="only LoRA and DoRA"):
        stack_slots([ModuleAdapter("lora", {"A": np.ones((2, K)), "B": np.ones((D, 2))}, fan_in_fan_out=True)])
    with pytest.raises(ShapeError, match="same"):
        stack_slots([modules[0], ModuleAdapter("lora", {"A": np.ones((2, K + 1)), "B": np.ones((D, 2))})])
