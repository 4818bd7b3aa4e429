"""HF PEFT applying an adapter_config.json: the `adapter_config` family's peer.

A torch model is built with exactly the case's module paths (each a 4 x 4 nn.Linear with a bias,
the containers between them plain nn.Modules), `peft.get_peft_model` applies the config, and each
module's settings are read back from what PEFT built: a LoraLayer's r, lora_alpha, scaling and
use_dora for the adapter "default", whether its lora_B has a bias, whether the base bias has
requires_grad, and whether a ModulesToSaveWrapper sits on the path. A ValueError from PEFT (the
config or get_peft_model refusing) is the result `refused`.
"""

from __future__ import annotations

import json


def _model(paths: list[str]):
    import torch

    root = torch.nn.Module()
    for path in paths:
        parent = root
        *containers, leaf = path.split(".")
        for name in containers:
            if name not in parent._modules:
                parent.add_module(name, torch.nn.Module())
            parent = parent._modules[name]
        parent.add_module(leaf, torch.nn.Linear(4, 4, bias=True))
    return root


def adapter_config(manifest: dict, inputs: dict, device: str) -> dict:
    import peft
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    paths = list(inputs["modules"])
    try:
        model = peft.get_peft_model(_model(paths), peft.get_peft_config(json.loads(inputs["adapter_config"])))
    except ValueError:
        return {"refused": True}
    resolved = {}
    for path in paths:
        module, saved = model.base_model.model, False
        for name in path.split("."):
            module = getattr(module, name)
            if isinstance(module, ModulesToSaveWrapper):
                saved, module = True, module.original_module
        record = {"targeted": isinstance(module, LoraLayer), "saved": saved}
        if record["targeted"]:
            record.update(method="dora" if module.use_dora["default"] else "lora", r=module.r["default"],
                          alpha=module.lora_alpha["default"], scaling=module.scaling["default"],
                          lora_bias=module.lora_B["default"].bias is not None)
            module = module.base_layer
        if not saved:
            record["base_bias_trained"] = bool(module.bias.requires_grad)
        resolved[path] = record
    return {"modules": resolved}
