"""refpeft itself, computing in the case's dtype (float32 in float32): the oracle checked by its own bounds.

This is the first implementation every case must pass: it shows the bounds hold for a plain
NumPy implementation and gives the baseline error / bound figures the peers are compared with.
"""

from __future__ import annotations

import numpy as np

from refpeft.conformance.check import Unsupported
from refpeft.conformance.runners import Runner
from refpeft.lora import lora_backward, lora_forward, merge, unmerge
from refpeft.optim import AdamConfig, AdamState, ParamGroup, adam_step


def _lora(manifest: dict, inputs: dict) -> dict:
    family, o, p = manifest["family"], manifest["options"], manifest["parameters"]
    common = dict(scaling=p["scaling"], fan_in_fan_out=o.get("fan_in_fan_out", False))
    if family == "lora_merge":
        if o.get("unmerge", False):
            return {"W0": unmerge(inputs["W"], inputs["A"], inputs["B"], **common)}
        return {"W": merge(inputs["W0"], inputs["A"], inputs["B"], **common)}
    trainable = "bias" in inputs
    y, cache = lora_forward(inputs["x"], inputs["W0"], inputs["A"], inputs["B"], bias=inputs.get("bias"),
                            dropout_mask=inputs.get("dropout_mask"), bias_trainable=trainable, **common)
    if family == "lora_forward":
        return {"y": y}
    g = lora_backward(inputs["dy"], cache)
    return {"dx": g.dx, "dA": g.dA, "dB": g.dB, **({"dbias": g.dbias} if trainable else {})}


def _adam(manifest: dict, inputs: dict) -> dict:
    o, p = manifest["options"], manifest["parameters"]
    t = p["step"]
    base = AdamConfig(lr=o["lr"], betas=tuple(o.get("betas", (0.9, 0.999))), eps=o.get("eps", 1e-8),
                      decoupled_weight_decay=o.get("adamw", False))
    groups = [ParamGroup(tuple(g["names"]), AdamConfig(**{**vars(base), "lr": g["lr"], "weight_decay": g["weight_decay"]}))
              for g in p["groups"]]
    names = [n for g in groups for n in g.names]
    state = AdamState() if t == 1 else AdamState(step={n: t - 1 for n in names},
                                                 exp_avg={n: inputs[f"exp_avg.{n}"] for n in names},
                                                 exp_avg_sq={n: inputs[f"exp_avg_sq.{n}"] for n in names})
    params, new = adam_step({n: inputs[n] for n in names}, {n: inputs[f"grad.{n}"] for n in names}, state, groups)
    out = dict(params)
    out.update({f"exp_avg.{n}": new.exp_avg[n] for n in names})
    out.update({f"exp_avg_sq.{n}": new.exp_avg_sq[n] for n in names})
    return out


HANDLERS = {"lora_forward": _lora, "lora_backward": _lora, "lora_merge": _lora, "adam_step": _adam}


def run(manifest: dict, inputs: dict[str, np.ndarray]) -> dict:
    handler = HANDLERS.get(manifest["family"])
    if handler is None:
        raise Unsupported(f"no refpeft runner for family {manifest['family']!r}")
    return handler(manifest, inputs)


def implementations() -> list[Runner]:
    return [Runner("refpeft-numpy", run)]
