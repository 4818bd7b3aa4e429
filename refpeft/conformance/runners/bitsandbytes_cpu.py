"""bitsandbytes (CPU, and CUDA when present): 4-bit quantisation bytes, absmaxes and double quantisation."""

from __future__ import annotations

import numpy as np

from refpeft.conformance.check import Unsupported
from refpeft.conformance.runners import Runner, require

HANDLERS: dict = {}


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

    runners = [Runner("bitsandbytes-cpu", _runner("cpu"))]
    if torch.cuda.is_available():
        runners.append(Runner("bitsandbytes-cuda", _runner("cuda")))
    return runners
