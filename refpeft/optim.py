"""Adam, AdamW and LoRA+ with exactly `torch.optim.Adam`'s update, as pure functions over named arrays.

Kingma & Ba 2015 (Adam), Loshchilov & Hutter 2019 (AdamW), Hayou et al. 2024 (LoRA+). For a
parameter p with gradient g at step t = 1, 2, ... (torch's single-tensor CPU path, in its order):

    g   = g + wd * p                    Adam: L2 penalty folded into the gradient
    p   = p * (1 - lr * wd)             AdamW: decoupled weight decay, applied to p first
    m   = lerp(m, g, 1 - beta1)         = m + (1 - beta1) (g - m)   (torch's lerp, weight < 0.5)
    v   = v * beta2 + (1 - beta2) * g * g
    vmax = max(vmax, v)                 amsgrad only; vmax replaces v below
    c1  = 1 - beta1^t,   c2 = 1 - beta2^t              (float64 scalars, `bias_corrections`)
    p   = p + (-lr / c1) * m / (sqrt(v) / sqrt(c2) + eps)

beta^t is computed without the platform's pow: torch evaluates `beta1 ** step` and
`bias_correction2 ** 0.5` with the C library's pow, which is not correctly rounded everywhere (glibc
2.3x: 1 step in 3000 of beta2 = 0.999 differs from the correctly rounded power, and `c2 ** 0.5` from
sqrt(c2) at 2 steps in 3000) and differs between C libraries. `power` evaluates beta^t in decimal
software arithmetic (40 digits) and rounds once to float64, sqrt is IEEE's (correctly rounded), so
c1 and sqrt(c2) are the same bits on every platform; at the rare steps where glibc's pow misses the
correct rounding refpeft and torch differ in the last bit of these scalars.

eps is added *after* the bias-corrected square root (torch's placement, not the paper's
sqrt(v_hat + eps)). Scalars are Python floats; on a float32 array they round to float32 at use,
as torch's kernels do. torch's vectorised CPU lerp uses a fused multiply-add, so float32 moments
can differ from torch in the last bit; float64 agrees to ~1e-16 relative per step.

LoRA+ (PEFT's `create_loraplus_optimizer`) is a choice of parameter groups, not a new update:
A matrices at lr, B matrices and other 1-D parameters at lr * ratio, embedding adapters at their
own rate; biases and norm weights get no weight decay.

State is functional: `adam_step` returns new parameters and a new `AdamState`; nothing is
mutated. `save_adam_state` / `load_adam_state` store it as safetensors (atomic write).
"""

from __future__ import annotations

import json
import math
from decimal import Decimal, localcontext
from dataclasses import dataclass, field, replace
from typing import Any, Iterable

from refpeft.backend import check_float_array, from_numpy, namespace, numpy_namespace, to_numpy
from refpeft.errors import ConfigError, FormatError, ShapeError
from refpeft.io import metadata_json, read_safetensors, write_safetensors
from refpeft.tolerance import Bounded, Precision, add, divide, exact, multiply, scale, sqrt, subtract, with_reference

STATE_FORMAT = "refpeft-adam-state/1"


@dataclass(frozen=True)
class AdamConfig:
    """Hyper-parameters of one parameter group (torch.optim.Adam's arguments and defaults)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False
    decoupled_weight_decay: bool = False  # True is AdamW

    def __post_init__(self) -> None:
        beta1, beta2 = self.betas
        checks = {"lr": self.lr >= 0.0, "eps": self.eps >= 0.0, "weight_decay": self.weight_decay >= 0.0,
                  "betas[0]": 0.0 <= beta1 < 1.0, "betas[1]": 0.0 <= beta2 < 1.0}
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"invalid Adam {name}: lr, eps, weight_decay >= 0 and betas in [0, 1) are required")


def adam(lr: float = 1e-3, **options: Any) -> AdamConfig:
    """torch.optim.Adam's configuration (L2 weight decay folded into the gradient)."""
    return AdamConfig(lr=lr, **options)


def adamw(lr: float = 1e-3, *, weight_decay: float = 1e-2, **options: Any) -> AdamConfig:
    """torch.optim.AdamW's configuration (decoupled weight decay, default 0.01)."""
    return AdamConfig(lr=lr, weight_decay=weight_decay, decoupled_weight_decay=True, **options)


@dataclass(frozen=True)
class ParamGroup:
    """Named parameters sharing one configuration (torch's param_groups)."""

    names: tuple[str, ...]
    config: AdamConfig


@dataclass(frozen=True)
class AdamState:
    """Per-parameter step counts and moments; a parameter enters it at its first update."""

    step: dict[str, int] = field(default_factory=dict)
    exp_avg: dict[str, Any] = field(default_factory=dict)
    exp_avg_sq: dict[str, Any] = field(default_factory=dict)
    max_exp_avg_sq: dict[str, Any] = field(default_factory=dict)


POWER_DIGITS = 40   # decimal digits of `power`'s intermediate: beta^t within 1e-39 relative before one rounding


