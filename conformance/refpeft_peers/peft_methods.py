"""HF PEFT's IA3, LoHa, LoKr, OFT and AdaLoRA layers on torch, for the `<method>_forward/_backward/_merge` cases.

One `nn.Linear` (`proj`) holding the case's W0 and bias is wrapped by `peft.get_peft_model` with the
method's config (`CONFIGS`: PEFT's defaults otherwise, init skipped); each of the module's tensors
is copied into the PEFT parameter its table row names (`Method.suffixes()`: `ia3_l` is the
ParameterDict entry `proj.ia3_l["default"]`, `oft_R.weight` the weight of the module
`proj.oft_R["default"]`). Forward and autograd backward are PEFT's own (`peft_torch._run_layer`),
merge is `merge_and_unload()`. PEFT builds LoKr's factor shapes itself from (k, d, r,
decompose_both); the runner checks they are the case's. AdaLoRA's dropout is replaced by the case's
fixed mask as for LoRA; its `ranknum` is PEFT's (init_r = r).
"""

from __future__ import annotations

from typing import Any

from refpeft.conformance.method_families import METHOD_CONFORMANCE


# method -> its PEFT config from the case's sizes and options (peft imported), targeting `proj`
CONFIGS = {
    "ia3": lambda peft, s, o: peft.IA3Config(target_modules=["proj"], init_ia3_weights=False,
                                             feedforward_modules=["proj"] if o["feedforward"] else []),
    "loha": lambda peft, s, o: peft.LoHaConfig(r=s["r"], alpha=o["alpha"], target_modules=["proj"], init_weights=False),
    "lokr": lambda peft, s, o: peft.LoKrConfig(r=s["r"], alpha=o["alpha"], target_modules=["proj"], init_weights=False,
                                               decompose_both=o.get("decompose_both", False)),
    "oft": lambda peft, s, o: peft.OFTConfig(r=0, oft_block_size=s["block_size"], target_modules=["proj"],
                                             init_weights=False),
    "adalora": lambda peft, s, o: peft.AdaLoraConfig(init_r=s["r"], target_r=s["r"], tinit=0, tfinal=0, total_step=10,
                                                     lora_alpha=o["alpha"], lora_dropout=0.0, target_modules=["proj"]),
}


def _parameter(proj: Any, suffix: str) -> Any:
    """The PEFT parameter a table suffix names on the wrapped layer (module docstring)."""
    head, _, attribute = suffix.partition(".")
    holder = getattr(proj, head)["default"]
    return getattr(holder, attribute) if attribute else holder


def method_layer(manifest: dict, inputs: dict, device: str) -> dict:
    """PEFT's layer on one case: y, the gradients (autograd) or the merged weight."""
    import peft
    import torch
    from refpeft_peers.peft_torch import _FixedMask, _numpy, _one_layer_model, _run_layer, _set, _tensor

    s, dtype = manifest["sizes"], getattr(torch, manifest["dtype"])
    row = METHOD_CONFORMANCE[manifest["family"].rsplit("_", 1)[0]].row
    layer = torch.nn.Linear(s["k"], s["d"], bias="bias" in inputs).to(dtype)
    _set(layer.weight, inputs["W0"])
    if layer.bias is not None:
        _set(layer.bias, inputs["bias"])
    config = CONFIGS[row.name](peft, s, manifest["options"])
    model = peft.get_peft_model(_one_layer_model(layer), config).to(device=device, dtype=dtype)
    proj = model.base_model.model.proj
    params = {}
    for name, suffix in row.suffixes().items():
        if name not in inputs:
            continue
        parameter = _parameter(proj, suffix)
        if tuple(parameter.shape) != inputs[name].shape:
            raise AssertionError(f"PEFT built {suffix} of shape {tuple(parameter.shape)}, the case has "
                                 f"{inputs[name].shape}")
        _set(parameter, inputs[name])
        if name in row.trainable:
            params[f"d{name}"] = parameter
    if manifest["family"].endswith("_merge"):
        return {"W": _numpy(model.merge_and_unload().proj.weight)}
    if "dropout_mask" in inputs:
        proj.lora_dropout["default"] = _FixedMask.module(_tensor(inputs["dropout_mask"], device))
    return _run_layer(model, proj, manifest, inputs, device, params)

