"""AdaLoRA's rank allocator: importance scores, the cubic budget schedule and the masks, as pure functions.

HF PEFT 0.21.2's `RankAllocator` (tuners/adalora/layer.py) and `AdaLoraModel.update_and_allocate`
(model.py), called once per training step after the optimiser step, with the gradients of that step
still held. Here the state is a value: `adalora_allocate(step, state, params, grads, schedule)`
returns (new state, budget, masks); the caller zeroes the masked singular values (`adalora_apply_masks`),
as PEFT's `masked_fill_` does in place.

Importance of every entry w of A, E and B (Zhang et al. 2023, eqs. 8-10):

    I     = |w * dL/dw|                          # w after this step's update, dL/dw from before it
    Ibar  = beta1 * Ibar + (1 - beta1) * I       # sensitivity, smoothed
    U     = beta2 * U + (1 - beta2) * |I - Ibar| # uncertainty (with the new Ibar)
    score = Ibar * U                             # per entry; Ibar = U = 0 before the first update

Triplet i of a module (E_i, row A_i, column B_:,i) scores

    S_i = score(E_i) + (mean_k score(A_i,k) + mean_d score(B_d,i))

Budget (T = total_step, tinit, tfinal; b0 = init_r * modules, bT = target_r * modules):

    step <= tinit:                 b = b0,  no masking
    step >  T - tfinal:            b = bT,  the final masks re-applied every step
    otherwise:                     b = int((b0 - bT) * (1 - (step - tinit) / (T - tfinal - tinit))^3 + bT),
                                   masking when step % deltaT == 0 (int truncates towards zero)

Masking keeps triplet i when S_i > t, t the (b0 - b)-th smallest score over all modules (torch.kthvalue,
so ties at t are all masked and fewer than b may survive). At step == T - tfinal the scores are not
updated, the masks are forced at b = bT, they become the final rank pattern (PEFT's
`config.rank_pattern`) and the scores are reset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from refpeft.backend import check_float_array, namespace
from refpeft.errors import ConfigError, ShapeError
from refpeft.methods.adalora import TENSOR_NAMES


@dataclass(frozen=True)
class AdaloraSchedule:
    """PEFT's AdaLoraConfig fields that drive the allocator, checked as PEFT checks them."""

    init_r: int
    target_r: int
    total_step: int
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85

    def __post_init__(self) -> None:
        for name in ("init_r", "target_r", "total_step", "tinit", "tfinal", "deltaT"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.target_r > self.init_r:
            raise ConfigError(f"target_r = {self.target_r} is larger than init_r = {self.init_r}: the budget can "
                              "only prune the ranks each layer starts with")
        if self.total_step < 1 or self.deltaT < 1:
            raise ConfigError(f"total_step and deltaT must be at least 1, got {self.total_step}, {self.deltaT}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(f"tinit = {self.tinit} >= total_step - tfinal = {self.total_step - self.tfinal}: "
                              "no budgeting phase (PEFT refuses it too)")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name} must lie in (0, 1), got {getattr(self, name)}")


@dataclass(frozen=True)
class AdaloraState:
    """The allocator's memory: smoothed sensitivity and uncertainty per module and tensor, and the masks
    of the last allocation (PEFT's config.rank_pattern), by module path."""

    sensitivity: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)   # Ibar: {path: {lora_A: ...}}
    uncertainty: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)   # U
    rank_pattern: Mapping[str, Any] | None = None                                 # {path: (r,) bool}


def adalora_budget(step: int, schedule: AdaloraSchedule, *, modules: int) -> tuple[int, bool]:
    """(budget, whether this step masks) for `modules` adapted layers of init_r each (PEFT's budget_schedule)."""
    s = schedule
    b0, bT = s.init_r * modules, s.target_r * modules
    if step <= s.tinit:
        return b0, False
    if step > s.total_step - s.tfinal:
        return bT, True
    mul = 1 - (step - s.tinit) / (s.total_step - s.tfinal - s.tinit)
    return int((b0 - bT) * mul ** 3 + bT), step % s.deltaT == 0


def adalora_update_importance(state: AdaloraState, params: Mapping[str, Mapping[str, Any]],
                              grads: Mapping[str, Mapping[str, Any]], *, beta1: float, beta2: float) -> AdaloraState:
    """One smoothing step of Ibar and U for every module's lora_A, lora_E, lora_B (module docstring)."""
    if set(params) != set(grads):
        raise ShapeError(f"params and grads name different modules: {sorted(set(params) ^ set(grads))}")
    sensitivity, uncertainty = dict(state.sensitivity), dict(state.uncertainty)
    for path in params:
        s_new, u_new = {}, {}
        for name in TENSOR_NAMES:
            w, g = params[path][name], grads[path][name]
            xp = namespace(w, g)
            check_float_array(f"{path}.{name}", w, xp=xp)
            check_float_array(f"grad of {path}.{name}", g, xp=xp, shape=tuple(w.shape))
            ipt = xp.abs(w * g)
            old_s = state.sensitivity.get(path, {}).get(name)
            old_u = state.uncertainty.get(path, {}).get(name)
            s_new[name] = (1 - beta1) * ipt if old_s is None else beta1 * old_s + (1 - beta1) * ipt
            spread = (1 - beta2) * xp.abs(ipt - s_new[name])
            u_new[name] = spread if old_u is None else beta2 * old_u + spread
        sensitivity[path], uncertainty[path] = s_new, u_new
    return AdaloraState(sensitivity, uncertainty, state.rank_pattern)


