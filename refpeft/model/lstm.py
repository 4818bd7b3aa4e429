"""A bidirectional multi-layer LSTM on one sequence as torch.nn.LSTM computes it (P-tuning's lstm_head).

Letters: n steps, m inputs, e hidden size. Tensors by torch's names: layer l's forward direction has
weight_ih_l{l} (4e, m_l), weight_hh_l{l} (4e, e), bias_ih_l{l}, bias_hh_l{l} (4e,); the reverse
direction the same with the suffix "_reverse". Gates are stacked in torch's order i, f, g, o.
One direction over inputs x_t (the reverse direction runs t = n-1 .. 0), from h = c = 0:

    a_t = x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh                 # (4e,)  = [a_i, a_f, a_g, a_o]
    i, f, o = sigmoid(a_i, a_f, a_o);  g = tanh(a_g)
    c_t = f c_{t-1} + i g;   h_t = o tanh(c_t)
    layer output y_t = concat(h_t forward, h_t reverse)              # (n, 2e), the next layer's input

Backward through time, from dy_t (its half for this direction), t in the reverse of the run order,
with dh, dc carried from the step after (0 at the last step):

    dh = dy_t + dh_carry;   dc = dh o (1 - tanh(c_t)^2) + dc_carry
    do = dh tanh(c_t);  di = dc g;  dg = dc i;  df = dc c_{t-1}
    da = [di i (1 - i), df f (1 - f), dg (1 - g^2), do o (1 - o)]    # (4e,)
    dh_carry = da W_hh;   dc_carry = dc f
    over all steps: dW_ih = da^T x, dW_hh = da^T h_prev, db_ih = db_hh = sum of da, dx = da W_ih

The layers run in reverse, each layer's dx (summed over its two directions) the previous layer's dy.
Dropout between layers is not modelled (PEFT's encoder_dropout defaults to 0; 0 is required).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from refpeft.backend import namespace
from refpeft.errors import ConfigError

DIRECTIONS = ("", "_reverse")


@dataclass(frozen=True)
class LSTMCache:
    name: str
    steps: list      # per layer, per direction: (x (n, m), h_prev (n, e), c_prev (n, e), c (n, e), gates (n, 4e))


def lstm_layers(params: Mapping[str, Any], name: str) -> int:
    """How many layers "<name>.weight_ih_l0", "..._l1", ... `params` holds."""
    count = 0
    while f"{name}.weight_ih_l{count}" in params:
        count += 1
    if count == 0:
        raise ConfigError(f"no {name}.weight_ih_l0 among the encoder's tensors ({sorted(params)[:4]})")
    return count


def lstm_forward(x: Any, params: Mapping[str, Any], *, name: str) -> tuple[Any, LSTMCache]:
    """The last layer's outputs (n, 2e) of x (n, m) (module docstring)."""
    xp = namespace(x)
    steps = []
    for layer in range(lstm_layers(params, name)):
        outputs, records = [], []
        for suffix in DIRECTIONS:
            p = {w: params[f"{name}.{w}_l{layer}{suffix}"] for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            h, record = _direction_forward(x, p, reverse=bool(suffix), xp=xp)
            outputs.append(h)
            records.append((x, p, record))
        steps.append(records)
        x = xp.concat(outputs, axis=-1)                                              # (n, 2e)
    return x, LSTMCache(name=name, steps=steps)


def lstm_backward(dy: Any, cache: LSTMCache) -> tuple[Any, dict[str, Any]]:
    """(dx (n, m), every tensor's gradient by name) from dy (n, 2e)."""
    xp = namespace(dy)
    grads: dict[str, Any] = {}
    for layer in reversed(range(len(cache.steps))):
        e = dy.shape[-1] // 2
        dx = None
        for (x, p, record), suffix, half in zip(cache.steps[layer], DIRECTIONS, (dy[:, :e], dy[:, e:])):
            g, dxd = _direction_backward(half, x, p, record, reverse=bool(suffix), xp=xp)
            for w, value in g.items():
                grads[f"{cache.name}.{w}_l{layer}{suffix}"] = value
            dx = dxd if dx is None else dx + dxd
        dy = dx
    return dy, grads


def _direction_forward(x: Any, p: Mapping[str, Any], *, reverse: bool, xp: Any) -> tuple[Any, tuple]:
    n, e = x.shape[0], p["weight_hh"].shape[1]
    pre = xp.matmul(x, xp.matrix_transpose(p["weight_ih"])) + p["bias_ih"]          # x W_ih^T + b_ih  (n, 4e)
    h = c = xp.zeros((e,), dtype=x.dtype)
    hs, h_prev, c_prev, cs, gates = ([None] * n for _ in range(5))
    for t in (reversed(range(n)) if reverse else range(n)):
        a = pre[t, :] + xp.matmul(p["weight_hh"], h) + p["bias_hh"]                  # (4e,)
        i, f, o = (1 / (1 + xp.exp(-a[j * e:(j + 1) * e])) for j in (0, 1, 3))
        g = xp.tanh(a[2 * e:3 * e])
        h_prev[t], c_prev[t] = h, c
        c = f * c + i * g
        h = o * xp.tanh(c)
        hs[t], cs[t], gates[t] = h, c, xp.concat([i, f, g, o])
    return xp.stack(hs), (xp.stack(h_prev), xp.stack(c_prev), xp.stack(cs), xp.stack(gates))


def _direction_backward(dy: Any, x: Any, p: Mapping[str, Any], record: tuple, *, reverse: bool,
                        xp: Any) -> tuple[dict[str, Any], Any]:
    h_prev, c_prev, cs, gates = record
    n, e = dy.shape
    dh_carry = dc_carry = xp.zeros((e,), dtype=dy.dtype)
    da = [None] * n
    for t in (range(n) if reverse else reversed(range(n))):                       # the run order, reversed
        i, f, g, o = (gates[t, j * e:(j + 1) * e] for j in range(4))
        tc = xp.tanh(cs[t, :])
        dh = dy[t, :] + dh_carry
        dc = dh * o * (1 - tc * tc) + dc_carry
        da[t] = xp.concat([dc * g * i * (1 - i), dc * c_prev[t, :] * f * (1 - f), dc * i * (1 - g * g),
                           dh * tc * o * (1 - o)])                                   # (4e,)
        dh_carry = xp.matmul(da[t], p["weight_hh"])
        dc_carry = dc * f
    dA = xp.stack(da)                                                                # (n, 4e)
    db = xp.sum(dA, axis=0)
    grads = {"weight_ih": xp.matmul(xp.matrix_transpose(dA), x),                   # da^T x
             "weight_hh": xp.matmul(xp.matrix_transpose(dA), h_prev), "bias_ih": db, "bias_hh": db}
    return grads, xp.matmul(dA, p["weight_ih"])
