"""HF PEFT on torch (CPU, and CUDA when present): LoRA, DoRA, VeRA layers, merges, and torch.optim/LoRA+ steps.

Each case builds a one-layer model (`proj`: nn.Linear, or transformers' Conv1D for
fan_in_fan_out), wraps it with `peft.get_peft_model`, copies the case's tensors into the base and
adapter weights, and runs PEFT's own forward, autograd backward, merge or unmerge. A dropout mask
is applied by replacing the layer's `lora_dropout` module with a fixed multiplication by the mask,
so PEFT's forward runs unchanged with the case's mask. Adam steps run `torch.optim.Adam`/`AdamW`
with the state injected; LoRA+ cases build the optimiser with `peft.optimizers.create_loraplus_optimizer`.
CUDA runs use float32 matmuls without TF32 (torch's default for matmul), so the float32 bounds apply.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refpeft.conformance.bf16_families import FAMILIES as BF16_FAMILIES
from refpeft.conformance.check import Unsupported
from refpeft.conformance.fusion_families import FUSION_FAMILIES
from refpeft.conformance.method_families import METHOD_FAMILIES
from refpeft.methods import method_spec
from refpeft_peers import Runner, require
from refpeft_peers.peft_adapter_config import adapter_config
from refpeft_peers.peft_mixed import multi_adapter
from refpeft_peers.peft_model import model_lora
from refpeft_peers.peft_bf16 import bf16_layer
from refpeft_peers.peft_methods import method_layer
from refpeft_peers.peft_fusion import fusion_combination
from refpeft_peers.peft_moe import moe_lora


def _torch():
    import torch

    return torch


class _FixedMask:
    """Stands in for PEFT's dropout module: x * mask (built lazily as a torch Module)."""

    @staticmethod
    def module(mask: Any):
        torch = _torch()

        class FixedMask(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.register_buffer("mask", mask)

            def forward(self, x):
                return x * self.mask

        return FixedMask()


def _tensor(a: np.ndarray, device: str, *, grad: bool = False):
    torch = _torch()
    t = torch.from_numpy(np.array(a, copy=True)).to(device)
    return t.requires_grad_(grad)


def _model(manifest: dict, inputs: dict, device: str, *, method: str = "lora"):
    """A PEFT model over one layer `proj`, holding the case's base weight and bias."""
    torch = _torch()
    import peft

    o, s = manifest["options"], manifest["sizes"]
    dtype = getattr(torch, manifest["dtype"])
    fan_in_fan_out = o.get("fan_in_fan_out", False)
    W = inputs.get("W0", inputs.get("W"))
    k, d = s["k"], s["d"]
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(d, k)
    else:
        layer = torch.nn.Linear(k, d, bias="bias" in inputs)
    layer = layer.to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.array(W, copy=True)))
        if layer.bias is not None:
            layer.bias.copy_(torch.from_numpy(np.array(inputs["bias"], copy=True)) if "bias" in inputs
                             else torch.zeros(d))

    spec = method_spec(method)
    if spec.peft_type == "VERA":
        config = peft.VeraConfig(r=s["r"], target_modules=["proj"], vera_dropout=0.0, fan_in_fan_out=fan_in_fan_out,
                                 save_projection=True)
    else:
        config = peft.LoraConfig(r=s["r"], lora_alpha=o["alpha"], target_modules=["proj"], lora_dropout=0.0,
                                 use_rslora=o.get("rslora", False), **spec.peft_flags,
                                 fan_in_fan_out=fan_in_fan_out, init_lora_weights=False)
    model = peft.get_peft_model(_one_layer_model(layer), config).to(device=device, dtype=dtype)
    return model, model.base_model.model.proj


