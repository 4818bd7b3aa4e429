"""What a training step minimises: the task loss, and the terms that keep what the base knew.

Micro-batch j of an optimiser step (refpeft.train.loop; G micro-batches of b examples, weight w =
1 / G, or 1 with "tokens" accumulation, where the task loss is a sum over the step's counted tokens):

    rehearsal  the batch's last round(f b) examples are general examples instead of task ones
               (their own stream over the general set, positions j-th of the step: deterministic
               from the seed, resumable like the task stream);
    task       w L_task(adapted)                                      refpeft.model.loss
    distill    alpha / G * L_KD(base || adapted, T) on the batch's real tokens    refpeft.model.distillation
               (the base: the model with its adapter disabled, or theta0 for full fine-tuning);
               its dlogits add to the task's before the one backward
    prior      lambda_p / G * L_task(adapted) on micro-batch j of the class-prior set: a second
               forward and backward

and once per step, before clipping, the EWC penalty lambda / 2 sum F (Delta theta)^2 and its
gradient (refpeft.train.ewc). The step's reported loss is the total; its parts are reported too.
`drift` is the mean KL(base || adapted) (T = 1) over held-out general text: how far the model has
moved from what the base predicted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from refpeft.backend import from_numpy, namespace
from refpeft.errors import ConfigError
from refpeft.model.decoder import Model, backward, forward
from refpeft.model.distillation import distillation_backward, distillation_forward
from refpeft.model.loss import causal_lm_loss_backward, causal_lm_loss_forward
from refpeft.model.prompt_tuning import prompt_labels
from refpeft.train.adapters import full_fine_tuning
from refpeft.train.data import Batch, TokenDataset, micro_batch, pad_batch, stream_indices
from refpeft.train.ewc import ewc_penalty


@dataclass(frozen=True)
class Forgetting:
    """The forgetting terms' settings (module docstring); the defaults add nothing."""

    distill: float = 0.0                   # alpha
    temperature: float = 1.0               # T
    ewc: float = 0.0                       # lambda
    fisher: Mapping[str, Any] | None = None
    rehearsal: TokenDataset | None = None  # general data mixed into the task batches
    rehearsal_fraction: float = 0.0        # f
    prior: TokenDataset | None = None      # class-prior data
    prior_weight: float = 0.0              # lambda_p
    base_weights: Mapping[str, Any] | None = None   # theta0, for full fine-tuning

    def __post_init__(self) -> None:
        for name in ("distill", "ewc", "prior_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise ConfigError(f"the distillation temperature must be positive, got {self.temperature!r}")
        _check_fraction(self.rehearsal_fraction)
        if self.ewc and self.fisher is None:
            raise ConfigError("EWC needs the Fisher of the base (refpeft.train.ewc.diagonal_fisher)")
        if self.rehearsal_fraction and self.rehearsal is None:
            raise ConfigError("a rehearsal fraction needs general data to rehearse")
        if self.prior_weight and self.prior is None:
            raise ConfigError("a prior weight needs class-prior data")


def general_per_batch(fraction: float, size: int) -> int:
    """round(f b): the general examples rehearsed in a batch of b = `size`; ConfigError unless f is in
    [0, 1) and leaves the batch at least one task example."""
    _check_fraction(fraction)
    general = round(fraction * size)
    if general >= size:
        raise ConfigError(f"a rehearsal fraction of {fraction} replaces all {size} examples of a batch with general "
                          "ones; lower it or raise the batch size")
    return general


def step_batches(dataset: TokenDataset, forgetting: Forgetting | None, *, position: int, size: int, count: int,
                 seed: int) -> list[Batch]:
    """The step's `count` micro-batches from stream position `position`, rehearsal mixed in."""
    general = 0 if forgetting is None or forgetting.rehearsal is None else \
        general_per_batch(forgetting.rehearsal_fraction, size)
    batches = []
    for j in range(count):
        start = position + j * size
        task = [dataset.examples[i] for i in stream_indices(len(dataset), start=start, size=size - general, seed=seed)]
        mixed = [forgetting.rehearsal.examples[i] for i in stream_indices(
            len(forgetting.rehearsal), start=(start // size) * general, size=general, seed=seed + 1)] if general else []
        batches.append(pad_batch(task + mixed, pad_id=dataset.pad_id))
    return batches


def base_of(model: Model, forgetting: Forgetting) -> Model:
    """The frozen base: the adapter disabled, or theta0 for full fine-tuning."""
    if not full_fine_tuning(model):
        return Model(model.config, model.weights)
    if forgetting.base_weights is None:
        raise ConfigError("distillation during full fine-tuning needs the base weights theta0")
    return Model(model.config, forgetting.base_weights)


def micro_batch_terms(model: Model, batch: Batch, forgetting: Forgetting | None, *, loss_weight: float,
                      count: int, num_items_in_batch: int | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """The micro-batch's weighted loss terms ({"task": ..., "distill": ...}) and their summed gradients."""
    ids, labels, mask = _arrays(model, batch)
    logits, tape, _ = forward(model, ids, attention_mask=mask, train_base=full_fine_tuning(model))
    loss, cache = causal_lm_loss_forward(logits, labels, num_items_in_batch=num_items_in_batch)
    dlogits = causal_lm_loss_backward(loss_weight, cache)
    terms = {"task": float(loss) * loss_weight}
    if forgetting is not None and forgetting.distill:
        base, _, _ = forward(base_of(model, forgetting), ids, attention_mask=mask, record=False)
        kd, kd_cache = distillation_forward(logits, base, temperature=forgetting.temperature, counted=mask)
        weight = forgetting.distill / count
        dlogits = dlogits + distillation_backward(weight, kd_cache)
        terms["distill"] = float(kd) * weight
    grads = backward(model, dlogits, tape)
    return terms, grads


def prior_terms(model: Model, forgetting: Forgetting, *, position: int, size: int, count: int,
                seed: int) -> tuple[dict[str, float], dict[str, Any]]:
    """lambda_p / G times the task loss of the prior set's micro-batch at `position`, and its gradients."""
    batch = micro_batch(forgetting.prior, start=position, size=size, seed=seed + 2)
    ids, labels, mask = _arrays(model, batch)
    logits, tape, _ = forward(model, ids, attention_mask=mask, train_base=full_fine_tuning(model))
    loss, cache = causal_lm_loss_forward(logits, labels)
    weight = forgetting.prior_weight / count
    return {"prior": float(loss) * weight}, backward(model, causal_lm_loss_backward(weight, cache), tape)


def step_penalty(model: Model, forgetting: Forgetting | None) -> tuple[dict[str, float], dict[str, Any]]:
    """The EWC penalty of the step and its gradient (nothing without EWC)."""
    if forgetting is None or not forgetting.ewc:
        return {}, {}
    value, grads = ewc_penalty(model, forgetting.fisher, forgetting.ewc, reference=forgetting.base_weights)
    return {"ewc": float(value)}, grads


def add_terms(total: dict[str, float], terms: Mapping[str, float]) -> dict[str, float]:
    return {**total, **{name: total.get(name, 0.0) + value for name, value in terms.items()}}


def drift(model: Model, general: TokenDataset, *, batch_size: int = 4, base_weights: Mapping[str, Any] | None = None,
          limit: int = 64) -> float:
    """Mean KL(base || model) (T = 1) per real token over up to `limit` held-out general examples."""
    base = base_of(model, Forgetting(base_weights=base_weights))
    total, tokens = 0.0, 0
    for start in range(0, min(limit, len(general)), batch_size):
        batch = pad_batch(list(general.examples[start:start + batch_size]), pad_id=general.pad_id)
        ids, _, mask = _arrays(model, batch)
        adapted = forward(model, ids, attention_mask=mask, record=False)[0]
        reference = forward(base, ids, attention_mask=mask, record=False)[0]
        n = int(np.sum(batch.attention_mask))
        total += float(distillation_forward(adapted, reference, counted=mask)[0]) * n
        tokens += n
    return total / tokens


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not (isinstance(fraction, (int, float)) and 0 <= fraction < 1):
        raise ConfigError(f"the rehearsal fraction must be in [0, 1), got {fraction!r}")


def _arrays(model: Model, batch: Batch) -> tuple[Any, Any, Any]:
    """ids, labels, mask as the model's arrays; prompt tuning's k virtual positions get labels -100."""
    embed = model.weights["model.embed_tokens.weight"]
    xp = namespace(embed)
    ids, labels, mask = (from_numpy(a, xp=xp, like=embed) for a in (batch.ids, batch.labels, batch.attention_mask))
    return ids, labels if model.prompt is None else prompt_labels(labels, int(model.prompt.shape[0])), mask
