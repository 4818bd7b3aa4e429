"""A small ONNX graph builder: nodes, constant initializers, and swappable inputs (inputs with a default).

Numeric choices: every tensor is cast from float64 to the graph's dtype (float32 or float16) once,
round to nearest even (NumPy's astype), at the moment it becomes an initializer or adapter value
(`to_graph_dtype`); a finite value past the dtype's range (65504 in float16) is refused, naming
the tensor, rather than stored as infinity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from refpeft.errors import ConfigError

DTYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}
DEFAULT_OPSET = 21           # Gelu (20) and BitwiseAnd (18) are standard ops from here on
OPSETS = (21, 22, 23)        # what onnx 1.23 checks and ONNX Runtime 1.32 runs (checked by the tests)
MICROSOFT_DOMAIN = "com.microsoft"


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"graphs are exported in {' or '.join(DTYPES)}, got {dtype!r}")


def to_graph_dtype(array: Any, np_dtype: type, *, name: str) -> np.ndarray:
    """`array` rounded to `np_dtype` (nearest even); ConfigError naming the tensor `name` when a
    finite value overflows that dtype (becomes infinity)."""
    a = np.asarray(array)
    with np.errstate(over="ignore"):
        cast = a.astype(np_dtype, copy=False)
    overflow = np.isinf(cast) & np.isfinite(a)
    if overflow.any():
        raise ConfigError(f"{name}: {int(overflow.sum())} value(s), up to {float(np.max(np.abs(a[overflow]))):.4g} in "
                          f"magnitude, overflow {np.dtype(np_dtype)} (largest {float(np.finfo(np_dtype).max):.6g}); "
                          "export in float32")
    return cast


def check_opset(opset: int) -> None:
    if opset not in OPSETS:
        raise ConfigError(f"opset {opset} is not supported; choose one of {', '.join(map(str, OPSETS))}")


class ExternalData:
    """A file the builder streams large initializers into as it makes them (ONNX's external data),
    so a model's weights exist once, on disk, instead of in the ModelProto and its serialisation."""

    THRESHOLD = 1024       # bytes: smaller tensors stay inside the model file

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.file = open(self.path, "wb")       # closed by close(); the caller's staging folder owns it

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """`array` appended to the file, as a TensorProto that points at it."""
        data = np.ascontiguousarray(array)
        offset = self.file.tell()
        self.file.write(data.tobytes())
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(data.dtype), dims=data.shape,
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(data.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def close(self) -> None:
        self.file.close()


class GraphBuilder:
    """Collects the pieces of one graph; `model()` assembles and returns the ModelProto.

    external: stream initializers of THRESHOLD bytes or more into that file (the model must then be
    saved in the file's folder, as its name is recorded relative to the model)."""

    def __init__(self, dtype: str, external: ExternalData | None = None) -> None:
        check_dtype(dtype)
        self.external = external
        self.dtype = dtype
        self.np_dtype, self.onnx_dtype = DTYPES[dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.swappable_names: list[str] = []
        self._names: set[str] = set()
        self.uses_microsoft = False

    def _claim(self, name: str) -> str:
        if name in self._names:
            raise ConfigError(f"two graph values are both named {name!r}")
        self._names.add(name)
        return name

    def const(self, name: str, array: Any, *, cast: bool = True) -> str:
        """A constant initializer; floating arrays are cast to the graph dtype unless cast=False."""
        a = np.asarray(array)
        if cast and a.dtype.kind == "f":
            a = to_graph_dtype(a, self.np_dtype, name=name)
        if self.external is not None and a.nbytes >= ExternalData.THRESHOLD:
            self.initializers.append(self.external.tensor(self._claim(name), a))
        else:
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(a), self._claim(name)))
        return name

    def shared(self, name: str, array: Any) -> str:
        """A constant used by several layers (say a codebook), stored once, exactly as given (no cast)."""
        return name if name in self._names else self.const(name, array, cast=False)

    def input(self, name: str, shape: list[int | str], elem_type: int | None = None) -> str:
        """A plain graph input (no default)."""
        self.inputs.append(helper.make_tensor_value_info(self._claim(name), elem_type or self.onnx_dtype, shape))
        return name

    def swappable(self, name: str, default: np.ndarray, shape: list[int | str]) -> str:
        """An input with an initializer default of the same name: ONNX Runtime's adapter convention."""
        self.input(name, shape)
        self.initializers.append(numpy_helper.from_array(
            np.ascontiguousarray(to_graph_dtype(default, self.np_dtype, name=name)), name))
        self.swappable_names.append(name)
        return name

    def op(self, op_type: str, inputs: list[str], output: str, *, domain: str = "", **attributes: Any) -> str:
        """One node producing `output`."""
        if domain == MICROSOFT_DOMAIN:
            self.uses_microsoft = True
        self.nodes.append(helper.make_node(op_type, inputs, [self._claim(output)], name=f"{output}/{op_type}",
                                           domain=domain, **attributes))
        return output

    def model(self, outputs: dict[str, list[int | str]], *, opset: int, name: str,
              metadata: dict[str, str]) -> onnx.ModelProto:
        """The ModelProto; `outputs` maps each graph output (a value of the graph's dtype) to its shape."""
        check_opset(opset)
        declared = [helper.make_tensor_value_info(output, self.onnx_dtype, shape) for output, shape in outputs.items()]
        graph = helper.make_graph(self.nodes, name, self.inputs, declared, initializer=self.initializers)
        opsets = [helper.make_opsetid("", opset)]
        if self.uses_microsoft:
            opsets.append(helper.make_opsetid(MICROSOFT_DOMAIN, 1))
        ir_version = helper.find_min_ir_version_for(opsets[:1])   # >= 4: initializers may be overridden
        model = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version, producer_name="refpeft_onnx")
        helper.set_model_props(model, metadata)
        return model
