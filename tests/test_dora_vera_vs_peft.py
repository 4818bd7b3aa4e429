"""DoRA and VeRA against HF PEFT on torch CPU: same weights, float64 to 1e-12, float32 within a derived bound.

The float32 bounds are the methods' own (dora_/vera_ forward, backward and merge bounds, which
cover both refpeft's and PEFT's operation orders): both implementations must stay within them.
"""

from __future__ import annotations

import numpy as np
import pytest

from refpeft import tolerance as tol
from refpeft.methods.dora import dora_backward, dora_backward_bound, dora_forward, dora_forward_bound, dora_merge, \
    dora_merge_bound, dora_unmerge, dora_weight_norm, dora_init
from refpeft.errors import NonFiniteError
from refpeft.methods.linear import LinearShape, dropout_mask
from refpeft.methods.lora import lora_scaling
from refpeft.methods.vera import largest_layer, vera_backward, vera_backward_bound, vera_forward, vera_forward_bound, \
    vera_merge, vera_merge_bound, vera_projections, vera_unmerge
from support import assert_close

torch = pytest.importorskip("torch", reason="torch is in the conformance extra")
peft = pytest.importorskip("peft", reason="peft is in the conformance extra")


class FixedMask(torch.nn.Module):
    """A dropout whose mask is given, so PEFT's training-mode dropout path can be compared exactly."""

    def __init__(self, mask: np.ndarray):
        super().__init__()
        self.mask = torch.tensor(mask)

    def forward(self, x):
        return x * self.mask.to(x.dtype)


def base_layer(W0: np.ndarray, b: np.ndarray | None, *, fan_in_fan_out: bool, dtype):
    """nn.Linear (W0 stored (d, k)), or GPT-2's Conv1D (stored (k, d)), holding W0 and b."""
    rows, cols = W0.shape
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(cols, rows)
    else:
        layer = torch.nn.Linear(cols, rows, bias=b is not None)
    layer = layer.to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(W0))
        if b is not None:
            layer.bias.copy_(torch.tensor(b))
        elif fan_in_fan_out:
            layer.bias.zero_()
    return layer


def tensor(a: np.ndarray, dtype) -> "torch.Tensor":
    return torch.tensor(a).to(dtype)


# ---------------------------------------------------------------- DoRA

def dora_case(*, fan_in_fan_out: bool, bias: bool, dropout: bool, seed: int = 11):
    rng = np.random.default_rng(seed)
    k, d, r, alpha = 24, 16, 4, 12.0
    W0 = rng.standard_normal((k, d) if fan_in_fan_out else (d, k))
    case = dict(k=k, d=d, r=r, alpha=alpha, W0=W0, b=rng.standard_normal(d) if bias or fan_in_fan_out else None,
                A=rng.standard_normal((r, k)), B=rng.standard_normal((d, r)), noise=rng.standard_normal(d),
                x=rng.standard_normal((3, 5, k)), dy=rng.standard_normal((3, 5, d)))
    case["mask"] = dropout_mask((3, 5, k), 0.25, seed=seed) if dropout else None
    return case


def peft_dora(c: dict, *, fan_in_fan_out: bool, dtype, rslora: bool = False):
    """A PEFT DoRA layer on the case's base weight; returns (layer, PEFT's own A, B, m after init)."""
    from peft import LoraConfig, get_peft_model

    base = base_layer(c["W0"], c["b"], fan_in_fan_out=fan_in_fan_out, dtype=dtype)
    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(base), LoraConfig(
        r=c["r"], lora_alpha=c["alpha"], use_dora=True, use_rslora=rslora, fan_in_fan_out=fan_in_fan_out,
        init_lora_weights=False, lora_dropout=0.1 if c["mask"] is not None else 0.0, target_modules=["0"]))
    layer = model.base_model.model[0]
    initial = tuple(t.detach().numpy().copy() for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                                                          layer.lora_magnitude_vector["default"].weight))
    if c["mask"] is not None:
        layer.lora_dropout["default"] = FixedMask(c["mask"])
    return layer, initial


