"""transformers' LlamaForCausalLM with HF PEFT's LoRA or DoRA on torch: the `model_lora` cases' peer.

The model is made in the case's dtype (float64, float32, bfloat16) before `get_peft_model`, so for
bfloat16 PEFT's default autocast keeps the adapter in float32, as a bfloat16 fine-tune has it. In
float32 and bfloat16 the model is stock transformers (its float32 RMSNorm, rotary and softmax, the
loss on `logits.float()`); the float64 patches below apply to float64 cases only.

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

import contextlib

import numpy as np

from refpeft.methods import method_spec


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

    from refpeft.conformance.model_families import adapter_keys

    o, s, dtype = manifest["options"], manifest["sizes"], manifest["dtype"]
    config = transformers.LlamaConfig(**inputs["config"], attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
    state = {n: torch.from_numpy(np.asarray(inputs[n], dtype=np.float64)) for n in model.state_dict()
             if n in inputs}
    missing = [n for n in model.state_dict() if n not in inputs and not (config.tie_word_embeddings and n == "lm_head.weight")]
    if missing:
        raise AssertionError(f"case has no weights for {missing}")
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    if dtype == "float64":
        rotary = model.model.rotary_emb
        D = config.hidden_size // config.num_attention_heads
        rotary.inv_freq = 1.0 / (config.rope_parameters["rope_theta"]
                                 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    targets = o["targets"]
    method = o.get("method", "lora")
    lora = peft.LoraConfig(r=s["r"], lora_alpha=o["alpha"], use_rslora=o.get("rslora", False),
                           use_dora=method_spec(method).rescaled, target_modules=list(targets), lora_dropout=0.0,
                           init_lora_weights=False)
    # bfloat16: the model is bfloat16 before get_peft_model, so PEFT upcasts the adapter to float32
    peer = peft.get_peft_model(model, lora).to(device)
    keys = adapter_keys(o)
    paths = sorted(n.rsplit(".", 1)[0] for n in inputs if n.endswith(f".{keys['A']}"))
    params: dict[str, torch.nn.Parameter] = {}
    with torch.no_grad():
        for path in paths:
            layer = peer.base_model.model.get_submodule(path)
            if layer.scaling["default"] != manifest["parameters"]["scaling"]:
                raise AssertionError(f"PEFT's scaling {layer.scaling['default']!r} at {path} differs from the case's")
            found = {"A": layer.lora_A["default"].weight, "B": layer.lora_B["default"].weight}
            if "magnitude" in keys:
                found["magnitude"] = layer.lora_magnitude_vector["default"].weight
            for name, param in found.items():
                param.copy_(torch.from_numpy(np.asarray(inputs[f"{path}.{keys[name]}"], dtype=np.float64)))
                params[f"{path}.{keys[name]}"] = param
    adapted = sorted(n.removeprefix("base_model.model.").split(".lora_")[0]
                     for n, p in peer.named_parameters() if p.requires_grad and ".lora_A." in n)
    if adapted != paths:
        raise AssertionError(f"PEFT adapted {adapted}, the case {paths}")
    ids, mask, labels = (torch.from_numpy(np.asarray(inputs[n], dtype=np.int64)).to(device)
                         for n in ("input_ids", "attention_mask", "labels"))
    with float64_llama() if dtype == "float64" else contextlib.nullcontext():
        logits = peer(input_ids=ids, attention_mask=mask).logits
        # float64 keeps its precision; float32 and bfloat16 take transformers' float32 loss (logits.float())
        loss = causal_lm_loss(logits if dtype == "float64" else logits.float(), labels)
        loss.backward()
    logits = logits.detach().float() if dtype == "bfloat16" else logits.detach()    # NumPy has no bfloat16
    results = {"logits": logits.cpu().numpy(), "loss": loss.detach().reshape(1).cpu().numpy()}
    results.update({f"grad.{name}": param.grad.cpu().numpy() for name, param in params.items()})
    return results
