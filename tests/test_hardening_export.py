"""The ONNX export's file boundaries under bad inputs (issue 17).

Specification: a base file whose `refpeft.stack` metadata is not JSON or not of the documented form
is a FormatError naming the file and the value; `export-adapter --model` pointing at a missing file
or at a file that is not an ONNX model is refused with exit status 2 and a one-line message, and
its output replaces none of its inputs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.numpy

from refpeft.errors import FormatError
from refpeft_onnx.stack import STACK_METADATA_KEY, load_stack


@pytest.mark.parametrize("stored, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object, got list"),
    (json.dumps({"layers": "a"}), "layers must be a list of layer names, got 'a'"),
    (json.dumps({"layers": ["a"], "fan_in_fan_out": [1]}), r"fan_in_fan_out must be a list of layer names"),
    (json.dumps({"layers": ["a"], "activation": ["relu"]}), r"activation \['relu'\] is not one of"),
])
def test_bad_stack_metadata_is_a_format_error_naming_the_value(tmp_path, stored, message):
    path = tmp_path / "base.safetensors"
    safetensors.numpy.save_file({"a.weight": np.ones((2, 3), dtype=np.float32)}, str(path),
                                metadata={STACK_METADATA_KEY: stored})
    with pytest.raises(FormatError, match=f"base.safetensors.*{message}"):
        load_stack(path)


def test_export_adapter_refuses_a_missing_or_foreign_model_and_its_own_inputs(tmp_path, capsys):
    pytest.importorskip("onnx", reason="export-adapter needs the `onnx` extra")
    pytest.importorskip("onnxruntime", reason="export-adapter needs the `onnx` extra")
    from test_export_cases import StackCase, build_adapter, build_stack

    from refpeft.cli import main
    from refpeft.peft_format import write_peft_adapter
    from refpeft_onnx.stack import save_stack

    stack = build_stack(StackCase((8, 6), 1, "lora", True, "relu", 3))
    save_stack(tmp_path / "base.safetensors", stack)
    write_peft_adapter(tmp_path / "adapter", build_adapter(stack, "lora", 2, seed=4))
    command = ["export-adapter", str(tmp_path / "adapter"), "--base", str(tmp_path / "base.safetensors")]
    for model, message in [(tmp_path / "absent.onnx", "absent.onnx: no such ONNX model file"),
                           (tmp_path / "base.safetensors", "base.safetensors: not an ONNX model")]:
        assert main([*command, "-o", str(tmp_path / "a.onnx_adapter"), "--model", str(model)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    before = (tmp_path / "base.safetensors").read_bytes()
    assert main([*command, "-o", str(tmp_path / "base.safetensors")]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert (tmp_path / "base.safetensors").read_bytes() == before