def set_dora(layer, A, B, m, dtype):
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(tensor(A, dtype))
        layer.lora_B["default"].weight.copy_(tensor(B, dtype))
        layer.lora_magnitude_vector["default"].weight.copy_(tensor(m, dtype))


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_dora_equals_peft_in_float64(fan_in_fan_out, rslora, dropout):
    c = dora_case(fan_in_fan_out=fan_in_fan_out, bias=True, dropout=dropout)
    s = lora_scaling(c["alpha"], c["r"], rslora=rslora)
    layer, (A0, B0, m0) = peft_dora(c, fan_in_fan_out=fan_in_fan_out, dtype=torch.float64, rslora=rslora)
    # The magnitude PEFT initialised from its own (non-zero) A and B.
    assert_close(dora_init(c["W0"], A0, B0, scaling=s, fan_in_fan_out=fan_in_fan_out), m0, rtol=1e-13)

    n = dora_weight_norm(c["W0"], c["A"], c["B"], scaling=s, fan_in_fan_out=fan_in_fan_out)
    m = n * (1.0 + 0.3 * np.tanh(c["noise"]))                 # g != 1 so every term matters
    set_dora(layer, c["A"], c["B"], m, torch.float64)
    tx = torch.tensor(c["x"], requires_grad=True)
    (layer(tx) * torch.tensor(c["dy"])).sum().backward()

    y, cache = dora_forward(c["x"], c["W0"], c["A"], c["B"], m, scaling=s, bias=c["b"], dropout_mask=c["mask"],
                            fan_in_fan_out=fan_in_fan_out)
    grads = dora_backward(c["dy"], cache)
    assert_close(y, layer(tx).detach().numpy(), rtol=1e-12)
    assert_close(grads.dx, tx.grad.numpy(), rtol=1e-12)
    assert_close(grads.dA, layer.lora_A["default"].weight.grad.numpy(), rtol=1e-12)
    assert_close(grads.dB, layer.lora_B["default"].weight.grad.numpy(), rtol=1e-12)
    assert_close(grads.dmagnitude, layer.lora_magnitude_vector["default"].weight.grad.numpy(), rtol=1e-12)

    layer.merge()
    merged = dora_merge(c["W0"], c["A"], c["B"], m, scaling=s, fan_in_fan_out=fan_in_fan_out)
    assert_close(merged, layer.base_layer.weight.detach().numpy(), rtol=1e-13)
    layer.unmerge()
    restored = dora_unmerge(merged, c["A"], c["B"], m, scaling=s, weight_norm=n, fan_in_fan_out=fan_in_fan_out)
    assert_close(restored, layer.base_layer.weight.detach().numpy(), rtol=1e-13)
    assert_close(restored, c["W0"], rtol=1e-13)


