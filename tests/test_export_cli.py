"""`refpeft export` and `refpeft export-adapter`: files in, verified ONNX files out, refusal on failure.

Specifications:
- From a base safetensors file and a PEFT adapter directory (written by refpeft), `export` writes
  a model that passes onnx.checker(full_check=True) and computes the adapted model in ONNX Runtime;
  --unmerged also writes the .onnx_adapter file; --nf4 stores the weights in 4 bits.
- `export-adapter` writes a file the unmerged graph serves (checked against --model).
- A graph that misses the bound is not written, and the message says by how much.
- A bitsandbytes 4-bit base file is exported as NF4 as it is.
"""

from __future__ import annotations

import numpy as np
import pytest

from test_export_cases import StackCase, build_adapter, build_stack

import onnx  # noqa: E402  (test_export_cases skips the module without the onnx extra)
from refpeft.cli import main  # noqa: E402
from refpeft.peft_format import write_peft_adapter  # noqa: E402
from refpeft.quant import quantize_4bit, save_quantized  # noqa: E402
from refpeft.tolerance import compare  # noqa: E402

import refpeft_onnx.verify  # noqa: E402
from refpeft_onnx.serving import AdapterSession  # noqa: E402
from refpeft_onnx.stack import reference_forward, save_stack  # noqa: E402
from refpeft_onnx.verify import graph_bound, session  # noqa: E402


@pytest.fixture
def files(tmp_path):
    stack = build_stack(StackCase((16, 12, 8), 1, "lora", True, "gelu", 21))
    adapter = build_adapter(stack, "dora", 4, seed=22)
    save_stack(tmp_path / "base.safetensors", stack)
    write_peft_adapter(tmp_path / "adapter", adapter)
    return tmp_path, stack, adapter


def _x(stack) -> np.ndarray:
    return np.random.default_rng(5).standard_normal((2, 3, stack.in_features)).astype(np.float32)


def test_export_merged_writes_a_checked_model_of_the_adapted_stack(files, capsys) -> None:
    tmp, stack, adapter = files
    assert main(["export", str(tmp / "adapter"), "--base", str(tmp / "base.safetensors"), "-o", str(tmp / "m.onnx")]) == 0
    assert "agrees with the refpeft reference" in capsys.readouterr().out
    model = onnx.load(tmp / "m.onnx")
    onnx.checker.check_model(model, full_check=True)
    x = _x(stack)
    result = compare(session(model).run(None, {"x": x})[0], reference_forward(stack, adapter, x),
                     graph_bound(stack, adapter, x, form="merged", dtype="float32"))
    assert result.passed


def test_export_unmerged_and_export_adapter_serve_the_adapter(files) -> None:
    tmp, stack, adapter = files
    base, model_path = str(tmp / "base.safetensors"), tmp / "u.onnx"
    assert main(["export", str(tmp / "adapter"), "--base", base, "-o", str(model_path), "--unmerged"]) == 0
    assert main(["export-adapter", str(tmp / "adapter"), "--base", base, "-o", str(tmp / "again.onnx_adapter"),
                 "--model", str(model_path)]) == 0
    onnx.checker.check_model(onnx.load(model_path), full_check=True)
    server = AdapterSession(model_path)
    server.load("written", tmp / "u.onnx_adapter")
    server.load("again", tmp / "again.onnx_adapter")
    x = _x(stack)
    for name in ("written", "again"):
        result = compare(server.run(x, adapter=name), reference_forward(stack, adapter, x),
                         graph_bound(stack, adapter, x, form="unmerged", dtype="float32"))
        assert result.passed


def test_export_nf4_float16_standard_ops(files, capsys) -> None:
    tmp, _, _ = files
    assert main(["export", "--base", str(tmp / "base.safetensors"), "-o", str(tmp / "q.onnx"), "--nf4",
                 "--nf4-ops", "standard", "--dtype", "float16"]) == 0
    out = capsys.readouterr().out
    assert "bits per parameter" in out and "agrees" in out
    onnx.checker.check_model(onnx.load(tmp / "q.onnx"), full_check=True)


def test_a_bitsandbytes_4bit_base_is_exported_as_it_is(tmp_path, capsys) -> None:
    W = np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)
    state = quantize_4bit(W, blocksize=64, double_quant=True)
    save_quantized(tmp_path / "q.safetensors", {"proj.weight": state})
    assert main(["export", "--base", str(tmp_path / "q.safetensors"), "-o", str(tmp_path / "q.onnx")]) == 0
    assert "proj: NF4 (bnb4)" in capsys.readouterr().out


def test_a_graph_missing_the_bound_is_refused_and_not_written(files, capsys, monkeypatch) -> None:
    tmp, _, _ = files
    original = refpeft_onnx.verify.graph_bound
    monkeypatch.setattr(refpeft_onnx.verify, "graph_bound", lambda *a, **k: original(*a, **k) * 1e-9)
    code = main(["export", str(tmp / "adapter"), "--base", str(tmp / "base.safetensors"), "-o", str(tmp / "bad.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "DISAGREES" in err and "of the derived float32 bound" in err and "refusing" in err
    assert not (tmp / "bad.onnx").exists()


def test_bad_inputs_are_reported_not_raised(files, capsys) -> None:
    tmp, _, _ = files
    assert main(["export", str(tmp / "adapter"), "--base", str(tmp / "missing.safetensors"), "-o",
                 str(tmp / "x.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["export", str(tmp / "adapter"), "--base", str(tmp / "base.safetensors"), "-o", str(tmp / "x.onnx"),
                 "--opset", "12"]) == 2
    assert "opset 12" in capsys.readouterr().err


def test_without_the_onnx_extra_the_commands_say_what_to_install(files, capsys, monkeypatch) -> None:
    import importlib.util

    tmp, _, _ = files
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    for command in (["export"], ["export-adapter", str(tmp / "adapter")]):
        assert main([*command, "--base", str(tmp / "base.safetensors"), "-o", str(tmp / "x")]) == 2
        assert "pip install 'refpeft[onnx]'" in capsys.readouterr().err