def power(beta: float, t: int) -> float:
    """beta^t for a float64 beta and an integer t >= 0, rounded once to float64, without libm's pow.

    Decimal(beta) is beta exactly; its t-th power in a 40-digit decimal context (deterministic
    software arithmetic, the same on every platform) is within ~1e-39 relative of beta^t, and
    float() rounds that correctly to float64: the correctly rounded beta^t unless beta^t lies within
    1e-39 relative of the midpoint of two float64 numbers.
    """
    with localcontext() as context:
        context.prec = POWER_DIGITS
        return float(Decimal(beta) ** t)


def bias_corrections(betas: tuple[float, float], t: int) -> tuple[float, float]:
    """(c1, sqrt(c2)) of step t: c1 = fl(1 - power(beta1, t)), sqrt(c2) = fl(sqrt(fl(1 - power(beta2, t))))."""
    beta1, beta2 = betas
    return 1.0 - power(beta1, t), math.sqrt(1.0 - power(beta2, t))


def adam_update(p: Any, g: Any, m: Any, v: Any, vmax: Any, *, t: int, config: AdamConfig) -> tuple[Any, Any, Any, Any]:
    """One Adam/AdamW update of one tensor at step t (>= 1): returns (p, m, v, vmax)."""
    xp = namespace(p, g, m, v)
    lr, eps, wd = config.lr, config.eps, config.weight_decay
    beta1, beta2 = config.betas
    if wd != 0.0:
        if config.decoupled_weight_decay:
            p = p * (1.0 - lr * wd)
        else:
            g = g + wd * p
    weight = 1.0 - beta1
    m = m + weight * (g - m) if weight < 0.5 else g - (g - m) * (1.0 - weight)  # torch's lerp
    v = v * beta2 + (1.0 - beta2) * g * g
    bias_correction1, bias_correction2_sqrt = bias_corrections(config.betas, t)
    step_size = lr / bias_correction1
    if config.amsgrad:
        vmax = xp.maximum(vmax, v)
        denom = xp.sqrt(vmax) / bias_correction2_sqrt + eps
    else:
        denom = xp.sqrt(v) / bias_correction2_sqrt + eps
    p = p + (-step_size) * m / denom  # torch's addcdiv: p + value * t1 / t2
    return p, m, v, vmax


def adam_step(params: dict[str, Any], grads: dict[str, Any], state: AdamState,
              groups: Iterable[ParamGroup]) -> tuple[dict[str, Any], AdamState]:
    """Update every parameter of every group that has a gradient (like torch, others are skipped)."""
    new_params = dict(params)
    step, m_all, v_all, vmax_all = (dict(state.step), dict(state.exp_avg), dict(state.exp_avg_sq),
                                    dict(state.max_exp_avg_sq))
    for group in groups:
        for name in group.names:
            if name not in params:
                raise ConfigError(f"parameter group names {name!r}, which is not among the parameters")
            g = grads.get(name)
            if g is None:
                continue
            p = params[name]
            xp = namespace(p, g)
            check_float_array(f"gradient of {name}", g, xp=xp)
            if tuple(g.shape) != tuple(p.shape):
                raise ShapeError(f"gradient of {name} has shape {tuple(g.shape)}, parameter {tuple(p.shape)}")
            zeros = xp.zeros_like(p)
            t = step.get(name, 0) + 1
            new_params[name], m_all[name], v_all[name], vmax = adam_update(
                p, g, m_all.get(name, zeros), v_all.get(name, zeros), vmax_all.get(name, zeros),
                t=t, config=group.config)
            step[name] = t
            if group.config.amsgrad:
                vmax_all[name] = vmax
    return new_params, AdamState(step=step, exp_avg=m_all, exp_avg_sq=v_all, max_exp_avg_sq=vmax_all)


def single_group(params: dict[str, Any], config: AdamConfig) -> list[ParamGroup]:
    """All parameters in one group."""
    return [ParamGroup(names=tuple(params), config=config)]


