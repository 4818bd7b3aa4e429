"""`.onnx_adapter` files: one adapter's tensors for the unmerged graph, in ONNX Runtime's format.

The file (onnxruntime.AdapterFormat, FlatBuffers) maps names to tensors. Its names are exactly the
unmerged graph's swappable inputs (refpeft_onnx.graph.adapter_input_names), its dtypes the graph's:

    LoRA  {layer}.lora_A_t (k, r)   {layer}.lora_B_t (r, d)   {layer}.lora_scaling (1,)   (LoHa: its Khatri-Rao factors)
    DoRA  the same, and {layer}.dora_scale (d,) = m / ||W0 + s B A|| (fixed per adapter)
    Pre-Diag  the same, and {layer}.prediag_D (d,)
    VeRA  {layer}.vera_lambda_d (r,)   {layer}.vera_lambda_b (d,)   (the projections stay in the graph)
    IA3   {layer}.ia3_input_scale (k,)   {layer}.ia3_output_scale (d,)   (ones on the side l does not scale)
    OFT   {layer}.oft_rotation (m, b, b)   the Cayley blocks R_i, computed in float64 when the file is written
    LoKr  {layer}.lokr_w1 (d1, k1)   {layer}.lokr_w2_t (k2, d2)   {layer}.lokr_scaling (1,)
    and   {layer}.bias (d,) for each base bias the adapter trains (PEFT's bias="lora_only"/"all")
(refpeft_onnx.branches has each kind's graph.)

ONNX Runtime appends a loaded adapter's tensors to a run's feeds, so every name must be an input of
the graph it is used with and every dtype must match; `check_against_model` says so before writing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from refpeft.adapter import Adapter
from refpeft.errors import ConfigError, FormatError, ShapeError
from refpeft.io import atomic_path

from refpeft_onnx.graph import adapter_inputs
from refpeft_onnx.stack import LinearStack
from refpeft_onnx.verify import adapter_feeds

ADAPTER_VERSION = 1   # of the adapter's content (written into the file; ONNX Runtime does not check it)
MODEL_VERSION = 1     # of the graph it belongs to (idem)


def adapter_parameters(stack: LinearStack, adapter: Adapter, *, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The tensors of `adapter` for the unmerged graph of `stack`, by input name, in `dtype`."""
    return adapter_feeds(stack, adapter, dtype)


def check_against_model(parameters: dict[str, np.ndarray], model: onnx.ModelProto) -> None:
    """Every parameter must be a swappable input of `model` with its element type and fixed sizes."""
    inputs = adapter_inputs(model)
    unknown = sorted(set(parameters) - set(inputs))
    if unknown and not inputs:
        raise ConfigError(f"the graph has no adapter inputs (no input with a default), so {unknown[:2]} ... have nowhere "
                          "to go: it was not exported unmerged by refpeft; to add the adapter's branch to a graph made "
                          "elsewhere, use `refpeft attach MODEL.onnx ADAPTER_DIR --base BASE -o DIR`")
    if unknown:
        raise ConfigError(f"parameter(s) {unknown} are not adapter inputs of the graph (it has {sorted(inputs)})")
    for name, value in parameters.items():
        elem_type, dims = inputs[name]
        wanted = helper.tensor_dtype_to_np_dtype(elem_type)
        if value.dtype != wanted:
            raise ConfigError(f"{name} has dtype {value.dtype}, the graph's input is {wanted}")
        if len(dims) != value.ndim or any(isinstance(s, int) and s != n for s, n in zip(dims, value.shape)):
            raise ShapeError(f"{name} has shape {value.shape}, the graph's input is {dims}")


def write_onnx_adapter(path: str | os.PathLike, parameters: dict[str, np.ndarray], *,
                       adapter_version: int = ADAPTER_VERSION, model_version: int = MODEL_VERSION) -> Path:
    """Write an .onnx_adapter file atomically (a temporary file in the target's folder, then a rename)."""
    import onnxruntime as ort

    empty = [name for name, value in parameters.items() if value.ndim == 0]
    if empty:
        raise ShapeError(f"ONNX Runtime refuses scalar adapter parameters: {empty}; give them shape (1,)")
    writer = ort.AdapterFormat()
    writer.set_adapter_version(adapter_version)
    writer.set_model_version(model_version)
    writer.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
                           for name, value in parameters.items()})
    with atomic_path(path) as tmp:
        writer.export_adapter(str(tmp))
    return Path(path)


def read_onnx_adapter(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of an .onnx_adapter file, by name; FormatError when it cannot be read."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FormatError(f"{path}: no such file")
    try:
        reader = ort.AdapterFormat.read_adapter(str(path))
    except Exception as exc:  # ONNX Runtime raises RuntimeError subclasses for corrupt files
        raise FormatError(f"{path}: not a readable .onnx_adapter file ({exc})") from None
    # The OrtValues view memory the reader owns: copy while it is alive.
    return {name: value.numpy().copy() for name, value in reader.get_parameters().items()}