def _set(parameter, array: np.ndarray) -> None:
    torch = _torch()
    with torch.no_grad():
        parameter.copy_(torch.from_numpy(np.array(array, copy=True)).to(parameter.device, parameter.dtype))


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def _lora(manifest: dict, inputs: dict, device: str) -> dict:
    family, o = manifest["family"], manifest["options"]
    model, proj = _model(manifest, inputs, device)
    _set(proj.lora_A["default"].weight, inputs["A"])
    _set(proj.lora_B["default"].weight, inputs["B"])
    scaling = proj.scaling["default"]
    if scaling != manifest["parameters"]["scaling"]:
        raise AssertionError(f"PEFT's scaling {scaling!r} differs from the case's {manifest['parameters']['scaling']!r}")
    if family == "lora_merge":
        if o.get("unmerge", False):
            proj.merged_adapters.append("default")   # the base holds W = W0 + s B A, as after merge()
            proj.unmerge()
            return {"W0": _numpy(proj.base_layer.weight)}
        merged = model.merge_and_unload()
        return {"W": _numpy(merged.proj.weight)}
    if "dropout_mask" in inputs:
        proj.lora_dropout["default"] = _FixedMask.module(_tensor(inputs["dropout_mask"], device))
    return _run_layer(model, proj, manifest, inputs, device,
                      {"dA": proj.lora_A["default"].weight, "dB": proj.lora_B["default"].weight})


def _dora(manifest: dict, inputs: dict, device: str) -> dict:
    family, o = manifest["family"], manifest["options"]
    if o.get("gradient", "detached") != "detached":
        raise Unsupported("PEFT's DoRA detaches the weight norm; this case asks for the exact gradient")
    model, proj = _model(manifest, inputs, device, method="dora")
    _set(proj.lora_A["default"].weight, inputs["A"])
    _set(proj.lora_B["default"].weight, inputs["B"])
    magnitude = proj.lora_magnitude_vector["default"].weight
    _set(magnitude, inputs["magnitude"])
    if family == "dora_merge" and o.get("unmerge", False):
        # the base holds the merged W and PEFT's cache the norm it stored at merge time
        proj._cache_store("default-weight_norm", _tensor(inputs["weight_norm"], device))
        proj.merged_adapters.append("default")
        proj.unmerge()
        return {"W0": _numpy(proj.base_layer.weight)}
    if family == "dora_merge":
        return {"W": _numpy(model.merge_and_unload().proj.weight)}
    if "dropout_mask" in inputs:
        proj.lora_dropout["default"] = _FixedMask.module(_tensor(inputs["dropout_mask"], device))
    return _run_layer(model, proj, manifest, inputs, device,
                      {"dA": proj.lora_A["default"].weight, "dB": proj.lora_B["default"].weight, "dmagnitude": magnitude})


def _vera(manifest: dict, inputs: dict, device: str) -> dict:
    family = manifest["family"]
    model, proj = _model(manifest, inputs, device, method="vera")
    _set(model.base_model.vera_A["default"], inputs["vera_A"])
    _set(model.base_model.vera_B["default"], inputs["vera_B"])
    _set(proj.vera_lambda_d["default"], inputs["lambda_d"])
    _set(proj.vera_lambda_b["default"], inputs["lambda_b"])
    if family == "vera_merge" and manifest["options"].get("unmerge", False):
        proj.merged_adapters.append("default")   # the base holds the merged W
        proj.unmerge()
        return {"W0": _numpy(proj.base_layer.weight)}
    if family == "vera_merge":
        return {"W": _numpy(model.merge_and_unload().proj.weight)}
    if "dropout_mask" in inputs:
        proj.vera_dropout["default"] = _FixedMask.module(_tensor(inputs["dropout_mask"], device))
    return _run_layer(model, proj, manifest, inputs, device,
                      {"dlambda_d": proj.vera_lambda_d["default"], "dlambda_b": proj.vera_lambda_b["default"]})


def _one_layer_model(layer: Any) -> Any:
    """A torch model whose one submodule, `proj`, is `layer` (PEFT targets it by that name)."""
    torch = _torch()

    class OneLayer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = layer

        def forward(self, x):
            return self.proj(x)

    return OneLayer()


def lora_adapters_on_one_layer(manifest: dict, inputs: dict, device: str,
                               ranks: list[int]) -> tuple[Any, Any, list[str]]:
    """PEFT LoRA adapters "adapter1".."adapterN" (ranks[i], options alphas[i]) on one layer `proj`
    (Linear(k, d), no bias) in the case's dtype, loaded with the case's A1.., B1..: (model, proj, names)."""
    torch = _torch()
    import peft

    s, o = manifest["sizes"], manifest["options"]
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
    model = model.to(device=device, dtype=getattr(torch, manifest["dtype"]))
    proj = model.base_model.model.proj
    for i, name in enumerate(names, start=1):
        _set(proj.lora_A[name].weight, inputs[f"A{i}"])
        _set(proj.lora_B[name].weight, inputs[f"B{i}"])
    return model, proj, names