def loraplus_groups(params: dict[str, Any], config: AdamConfig, *, lr_ratio: float,
                    lr_embedding: float = 1e-6, loraplus_weight_decay: float = 0.0,
                    layer_norm_names: bool = True) -> list[ParamGroup]:
    """PEFT's LoRA+ groups (`create_loraplus_optimizer`), from parameter names and shapes.

    - embedding adapters (names containing "lora_embedding"): lr_embedding, loraplus_weight_decay
    - "lora_B" or any 1-D parameter (DoRA magnitudes, VeRA vectors, biases): lr * lr_ratio,
      with loraplus_weight_decay, except names containing "bias" or a norm layer's weight: no decay
      (PEFT exempts the parameters of nn.LayerNorm layers, told here by "norm" in the name;
      layer_norm_names=False for models whose norms are RMSNorm, which PEFT does not exempt)
    - everything else (the A matrices): lr, loraplus_weight_decay
    `config` supplies lr, betas, eps, amsgrad and the Adam/AdamW choice; PEFT passes
    loraplus_weight_decay as each group's weight decay, overriding the optimiser's default.
    """
    if lr_ratio <= 0 or not math.isfinite(lr_ratio):
        raise ConfigError(f"LoRA+ lr_ratio must be a positive number, got {lr_ratio}")
    buckets: dict[str, list[str]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in params.items():
        if "lora_embedding" in name:
            buckets["embedding"].append(name)
        elif "lora_B" in name or len(p.shape) == 1:
            no_decay = "bias" in name or (layer_norm_names and "norm" in name.lower())
            buckets["B_no_decay" if no_decay else "B"].append(name)
        else:
            buckets["A"].append(name)
    lr = config.lr
    settings = {"A": (lr, loraplus_weight_decay), "embedding": (lr_embedding, loraplus_weight_decay),
                "B": (lr * lr_ratio, loraplus_weight_decay), "B_no_decay": (lr * lr_ratio, 0.0)}
    return [ParamGroup(names=tuple(names), config=replace(config, lr=settings[key][0], weight_decay=settings[key][1]))
            for key, names in buckets.items() if names]


def save_adam_state(path: str, state: AdamState, groups: Iterable[ParamGroup]) -> None:
    """Write the state and the group configuration to a safetensors file (atomically)."""
    tensors = {}
    for kind in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        for name, array in getattr(state, kind).items():
            tensors[f"{kind}/{name}"] = to_numpy(array)
    groups_json = [{"names": list(g.names), **{k: v for k, v in vars(g.config).items()}} for g in groups]
    metadata = {"format": STATE_FORMAT, "step": json.dumps(state.step, sort_keys=True),
                "groups": json.dumps(groups_json, sort_keys=True)}
    write_safetensors(path, tensors, metadata)


def load_adam_state(path: str, *, xp: Any = None) -> tuple[AdamState, list[ParamGroup]]:
    """Read a file written by `save_adam_state` into arrays of namespace `xp` (NumPy by default)."""
    xp = numpy_namespace() if xp is None else xp
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != STATE_FORMAT:
        raise FormatError(f"{path}: not a refpeft Adam state (format {metadata.get('format')!r})")
    step = metadata_json(metadata, "step", source=path)
    try:
        groups = [ParamGroup(names=tuple(g.pop("names")), config=AdamConfig(**{**g, "betas": tuple(g["betas"])}))
                  for g in metadata_json(metadata, "groups", source=path)]
    except (TypeError, KeyError, AttributeError) as exc:
        raise FormatError(f"{path}: malformed parameter groups ({exc})") from None
    kinds: dict[str, dict[str, Any]] = {"exp_avg": {}, "exp_avg_sq": {}, "max_exp_avg_sq": {}}
    for key, array in tensors.items():
        kind, _, name = key.partition("/")
        if kind not in kinds or name not in step:
            raise FormatError(f"{path}: unexpected tensor {key!r}")
        kinds[kind][name] = from_numpy(array, xp=xp)
    return AdamState(step={k: int(v) for k, v in step.items()}, **kinds), groups


# --- error bounds (composed from refpeft.tolerance's algebra; docs/tolerance.md) ---------------


def adam_update_bound(p: Any, g: Any, m: Any, v: Any, *, t: int, lr: float, betas: tuple[float, float],
                      eps: float, weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
                      dtype: str = "float32", model: str = "rigorous") -> dict[str, Any]:
    """Per-element bounds on the updated p, m, v of one Adam/AdamW step (amsgrad off).

    Every scalar (1 - lr wd, 1 - beta1, beta2, 1 - beta2, sqrt(1 - beta2^t), lr / (1 - beta1^t),
    eps) is a float64 number the peer rounds to its format; each elementwise op rounds once. A fused
    multiply-add or lerp rounds less, which the bound covers.
    """
    beta1, beta2 = betas
    c1, c2_sqrt = bias_corrections(betas, t)

    def chain(prec: Precision) -> dict[str, Bounded]:
        P, G, M, V = exact(p), exact(g), exact(m), exact(v)
        if weight_decay != 0.0:
            if decoupled_weight_decay:
                P = scale(P, 1.0 - lr * weight_decay, prec)
            else:
                G = add(G, scale(P, weight_decay, prec), prec)
        weight = 1.0 - beta1
        if weight < 0.5:
            M = add(M, scale(subtract(G, M, prec), weight, prec), prec)
        else:
            M = subtract(G, scale(subtract(G, M, prec), 1.0 - weight, prec), prec)
        V = add(scale(V, beta2, prec), scale(multiply(G, G, prec), 1.0 - beta2, prec), prec)
        root = scale(sqrt(V, prec), c2_sqrt, prec, divide=True)
        xp = namespace(root.value)
        denom = add(root, exact(xp.full(root.value.shape, eps, dtype=xp.float64)), prec)
        step = scale(divide(M, denom, prec), -lr / c1, prec)
        return {"p": add(P, step, prec), "m": M, "v": V}

    return with_reference(chain, Precision(dtype, None, model))
