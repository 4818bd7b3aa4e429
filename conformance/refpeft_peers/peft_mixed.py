"""HF PEFT's multi-adapter batches: one layer with an adapter per slot, `model(x, adapter_names=[...])`.

PEFT's mixed-batch forward (`LoraLayer._mixed_batch_forward`) takes one adapter name per sample,
"__base__" for none; each token of a case is one sample (x is (n, k)), so a BGMV or SGMV case maps
onto it token by token. y is that forward; shrink and expand are what it computes inside for each
adapter's rows, `lora_A[name](x_rows)` and `lora_B[name](shrink) * scaling[name]`, called on the
same modules. PEFT 0.21 refuses DoRA in mixed batches ("Cannot pass `adapter_names` when DoRA is
enabled.", peft/tuners/lora/layer.py), so cases with a DoRA slot are unsupported here.
"""

from __future__ import annotations

import numpy as np

from refpeft.conformance.check import Unsupported


def _tensor(a: np.ndarray, device: str, dtype):
    import torch

    return torch.from_numpy(np.asarray(a, dtype=np.float32 if dtype == torch.bfloat16 else a.dtype)).to(device, dtype)


def multi_adapter(manifest: dict, inputs: dict, device: str) -> dict:
    import peft
    import torch

    from refpeft.conformance.batch_families import token_slots_of
    from refpeft.methods import method_spec
    from refpeft_peers.peft_torch import _one_layer_model

    s, o = manifest["sizes"], manifest["options"]
    if any(method_spec(m).rescaled for m in o["methods"]):
        raise Unsupported("PEFT 0.21 refuses DoRA in mixed batches (Cannot pass `adapter_names` when DoRA is enabled)")
    dtype = getattr(torch, manifest["dtype"])
    layer = torch.nn.Linear(s["k"], s["d"], bias="bias" in inputs)
    names = [f"slot{j}" for j in range(len(s["ranks"]))]
    model = None
    for name, r, alpha, rslora in zip(names, s["ranks"], o["alphas"], o["rslora"]):
        config = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["proj"],
                                 lora_dropout=0.0, init_lora_weights=False)
        if model is None:
            model = peft.get_peft_model(_one_layer_model(layer), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    model = model.to(device=device, dtype=dtype).eval()
    proj = model.base_model.model.proj
    with torch.no_grad():
        proj.base_layer.weight.copy_(_tensor(inputs["W0"], device, dtype))
        if "bias" in inputs:
            proj.base_layer.bias.copy_(_tensor(inputs["bias"], device, dtype))
        for j, (name, r) in enumerate(zip(names, s["ranks"])):
            proj.lora_A[name].weight.copy_(_tensor(inputs["A_stack"][j, :r, :], device, dtype))
            proj.lora_B[name].weight.copy_(_tensor(inputs["B_stack"][j, :, :r], device, dtype))
            if proj.scaling[name] != manifest["parameters"]["scalings"][j]:
                raise AssertionError(f"PEFT's scaling of {name}, {proj.scaling[name]!r}, differs from the case's "
                                     f"{manifest['parameters']['scalings'][j]!r}")
        slots = token_slots_of(manifest["family"], inputs)
        x = _tensor(inputs["x"], device, dtype)
        y = model(x, adapter_names=[names[t] if t >= 0 else "__base__" for t in slots])
        shrink = torch.zeros((len(slots), max(s["ranks"])), dtype=dtype, device=device)
        expand = torch.zeros_like(y)
        for j, name in enumerate(names):
            rows = torch.from_numpy(np.flatnonzero(slots == j)).to(device)
            xa = proj.lora_A[name](x[rows])
            shrink[rows, : s["ranks"][j]] = xa
            expand[rows] = proj.lora_B[name](xa) * proj.scaling[name]
    return {name: t.to(torch.float64).cpu().numpy() for name, t in (("y", y), ("shrink", shrink), ("expand", expand))}