def _fusion_cat(manifest: dict, inputs: dict, device: str) -> dict:
    """Two adapters on one layer, PEFT's add_weighted_adapter(combination_type="cat")."""
    model, proj, names = lora_adapters_on_one_layer(manifest, inputs, device, manifest["sizes"]["ranks"])
    model.add_weighted_adapter(names, manifest["options"]["weights"], "fused", combination_type="cat")
    return {"A": _numpy(proj.lora_A["fused"].weight), "B": _numpy(proj.lora_B["fused"].weight)}


def quant_state(manifest: dict, inputs: dict):
    """The case's 4-bit base as a refpeft QuantState4bit (shape (d, k), bfloat16, block 64, nested)."""
    from refpeft.quant import NestedAbsmax, QuantState4bit

    s = manifest["sizes"]
    nested = NestedAbsmax(codes=inputs["absmax.codes"], nested_absmax=inputs["absmax.nested"],
                          offset=float(inputs["absmax.offset"][0]))
    return QuantState4bit(packed=inputs["packed"], absmax=nested, shape=(s["d"], s["k"]), dtype="bfloat16",
                          blocksize=64, quant_type=manifest["options"]["quant_type"])


def _qlora(manifest: dict, inputs: dict, device: str) -> dict:
    """bitsandbytes Linear4bit (compute bfloat16) holding the case's 4-bit state, with a PEFT LoRA adapter."""
    torch = _torch()
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise Unsupported("bitsandbytes is not installed") from None
    import peft
    from refpeft.quant.bnb_layout import to_state_dict

    s, o = manifest["sizes"], manifest["options"]
    backward = manifest["family"].endswith("_backward")
    stats = {key[len("weight."):]: torch.from_numpy(np.array(v, copy=True))
             for key, v in to_state_dict(quant_state(manifest, inputs)).items() if key != "weight"}
    layer = bnb.nn.Linear4bit(s["k"], s["d"], bias=not backward, compute_dtype=torch.bfloat16,
                              quant_type=o["quant_type"], compress_statistics=True)
    layer.weight = bnb.nn.Params4bit.from_prequantized(torch.from_numpy(np.array(inputs["packed"], copy=True)), stats,
                                                       requires_grad=False, device=device, module=layer)
    if not backward:
        layer.bias = torch.nn.Parameter(_bf16(inputs["bias"], device), requires_grad=False)

    net = _one_layer_model(layer)
    net.is_loaded_in_4bit = True   # what transformers sets: PEFT then uses its bnb LoRA layer
    model = peft.get_peft_model(net, peft.LoraConfig(r=s["r"], lora_alpha=o["alpha"], target_modules=["proj"],
                                                       lora_dropout=0.0, init_lora_weights=False))
    proj = model.base_model.model.proj
    if type(proj).__module__ != "peft.tuners.lora.bnb":
        raise AssertionError(f"PEFT wrapped the 4-bit layer in {type(proj).__module__}, not its bitsandbytes layer")
    _set(proj.lora_A["default"].weight, inputs["A"])
    _set(proj.lora_B["default"].weight, inputs["B"])
    x = _bf16(inputs["x"], device).requires_grad_(backward)
    y = model(x)
    if not backward:
        return {"y": y.detach().float().cpu().numpy()}
    y.backward(_bf16(inputs["dy"], device))
    return {"dx": x.grad.float().cpu().numpy(), "dA": _numpy(proj.lora_A["default"].weight.grad),
            "dB": _numpy(proj.lora_B["default"].weight.grad)}


def _bf16(a: np.ndarray, device: str):
    """A bfloat16 tensor from bfloat16 values (stored as ml_dtypes.bfloat16 or float32)."""
    torch = _torch()
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(device=device, dtype=torch.bfloat16)


def _run_layer(model, proj, manifest: dict, inputs: dict, device: str, params: dict) -> dict:
    """Forward (y) or forward + autograd backward (dx, the named parameter grads, dbias)."""
    backward = manifest["family"].endswith("_backward")
    if backward and "bias" in inputs:
        proj.base_layer.bias.requires_grad_(True)
        params = {**params, "dbias": proj.base_layer.bias}
    # training mode with a mask: PEFT's DoRA then recomputes the base product on the masked input,
    # which is the case's definition (the fixed mask module itself ignores the mode)
    model.train("dropout_mask" in inputs)
    x = _tensor(inputs["x"], device, grad=backward)
    y = model(x)
    if not backward:
        return {"y": _numpy(y)}
    y.backward(_tensor(inputs["dy"], device))
    return {"dx": _numpy(x.grad), **{name: _numpy(p.grad) for name, p in params.items()}}


