"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) as AdapterHub's `adapters` computes them.

A bottleneck adapter is a small residual MLP put into the residual stream of every decoder layer:
down to m = H // reduction_factor features, a non-linearity f, back up to H (Houlsby et al.,
"Parameter-Efficient Transfer Learning for NLP", arXiv 1902.00751, section 2.1; Pfeiffer et al.,
"AdapterFusion", arXiv 2005.00247). Letters: u the adapter's input (..., H), m the bottleneck
size, s the constant `scaling` (1.0 by default); layouts are torch's nn.Linear (W_down (m, H),
W_up (H, m)), the `adapters` library's tensors "adapter_down.0.weight", "adapter_down.0.bias",
"adapter_up.weight", "adapter_up.bias".

Forward (adapters 1.3, methods/modeling.py, `Adapter.forward` with residual_input = u):

    z  = u W_down^T + b_down                # (..., m)
    a  = f(z)                               # (..., m)   relu, swish (= silu) or tanh
    y  = u + s (a W_up^T + b_up)            # (..., H)

Backward, for dy = dL/dy (..., H), rows flattened (n = prod(...)):

    dup     = s dy                          # (n, H)
    dW_up   = dup^T a                       # (H, m)
    db_up   = sum_n dup                     # (H,)
    dz      = (dup W_up) * f'(z)            # (n, m)
    dW_down = dz^T u                        # (m, H)
    db_down = sum_n dz                      # (m,)
    du      = dy + dz W_down                # (n, H)   the residual plus the bottleneck

with f'(z) = [z > 0] for relu (0 at z = 0, as torch's threshold_backward), sig(z) (1 + z (1 - sig(z)))
for swish (sig the logistic sigmoid, refpeft.model.mlp's overflow-free one) and 1 - tanh(z)^2 for tanh.
The cache keeps u and z; a is recomputed from z.

Placement around a sub-block (attention or MLP) with output o and residual-stream input r
(`Adapter.pre_forward` / `post_forward` with residual_before_ln=True and original_ln_after=True;
a Llama passes no layer norm, so neither applies one):

    original_ln_before = False  (Houlsby):   e = A(o) + r,      A(u) = the y above
    original_ln_before = True   (Pfeiffer):  e = A(o + r)

and backward: Houlsby do = du (of A at o), dr = de; Pfeiffer do = dr = du (of A at o + r).
Houlsby's placement (`DoubleSeqBnConfig`: mh_adapter and output_adapter, swish) puts one adapter
after attention and one after the MLP; Pfeiffer's (`SeqBnConfig`: output_adapter only, relu) one
after the MLP. Both default to reduction_factor 16 and "bert" init: N(0, 0.02^2) weights, zero
biases, so a fresh adapter is not the identity ("mam_adapter": W_down Kaiming-uniform a = sqrt(5),
zero b_down, W_up and b_up, which is). Drawn from NumPy's generator, not torch's.

Not a row of the method table: the table's methods adapt one linear layer each (`ModuleAdapter`
over W0), and a bottleneck adapter adapts none; it adds a module to the residual stream, like
prompt tuning adds tokens, so it is a model-level method (refpeft.model.bottleneck_adapters puts
it into the decoder). Not mergeable: f is non-linear, so A(u) folds into no weight.

