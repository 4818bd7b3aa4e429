"""The small MLPs of PEFT's prompt encoders (torch.nn.Sequential of Linear and one activation): forward, backward.

PEFT builds three: prefix tuning's reparameterisation `transform` (Linear, Tanh, Linear), P-tuning's
`mlp_head` (Linear, ReLU, Linear, ReLU, Linear) and the head after P-tuning's LSTM (Linear, ReLU,
Linear). Each Linear sits at an even index 2j of the Sequential, so its tensors are saved as
"<name>.<2j>.weight" (out, in) and "<name>.<2j>.bias" (out,), torch's layout. Rows are tokens (n):

    z_0 = x                                                          # (n, in)
    y_j = z_j W_j^T + b_j                                            # (n, out_j)
    z_{j+1} = act(y_j) for every layer but the last, whose y is the output

Backward, from dy = dL/dy_last, for j from the last down (a = act(y_j) is what the cache keeps):

    dW_j = dy_j^T z_j        db_j = sum over rows of dy_j        dz_j = dy_j W_j
    dy_{j-1} = dz_j * act'(y_{j-1}):  tanh' = 1 - a^2;  relu' = 1 where a > 0, else 0

ReLU's derivative at 0 is taken as 0, as torch's threshold_backward does (a > 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from refpeft.backend import namespace
from refpeft.errors import ConfigError, ShapeError
from refpeft.methods.linear import base_forward, base_input_grad

ACTIVATIONS = ("tanh", "relu")


@dataclass(frozen=True)
class MLPCache:
    name: str
    activation: str
    inputs: list        # z_j (n, in_j) of each Linear: x, then the activation outputs
    weights: list       # W_j (out_j, in_j)


def mlp_layers(params: Mapping[str, Any], name: str) -> int:
    """How many Linear layers "<name>.0", "<name>.2", ... `params` holds."""
    count = 0
    while f"{name}.{2 * count}.weight" in params:
        count += 1
    if count == 0:
        raise ConfigError(f"no {name}.0.weight among the encoder's tensors ({sorted(params)[:4]})")
    return count


def mlp_forward(x: Any, params: Mapping[str, Any], *, name: str, activation: str) -> tuple[Any, MLPCache]:
    """y (n, out) of x (n, in) through "<name>.0", act, "<name>.2", ... (module docstring)."""
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    xp = namespace(x)
    count = mlp_layers(params, name)
    inputs, weights = [], []
    z = x
    for j in range(count):
        W, b = params[f"{name}.{2 * j}.weight"], params.get(f"{name}.{2 * j}.bias")
        if len(W.shape) != 2 or W.shape[1] != z.shape[-1]:
            raise ShapeError(f"{name}.{2 * j}.weight has shape {tuple(W.shape)}; its input has {z.shape[-1]} columns")
        inputs.append(z)
        weights.append(W)
        y = base_forward(z, W, b, fan_in_fan_out=False, xp=xp)                      # (n, out_j)
        z = (xp.tanh(y) if activation == "tanh" else xp.maximum(y, xp.zeros_like(y))) if j < count - 1 else y
    return z, MLPCache(name=name, activation=activation, inputs=inputs, weights=weights)


def mlp_backward(dy: Any, cache: MLPCache) -> tuple[Any, dict[str, Any]]:
    """(dx (n, in), the Linear layers' dW and db by name) from dy (n, out)."""
    xp = namespace(dy)
    grads: dict[str, Any] = {}
    for j in reversed(range(len(cache.weights))):
        z = cache.inputs[j]
        grads[f"{cache.name}.{2 * j}.weight"] = xp.matmul(xp.matrix_transpose(dy), z)   # dy^T z
        grads[f"{cache.name}.{2 * j}.bias"] = xp.sum(dy, axis=0)
        dz = base_input_grad(dy, cache.weights[j], fan_in_fan_out=False, xp=xp)       # dy W
        if j == 0:
            return dz, grads
        if cache.activation == "tanh":                                               # z = tanh(y_{j-1})
            dy = dz * (1 - z * z)
        else:                                                                        # z = relu(y_{j-1})
            dy = xp.where(z > 0, dz, xp.zeros_like(dz))
    raise AssertionError("unreachable: an MLP has at least one layer")