def _adam(manifest: dict, inputs: dict, device: str) -> dict:
    torch = _torch()
    o, p = manifest["options"], manifest["parameters"]
    t = p["step"]
    names = [n for g in p["groups"] for n in g["names"]]
    tensors = {n: torch.nn.Parameter(_tensor(inputs[n], device)) for n in names}
    for n, param in tensors.items():
        param.grad = _tensor(inputs[f"grad.{n}"], device)
    cls = torch.optim.AdamW if o.get("adamw", False) else torch.optim.Adam
    common = dict(betas=tuple(o.get("betas", (0.9, 0.999))), eps=o.get("eps", 1e-8))
    if "loraplus_ratio" in o:
        optimizer = _loraplus_optimizer(manifest, tensors, cls, common)
    else:
        optimizer = cls([{"params": [tensors[n] for n in g["names"]], "lr": g["lr"], "weight_decay": g["weight_decay"]}
                         for g in p["groups"]], **common)
    if t > 1:
        for n, param in tensors.items():
            optimizer.state[param] = {"step": torch.tensor(float(t - 1)),
                                      "exp_avg": _tensor(inputs[f"exp_avg.{n}"], device),
                                      "exp_avg_sq": _tensor(inputs[f"exp_avg_sq.{n}"], device)}
    optimizer.step()
    out = {n: _numpy(param) for n, param in tensors.items()}
    for n, param in tensors.items():
        out[f"exp_avg.{n}"] = _numpy(optimizer.state[param]["exp_avg"])
        out[f"exp_avg_sq.{n}"] = _numpy(optimizer.state[param]["exp_avg_sq"])
    return out


def _loraplus_optimizer(manifest: dict, tensors: dict, cls, common: dict):
    """PEFT's create_loraplus_optimizer over a module whose parameters carry the case's names."""
    torch = _torch()
    from peft.optimizers import create_loraplus_optimizer

    o = manifest["options"]
    holder = torch.nn.Module()
    for n, param in tensors.items():
        holder.register_parameter(n, param)
    if o.get("step", 1) != 1:
        raise Unsupported("LoRA+ cases start from a fresh optimiser")
    return create_loraplus_optimizer(holder, optimizer_cls=cls, lr=o["lr"], loraplus_lr_ratio=o["loraplus_ratio"],
                                     loraplus_weight_decay=o.get("weight_decay", 0.0), **common)


HANDLERS = {
    "lora_forward": _lora, "lora_backward": _lora, "lora_merge": _lora,
    "dora_forward": _dora, "dora_backward": _dora, "dora_merge": _dora,
    "vera_forward": _vera, "vera_backward": _vera, "vera_merge": _vera,
    "qlora_forward": _qlora, "qlora_backward": _qlora,
    "fusion_cat": _fusion_cat, "adam_step": _adam,
    "multi_adapter_bgmv": multi_adapter, "multi_adapter_sgmv": multi_adapter,
    "adapter_config": adapter_config,
    "moe_lora_forward": moe_lora, "moe_lora_backward": moe_lora, "moe_lora_merge": moe_lora,
    "model_lora": model_lora,
    **{family.name: bf16_layer for family in BF16_FAMILIES},
    **{family.name: method_layer for family in METHOD_FAMILIES},
    **{family.name: fusion_combination for family in FUSION_FAMILIES},
}


def _runner(device: str):
    def run(manifest: dict, inputs: dict[str, np.ndarray]) -> dict:
        handler = HANDLERS.get(manifest["family"])
        if handler is None:
            raise Unsupported(f"no PEFT runner for family {manifest['family']!r}")
        return handler(manifest, inputs, device)

    return run


def implementations() -> list[Runner]:
    require("torch", "peft", "transformers")
    torch = _torch()
    runners = [Runner("peft-torch-cpu", _runner("cpu"))]
    if torch.cuda.is_available():
        runners.append(Runner("peft-torch-cuda", _runner("cuda")))
    return runners