def adalora_triplet_scores(state: AdaloraState) -> dict[str, Any]:
    """S_i for each module's r triplets, (r,) per module path (module docstring)."""
    scores = {}
    for path, s in state.sensitivity.items():
        u = state.uncertainty[path]
        xp = namespace(s["lora_A"])
        entry = {name: s[name] * u[name] for name in TENSOR_NAMES}
        ab = xp.mean(entry["lora_A"], axis=1) + xp.mean(entry["lora_B"], axis=0)   # (r,)
        scores[path] = xp.reshape(entry["lora_E"], (-1,)) + ab
    return scores


def adalora_mask_to_budget(scores: Mapping[str, Any], budget: int, *, init_budget: int) -> dict[str, Any]:
    """{path: (r,) bool}: triplets scoring above the (init_budget - budget)-th smallest score over all modules."""
    k = init_budget - budget
    if not scores:
        raise ConfigError("no importance scores yet: the allocator needs one update before it can mask")
    xp = namespace(*scores.values())
    every = xp.sort(xp.concat([xp.reshape(v, (-1,)) for v in scores.values()]))
    if not 1 <= k <= every.shape[0]:
        raise ConfigError(f"budget {budget} of {init_budget} masks {k} of {every.shape[0]} triplets; it must mask "
                          "at least one (PEFT's kthvalue fails too): target_r must be below init_r")
    threshold = every[k - 1]
    return {path: v > threshold for path, v in scores.items()}


def adalora_allocate(step: int, state: AdaloraState, params: Mapping[str, Mapping[str, Any]],
                     grads: Mapping[str, Mapping[str, Any]] | None, *,
                     schedule: AdaloraSchedule) -> tuple[AdaloraState, int, dict[str, Any] | None]:
    """One call of PEFT's update_and_allocate(step): (new state, budget, masks to apply or None).

    params / grads: {path: {"lora_A": (r, k), "lora_E": (r, 1), "lora_B": (d, r)}}, the parameters after
    this step's update and this step's gradients (grads may be None once step >= total_step - tfinal)."""
    if type(step) is not int or step < 0:
        raise ConfigError(f"step must be a non-negative integer, got {step!r}")
    end = schedule.total_step - schedule.tfinal
    modules = len(params)
    for path, p in params.items():
        if p["lora_A"].shape[0] != schedule.init_r:
            raise ShapeError(f"{path}.lora_A has {p['lora_A'].shape[0]} rows; the allocator runs on the "
                             f"unpruned init_r = {schedule.init_r} triplets")
    budget, masking = adalora_budget(step, schedule, modules=modules)
    init_budget = schedule.init_r * modules
    if step < end:
        if grads is None:
            raise ConfigError(f"step {step} < total_step - tfinal = {end} updates the scores: pass the gradients")
        state = adalora_update_importance(state, params, grads, beta1=schedule.beta1, beta2=schedule.beta2)
        if not masking:
            return state, budget, None
        masks = adalora_mask_to_budget(adalora_triplet_scores(state), budget, init_budget=init_budget)
        return AdaloraState(state.sensitivity, state.uncertainty, masks), budget, masks
    if step == end:            # forced final allocation, then PEFT's reset_ipt()
        masks = adalora_mask_to_budget(adalora_triplet_scores(state), budget, init_budget=init_budget)
        return AdaloraState(rank_pattern=masks), budget, masks
    if state.rank_pattern is None:
        raise ConfigError(f"step {step} is past total_step - tfinal = {end} but no final rank pattern was made "
                          f"(call step {end} first)")
    return state, budget, dict(state.rank_pattern)


def adalora_apply_masks(E: Mapping[str, Any], masks: Mapping[str, Any]) -> dict[str, Any]:
    """Each module's E (r, 1) with masked singular values set to 0 (PEFT's masked_fill_), others as they are."""
    out = {}
    for path, e in E.items():
        xp = namespace(e)
        if path not in masks:
            raise ShapeError(f"no mask for module {path!r}")
        out[path] = xp.where(xp.reshape(masks[path], (-1, 1)), e, xp.zeros_like(e))
    return out

