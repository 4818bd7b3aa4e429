"""HF PEFT's LoRA on MoE expert parameters (`LoraConfig(target_parameters=[...])`) on transformers' Qwen3-MoE experts.

The module is transformers' own `Qwen3MoeExperts` (E experts, `down_proj` (E, H, I) = (E, out, in));
PEFT wraps its `down_proj` in a `lora.ParamWrapper` whose lora_A / lora_B are loaded with the
case's A (r*E, in) and B (out, r*E) as they are stored. A case is one expert parameter, so the
experts' forward is replaced by the routed linear `y_t = sum_k g_tk (x_t W_e^T)` over that
parameter, written as Qwen3MoeExperts' own loop (its gate_up projection and SwiGLU removed);
PEFT's wrapper patches W to W + dW around that forward exactly as it does around the real one.
For layout "in_out" the parameter is replaced by an (E, in, out) one and the module marked
`is_transposed = True`, which is what PEFT reads to orient dW. Gradients are torch autograd,
merge is PEFT's `merge_adapter()`.
"""

from __future__ import annotations

import types

import numpy as np


def _routed_linear(self, hidden_states, top_k_index, top_k_weights):
    """Qwen3MoeExperts.forward with the down projection alone (see the module docstring)."""
    import torch

    final = torch.zeros((hidden_states.shape[0], self.out_features), dtype=hidden_states.dtype,
                        device=hidden_states.device)
    for e in range(self.num_experts):
        token_idx, top_k_pos = torch.where(top_k_index == e)
        if len(token_idx) == 0:
            continue
        W = self.down_proj[e]
        z = hidden_states[token_idx] @ W if self.is_transposed else torch.nn.functional.linear(hidden_states[token_idx], W)
        final = final.index_add(0, token_idx, z * top_k_weights[token_idx, top_k_pos, None])
    return final


def moe_lora(manifest: dict, inputs: dict, device: str) -> dict:
    import peft
    import torch
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from refpeft_peers.peft_mixed import _tensor

    s, o, family = manifest["sizes"], manifest["options"], manifest["family"]
    dtype = getattr(torch, manifest["dtype"])
    E, inn, out = s["experts"], s["in"], s["out"]
    experts = Qwen3MoeExperts(Qwen3MoeConfig(num_experts=E, hidden_size=out, moe_intermediate_size=inn))
    if o["layout"] == "in_out":
        experts.down_proj = torch.nn.Parameter(torch.empty(E, inn, out))
        experts.is_transposed = True
    experts.out_features = out
    experts.forward = types.MethodType(_routed_linear, experts)
    holder = torch.nn.Module()
    holder.experts = experts
    config = peft.LoraConfig(r=s["r"], lora_alpha=o["alpha"], target_modules=[], target_parameters=["down_proj"],
                             init_lora_weights=False)
    model = peft.get_peft_model(holder, config).to(device=device, dtype=dtype)
    wrapper = model.base_model.model.experts
    if wrapper.scaling["default"] != manifest["parameters"]["scaling"]:
        raise AssertionError(f"PEFT's scaling {wrapper.scaling['default']!r} differs from the case's")
    base = wrapper.get_base_layer()
    with torch.no_grad():
        base.down_proj.copy_(_tensor(inputs["W"], device, dtype))
        wrapper.lora_A["default"].weight.copy_(_tensor(inputs["A"], device, dtype))
        wrapper.lora_B["default"].weight.copy_(_tensor(inputs["B"], device, dtype))
    if family == "moe_lora_merge":
        model.merge_adapter()
        return {"W_merged": base.down_proj.detach().to(torch.float64).cpu().numpy()}
    x = _tensor(inputs["x"], device, dtype).requires_grad_(True)
    g = _tensor(inputs["top_k_weights"], device, dtype).requires_grad_(True)
    index = torch.from_numpy(inputs["top_k_index"].astype(np.int64)).to(device)
    y = wrapper(x, index, g)                         # PEFT's ParamWrapper: patches W, calls the experts
    if family == "moe_lora_forward":
        return {"y": y.detach().to(torch.float64).cpu().numpy()}
    y.backward(_tensor(inputs["dy"], device, dtype))
    grads = {"dx": x.grad, "dA": wrapper.lora_A["default"].weight.grad, "dB": wrapper.lora_B["default"].weight.grad,
             "dtop_k_weights": g.grad}
    return {name: t.to(torch.float64).cpu().numpy() for name, t in grads.items()}
