"""bitsandbytes (CPU, and CUDA when present): 4-bit quantisation bytes, absmaxes and double quantisation.

`bitsandbytes.functional.quantize_4bit` / `dequantize_4bit`, called as transformers' Linear4bit
does. bitsandbytes' CPU code implements the cases with rounding "bnb-cpu", its CUDA kernels those
with "bnb-cuda"; each device runner declines the other semantics' cases (they are different
specifications, not deviations). Known deviations point at conformance/FINDINGS.md.
"""

from __future__ import annotations

import numpy as np

from refpeft.conformance.check import Unsupported
from refpeft_peers import Runner, require

SEMANTICS = {"cpu": "bnb-cpu", "cuda": "bnb-cuda"}
# case name -> the FINDINGS.md entry explaining the expected difference (CPU runner)
KNOWN_DEVIATIONS_CPU = {
    f"fp4-dequantize-{label}-bnb-cpu": "FINDINGS.md F-5: bnb CPU decodes FP4 code 8 as +0.0 (CUDA: -0.0)"
    for label in ("bs64", "bs32-partial", "bs128-float16", "double-bs32", "bs128-rows320")
}


def known_deviations_cpu() -> dict[str, str]:
    """F-5 everywhere; F-6 (the AVX-512 dequantiser's per-row absmax index) only where that path runs."""
    import torch

    known = dict(KNOWN_DEVIATIONS_CPU)
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        for quant_type in ("nf4", "fp4"):
            known[f"{quant_type}-dequantize-bs128-rows320-bnb-cpu"] = (
                "FINDINGS.md F-6: bnb CPU AVX-512 dequantize_4bit indexes absmax per row (320 % 128 != 0)")
    return known


def _check_semantics(manifest: dict, device: str) -> None:
    if manifest["options"]["rounding"] != SEMANTICS[device]:
        raise Unsupported(f"bitsandbytes on {device} implements {SEMANTICS[device]}, "
                          f"this case specifies {manifest['options']['rounding']}")


def _quantize(manifest: dict, inputs: dict, device: str) -> dict:
    import bitsandbytes.functional as F
    import torch

    _check_semantics(manifest, device)
    o = manifest["options"]
    W = torch.from_numpy(inputs["W"]).to(device)
    P, S = F.quantize_4bit(W, blocksize=o["blocksize"], quant_type=o["quant_type"],
                           compress_statistics=o.get("double_quant", False))
    out = {"packed": P.cpu().numpy()}
    if o.get("double_quant", False):
        out.update({"absmax.codes": S.absmax.cpu().numpy(), "absmax.nested": S.state2.absmax.cpu().numpy(),
                    "absmax.offset": np.asarray([S.offset.item()], dtype=np.float32)})
    else:
        out["absmax"] = S.absmax.cpu().numpy()
    return out


def _dequantize(manifest: dict, inputs: dict, device: str) -> dict:
    import bitsandbytes.functional as F
    import torch

    _check_semantics(manifest, device)
    o = manifest["options"]
    shape = torch.Size(manifest["sizes"]["shape"])
    dtype = getattr(torch, manifest["dtype"])

    def t(name):
        return torch.from_numpy(np.array(inputs[name], copy=True)).to(device)

    if o.get("double_quant", False):
        state2 = F.QuantState(absmax=t("absmax.nested"), code=F.create_dynamic_map().to(device), blocksize=256,
                              dtype=torch.float32)
        state = F.QuantState(absmax=t("absmax.codes"), shape=shape, code=F.get_4bit_type(o["quant_type"], device=device),
                             blocksize=o["blocksize"], quant_type=o["quant_type"], dtype=dtype,
                             offset=t("absmax.offset")[0], state2=state2)
    else:
        state = F.QuantState(absmax=t("absmax"), shape=shape, code=F.get_4bit_type(o["quant_type"], device=device),
                             blocksize=o["blocksize"], quant_type=o["quant_type"], dtype=dtype)
    W = F.dequantize_4bit(t("packed"), state)
    return {"W": W.cpu().numpy().reshape(tuple(shape))}


HANDLERS = {"quantize_4bit": _quantize, "dequantize_4bit": _dequantize}


def _runner(device: str):
    def run(manifest: dict, inputs: dict[str, np.ndarray]) -> dict:
        handler = HANDLERS.get(manifest["family"])
        if handler is None:
            raise Unsupported(f"no bitsandbytes runner for family {manifest['family']!r}")
        return handler(manifest, inputs, device)

    return run


def implementations() -> list[Runner]:
    require("torch", "bitsandbytes")
    import torch

    runners = [Runner("bitsandbytes-cpu", _runner("cpu"), known_deviations_cpu())]
    if torch.cuda.is_available():
        runners.append(Runner("bitsandbytes-cuda", _runner("cuda")))
    return runners
