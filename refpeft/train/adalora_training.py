"""AdaLoRA in a training run: the adapter, the orthogonality term of each step, the rank allocation after it.

A run trains the full init_r triplets (A (r, k), E (r, 1), B (d, r)) of every targeted layer with the
decoder's forward and backward (AdaLoRA's row, refpeft.methods.adalora), as PEFT 0.21.2's
AdaLoraModel trains them, and differs from a LoRA run in three places:

    loss    L + R,  R = w / N * sum ||A A^T - I||_F + ||B^T B - I||_F       (refpeft.methods.adalora:
                                                                             adalora_orthogonality)
            PEFT adds R to the loss in AdaLoraModel.forward, so its gradient joins before clipping;
            it is added once per optimiser step ("mean" accumulation: G micro-batches of (L_j + R) / G).
    after   the optimiser step t (0-based), with the step's clipped gradients (still in `.grad` in PEFT):
            state, budget, masks = adalora_allocate(t, state, params, grads)  (refpeft.methods.adalora_allocator)
            E = E masked where a triplet is pruned                            (PEFT's masked_fill_ on lora_E)
            which is PEFT's `model.base_model.update_and_allocate(t)` between optimizer.step() and
            zero_grad(); the optimiser's moments are left as they are, as PEFT leaves them.
    saved   PEFT's ADALORA folder (refpeft.adalora_format): the tensors pruned by the final masks,
            which become the config's rank_pattern; total_step is the run's --steps.

ranknum (the scale's init_r) stays fixed. PEFT 0.21.2 marks it trainable by accident (refpeft.methods.adalora),
so an optimiser over every `requires_grad` tensor moves it there; its files do not keep it (it is init_r on
load), and neither does refpeft's training.

AdaLoRA's row is not in the method table (refpeft.methods.adalora says why), so its modules are
`AdaloraModule`s (refpeft.methods.adalora): ModuleAdapters that carry the row itself instead of looking
their name up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from refpeft.adalora_format import write_adalora_adapter
from refpeft.adapter import Adapter
from refpeft.errors import ConfigError
from refpeft.methods.adalora import ADALORA, TENSOR_NAMES, adalora_orthogonality
from refpeft.methods.adalora_allocator import AdaloraSchedule, AdaloraState, adalora_allocate, adalora_apply_masks
from refpeft.model.decoder import Model, dense_weight


@dataclass(frozen=True)
class AdaloraTraining:
    """What an AdaLoRA run adds to a training configuration: PEFT's AdaLoraConfig's schedule and weight."""

    schedule: AdaloraSchedule          # init_r, target_r, tinit, tfinal, deltaT, beta1, beta2; total_step = the steps
    orth_reg_weight: float = 0.5       # w, PEFT's default

    def __post_init__(self) -> None:
        if not (math.isfinite(self.orth_reg_weight) and self.orth_reg_weight >= 0):
            raise ConfigError(f"orth_reg_weight must be a finite number >= 0, got {self.orth_reg_weight}")


def new_adalora_adapter(model: Model, paths: Sequence[str], *, init_r: int, alpha: float, seed: int = 0) -> Adapter:
    """Fresh AdaLoRA modules on the layers `paths` (PEFT's init: E = 0, A, B ~ N(0, 0.02^2)), layer i
    drawn from seeds seed + 2i, seed + 2i + 1 (the seeds the row's init uses), in the model's dtype."""
    if init_r < 1:
        raise ConfigError(f"AdaLoRA trains init_r >= 1 triplets per layer, got --rank {init_r}")
    W0s = {path: dense_weight(model, path) for path in paths}
    modules, _, _ = ADALORA.init_modules(W0s, ranks={p: init_r for p in paths}, alphas={p: alpha for p in paths},
                                         seed=seed)
    return Adapter(modules)


def is_adalora(model: Model) -> bool:
    """Whether the model's adapter is an AdaLoRA adapter (its modules carry AdaLoRA's row)."""
    return model.adapter is not None and any(m.spec is ADALORA for m in model.adapter.modules.values())


def orthogonality_term(model: Model, training: AdaloraTraining) -> tuple[dict[str, float], dict[str, Any]]:
    """({"orthogonality": R}, dR by the decoder's gradient names "<path>.lora_A" / "<path>.lora_B")."""
    modules = model.adapter.modules
    value, grads = adalora_orthogonality({p: (m.lora_A, m.lora_B) for p, m in modules.items()},
                                         weight=training.orth_reg_weight)
    named = {f"{p}.lora_A": g for p, g in grads.dlora_A.items()}
    named.update({f"{p}.lora_B": g for p, g in grads.dlora_B.items()})
    return {"orthogonality": float(value)}, named


def allocate(step: int, model: Model, grads: Mapping[str, Any], state: AdaloraState | None,
             training: AdaloraTraining) -> tuple[Model, AdaloraState]:
    """PEFT's update_and_allocate(step) after optimiser step `step` (0-based): the model with pruned
    singular values zeroed, and the allocator's new state. `grads` are the step's clipped gradients."""
    modules = model.adapter.modules
    params = {p: {n: m.tensors[n] for n in TENSOR_NAMES} for p, m in modules.items()}
    by_module = {p: {n: grads[f"{p}.{n}"] for n in TENSOR_NAMES} for p in modules}
    state, _, masks = adalora_allocate(step, state or AdaloraState(), params, by_module, schedule=training.schedule)
    if masks is None:
        return model, state
    E = adalora_apply_masks({p: m.lora_E for p, m in modules.items()}, masks)
    masked = {p: m.replace(lora_E=E[p]) for p, m in modules.items()}
    return replace(model, adapter=replace(model.adapter, modules=masked)), state


def write_adalora_folder(directory: str | Path, model: Model, state: AdaloraState | None,
                         training: AdaloraTraining) -> Path:
    """PEFT's ADALORA folder of the trained model: pruned by the final masks (state.rank_pattern) when made."""
    modules = model.adapter.modules
    alphas = {m.alpha for m in modules.values()}
    if len(alphas) != 1:
        raise ConfigError(f"PEFT's AdaLoRA stores one lora_alpha, but the modules have {sorted(alphas)}")
    return write_adalora_adapter(directory, {p: tuple(m.tensors[n] for n in TENSOR_NAMES) for p, m in modules.items()},
                                 schedule=training.schedule, lora_alpha=alphas.pop(),
                                 rank_pattern=None if state is None else state.rank_pattern,
                                 orth_reg_weight=training.orth_reg_weight)
