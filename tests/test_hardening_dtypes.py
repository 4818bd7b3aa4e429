"""Tensors whose dtype does not fit (issue 17): refused by name, never converted or overflowed in silence.

Specification: a float8 tensor anywhere in a safetensors file is read (as its ml_dtypes type), and a
command passes it through untouched where it only copies it; where a command needs a float weight
(quantize's selected weights, export's base layers, merge) a float8, integer or bool tensor is
refused with a one-line error naming the tensor and its dtype, and nothing is written; an export
to float16 whose values overflow float16 (becoming infinity) is refused naming the tensor.
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.cli import main
from refpeft.io import read_safetensors
from refpeft.peft_format import write_peft_adapter

WRONG_DTYPES = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "int32": np.int32, "bool": np.bool_}


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 64)).astype(np.float32)
    safetensors.numpy.save_file({"l1.weight": weight}, str(tmp_path / "base.safetensors"))
    for name, dtype in WRONG_DTYPES.items():  # the layer's weight itself in a dtype that is not a float weight
        safetensors.numpy.save_file({"l1.weight": (weight * 4).astype(dtype)}, str(tmp_path / f"{name}.safetensors"))
    for alpha, name in ((4.0, "adapter"), (1e6, "huge")):
        module = ModuleAdapter("lora", {"A": rng.standard_normal((2, 64)), "B": rng.standard_normal((6, 2))}, alpha=alpha)
        write_peft_adapter(tmp_path / name, Adapter(modules={"l1": module}))
    return tmp_path


def refused(argv, capsys, *, names: str) -> None:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert re.search(names, err[0]), err[0]


def test_a_float8_tensor_is_read_and_quantize_passes_it_through_untouched(files, capsys):
    scale = np.arange(12, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn).reshape(3, 4)
    base = safetensors.numpy.load_file(str(files / "base.safetensors"))
    safetensors.numpy.save_file(dict(base, **{"l1.weight_scale": scale}), str(files / "mixed.safetensors"))
    tensors, _ = read_safetensors(files / "mixed.safetensors")
    assert tensors["l1.weight_scale"].dtype == ml_dtypes.float8_e4m3fn
    assert main(["quantize", str(files / "mixed.safetensors"), str(files / "q.safetensors"), "--no-progress"]) == 0
    out, _ = read_safetensors(files / "q.safetensors")
    assert out["l1.weight_scale"].tobytes() == scale.tobytes() and out["l1.weight"].dtype == np.uint8


@pytest.mark.parametrize("dtype", WRONG_DTYPES)
def test_quantize_and_merge_refuse_a_weight_that_is_not_float_by_name(files, capsys, dtype):
    base = files / f"{dtype}.safetensors"
    refused(["quantize", base, files / "q.safetensors", "--no-progress"], capsys, names=rf"'l1.weight'.*{dtype}")
    refused(["merge", files / "adapter", "--base", base, "-o", files / "m.safetensors", "--no-progress"], capsys,
            names=r"l1.weight.*(F8_E4M3|I32|BOOL)")
    assert not (files / "q.safetensors").exists() and not (files / "m.safetensors").exists()


@pytest.mark.parametrize("dtype", WRONG_DTYPES)
def test_export_refuses_a_base_weight_that_is_not_float_by_name(files, capsys, dtype):
    pytest.importorskip("onnxruntime")
    base = files / f"{dtype}.safetensors"
    refused(["export", files / "adapter", "--base", base, "-o", files / "m.onnx"], capsys, names=rf"'l1.weight'.*{dtype}")
    refused(["export-adapter", files / "adapter", "--base", base, "-o", files / "a.onnx_adapter"], capsys,
            names=rf"'l1.weight'.*{dtype}")
    assert not (files / "m.onnx").exists() and not (files / "a.onnx_adapter").exists()


def test_a_float16_export_whose_values_overflow_is_refused_naming_the_tensor(files, capsys):
    pytest.importorskip("onnxruntime")
    base = files / "base.safetensors"
    refused(["export-adapter", files / "huge", "--base", base, "-o", files / "a.onnx_adapter", "--dtype", "float16"],
            capsys, names=r"l1\.lora_scaling.*overflow float16")
    refused(["export", files / "huge", "--base", base, "-o", files / "m.onnx", "--dtype", "float16"], capsys,
            names=r"l1.*overflow float16")
    assert not (files / "a.onnx_adapter").exists() and not (files / "m.onnx").exists()
    assert main(["export-adapter", str(files / "huge"), "--base", str(base), "-o", str(files / "a.onnx_adapter")]) == 0
