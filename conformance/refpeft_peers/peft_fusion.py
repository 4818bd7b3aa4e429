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
    import torch
    from refpeft_peers.peft_torch import _numpy, lora_adapters_on_one_layer

    s, o = manifest["sizes"], manifest["options"]
    combination = manifest["family"].removeprefix("fusion_")
    ranks = s.get("ranks") or [s["r"]] * len(o["alphas"])
    model, proj, names = lora_adapters_on_one_layer(manifest, inputs, device, ranks)
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
