"""transformers' LlamaForCausalLM with HF PEFT's LoRA, in float64 on torch: the `model_lora` cases' peer.

The case's config.json builds the model (`attn_implementation="eager"`), its weights are loaded by
checkpoint name, `peft.get_peft_model` wraps the targeted layers (r, lora_alpha, use_rslora from
the case) and the case's lora_A / lora_B are copied in. The loss is transformers' ForCausalLMLoss
less its float32 upcast (`causal_lm_loss`), the gradients torch autograd.

Stock transformers is not float64 end to end: LlamaRMSNorm computes in float32 (`.to(float32)`),
the rotary embedding computes its angles in float32 (`.float()`, and `inv_freq` is made in float32),
eager attention's softmax runs in float32. Those casts alone would use the whole float64 bound, so
this runner removes exactly them while it runs (`float64_llama`, refpeft_peers.transformers_float64,
which the tests use too) and recomputes `inv_freq` in float64 (the default rope: 1 / theta^(2i / D)).
"""

from __future__ import annotations


import numpy as np


def float64_llama():
    """transformers' Llama with its float32 casts removed (refpeft_peers.transformers_float64)."""
    from refpeft_peers.transformers_float64 import float64_transformers

    return float64_transformers("llama")


def causal_lm_loss(logits, labels):
    """transformers' ForCausalLMLoss less its `logits.float()`: shift by one, mean cross-entropy, -100 ignored.

    transformers computes the loss of `labels=` in float32 whatever the model's dtype, which costs
    ~1e7 float64 bounds on these cases (conformance/FINDINGS.md); this is the same loss in float64.
    """
    import torch

    V = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                                             ignore_index=-100, reduction="mean")


def model_lora(manifest: dict, inputs: dict, device: str) -> dict:
    import peft
    import torch
    import transformers

    from refpeft.conformance.check import Unsupported

    if manifest["dtype"] != "float64":
        raise Unsupported("the model_lora runner computes in float64 only")
    o, s = manifest["options"], manifest["sizes"]
    config = transformers.LlamaConfig(**inputs["config"], attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).to(torch.float64).eval()
    state = {n: torch.from_numpy(np.asarray(inputs[n], dtype=np.float64)) for n in model.state_dict()
             if n in inputs}
    missing = [n for n in model.state_dict() if n not in inputs and not (config.tie_word_embeddings and n == "lm_head.weight")]
    if missing:
        raise AssertionError(f"case has no weights for {missing}")
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    rotary = model.model.rotary_emb
    D = config.hidden_size // config.num_attention_heads
    rotary.inv_freq = 1.0 / (config.rope_parameters["rope_theta"]
                             ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    targets = o["targets"]
    lora = peft.LoraConfig(r=s["r"], lora_alpha=o["alpha"], use_rslora=o.get("rslora", False),
                           target_modules=list(targets), lora_dropout=0.0, init_lora_weights=False)
    peer = peft.get_peft_model(model, lora).to(device)
    paths = sorted(n.rsplit(".", 1)[0] for n in inputs if n.endswith(".lora_A"))
    with torch.no_grad():
        for path in paths:
            layer = peer.base_model.model.get_submodule(path)
            if layer.scaling["default"] != manifest["parameters"]["scaling"]:
                raise AssertionError(f"PEFT's scaling {layer.scaling['default']!r} at {path} differs from the case's")
            layer.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(inputs[f"{path}.lora_A"], dtype=np.float64)))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(inputs[f"{path}.lora_B"], dtype=np.float64)))
    adapted = sorted(n.removeprefix("base_model.model.").split(".lora_")[0]
                     for n, p in peer.named_parameters() if p.requires_grad and ".lora_A." in n)
    if adapted != paths:
        raise AssertionError(f"PEFT adapted {adapted}, the case {paths}")
    ids, mask, labels = (torch.from_numpy(np.asarray(inputs[n], dtype=np.int64)).to(device)
                         for n in ("input_ids", "attention_mask", "labels"))
    with float64_llama():
        logits = peer(input_ids=ids, attention_mask=mask).logits
        loss = causal_lm_loss(logits, labels)
        loss.backward()
    results = {"logits": logits.detach().cpu().numpy(), "loss": loss.detach().reshape(1).cpu().numpy()}
    for path in paths:
        layer = peer.base_model.model.get_submodule(path)
        results[f"grad.{path}.lora_A"] = layer.lora_A["default"].weight.grad.cpu().numpy()
        results[f"grad.{path}.lora_B"] = layer.lora_B["default"].weight.grad.cpu().numpy()
    return results
