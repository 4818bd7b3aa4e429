"""HF PEFT's add_weighted_adapter on torch for the `fusion_<combination>` cases past `cat`.

n LoRA adapters ("adapter1", ...) on one layer `proj`, loaded with the case's factors, combined by
`add_weighted_adapter(..., combination_type=<combination>)` into "fused". DARE's masks are the
case's: torch.bernoulli is replaced, while the combination runs, by a function that returns the next
given mask (PEFT prunes A_1..A_n, then B_1..B_n, or the deltas 1..n of a `*_svd` merge, one bernoulli
call each). For `svd` and the `*_svd` merges the result is the fused adapter's product B A (its scaling
is 1: PEFT sets r = lora_alpha = svd_rank).
"""

from __future__ import annotations

from unittest import mock

import numpy as np


def fusion_combination(manifest: dict, inputs: dict, device: str) -> dict:
    import peft
    import torch
    from refpeft_peers.peft_torch import _numpy, _one_layer_model, _set

    s, o = manifest["sizes"], manifest["options"]
    combination = manifest["family"].removeprefix("fusion_")
    dtype = getattr(torch, manifest["dtype"])
    ranks = s.get("ranks") or [s["r"]] * len(o["alphas"])
    model, names = None, []
    for i, (r, alpha) in enumerate(zip(ranks, o["alphas"]), start=1):
        config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], init_lora_weights=False)
        name = f"adapter{i}"
        if model is None:
            model = peft.get_peft_model(_one_layer_model(torch.nn.Linear(s["k"], s["d"], bias=False)), config,
                                        adapter_name=name)
        else:
            model.add_adapter(name, config)
        names.append(name)
    model = model.to(device=device, dtype=dtype)
    proj = model.base_model.model.proj
    for i, name in enumerate(names, start=1):
        _set(proj.lora_A[name].weight, inputs[f"A{i}"])
        _set(proj.lora_B[name].weight, inputs[f"B{i}"])
    masked = [f"delta{i}" for i in range(1, len(names) + 1)] if combination.endswith("svd") else \
        [f"{side}{i}" for side in ("A", "B") for i in range(1, len(names) + 1)]
    masks = iter([inputs[f"mask.{name}"] for name in masked] if combination.startswith("dare") else [])

    def given_mask(p, *args, **kwargs):
        mask = next(masks)
        if tuple(mask.shape) != tuple(p.shape):
            raise AssertionError(f"PEFT asked for a mask of shape {tuple(p.shape)}, the next given one is {mask.shape}")
        return torch.from_numpy(mask.astype(np.float64)).to(device=p.device, dtype=p.dtype)

    options = {key: o[key] for key in ("density", "majority_sign_method") if key in o}
    if "rank" in o:
        options["svd_rank"] = o["rank"]
    with mock.patch.object(torch, "bernoulli", given_mask):
        model.add_weighted_adapter(names, o["weights"], "fused", combination_type=combination, **options)
    A, B = proj.lora_A["fused"].weight, proj.lora_B["fused"].weight
    if combination.endswith("svd"):
        return {"delta": _numpy(B @ A)}
    return {"A": _numpy(A), "B": _numpy(B)}
