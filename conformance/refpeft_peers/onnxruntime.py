"""ONNX Runtime (CPU provider): its bnb4 quantiser, and refpeft's exported graphs run on the cases' inputs.

- export_forward: the case's layer exported by refpeft_onnx (merged or unmerged, NF4 through
  com.microsoft.MatMulBnb4 or standard ops; every branch kind: LoRA, DoRA, VeRA, IA3, OFT, LoKr,
  Pre-Diag), run in an InferenceSession on the case's x; an unmerged graph is fed the case's
  `branch.<input>` tensors as its swappable inputs (an adapter switched in per run), so the
  golden values, not the graph's initializer defaults, drive the branch.
- quantize_4bit: `quantize_matmul_bnb4` (the quantiser behind com.microsoft.MatMulBnb4, CUDA's
  decision trees compiled for the CPU) on the weight as one row of numel values, so its blocks
  are bitsandbytes' flat blocks. It implements the "bnb-cuda" semantics without double
  quantisation, for block sizes 16..256.
"""

from __future__ import annotations

import numpy as np

from refpeft.conformance.check import Unsupported
from refpeft_peers import Runner, require

# case name -> the FINDINGS.md entry explaining the expected difference
KNOWN_DEVIATIONS = {
    "nf4-quantize-bs64-bnb-cuda": "FINDINGS.md F-2: ORT's bnb4 quantiser codes an all-zero NF4 block 0x77, CUDA 0x00",
}


def _quantize(manifest: dict, inputs: dict) -> dict:
    from onnxruntime.capi import _pybind_state as ort

    o = manifest["options"]
    if o["rounding"] != "bnb-cuda" or o.get("double_quant", False) or not 16 <= o["blocksize"] <= 256:
        raise Unsupported("ONNX Runtime's bnb4 quantiser: bnb-cuda semantics, no double quantisation, blocks 16..256")
    W = np.ascontiguousarray(inputs["W"], dtype=np.float32)
    if inputs["W"].dtype != np.float32:
        raise Unsupported("ONNX Runtime's bnb4 quantiser takes float32 weights")
    n = W.size
    packed = np.zeros((n + 1) // 2, dtype=np.uint8)
    absmax = np.zeros(-(-n // o["blocksize"]), dtype=np.float32)
    ort.quantize_matmul_bnb4(packed, W.reshape(1, n), absmax, o["blocksize"], {"fp4": 0, "nf4": 1}[o["quant_type"]], 1, n)
    return {"packed": packed.reshape(-1, 1), "absmax": absmax}


def _export(manifest: dict, inputs: dict) -> dict:
    """Export the case's layer with refpeft_onnx and run the graph in an ONNX Runtime CPU session."""
    import importlib.util

    import onnxruntime as ort
    from refpeft.conformance.export_families import BRANCH_PREFIX, export_adapter

    if importlib.util.find_spec("refpeft_onnx") is None:
        raise Unsupported("refpeft_onnx (the exporter under test) is not installed")
    from refpeft_onnx.graph import build_model

    o = manifest["options"]
    stack, adapter = export_adapter(inputs, o, manifest["sizes"])
    model = build_model(stack, adapter, form=o["form"], dtype=manifest["dtype"], nf4_ops=o.get("nf4_ops", "bnb4"))
    options = ort.SessionOptions()
    options.log_severity_level = 3   # the swappable adapter inputs are initializers by design: no warnings
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {"x": inputs["x"]}
    layer = stack.layers[0].name
    feeds.update({f"{layer}.{name.removeprefix(BRANCH_PREFIX)}": value for name, value in inputs.items()
                  if name.startswith(BRANCH_PREFIX)})
    return {"y": session.run(["y"], feeds)[0]}


HANDLERS = {"quantize_4bit": _quantize, "export_forward": _export}


def run(manifest: dict, inputs: dict[str, np.ndarray]) -> dict:
    handler = HANDLERS.get(manifest["family"])
    if handler is None:
        raise Unsupported(f"no ONNX Runtime runner for family {manifest['family']!r}")
    return handler(manifest, inputs)


def implementations() -> list[Runner]:
    require("onnx", "onnxruntime")
    return [Runner("onnxruntime-cpu", run, KNOWN_DEVIATIONS)]
