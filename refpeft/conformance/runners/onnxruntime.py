"""ONNX Runtime (CPU provider): refpeft's exported graphs run on the cases' inputs."""

from __future__ import annotations

import numpy as np

from refpeft.conformance.check import Unsupported
from refpeft.conformance.runners import Runner, require

HANDLERS: dict = {}


def run(manifest: dict, inputs: dict[str, np.ndarray]) -> dict:
    handler = HANDLERS.get(manifest["family"])
    if handler is None:
        raise Unsupported(f"no ONNX Runtime runner for family {manifest['family']!r}")
    return handler(manifest, inputs)


def implementations() -> list[Runner]:
    require("onnx", "onnxruntime")
    return [Runner("onnxruntime-cpu", run)]
