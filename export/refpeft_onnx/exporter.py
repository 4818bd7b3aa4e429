"""Export end to end: (quantise,) build, verify, and only then write the model and its adapter file.

    export_model("model.onnx", stack, adapter, form="unmerged", dtype="float32")
        -> writes model.onnx (+ model.onnx_adapter for an unmerged graph with an adapter)
    export_adapter_file("a.onnx_adapter", stack, adapter, model=onnx.load("model.onnx"))

Nothing is written when the graph fails verification (refpeft_onnx.verify): the VerificationError
says by how much the output missed the derived bound.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from refpeft.adapter import Adapter
from refpeft.errors import ConfigError, FormatError
from refpeft.io import atomic_write_bytes

from refpeft_onnx.adapter_files import adapter_parameters, check_against_model, write_onnx_adapter
from refpeft_onnx.builder import DEFAULT_OPSET
from refpeft_onnx.graph import build_model
from refpeft_onnx.nf4 import bits_per_parameter, quantize_stack
from refpeft_onnx.stack import LinearStack, load_stack
from refpeft_onnx.verify import VerificationReport, require_passed, verify_model

PROTOBUF_LIMIT = 2**31 - 1   # a single-file ONNX model is one protobuf message


@dataclass(frozen=True)
class ExportResult:
    model_path: Path
    adapter_path: Path | None
    report: VerificationReport
    bits_per_parameter: dict[str, float]     # NF4 layers: stored weight bits per parameter


def load_inputs(base: str | os.PathLike, adapter_dir: str | os.PathLike | None = None, *,
                layers: list[str] | None = None, activation: str | None = None) -> tuple[LinearStack, Adapter | None]:
    """The base stack (refpeft_onnx.stack.load_stack) and a PEFT adapter directory read against it
    (refpeft.peft_format; refpeft writes adapters in that format too), in float64."""
    from refpeft.methods.linear import LinearShape
    from refpeft.peft_format import WEIGHTS_NAME, fit_to_base, read_peft_adapter

    stack = load_stack(base, layers=layers, activation=activation)
    if adapter_dir is None:
        return stack, None
    adapter = read_peft_adapter(adapter_dir, dtype="float64")
    left_out = sorted(set(adapter.modules) - {layer.name for layer in stack.layers})
    if left_out and layers is not None:
        raise ConfigError(f"the adapter adapts {', '.join(left_out)}, which --layers {','.join(layers)} leaves out")
    shapes = {layer.name: LinearShape(k=layer.k, d=layer.d) for layer in stack.layers}
    return stack, fit_to_base(adapter, shapes, source=Path(adapter_dir) / WEIGHTS_NAME, dtype="float64")


def export_model(path: str | os.PathLike, stack: LinearStack, adapter: Adapter | None = None, *,
                 form: str = "merged", dtype: str = "float32", nf4_blocksize: int | None = None,
                 double_quant: bool = True, nf4_ops: str = "bnb4", opset: int = DEFAULT_OPSET,
                 adapter_path: str | os.PathLike | None = None, providers: list[str] | None = None,
                 bound_model: str = "rigorous") -> ExportResult:
    """Build, verify and write the graph (see the module docstring).

    nf4_blocksize: quantise every frozen weight to NF4 with this block size (None: float weights).
    adapter_path: where an unmerged export writes the adapter's .onnx_adapter file (default: the
      model's path with the suffix .onnx_adapter).
    bound_model: "rigorous" (default) or "probabilistic" (refpeft_onnx.verify.graph_bound).
    """
    if nf4_blocksize is not None:
        stack = quantize_stack(stack, blocksize=nf4_blocksize, double_quant=double_quant)
    model = build_model(stack, adapter, form=form, dtype=dtype, nf4_ops=nf4_ops, opset=opset)
    report = verify_model(model, stack, adapter, providers=providers, bound_model=bound_model)
    require_passed(report)
    data = model.SerializeToString()
    if len(data) > PROTOBUF_LIMIT:
        raise ConfigError(f"the model is {len(data) / 2**30:.1f} GiB; single-file ONNX models stop at 2 GiB")
    model_path = atomic_write_bytes(path, data)
    written_adapter = None
    if form == "unmerged" and adapter is not None:
        target = Path(adapter_path) if adapter_path is not None else model_path.with_suffix(".onnx_adapter")
        written_adapter = export_adapter_file(target, stack, adapter, dtype=dtype, model=model)
    bits = {layer.name: bits_per_parameter(model, layer) for layer in stack.layers if layer.nf4 is not None}
    return ExportResult(model_path, written_adapter, report, bits)


def export_adapter_file(path: str | os.PathLike, stack: LinearStack, adapter: Adapter, *, dtype: str = "float32",
                        model: onnx.ModelProto | str | os.PathLike | None = None) -> Path:
    """Write `adapter` as an .onnx_adapter file, checked against `model`'s inputs when given
    (a loaded graph or the path of one)."""
    parameters = adapter_parameters(stack, adapter, dtype=dtype)
    if model is not None:
        check_against_model(parameters, model if isinstance(model, onnx.ModelProto) else read_model(model))
    return write_onnx_adapter(path, parameters)


def read_model(path: str | os.PathLike) -> onnx.ModelProto:
    """An ONNX model file; FormatError naming it when it is missing or not an ONNX model."""
    source = Path(path)
    if not source.is_file():
        raise FormatError(f"{source}: no such ONNX model file")
    try:
        return onnx.load(source)
    except Exception as exc:  # protobuf's DecodeError, onnx's own errors for external data
        raise FormatError(f"{source}: not an ONNX model ({exc})") from None
