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

Error bounds (`block_forward_bound`, `block_backward_bound`, `preactivation_bound`) follow
refpeft.tolerance's algebra through the steps above, and add one rule per non-linearity for f and f'
evaluated at a computed z_hat (|z_hat - z| <= e):

    |f_hat(z_hat) - f(z)| <= |f'(z)| e + (sup |f''| / 2) e^2 + rho_f (|f(z)| + that)     (Taylor, then evaluation)

exp and tanh are taken to be evaluated with relative error <= c u, c = FUNCTION_ERROR_UNITS = 4
(2 ulp: SLEEF's u10 kernels, which torch's CPU float32 sigmoid / silu / tanh call, and glibc's and
NumPy's exp are within 1 ulp). The sigmoid is 1 / (1 + e) or e / (1 + e) with e = exp(-|z|) or
exp(-z) (refpeft's form and torch's), so rho_sig = (1 + c u)(1 + u) / ((1 - c u)(1 - u)) - 1 covers both
(one exp in the numerator, one in the sum, one division); swish is z * sig(z) or z / (1 + exp(-z))
(torch's silu), a product of two bounded quantities (`tolerance.multiply`). sup |sig''| = 1 / (6 sqrt 3),
sup |tanh''| = 4 / (3 sqrt 3); rho_tanh = c u. The sigmoid's relative rule needs exp(-|z|) and
|z| exp(-|z|) to stay normal numbers: for |z| + e above half of -log(smallest normal) (43.7 in float32)
there is no bound (ConfigError). relu is exact at a computed z_hat and 1-Lipschitz: error e where z > -e, 0
where z < -e (the computed z_hat is negative too); its slope [z > 0] is exact where |z| > e and
may be either 0 or 1 elsewhere (error 1): a case that keeps every |z| above `preactivation_bound`
(the conformance cases do) has exact slopes. f'(z) = sig (1 + z (1 - sig)) for swish and 1 - t^2 for
tanh are composed from the bounded sig and t with the algebra's product and sum rules.

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
from refpeft.tolerance import (Bounded, Precision, add, exact, matmul, multiply, row_sum, rows, scale, subtract,
                               transpose, with_reference)

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


# --- error bounds (composed from refpeft.tolerance's algebra; module docstring) -------------------

FUNCTION_ERROR_UNITS = 4                        # exp and tanh: relative error <= 4 u (2 ulp)
SIGMOID_CURVATURE = 1.0 / (6.0 * math.sqrt(3.0)) * (1.0 + 1e-12)   # sup |sig''|, rounded up
TANH_CURVATURE = 4.0 / (3.0 * math.sqrt(3.0)) * (1.0 + 1e-12)      # sup |tanh''|, rounded up


def _evaluated(value: Any, slope: Any, curvature: float, rho: float, Z: Bounded) -> Bounded:
    """f(z_hat) evaluated with relative error rho: |f'(z)| e + (curvature / 2) e^2, then rho of the moved value."""
    xp = namespace(value)
    moved = xp.abs(slope) * Z.error + 0.5 * curvature * Z.error * Z.error
    return Bounded(value, moved + rho * (xp.abs(value) + moved))


def _sigmoid_bounded(Z: Bounded, p: Precision) -> Bounded:
    """sig(z_hat) as 1 / (1 + e) or e / (1 + e) (module docstring); ConfigError where exp may leave the normal range."""
    xp = namespace(Z.value)
    limit = -0.5 * math.log(float(np.finfo(p.storage if p.storage != "bfloat16" else "float32").tiny))
    if bool(xp.any(xp.abs(Z.value) + Z.error > limit)):
        raise ConfigError(f"no rounding bound for the sigmoid in {p.storage} where |z| exceeds {limit:.1f} (exp(-|z|) "
                          f"leaves the normal range); the largest |z| here is {float(xp.max(xp.abs(Z.value))):.4g}")
    sig = sigmoid(Z.value, xp=xp)
    c = FUNCTION_ERROR_UNITS * p.u
    rho = (1.0 + c) * (1.0 + p.u) / ((1.0 - c) * (1.0 - p.u)) - 1.0
    return _evaluated(sig, sig * (1.0 - sig), SIGMOID_CURVATURE, rho, Z)


def _activation_bounded(Z: Bounded, name: str, p: Precision) -> tuple[Bounded, Bounded]:
    """f(z) and f'(z) as computed from z_hat (module docstring's rules)."""
    xp = namespace(Z.value)
    one = exact(xp.ones_like(Z.value))
    if name == "relu":
        zero = xp.zeros_like(Z.value)
        a = Bounded(xp.maximum(Z.value, zero), xp.where(Z.value < -Z.error, zero, Z.error))
        slope = Bounded(xp.astype(Z.value > 0, Z.value.dtype), xp.where(xp.abs(Z.value) > Z.error, zero, zero + 1.0))
        return a, slope
    if name in ("swish", "silu"):
        S = _sigmoid_bounded(Z, p)
        return multiply(Z, S, p), multiply(S, add(one, multiply(Z, subtract(one, S, p), p), p), p)
    t = xp.tanh(Z.value)
    T = _evaluated(t, 1.0 - t * t, TANH_CURVATURE, FUNCTION_ERROR_UNITS * p.u, Z)
    return T, subtract(one, multiply(T, T, p), p)


def _block_chain(o: Any, r: Any, params: BottleneckParams, config: BottleneckConfig,
                 p: Precision) -> dict[str, Bounded]:
    """Forward intermediates with their errors, rows flattened: u, z, a, f'(z), e (the block's output)."""
    R = rows(exact(r))
    U = add(rows(exact(o)), R, p) if config.original_ln_before else rows(exact(o))          # (n, H)
    Z = matmul(U, transpose(exact(params.W_down)), p, bias=exact(params.b_down))          # (n, m)
    A, slope = _activation_bounded(Z, config.non_linearity, p)
    up = matmul(A, transpose(exact(params.W_up)), p, bias=exact(params.b_up))            # (n, H), then * s
    Y = add(U, scale(up, config.scaling, p), p)
    return {"u": U, "z": Z, "a": A, "slope": slope, "e": Y if config.original_ln_before else add(Y, R, p)}


def preactivation_bound(o: Any, r: Any, params: BottleneckParams, config: BottleneckConfig, *,
                        dtype: str = "float32") -> Any:
    """Per-element bound on |z_peer - z_refpeft|, z = u W_down^T + b_down, rows flattened (n, m): a
    relu case whose every |z| exceeds it has the same kink side (and slope) in every implementation."""
    return with_reference(lambda p: _block_chain(o, r, params, config, p)["z"], Precision(dtype))


def block_forward_bound(o: Any, r: Any, params: BottleneckParams, config: BottleneckConfig, *,
                        dtype: str = "float32", accumulation: str | None = None, model: str = "rigorous") -> Any:
    """Per-element bound on |e_peer - e_refpeft| of `block_forward` (shape of o), the inputs exact in `dtype`."""
    bound = with_reference(lambda p: _block_chain(o, r, params, config, p)["e"], Precision(dtype, accumulation, model))
    return namespace(bound).reshape(bound, tuple(o.shape))


def block_backward_bound(de: Any, o: Any, r: Any, params: BottleneckParams, config: BottleneckConfig, *,
                         dtype: str = "float32", accumulation: str | None = None,
                         model: str = "rigorous") -> dict[str, Any]:
    """Per-element bounds on do, dr and the four gradients ("W_down", ...) of `block_backward`.

    The scaling may be applied to dy first (autograd) or to the products (matmul's rule covers both);
    Houlsby's dr = de is exact (bound 0)."""
    s = config.scaling

    def chain(p: Precision) -> dict[str, Bounded]:
        f = _block_chain(o, r, params, config, p)
        dy = rows(exact(de))                                                                  # (n, H)
        dz = multiply(matmul(dy, exact(params.W_up), p, scale=s), f["slope"], p)              # (n, m)
        du = add(dy, matmul(dz, exact(params.W_down), p), p)                                  # (n, H)
        return {"do": du, "dr": du if config.original_ln_before else dy,
                "W_up": matmul(transpose(dy), f["a"], p, scale=s), "b_up": row_sum(scale(dy, s, p), p),
                "W_down": matmul(transpose(dz), f["u"], p), "b_down": row_sum(dz, p)}

    bounds = with_reference(chain, Precision(dtype, accumulation, model))
    xp = namespace(bounds["do"])
    return {**bounds, "do": xp.reshape(bounds["do"], tuple(o.shape)), "dr": xp.reshape(bounds["dr"], tuple(o.shape))}


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
