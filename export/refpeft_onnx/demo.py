"""The export step of `refpeft demo`: export the trained adapter and show ONNX Runtime agreeing.

    from refpeft_onnx.demo import export_and_check, skip_reason
    reason = skip_reason()
    lines = [reason] if reason else export_and_check(out_dir, W0=W0, bias=b, adapter=module)

This module imports onnx only inside `export_and_check`, so `skip_reason()` can be asked first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.errors import ConfigError

from refpeft_onnx import missing_extra

LAYER = "linear"


def skip_reason() -> str | None:
    """None when the export can run, else the sentence the demo prints instead of exporting."""
    missing = missing_extra()
    return None if missing is None else f"ONNX export skipped: {missing}"


def export_and_check(out_dir: str | os.PathLike, *, W0: Any, bias: Any, adapter: Adapter | ModuleAdapter,
                     dtype: str = "float32", seed: int = 0) -> list[str]:
    """Export the demo's one adapted layer merged and unmerged (+ .onnx_adapter), verified; report lines.

    adapter: the trained module (LoRA or DoRA), or an Adapter with one module (VeRA: with its
    shared projections vera_A, vera_B).

    Each graph is verified before it is written (refpeft_onnx.verify); then the unmerged graph is
    served through an AdapterSession with the adapter file switched on and off, and both outputs
    are compared with refpeft's reference within the derived bound.
    """
    from refpeft.tolerance import compare

    from refpeft_onnx.exporter import export_model
    from refpeft_onnx.serving import AdapterSession
    from refpeft_onnx.stack import reference_forward, single_layer
    from refpeft_onnx.verify import graph_bound

    out = Path(out_dir)
    whole = adapter if isinstance(adapter, Adapter) else Adapter({LAYER: adapter})
    if len(whole.modules) != 1:
        raise ConfigError(f"the demo exports one adapted layer, the adapter has {len(whole.modules)} modules")
    stack = single_layer(W0, bias, name=next(iter(whole.modules)))
    merged = export_model(out / "merged.onnx", stack, whole, form="merged", dtype=dtype)
    unmerged = export_model(out / "unmerged.onnx", stack, whole, form="unmerged", dtype=dtype)
    server = AdapterSession(unmerged.model_path)
    server.load("demo", unmerged.adapter_path)
    x = np.random.default_rng(seed).standard_normal((4, 16, stack.in_features)).astype(dtype)
    lines = [f"merged   {merged.model_path}: {merged.report.summary()}",
             f"unmerged {unmerged.model_path} + {unmerged.adapter_path.name}: {unmerged.report.summary()}"]
    for label, active, reference in (("adapter on ", "demo", whole), ("adapter off", None, None)):
        y = server.run(x, adapter=active)
        result = compare(y, reference_forward(stack, reference, x),
                         graph_bound(stack, reference, x, form="unmerged", dtype=dtype))
        lines.append(f"served, {label}: max|ONNX Runtime - refpeft| = {result.max_error:.3g} "
                     f"({result.ratio:.3g} of the {dtype} bound){'' if result.passed else '  FAILED'}")
    return lines