def test_peft_gives_non_finite_output_for_a_zero_norm_row_where_refpeft_refuses():
    """A finding: PEFT divides by a zero row norm (m = 0 at init, 0 / 0 = NaN in forward)."""
    c = dora_case(fan_in_fan_out=False, bias=True, dropout=False)
    c["W0"][5] = 0.0
    layer, _ = peft_dora(c, fan_in_fan_out=False, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B["default"].weight.zero_()
        layer.lora_magnitude_vector["default"].weight.fill_(1.0)
    y = layer(torch.tensor(c["x"])).detach().numpy()
    assert not np.all(np.isfinite(y[..., 5])) and np.all(np.isfinite(np.delete(y, 5, axis=-1)))
    with pytest.raises(NonFiniteError, match=r"first \[5\]"):
        dora_forward(c["x"], c["W0"], c["A"], np.zeros_like(c["B"]), np.ones(c["d"]), scaling=1.0, bias=c["b"])


def within(bound, reference, *results, named):
    """Each result within `bound` of the float64 reference; returns the fraction of the bound used."""
    checks = [tol.compare(result, reference, bound) for result in results]
    assert all(c.passed for c in checks), (named, checks)
    return [c.ratio for c in checks]


def float32_dora_layer(*, bias_shift: float = 0.0, g_centre: float = 1.0, g_spread: float = 0.3):
    """A DoRA case with float32-representable inputs (both sides start from the same values), its
    scaling, a magnitude m = nu * (g_centre + g_spread * tanh(noise)), and PEFT's float32 layer."""
    c = dora_case(fan_in_fan_out=False, bias=True, dropout=False)
    c["b"] = bias_shift + c["b"]
    for name in ("W0", "b", "A", "B", "x", "dy", "noise"):
        c[name] = c[name].astype(np.float32).astype(np.float64)
    s = lora_scaling(c["alpha"], c["r"])
    m = dora_weight_norm(c["W0"], c["A"], c["B"], scaling=s) * (g_centre + g_spread * np.tanh(c["noise"]))
    m = m.astype(np.float32).astype(np.float64)
    layer, _ = peft_dora(c, fan_in_fan_out=False, dtype=torch.float32)
    set_dora(layer, c["A"], c["B"], m, torch.float32)
    return c, s, m, layer


def test_dora_float32_agrees_with_peft_within_the_derived_bound():
    c, s, m, layer = float32_dora_layer()
    tx = tensor(c["x"], torch.float32).requires_grad_(True)
    peft_y = layer(tx)
    (peft_y * tensor(c["dy"], torch.float32)).sum().backward()
    f32 = {n: c[n].astype(np.float32) for n in ("x", "W0", "A", "B", "b", "dy")}
    y32, cache32 = dora_forward(f32["x"], f32["W0"], f32["A"], f32["B"], m.astype(np.float32), scaling=s, bias=f32["b"])
    y64, cache64 = dora_forward(c["x"], c["W0"], c["A"], c["B"], m, scaling=s, bias=c["b"])
    args = (c["x"], c["W0"], c["A"], c["B"], m)
    ratios = within(dora_forward_bound(*args, scaling=s, bias=c["b"]), y64, y32, peft_y.detach().numpy(), named="y")
    assert min(ratios) > 0.0   # really computed in float32

    grads32, grads64 = dora_backward(f32["dy"], cache32), dora_backward(c["dy"], cache64)
    bounds = dora_backward_bound(c["dy"], *args, scaling=s, bias=c["b"])
    peft = {"dx": tx.grad, "dA": layer.lora_A["default"].weight.grad, "dB": layer.lora_B["default"].weight.grad,
            "dmagnitude": layer.lora_magnitude_vector["default"].weight.grad}
    for name, theirs in peft.items():
        within(bounds[name], getattr(grads64, name), getattr(grads32, name), theirs.numpy(), named=name)

    layer.merge()
    W32 = dora_merge(f32["W0"], f32["A"], f32["B"], m.astype(np.float32), scaling=s)
    W64 = dora_merge(c["W0"], c["A"], c["B"], m, scaling=s)
    within(dora_merge_bound(c["W0"], c["A"], c["B"], m, scaling=s), W64, W32,
           layer.base_layer.weight.detach().numpy(), named="merged")


def test_dora_base_output_peft_reproduces_peft_order_where_a_large_bias_rounds_x_w0():
    """PEFT takes u = x W0^T back as fl(fl(x W0^T + b) - b): with |b| >> |x W0^T| in float32 that
    loses bits refpeft's default keeps. base_output="peft" follows PEFT's order and lands much
    closer to PEFT; the default lands closer to the float64 result."""
    # g = m / nu far from 1, so (g - 1) u carries u's rounding past the output's own
    c, s, m, layer = float32_dora_layer(bias_shift=3000.0, g_centre=40.0, g_spread=10.0)
    with torch.no_grad():
        theirs = layer(tensor(c["x"], torch.float32)).numpy().astype(np.float64)
    f32 = {n: c[n].astype(np.float32) for n in ("x", "W0", "A", "B", "b")}
    ours = {order: dora_forward(f32["x"], f32["W0"], f32["A"], f32["B"], m.astype(np.float32), scaling=s,
                                bias=f32["b"], base_output=order)[0].astype(np.float64) for order in ("exact", "peft")}
    y64, _ = dora_forward(c["x"], c["W0"], c["A"], c["B"], m, scaling=s, bias=c["b"])
    to_peft = {order: np.max(np.abs(y - theirs)) for order, y in ours.items()}
    to_f64 = {order: np.max(np.abs(y - y64)) for order, y in ours.items()}
    assert to_peft["peft"] < to_peft["exact"] / 4, (to_peft, to_f64)
    assert to_f64["exact"] < to_f64["peft"], to_f64


# ---------------------------------------------------------------- VeRA

SHAPES = [LinearShape(k=20, d=12), LinearShape(k=12, d=28)]   # two layers, one projection pair


def peft_vera(*, r: int, key: int, dtype, fan_in_fan_out: bool = False, dropout: bool = False):
    """Two PEFT VeRA layers of different shapes sharing one pair of projections."""
    from peft import VeraConfig, get_peft_model

    rng = np.random.default_rng(3)
    layers = [base_layer(rng.standard_normal((s.k, s.d) if fan_in_fan_out else (s.d, s.k)), rng.standard_normal(s.d),
                         fan_in_fan_out=fan_in_fan_out, dtype=torch.float32) for s in SHAPES]
    model = get_peft_model(torch.nn.Sequential(*layers), VeraConfig(
        r=r, projection_prng_key=key, fan_in_fan_out=fan_in_fan_out, vera_dropout=0.1 if dropout else 0.0,
        target_modules=["0", "1"]))
    return model.to(dtype)


def test_vera_projections_equal_peft_bit_for_bit():
    for r, key in ((4, 0), (16, 1234), (33, 2**31 + 5)):
        model = peft_vera(r=r, key=key, dtype=torch.float32)
        vera_A, vera_B = vera_projections(largest_layer(SHAPES), r, seed=key, dtype="float32")
        np.testing.assert_array_equal(vera_A, model.base_model.vera_A["default"].numpy())
        np.testing.assert_array_equal(vera_B, model.base_model.vera_B["default"].numpy())


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_vera_equals_peft_in_float64(fan_in_fan_out, dropout):
    r = 8
    model = peft_vera(r=r, key=7, dtype=torch.float64, fan_in_fan_out=fan_in_fan_out, dropout=dropout)
    vera_A, vera_B = vera_projections(largest_layer(SHAPES), r, seed=7)       # float64 copies of PEFT's
    rng = np.random.default_rng(5)
    for index, shape in enumerate(SHAPES):
        layer = model.base_model.model[index]
        W0 = layer.base_layer.weight.detach().numpy().copy()
        b = layer.base_layer.bias.detach().numpy().copy()
        lambda_d, lambda_b = rng.standard_normal(r), rng.standard_normal(shape.d)
        x, dy = rng.standard_normal((2, 3, shape.k)), rng.standard_normal((2, 3, shape.d))
        mask = dropout_mask(x.shape, 0.25, seed=index) if dropout else None
        if dropout:
            layer.vera_dropout["default"] = FixedMask(mask)
        with torch.no_grad():
            layer.vera_lambda_d["default"].copy_(torch.tensor(lambda_d))
            layer.vera_lambda_b["default"].copy_(torch.tensor(lambda_b))
        tx = torch.tensor(x, requires_grad=True)
        ty = layer(tx)
        (ty * torch.tensor(dy)).sum().backward()

        y, cache = vera_forward(x, W0, vera_A, vera_B, lambda_d, lambda_b, bias=b, dropout_mask=mask,
                                fan_in_fan_out=fan_in_fan_out)
        grads = vera_backward(dy, cache)
        assert_close(y, ty.detach().numpy(), rtol=1e-12)
        assert_close(grads.dx, tx.grad.numpy(), rtol=1e-12)
        assert_close(grads.dlambda_d, layer.vera_lambda_d["default"].grad.numpy(), rtol=1e-12)
        assert_close(grads.dlambda_b, layer.vera_lambda_b["default"].grad.numpy(), rtol=1e-12)

        layer.merge()
        merged = vera_merge(W0, vera_A, vera_B, lambda_d, lambda_b, fan_in_fan_out=fan_in_fan_out)
        assert_close(merged, layer.base_layer.weight.detach().numpy(), rtol=1e-13)
        layer.unmerge()
        restored = vera_unmerge(merged, vera_A, vera_B, lambda_d, lambda_b, fan_in_fan_out=fan_in_fan_out)
        assert_close(restored, layer.base_layer.weight.detach().numpy(), rtol=1e-13)


def test_vera_float32_agrees_with_peft_within_the_derived_bound():
    r = 8
    model = peft_vera(r=r, key=7, dtype=torch.float32)
    vera_A, vera_B = vera_projections(largest_layer(SHAPES), r, seed=7, dtype="float32")
    rng = np.random.default_rng(6)
    for index, shape in enumerate(SHAPES):
        layer = model.base_model.model[index]
        W0, b = (t.detach().numpy().copy() for t in (layer.base_layer.weight, layer.base_layer.bias))
        lambda_d = rng.standard_normal(r).astype(np.float32)
        lambda_b = rng.standard_normal(shape.d).astype(np.float32)
        x = rng.standard_normal((2, 3, shape.k)).astype(np.float32)
        dy = rng.standard_normal((2, 3, shape.d)).astype(np.float32)
        with torch.no_grad():
            layer.vera_lambda_d["default"].copy_(torch.tensor(lambda_d))
            layer.vera_lambda_b["default"].copy_(torch.tensor(lambda_b))
        tx = torch.tensor(x, requires_grad=True)
        peft_y = layer(tx)
        (peft_y * torch.tensor(dy)).sum().backward()
        y32, cache32 = vera_forward(x, W0, vera_A, vera_B, lambda_d, lambda_b, bias=b)
        f64 = [a.astype(np.float64) for a in (x, W0, vera_A, vera_B, lambda_d, lambda_b, b, dy)]
        y64, cache64 = vera_forward(*f64[:6], bias=f64[6])
        sliced = (f64[2][:, :shape.k], f64[3][:shape.d])
        args = (f64[0], f64[1], *sliced, f64[4], f64[5])
        within(vera_forward_bound(*args, bias=f64[6]), y64, y32, peft_y.detach().numpy(), named="y")

        grads32, grads64 = vera_backward(dy, cache32), vera_backward(f64[7], cache64)
        bounds = vera_backward_bound(f64[7], *args)
        peft = {"dx": tx.grad, "dlambda_d": layer.vera_lambda_d["default"].grad,
                "dlambda_b": layer.vera_lambda_b["default"].grad}
        for name, theirs in peft.items():
            within(bounds[name], getattr(grads64, name), getattr(grads32, name), theirs.numpy(), named=name)

        layer.merge()
        within(vera_merge_bound(f64[1], *sliced, f64[4], f64[5]), vera_merge(*f64[1:6]),
               vera_merge(W0, vera_A, vera_B, lambda_d, lambda_b), layer.base_layer.weight.detach().numpy(),
               named="merged")
