"""`refpeft demo`: fine-tune an adapter on an embedded task whose answer is known.

The task: a frozen linear layer W0 (d x k) with bias b, and targets produced by a *different*
layer, W0 + Delta, where Delta is hidden. Fitting the targets with an adapter means finding Delta;
since it is known, the report can say how much of it the adapter captured. Delta is drawn from
what the method can represent:

- LoRA, DoRA: Delta = U diag(sigma) V^T of rank `hidden_rank` (4) < r, with orthonormal U, V
  and sigma evenly spaced from 3 to 1;
- VeRA: Delta = diag(lambda_b*) B diag(lambda_d*) A with the layer's own frozen random
  projections A, B and hidden vectors lambda_d* ~ N(0, 1), lambda_b* ~ N(0, 0.2^2): VeRA can only
  scale fixed random directions, so an arbitrary low-rank Delta is out of its reach.

    loss            L = (1 / 2n) sum_rows ||y - t||^2,      dL/dy = (y - t) / n
    captured energy E = 1 - ||Delta_learned - Delta||_F^2 / ||Delta||_F^2
                    (1 = the hidden delta recovered exactly; Delta_learned = merged W - W0)

Training uses refpeft's own Adam/AdamW (or LoRA+ groups) and the method's hand-written backward;
on the way, the gradients are checked against float64 finite differences (refpeft.gradcheck).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable

import numpy as np

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.backend import FLOAT_NAMES, numpy_namespace, round_to, to_numpy
from refpeft.methods.dora import (
    dora_backward,
    dora_forward,
    dora_merge,
    dora_parameter_count,
    dora_weight_norm,
    dora_init,
)
from refpeft.errors import ConfigError
from refpeft.gradcheck import gradient_errors
from refpeft.init import as_parameter
from refpeft.methods.linear import LinearShape
from refpeft.methods.lora import (
    full_parameter_count,
    lora_init,
    lora_backward,
    lora_forward,
    lora_parameter_count,
    lora_scaling,
    lora_merge,
)
from refpeft.optim import AdamState, adam_step, adamw, loraplus_groups, single_group
from refpeft.methods.qlora import base_weight, qlora_backward, qlora_forward, quantize_base
from refpeft.methods.vera import vera_init, vera_backward, vera_delta_weight, vera_forward, vera_merge, vera_parameter_count, vera_projections

GRADIENT_TOLERANCE = 1e-7
DEMO_LAYER = "linear"  # the module path of the demo's one adapted layer in exported adapters


@dataclass(frozen=True)
class DemoConfig:
    """Everything `refpeft demo` can vary."""

    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    steps: int = 300
    lr: float = 1e-2
    dora_gradient: str = "detached"       # DoRA's backward: "detached" (PEFT's) or "exact"
    seed: int = 0
    dtype: str | None = None              # None: the method's own (float64; bfloat16 for QLoRA)
    loraplus_ratio: float | None = None   # None: plain AdamW; a number: LoRA+ groups
    d: int = 256
    k: int = 384
    tokens: int = 1024
    hidden_rank: int = 4
    gradient_checks: int = 3              # at the first step, in the middle, at the last


@dataclass(frozen=True)
class Task:
    """The embedded task (float64 on the host; cast per the demo's dtype for training)."""

    x: np.ndarray        # (n, k)
    W0: np.ndarray       # (d, k)
    bias: np.ndarray     # (d,)
    delta: np.ndarray    # (d, k)  hidden: the answer
    target: np.ndarray   # (n, d)  x (W0 + delta)^T + bias
    extra: dict          # the method's other frozen tensors (VeRA's projections, QLoRA's 4-bit state)


def embedded_task(config: DemoConfig, *, frozen_base: Callable[[np.ndarray, DemoConfig], tuple[np.ndarray, dict]]
                  | None = None, hidden_delta: Callable[[np.random.Generator, DemoConfig, dict], np.ndarray]
                  | None = None) -> Task:
    """A frozen layer and targets from a hidden delta (seeded, machine-independent).

    `frozen_base(W0, config)` turns the drawn weight into the method's frozen base and its other
    frozen tensors (default: unchanged, none); `hidden_delta(rng, config, extra)` draws Delta
    (default: rank `hidden_rank`).
    """
    rng = np.random.default_rng(config.seed)
    d, k, n = config.d, config.k, config.tokens
    W0, extra = (frozen_base or plain_base)(rng.standard_normal((d, k)) / math.sqrt(k), config)
    bias = 0.1 * rng.standard_normal(d)
    delta = (hidden_delta or low_rank_delta)(rng, config, extra)
    x = rng.standard_normal((n, k))
    return Task(x=x, W0=W0, bias=bias, delta=delta, target=x @ (W0 + delta).T + bias, extra=extra)


def plain_base(W0: np.ndarray, config: DemoConfig) -> tuple[np.ndarray, dict]:
    """The drawn weight is the frozen base; no other frozen tensors."""
    return W0, {}


def low_rank_delta(rng: np.random.Generator, config: DemoConfig, frozen_extra: dict) -> np.ndarray:
    """U diag(sigma) V^T: orthonormal U (d, h), V (k, h), sigma from 3 down to 1."""
    h = config.hidden_rank
    if not 1 <= h <= min(config.d, config.k):
        raise ConfigError(f"hidden rank must be in 1..min(d, k) = {min(config.d, config.k)}, got {h}")
    U, _ = np.linalg.qr(rng.standard_normal((config.d, h)))
    V, _ = np.linalg.qr(rng.standard_normal((config.k, h)))
    return (U * np.linspace(3.0, 1.0, h)) @ V.T


@dataclass(frozen=True)
class Method:
    """How the demo trains one adapter method: its parameters, passes and merged weight.

    `frozen` is {"W0", "bias"} plus the method's own frozen tensors (VeRA's projections).
    """

    init: Callable[[dict[str, np.ndarray], DemoConfig], dict[str, np.ndarray]]  # frozen -> float64 params
    forward: Callable[[Any, dict[str, Any], dict[str, Any], DemoConfig], tuple[Any, Any]]  # x, frozen, params
    backward: Callable[[Any, Any], dict[str, Any]]                  # dL/dy, cache -> grads by name ("x" too)
    merged: Callable[[dict[str, Any], dict[str, Any], DemoConfig], Any]  # frozen, params -> W0 + delta
    trainable: Callable[[DemoConfig], int]
    frozen_base: Callable[[np.ndarray, DemoConfig], tuple[np.ndarray, dict]] = plain_base
    hidden_delta: Callable[[np.random.Generator, DemoConfig, dict], np.ndarray] = low_rank_delta
    # The function whose finite differences the backward must match (default: the forward itself).
    differentiated: Callable[[dict[str, Any], dict[str, Any], DemoConfig], Callable[..., Any]] | None = None
    # The trained tensors as an adapter (for export): frozen, params -> Adapter
    adapter: Callable[[dict[str, Any], dict[str, Any], DemoConfig], Adapter] | None = None
    dtypes: tuple[str, ...] = FLOAT_NAMES     # training precisions offered; the first is the default
    adapter_dtype: Callable[[str], str] = lambda dtype: dtype   # training dtype -> the adapter's dtype
    table_method: str = "lora"                # the refpeft.methods row its trained adapter belongs to


def _scaling(config: DemoConfig) -> float:
    return lora_scaling(config.alpha, config.rank)


def _lora_init(frozen: dict[str, np.ndarray], config: DemoConfig) -> dict[str, np.ndarray]:
    A, B = lora_init(config.k, config.d, config.rank, seed=config.seed)
    return {"lora_A": A, "lora_B": B}


def _lora_forward(x: Any, frozen: dict[str, Any], params: dict[str, Any], config: DemoConfig):
    return lora_forward(x, frozen["W0"], params["lora_A"], params["lora_B"], bias=frozen["bias"],
                        scaling=_scaling(config))


def _lora_backward(dy: Any, cache: Any) -> dict[str, Any]:
    grads = lora_backward(dy, cache)
    return {"lora_A": grads.dA, "lora_B": grads.dB, "x": grads.dx}


def _lora_merged(frozen: dict[str, Any], params: dict[str, Any], config: DemoConfig):
    return lora_merge(frozen["W0"], params["lora_A"], params["lora_B"], scaling=_scaling(config))


def _lora_adapter(frozen: dict[str, Any], params: dict[str, Any], config: DemoConfig) -> Adapter:
    module = ModuleAdapter(METHODS[config.method].table_method,
                           {"A": params["lora_A"], "B": params["lora_B"], "magnitude": params.get("lora_magnitude_vector")},
                           alpha=config.alpha)
    return Adapter({DEMO_LAYER: module})


def _dora_init(frozen: dict[str, np.ndarray], config: DemoConfig) -> dict[str, np.ndarray]:
    params = _lora_init(frozen, config)
    magnitude = dora_init(frozen["W0"], params["lora_A"], params["lora_B"], scaling=_scaling(config))
    return {**params, "lora_magnitude_vector": magnitude}


def _dora_forward(x: Any, frozen: dict[str, Any], params: dict[str, Any], config: DemoConfig):
    return dora_forward(x, frozen["W0"], params["lora_A"], params["lora_B"], params["lora_magnitude_vector"],
                        bias=frozen["bias"], scaling=_scaling(config), gradient=config.dora_gradient)


def _dora_backward(dy: Any, cache: Any) -> dict[str, Any]:
    grads = dora_backward(dy, cache)
    return {"lora_A": grads.dA, "lora_B": grads.dB, "lora_magnitude_vector": grads.dmagnitude, "x": grads.dx}


def _dora_merged(frozen: dict[str, Any], params: dict[str, Any], config: DemoConfig):
    return dora_merge(frozen["W0"], params["lora_A"], params["lora_B"], params["lora_magnitude_vector"],
                      scaling=_scaling(config))


def _dora_differentiated(frozen: dict[str, Any], params: dict[str, Any], config: DemoConfig) -> Callable[..., Any]:
    """Exact mode: the forward. Detached mode: the forward with the norm frozen at the current A, B."""
    if config.dora_gradient == "exact":
        return lambda x, **p: _dora_forward(x, frozen, p, config)[0]
    norm = dora_weight_norm(frozen["W0"], params["lora_A"], params["lora_B"], scaling=_scaling(config))
    return lambda x, **p: dora_forward(x, frozen["W0"], p["lora_A"], p["lora_B"], p["lora_magnitude_vector"],
                                       bias=frozen["bias"], scaling=_scaling(config), weight_norm=norm)[0]


def _qlora_base(W0: np.ndarray, config: DemoConfig) -> tuple[np.ndarray, dict]:
    """QLoRA's recipe: the weight stored in bfloat16, then NF4, block 64, double quantisation.

    The frozen base the adapter trains on is the dequantised 4-bit weight (float64 values).
    """
    state = quantize_base(W0)
    return np.asarray(to_numpy(base_weight(state, precision="float64"))), {"base_state": state}


def _qlora_forward(x: Any, frozen: dict[str, Any], params: dict[str, Any], config: DemoConfig):
    return qlora_forward(x, frozen["base_state"], params["lora_A"], params["lora_B"], bias=frozen["bias"],
                         scaling=_scaling(config), precision=config.dtype)


def _qlora_backward(dy: Any, cache: Any) -> dict[str, Any]:
    grads = qlora_backward(dy, cache)
    return {"lora_A": grads.dA, "lora_B": grads.dB, "x": grads.dx}


def _vera_frozen(W0: np.ndarray, config: DemoConfig) -> tuple[np.ndarray, dict]:
    vera_A, vera_B = vera_projections(LinearShape(k=config.k, d=config.d), config.rank, seed=config.seed)
    return W0, {"vera_A": vera_A, "vera_B": vera_B}


def _vera_hidden_delta(rng: np.random.Generator, config: DemoConfig, frozen_extra: dict) -> np.ndarray:
    lambda_d, lambda_b = rng.standard_normal(config.rank), 0.2 * rng.standard_normal(config.d)
    return vera_delta_weight(frozen_extra["vera_A"], frozen_extra["vera_B"], lambda_d, lambda_b, k=config.k)


def _vera_init(frozen: dict[str, np.ndarray], config: DemoConfig) -> dict[str, np.ndarray]:
    lambda_d, lambda_b = vera_init(config.d, config.rank)
    return {"vera_lambda_d": lambda_d, "vera_lambda_b": lambda_b}


def _vera_forward(x: Any, frozen: dict[str, Any], params: dict[str, Any], config: DemoConfig):
    return vera_forward(x, frozen["W0"], frozen["vera_A"], frozen["vera_B"], params["vera_lambda_d"],
                        params["vera_lambda_b"], bias=frozen["bias"])


def _vera_backward(dy: Any, cache: Any) -> dict[str, Any]:
    grads = vera_backward(dy, cache)
    return {"vera_lambda_d": grads.dlambda_d, "vera_lambda_b": grads.dlambda_b, "x": grads.dx}


def _vera_adapter(frozen: dict[str, Any], params: dict[str, Any], config: DemoConfig) -> Adapter:
    module = ModuleAdapter("vera", {"lambda_d": params["vera_lambda_d"], "lambda_b": params["vera_lambda_b"]})
    return Adapter({DEMO_LAYER: module}, vera_A=frozen["vera_A"], vera_B=frozen["vera_B"])


def _vera_merged(frozen: dict[str, Any], params: dict[str, Any], config: DemoConfig):
    return vera_merge(frozen["W0"], frozen["vera_A"], frozen["vera_B"], params["vera_lambda_d"],
                      params["vera_lambda_b"])


METHODS: dict[str, Method] = {
    "lora": Method(init=_lora_init, forward=_lora_forward, backward=_lora_backward, merged=_lora_merged,
                   trainable=lambda c: lora_parameter_count(c.k, c.d, c.rank), adapter=_lora_adapter),
    "dora": Method(init=_dora_init, forward=_dora_forward, backward=_dora_backward, merged=_dora_merged,
                   trainable=lambda c: dora_parameter_count(c.k, c.d, c.rank), differentiated=_dora_differentiated,
                   adapter=_lora_adapter, table_method="dora"),
    "vera": Method(init=_vera_init, forward=_vera_forward, backward=_vera_backward, merged=_vera_merged,
                   trainable=lambda c: vera_parameter_count(c.d, c.rank), frozen_base=_vera_frozen,
                   hidden_delta=_vera_hidden_delta, adapter=_vera_adapter, table_method="vera"),
    # PEFT on bitsandbytes' Linear4bit: bfloat16 compute with float32 adapters, or the float64 oracle.
    "qlora": Method(init=_lora_init, forward=_qlora_forward, backward=_qlora_backward, merged=_lora_merged,
                    trainable=lambda c: lora_parameter_count(c.k, c.d, c.rank), adapter=_lora_adapter,
                    frozen_base=_qlora_base, dtypes=("bfloat16", "float64"),
                    adapter_dtype=lambda dtype: "float32" if dtype == "bfloat16" else dtype),
}


@dataclass
class DemoReport:
    """What the demo measured."""

    config: DemoConfig
    losses: list[float] = field(default_factory=list)
    gradient_errors: dict[str, float] = field(default_factory=dict)   # worst relative error per tensor
    captured_energy: float = float("nan")
    trainable_parameters: int = 0
    full_parameters: int = 0
    seconds: float = 0.0
    frozen: dict[str, np.ndarray] = field(default_factory=dict)    # W0, bias (+ VeRA projections), float64
    trained: dict[str, np.ndarray] = field(default_factory=dict)   # the trained tensors, float64

    def adapter(self) -> Adapter:
        """The trained adapter (for export), one module named DEMO_LAYER."""
        return METHODS[self.config.method].adapter(self.frozen, self.trained, self.config)

    @property
    def loss_drop(self) -> float:
        return self.losses[0] / self.losses[-1] if self.losses[-1] > 0 else math.inf

    @property
    def gradients_ok(self) -> bool:
        return bool(self.gradient_errors) and max(self.gradient_errors.values()) < GRADIENT_TOLERANCE


def resolved(config: DemoConfig) -> DemoConfig:
    """The configuration with the method's default dtype filled in, checked."""
    if config.method not in METHODS:
        raise ConfigError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    if config.steps < 1:
        raise ConfigError(f"steps must be at least 1, got {config.steps}")
    dtypes = METHODS[config.method].dtypes
    if config.dtype is None:
        return replace(config, dtype=dtypes[0])
    if config.dtype not in dtypes:
        raise ConfigError(f"{config.method} trains in {', '.join(dtypes)}, not {config.dtype}")
    return config


def run_demo(config: DemoConfig, *, progress: Callable[[int, float], None] | None = None) -> DemoReport:
    """Train `config.method` on the embedded task; `progress(step, loss)` is called after each step."""
    config = resolved(config)
    method = METHODS[config.method]
    xp = numpy_namespace()
    start = time.perf_counter()
    task = embedded_task(config, frozen_base=method.frozen_base, hidden_delta=method.hidden_delta)
    frozen64 = {"W0": task.W0, "bias": task.bias, **task.extra}
    cast = partial(as_parameter, dtype=config.dtype, xp=xp)   # bfloat16: float32 storage of bf16 values
    frozen = {name: cast(a) if isinstance(a, np.ndarray) else a for name, a in frozen64.items()}
    x, target = cast(task.x), cast(task.target)
    adapter_dtype = method.adapter_dtype(config.dtype)
    cast_param = partial(as_parameter, dtype=adapter_dtype, xp=xp)
    params = {name: cast_param(p) for name, p in method.init(frozen64, config).items()}
    groups = (single_group(params, adamw(lr=config.lr, weight_decay=0.0)) if config.loraplus_ratio is None
              else loraplus_groups(params, adamw(lr=config.lr), lr_ratio=config.loraplus_ratio))
    state = AdamState()
    report = DemoReport(config=config, trainable_parameters=method.trainable(config),
                        full_parameters=full_parameter_count(config.k, config.d))
    check_at = _check_steps(config)
    n = task.x.shape[0]
    for step in range(config.steps):
        y, cache = method.forward(x, frozen, params, config)
        residual = y - target
        report.losses.append(0.5 * float(xp.sum(residual * residual)) / n)
        dy = residual / n
        if config.dtype == "bfloat16":  # a bfloat16 model's output gradient is bfloat16 too
            dy = round_to(dy, "bfloat16", xp=xp)
        grads = method.backward(dy, cache)
        if step in check_at:
            _record_gradient_check(report, method, task.x, frozen64, params, config, seed=step)
        params, state = adam_step(params, {k: v for k, v in grads.items() if k in params}, state, groups)
        if adapter_dtype == "bfloat16":
            params = {name: round_to(p, "bfloat16", xp=xp) for name, p in params.items()}
        if progress is not None:
            progress(step, report.losses[-1])
    report.frozen, report.trained = frozen64, _to64(params)
    learned = np.asarray(to_numpy(method.merged(frozen64, report.trained, config))) - task.W0
    report.captured_energy = 1.0 - float(np.sum((learned - task.delta) ** 2) / np.sum(task.delta**2))
    report.seconds = time.perf_counter() - start
    return report


def _to64(params: dict[str, Any]) -> dict[str, np.ndarray]:
    return {name: np.asarray(to_numpy(p), dtype=np.float64) for name, p in params.items()}


def _check_steps(config: DemoConfig) -> set[int]:
    if config.gradient_checks <= 0:
        return set()
    last = config.steps - 1
    return {round(i * last / max(config.gradient_checks - 1, 1)) for i in range(config.gradient_checks)}


def _record_gradient_check(report: DemoReport, method: Method, x: np.ndarray, frozen: dict[str, np.ndarray],
                           params: dict[str, Any], config: DemoConfig, *, seed: int) -> None:
    """Check the method's backward in float64 at the current parameters, on 16 rows of the batch."""
    config = replace(config, dtype="float64")
    inputs = {"x": x[:16], **_to64(params)}
    dy = np.random.default_rng(seed).standard_normal((16, config.d))
    current = {k: v for k, v in inputs.items() if k != "x"}
    if method.differentiated is None:
        def f(x, **p):
            return method.forward(x, frozen, p, config)[0]
    else:
        f = method.differentiated(frozen, current, config)
    _, cache = method.forward(inputs["x"], frozen, current, config)
    grads = method.backward(dy, cache)
    errors = gradient_errors(f, inputs, grads, dy, seed=seed)
    for name, err in errors.items():
        report.gradient_errors[name] = max(report.gradient_errors.get(name, 0.0), err)