Supported options are the two configs' defaults and what changes no formula above (reduction
factor, relu / swish / silu / tanh, a constant scaling, leave_out, the two placements, bert or
mam_adapter init); `bottleneck_config` refuses the rest by name (layer norms, gating, parallel
adapters, PHM layers, learned scaling, invertible adapters, dropout, stochastic depth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from refpeft.backend import check_float_array, namespace, same_dtype
from refpeft.errors import ConfigError, ShapeError
from refpeft.init import kaiming_uniform_bound, normal, uniform
from refpeft.methods.linear import flatten_rows
from refpeft.model.mlp import _sigmoid as sigmoid

# The adapters library's tensor names for each of the four tensors.
TENSORS = {"W_down": "adapter_down.0.weight", "b_down": "adapter_down.0.bias",
           "W_up": "adapter_up.weight", "b_up": "adapter_up.bias"}
NON_LINEARITIES = ("relu", "swish", "silu", "tanh")
INITS = ("bert", "mam_adapter")


@dataclass(frozen=True)
class BottleneckConfig:
    """Where the adapters go and what they compute (the adapters library's BnConfig fields)."""

    mh_adapter: bool                   # one after the attention block
    output_adapter: bool               # one after the MLP block
    original_ln_before: bool           # True: the adapter reads o + r (Pfeiffer); False: o (Houlsby)
    non_linearity: str
    reduction_factor: float = 16
    scaling: float = 1.0
    leave_out: tuple[int, ...] = ()    # layers with no adapter
    init_weights: str = "bert"


HOULSBY = BottleneckConfig(mh_adapter=True, output_adapter=True, original_ln_before=False, non_linearity="swish")
PFEIFFER = BottleneckConfig(mh_adapter=False, output_adapter=True, original_ln_before=True, non_linearity="relu")
ARCHITECTURES = {"double_seq_bn": HOULSBY, "houlsby": HOULSBY, "seq_bn": PFEIFFER, "pfeiffer": PFEIFFER}

# adapters' BnConfig fields whose other values change the math above, and the value supported.
_FIXED = {"original_ln_after": True, "residual_before_ln": True, "adapter_residual_before_ln": False,
          "ln_before": False, "ln_after": False, "is_parallel": False, "use_gating": False, "phm_layer": False,
          "inv_adapter": None, "cross_adapter": False, "dropout": 0.0, "stochastic_depth": 0.0}
_FIELDS = ("mh_adapter", "output_adapter", "original_ln_before", "non_linearity", "reduction_factor", "scaling",
           "leave_out", "init_weights")
# Fields that change nothing here (PHM options without phm_layer, the init seed, the architecture tag).
_IGNORED = {"architecture", "init_weights_seed", "inv_adapter_reduction_factor", "phm_dim", "factorized_phm_W",
            "shared_W_phm", "shared_phm_rule", "factorized_phm_rule", "phm_c_init", "phm_init_range", "learn_phm",
            "hypercomplex_nonlinearity", "phm_rank", "phm_bias"}


@dataclass(frozen=True)
class BottleneckParams:
    """One adapter's tensors (the adapters library's layout)."""

    W_down: Any   # (m, H)
    b_down: Any   # (m,)
    W_up: Any     # (H, m)
    b_up: Any     # (H,)


@dataclass(frozen=True)
class BottleneckCache:
    u: Any        # (n, H)  the input rows
    z: Any        # (n, m)  the pre-activation
    params: BottleneckParams
    shape: tuple[int, ...]
    non_linearity: str
    scaling: float


@dataclass(frozen=True)
class BottleneckGrads:
    du: Any       # (..., H)
    grads: dict[str, Any] = field(default_factory=dict)   # "W_down", "b_down", "W_up", "b_up"


@dataclass(frozen=True)
class BlockCache:
    adapter: BottleneckCache
    original_ln_before: bool


def bottleneck_config(spec: str | Mapping[str, Any] | BottleneckConfig, **overrides: Any) -> BottleneckConfig:
    """A config from an architecture name ("double_seq_bn" / "houlsby", "seq_bn" / "pfeiffer"), the
    adapters library's config dict (`BnConfig.to_dict()`), or a config; ConfigError for an option
    whose value changes the math (module docstring)."""
    if isinstance(spec, BottleneckConfig):
        base, given = spec, {}
    elif isinstance(spec, str):
        if spec not in ARCHITECTURES:
            raise ConfigError(f"unknown bottleneck architecture {spec!r}; refpeft has {', '.join(ARCHITECTURES)}")
        base, given = ARCHITECTURES[spec], {}
    else:
        base, given = HOULSBY, dict(spec)
        unknown = sorted(set(given) - set(_FIELDS) - set(_FIXED) - _IGNORED)
        if unknown:
            raise ConfigError(f"the bottleneck config has options refpeft does not know: {unknown}")
        for key, supported in _FIXED.items():
            if key in given and given[key] != supported:
                raise ConfigError(f"bottleneck option {key}={given[key]!r} is not supported (refpeft computes "
                                  f"{key}={supported!r}, the Houlsby and Pfeiffer default)")
        missing = [key for key in ("mh_adapter", "output_adapter", "original_ln_before", "non_linearity")
                   if key not in given]
        if missing:
            raise ConfigError(f"the bottleneck config lacks {missing}")
    if set(overrides) - set(_FIELDS):
        raise ConfigError(f"unknown bottleneck options {sorted(set(overrides) - set(_FIELDS))}; refpeft has {_FIELDS}")
    values = {key: given[key] for key in _FIELDS if key in given}
    config = BottleneckConfig(**{**base.__dict__, **values, **overrides})
    return _checked(config)


def _checked(config: BottleneckConfig) -> BottleneckConfig:
    if str(config.non_linearity).lower() not in NON_LINEARITIES:
        raise ConfigError(f"non_linearity {config.non_linearity!r} is not supported; refpeft has "
                          f"{', '.join(NON_LINEARITIES)}")
    if isinstance(config.reduction_factor, Mapping) or not config.reduction_factor > 0:
        raise ConfigError(f"reduction_factor must be one positive number, got {config.reduction_factor!r}")
    if isinstance(config.scaling, str) or not math.isfinite(config.scaling):
        raise ConfigError(f"scaling must be a constant number (not 'learned' or 'channel'), got {config.scaling!r}")
    if config.init_weights not in INITS:
        raise ConfigError(f"init_weights {config.init_weights!r} is not supported; refpeft has {', '.join(INITS)}")
    if not (config.mh_adapter or config.output_adapter):
        raise ConfigError("a bottleneck config with neither mh_adapter nor output_adapter adds no adapter")
    return BottleneckConfig(**{**config.__dict__, "non_linearity": config.non_linearity.lower(),
                               "leave_out": tuple(int(i) for i in config.leave_out)})


def bottleneck_size(hidden: int, config: BottleneckConfig) -> int:
    """m = max(1, int(H // reduction_factor)), as the adapters library sizes it."""
    return max(1, int(hidden // config.reduction_factor))


# --- init, forward, backward ----------------------------------------------------------------------


def bottleneck_init(hidden: int, config: BottleneckConfig, *, seed: int) -> BottleneckParams:
    """Fresh float64 tensors (NumPy's generator) by config.init_weights (module docstring)."""
    m = bottleneck_size(hidden, config)
    if config.init_weights == "bert":
        return BottleneckParams(W_down=normal((m, hidden), 0.02, seed=seed), b_down=np.zeros(m),
                                W_up=normal((hidden, m), 0.02, seed=seed + 1), b_up=np.zeros(hidden))
    return BottleneckParams(W_down=uniform((m, hidden), kaiming_uniform_bound(hidden), seed=seed), b_down=np.zeros(m),
                            W_up=np.zeros((hidden, m)), b_up=np.zeros(hidden))


def bottleneck_forward(u: Any, params: BottleneckParams, *, non_linearity: str,
                       scaling: float = 1.0) -> tuple[Any, BottleneckCache]:
    """y = u + s (f(u W_down^T + b_down) W_up^T + b_up), and the cache for `bottleneck_backward`."""
    xp = namespace(u, params.W_down, params.W_up)
    if non_linearity not in NON_LINEARITIES:
        raise ConfigError(f"non_linearity {non_linearity!r} is not supported; refpeft has {', '.join(NON_LINEARITIES)}")
    _check(u, params, xp=xp)
    rows = flatten_rows(u, xp=xp)                                                   # (n, H)
    z = xp.matmul(rows, xp.matrix_transpose(params.W_down)) + params.b_down         # (n, m)
    up = xp.matmul(_activation(z, non_linearity, xp=xp), xp.matrix_transpose(params.W_up)) + params.b_up   # (n, H)
    y = xp.reshape(rows + scaling * up, tuple(u.shape))
    return y, BottleneckCache(u=rows, z=z, params=params, shape=tuple(u.shape), non_linearity=non_linearity,
                              scaling=scaling)


def bottleneck_backward(dy: Any, cache: BottleneckCache) -> BottleneckGrads:
    """du and the four tensors' gradients from dy = dL/dy (module docstring)."""
    xp = namespace(dy, cache.u)
    check_float_array("dy", dy, xp=xp, shape=cache.shape)
    p = cache.params
    dy2 = flatten_rows(dy, xp=xp)                                                   # (n, H)
    dup = cache.scaling * dy2                                                       # (n, H)
    a = _activation(cache.z, cache.non_linearity, xp=xp)                            # (n, m)  recomputed
    dz = xp.matmul(dup, p.W_up) * _activation_slope(cache.z, cache.non_linearity, xp=xp)   # (n, m)
    du = dy2 + xp.matmul(dz, p.W_down)                                              # (n, H)
    return BottleneckGrads(du=xp.reshape(du, cache.shape), grads={
        "W_down": xp.matmul(xp.matrix_transpose(dz), cache.u), "b_down": xp.sum(dz, axis=0),
        "W_up": xp.matmul(xp.matrix_transpose(dup), a), "b_up": xp.sum(dup, axis=0)})


def block_forward(o: Any, r: Any, params: BottleneckParams, config: BottleneckConfig) -> tuple[Any, BlockCache]:
    """The residual stream after a sub-block with output o and input r, the adapter placed as
    config.original_ln_before says: A(o) + r (Houlsby) or A(o + r) (Pfeiffer)."""
    if tuple(o.shape) != tuple(r.shape):
        raise ShapeError(f"the sub-block output has shape {tuple(o.shape)}, its residual {tuple(r.shape)}")
    u = o + r if config.original_ln_before else o
    y, cache = bottleneck_forward(u, params, non_linearity=config.non_linearity, scaling=config.scaling)
    return (y if config.original_ln_before else y + r), BlockCache(adapter=cache,
                                                                    original_ln_before=config.original_ln_before)


def block_backward(de: Any, cache: BlockCache) -> tuple[Any, Any, dict[str, Any]]:
    """(do, dr, the adapter's gradients) from de = dL/de."""
    g = bottleneck_backward(de, cache.adapter)
    return g.du, (g.du if cache.original_ln_before else de), g.grads


def parameter_count(hidden: int, config: BottleneckConfig) -> int:
    """Trainable entries of one adapter: 2 m H + m + H."""
    m = bottleneck_size(hidden, config)
    return 2 * m * hidden + m + hidden


# --- helpers --------------------------------------------------------------------------------------


def _activation(z: Any, name: str, *, xp: Any) -> Any:
    if name == "relu":
        return xp.maximum(z, xp.zeros_like(z))
    if name in ("swish", "silu"):
        return z * sigmoid(z, xp=xp)
    return xp.tanh(z)


def _activation_slope(z: Any, name: str, *, xp: Any) -> Any:
    """f'(z) (module docstring)."""
    if name == "relu":
        return xp.astype(z > 0, z.dtype)
    if name in ("swish", "silu"):
        sig = sigmoid(z, xp=xp)
        return sig * (1.0 + z * (1.0 - sig))
    return 1.0 - xp.tanh(z) ** 2


def _check(u: Any, p: BottleneckParams, *, xp: Any) -> None:
    check_float_array("u", u, xp=xp)
    same_dtype({"u": u, "W_down": p.W_down, "b_down": p.b_down, "W_up": p.W_up, "b_up": p.b_up})
    h = u.shape[-1] if len(u.shape) else None
    m = p.W_down.shape[0] if len(p.W_down.shape) == 2 else None
    shapes = {"W_down": (m, h), "b_down": (m,), "W_up": (h, m), "b_up": (h,)}
    for name, expected in shapes.items():
        if m is None or h is None or tuple(getattr(p, name).shape) != expected:
            raise ShapeError(f"bottleneck {name} has shape {tuple(getattr(p, name).shape)}, expected {expected} "
                             f"for an input of shape {tuple(u.shape)}")
