"""Elastic weight consolidation: a penalty that holds the weights the base needs where they were.

The diagonal Fisher information of the base weights theta0, estimated on a reference set of E
examples (the empirical Fisher: each example's own labels, its mean next-token loss L_e):

    F_j = (1 / E) sum_e (dL_e / d theta_j)^2            at theta0, per weight entry j

and the penalty on a fine-tuned theta (Kirkpatrick et al. 2017), with strength lambda:

    P = lambda / 2 sum_j F_j (theta_j - theta0_j)^2      dP / d theta = lambda F (theta - theta0)

Full fine-tuning penalises the weights themselves. An adapter changes a layer's weight W by its
effective update, for LoRA (and rsLoRA) Delta W = s B A (d, k), so the penalty is on that change:

    P = lambda / 2 sum F_W * (s B A)^2         G = lambda F_W * (s B A)          # (d, k)
    dP / dB = s G A^T   (d, r)                 dP / dA = s B^T G   (r, k)

(the chain rule through Delta W = s B A; B = 0 at initialisation gives P = 0 and no pull until the
adapter moves). Other methods' updates (DoRA's rescaled weight, VeRA's shared projections) are
not derived here and are refused.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from refpeft.backend import namespace
from refpeft.errors import ConfigError
from refpeft.model.decoder import Model, loss_and_gradients

EWC_METHODS = ("lora",)


def fisher_names(model: Model) -> list[str]:
    """The base weights whose Fisher the penalty needs: the adapted layers' weights, or every weight
    of a model without an adapter (full fine-tuning)."""
    if model.adapter is None:
        return list(model.weights)
    names = []
    for path, module in model.adapter.modules.items():
        if module.method not in EWC_METHODS:
            raise ConfigError(f"{path}: EWC's penalty on the effective update is derived for "
                              f"{', '.join(EWC_METHODS)} (rsLoRA included), not {module.method}")
        if path == "lm_head":
            raise ConfigError("EWC on an adapted lm_head is not supported (its base weight may be the tied embedding)")
        names.append(f"{path}.weight")
    return names


def diagonal_fisher(base: Model, examples: Iterable[tuple[Any, Any, Any]], names: list[str]) -> dict[str, Any]:
    """F of the module docstring for the base weights `names`, over (ids (1, s), labels (1, s), mask or None)."""
    total: dict[str, Any] = {}
    count = 0
    for ids, labels, mask in examples:
        _, _, grads = loss_and_gradients(Model(base.config, base.weights), ids, labels, attention_mask=mask,
                                         train_base=set(names))
        for name in names:
            total[name] = grads[name] ** 2 if name not in total else total[name] + grads[name] ** 2
        count += 1
    if count == 0:
        raise ConfigError("the Fisher needs at least one reference example")
    return {name: value / count for name, value in total.items()}


def ewc_penalty(model: Model, fisher: Mapping[str, Any], strength: float,
                reference: Mapping[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """(P, dP by the gradient names of refpeft.model.decoder) for `model`'s adapter, or for its
    weights against `reference` (theta0) when it has none (full fine-tuning)."""
    if not strength >= 0:
        raise ConfigError(f"the EWC strength lambda must be >= 0, got {strength!r}")
    grads: dict[str, Any] = {}
    value = 0.0
    if model.adapter is None:
        if reference is None:
            raise ConfigError("full fine-tuning's EWC penalty needs the base weights theta0 (reference=...)")
        for name, F in fisher.items():
            change = model.weights[name] - reference[name]
            value = value + 0.5 * strength * namespace(change).sum(F * change * change)
            grads[name] = strength * F * change
        return value, grads
    for path, module in model.adapter.modules.items():
        xp = namespace(module.A)
        F = fisher[f"{path}.weight"]
        delta = module.scaling * xp.matmul(module.B, module.A)                          # (d, k)  s B A
        G = strength * F * delta                                                        # (d, k)
        value = value + 0.5 * xp.sum(G * delta)
        grads[f"{path}.B"] = module.scaling * xp.matmul(G, xp.matrix_transpose(module.A))   # (d, r)
        grads[f"{path}.A"] = module.scaling * xp.matmul(xp.matrix_transpose(module.B), G)   # (r, k)
    return value, grads
