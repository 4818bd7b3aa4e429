"""HF PEFT's bfloat16 layer on torch: the `{lora,dora,vera}_bf16_*` cases' peer.

The base `nn.Linear` is made in bfloat16 *before* `peft.get_peft_model`, so PEFT's default
`autocast_adapter_dtype=True` upcasts the adapter (lora_A/lora_B, DoRA's magnitude, VeRA's lambdas
and shared projections) to float32, as it does for any bfloat16 model; the runner checks that it
did. The case's bfloat16 values are copied in (exactly: bfloat16 values are float32 values), the
model runs in eval mode (no dropout), y = model(x) with x bfloat16, and the backward is autograd of
sum(y * dy). The base bias is frozen (PEFT's bias="none").
"""

from __future__ import annotations

import numpy as np

from refpeft.methods import method_spec


def bf16_layer(manifest: dict, inputs: dict, device: str) -> dict:
    import peft
    import torch

    from refpeft_peers.peft_torch import _numpy, _one_layer_model, _set

    method = manifest["family"].split("_")[0]
    backward = manifest["family"].endswith("_backward")
    s, o = manifest["sizes"], manifest["options"]
    layer = torch.nn.Linear(s["k"], s["d"], bias="bias" in inputs).to(torch.bfloat16)
    _set(layer.weight, np.asarray(inputs["W0"], dtype=np.float32))
    if "bias" in inputs:
        _set(layer.bias, np.asarray(inputs["bias"], dtype=np.float32))
        layer.bias.requires_grad_(False)
    spec = method_spec(method)
    if spec.shared:
        config = peft.VeraConfig(r=s["r"], target_modules=["proj"], vera_dropout=0.0, save_projection=True)
    else:
        config = peft.LoraConfig(r=s["r"], lora_alpha=o["alpha"], target_modules=["proj"], lora_dropout=0.0,
                                 use_rslora=o.get("rslora", False), use_dora=spec.rescaled,
                                 init_lora_weights=False)
    model = peft.get_peft_model(_one_layer_model(layer), config).to(device).eval()
    proj = model.base_model.model.proj
    if spec.shared:
        params = {"dlambda_d": proj.vera_lambda_d["default"], "dlambda_b": proj.vera_lambda_b["default"]}
        tensors = {"vera_A": model.base_model.vera_A["default"], "vera_B": model.base_model.vera_B["default"],
                   "lambda_d": params["dlambda_d"], "lambda_b": params["dlambda_b"]}
    else:
        params = {"dA": proj.lora_A["default"].weight, "dB": proj.lora_B["default"].weight}
        tensors = {"A": params["dA"], "B": params["dB"]}
        if spec.rescaled:
            params["dmagnitude"] = tensors["magnitude"] = proj.lora_magnitude_vector["default"].weight
        if proj.scaling["default"] != manifest["parameters"]["scaling"]:
            raise AssertionError(f"PEFT's scaling {proj.scaling['default']!r} differs from the case's")
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float32:
            raise AssertionError(f"PEFT kept {name} in {tensor.dtype}; autocast_adapter_dtype should make it float32")
        _set(tensor, np.asarray(inputs[name], dtype=np.float32))
    x = torch.from_numpy(np.asarray(inputs["x"], dtype=np.float32)).to(device, torch.bfloat16).requires_grad_(backward)
    y = model(x)
    if y.dtype != torch.bfloat16:
        raise AssertionError(f"PEFT's output is {y.dtype}, not bfloat16")
    if not backward:
        return {"y": _numpy(y.float())}
    y.backward(torch.from_numpy(np.asarray(inputs["dy"], dtype=np.float32)).to(device, torch.bfloat16))
    return {"dx": _numpy(x.grad.float()), **{name: _numpy(p.grad.float()) for name, p in params.items()}}
