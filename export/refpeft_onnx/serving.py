"""Serving many adapters over one base: one ONNX Runtime session, the adapter chosen per run.

    server = AdapterSession("model.onnx")                 # an unmerged graph (refpeft export --unmerged)
    server.load("support", "support.onnx_adapter")
    server.load("legal", "legal.onnx_adapter")
    y_support = server.run(x, adapter="support")
    y_base = server.run(x)                                 # no active adapter: the base model

Each run gets its own onnxruntime.RunOptions with `add_active_adapter(LoraAdapter)`; ONNX Runtime
then feeds the adapter's tensors in place of the graph's defaults for that run only, so concurrent
runs with different adapters share the session. (`run_with_iobinding` ignores adapters, so this
helper does not use it.)
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx

from refpeft.errors import ConfigError

from refpeft_onnx.adapter_files import check_against_model, read_onnx_adapter
from refpeft_onnx.verify import session


class AdapterSession:
    """One session over an unmerged graph and the adapters loaded into it, by name."""

    def __init__(self, model: str | os.PathLike | onnx.ModelProto, *, provider: str = "CPUExecutionProvider") -> None:
        self._model = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        self.session = session(self._model, provider)
        self._adapters: dict[str, Any] = {}

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(self._adapters)

    def load(self, name: str, path: str | os.PathLike) -> None:
        """Load an .onnx_adapter file under `name`, after checking its tensors fit this graph's inputs."""
        import onnxruntime as ort

        check_against_model(read_onnx_adapter(path), self._model)
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        self._adapters[name] = adapter

    def run(self, x: np.ndarray, *, adapter: str | None = None) -> np.ndarray:
        """y for input x (batch, sequence, k) with `adapter` active (None: the base model)."""
        import onnxruntime as ort

        options = ort.RunOptions()
        if adapter is not None:
            if adapter not in self._adapters:
                raise ConfigError(f"no adapter named {adapter!r} is loaded; loaded: {sorted(self._adapters)}")
            options.add_active_adapter(self._adapters[adapter])
        return self.session.run(None, {"x": x}, options)[0]
