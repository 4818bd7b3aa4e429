"""transformers in float64 end to end, for the float64 peers: exactly its float32 casts removed.

Stock transformers 5 computes RMSNorm in float32 (`.to(torch.float32)`), the rotary angles in
float32 (`.float()`, and `inv_freq` made in float32) and eager attention's softmax in float32
(conformance/FINDINGS.md M-1..M-4). `float64_transformers(family)` replaces, while it is active,
those three functions with transformers' own code less the casts; `float64_inv_freq` recomputes a
model's inverse frequencies with transformers' own init function in float64. The tests
(tests/test_model_decoder.py shows they change nothing in float32) and the whole-model
conformance runner (refpeft_peers.peft_model) share this one copy.
"""

from __future__ import annotations

import contextlib
import importlib
import types

import torch

FAMILY_MODULES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


def _module(family: str):
    return importlib.import_module(f"transformers.models.{FAMILY_MODULES[family]}.modeling_{FAMILY_MODULES[family]}")


@contextlib.contextmanager
def float64_transformers(family: str):
    """transformers' RMSNorm, rotary embedding and eager attention with their float32 casts removed."""
    mod = _module(family)
    prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    norm, rotary = getattr(mod, f"{prefix}RMSNorm"), getattr(mod, f"{prefix}RotaryEmbedding")
    saved = norm.forward, rotary.forward, mod.eager_attention_forward

    def norm_forward(self, hidden_states):                          # LlamaRMSNorm.forward less `.to(float32)`
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    def rotary_forward(self, x, position_ids):                      # less `.float()` / `dtype=torch.float`
        freqs = position_ids[..., None].to(x.dtype) * self.inv_freq.to(device=x.device, dtype=x.dtype)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):   # softmax less float32
        key_states = mod.repeat_kv(key, module.num_key_value_groups)
        value_states = mod.repeat_kv(value, module.num_key_value_groups)
        attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1)
        attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
        return attn_output, attn_weights

    norm.forward, rotary.forward, mod.eager_attention_forward = norm_forward, rotary_forward, eager
    try:
        yield
    finally:
        norm.forward, rotary.forward, mod.eager_attention_forward = saved


def float64_inv_freq(model, family: str) -> None:
    """The rotary inverse frequencies recomputed with transformers' own init function, float64 throughout."""
    rope_utils = importlib.import_module("transformers.modeling_rope_utils")
    mod = _module(family)
    proxy = types.SimpleNamespace(**{n: getattr(torch, n) for n in dir(torch) if not n.startswith("__")})
    proxy.float, proxy.float32 = torch.float64, torch.float64
    rotary = model.model.rotary_emb
    saved = rope_utils.torch, mod.torch
    rope_utils.torch, mod.torch = proxy, proxy
    try:
        # transformers 4.57 (the adapters peer's) lists "default" in ROPE_INIT_FUNCTIONS; 5 has it on the class
        init = rope_utils.ROPE_INIT_FUNCTIONS[rotary.rope_type] if rotary.rope_type in rope_utils.ROPE_INIT_FUNCTIONS \
            else rotary.compute_default_rope_parameters
        inv_freq, _ = init(model.config)
    finally:
        rope_utils.torch, mod.torch = saved
    assert inv_freq.dtype == torch.float64
    rotary.inv_freq = inv_freq
