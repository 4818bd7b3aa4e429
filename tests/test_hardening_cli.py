"""The command line under bad inputs (issue 17): refpeft's own error, never a traceback or a destroyed input.

Specification: each input below, which once ended in a Python traceback, a hang or a replaced input
file, makes the command exit with status 2 and a one-line message on stderr that names the
offending value; no input file changes; Ctrl-C prints "interrupted" and leaves no temporary file;
a reader that goes away (`| head`) ends the command without a traceback.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from refpeft.adapter import Adapter, ModuleAdapter
from refpeft.cli import main
from refpeft.peft_format import write_peft_adapter


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    safetensors.numpy.save_file({"l1.weight": rng.standard_normal((6, 5)).astype(np.float32)},
                                str(tmp_path / "base.safetensors"))
    module = ModuleAdapter("lora", {"A": rng.standard_normal((2, 5)), "B": rng.standard_normal((6, 2))}, alpha=4.0)
    for name in ("adapter", "other"):
        write_peft_adapter(tmp_path / name, Adapter(modules={"l1": module}))
    return tmp_path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(argv: list[str], capsys, *, names: str) -> str:
    """Run the command, which must exit 2 with one line on stderr matching `names`; returns that line."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert re.search(names, err[0]), err[0]
    return err[0]


def _config(folder: Path, **changes) -> Path:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return folder


def test_inputs_that_once_raised_tracebacks_are_refpeft_errors(files, capsys):
    huge = files / "huge"
    shutil.copytree(files / "adapter", huge)
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**63, 0], "data_offsets": [0, 0]}}).encode()
    (huge / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    refused(["inspect", huge], capsys, names=r"shape \[9223372036854775808, 0\] is larger than an array can be")

    deep = files / "deep"
    shutil.copytree(files / "adapter", deep)
    (deep / "adapter_config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(["merge", deep, "--base", files / "base.safetensors", "-o", files / "m.safetensors"], capsys,
            names="adapter_config.json: JSON nested too deeply")

    big_alpha = files / "alpha"
    shutil.copytree(files / "adapter", big_alpha)
    _config(big_alpha, lora_alpha=10**400)
    refused(["inspect", big_alpha], capsys, names=r"lora_alpha must be a finite number .*got 1000")
    _config(big_alpha, lora_alpha=4, alpha_pattern={"l1": 10**400})
    refused(["inspect", big_alpha], capsys, names=r"alpha_pattern\['l1'\] must be a finite number")
    (big_alpha / "adapter_config.json").write_text(
        (big_alpha / "adapter_config.json").read_text().replace('"r": 2', '"r": 1' + "0" * 5000))
    refused(["inspect", big_alpha], capsys, names="adapter_config.json: not valid JSON .*5001 digits")

    refused(["quantize", files / "base.safetensors", files / "q.safetensors", "--include", "("], capsys,
            names=r"--include: '\(' is not a valid regular expression")
    (files / "model.onnx").write_bytes(b"\x08\x08\x12\x07refpeft:\x10\x0a")
    refused(["quantize", files / "model.onnx", files / "q.safetensors"], capsys,
            names="model.onnx: an ONNX model, not a safetensors file")
    refused(["fuse", files / "adapter", files / "other", "--weights", "1e300", "1e300", "--combination", "svd",
             "-o", files / "fused"], capsys, names="l1: the weighted sum overflows float64")
    assert not (files / "fused").exists()


def test_out_of_range_options_are_usage_errors(files, capsys):
    for argv, names in [(["fuse", files / "adapter", files / "other", "--combination", "dare_linear", "--density",
                          "0.5", "--seed", "-1", "-o", files / "f"], "--seed: '-1' is not an integer >= 0"),
                        (["memory", "--hidden", "-4096", "--intermediate", "1", "--layers", "1", "--vocab", "3"],
                         "--hidden: '-4096' is not an integer >= 1")]:
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in argv])
        assert exit_.value.code == 2 and names in capsys.readouterr().err


def test_a_malformed_vectors_folder_is_a_format_error(files, capsys):
    vectors = files / "vectors"
    vectors.mkdir()
    (vectors / "index.json").write_text(json.dumps({"format": "refpeft-conformance/1", "cases": [{"x": 1}]}))
    argv = ["conformance", "check", "--results", files, "--vectors", vectors]
    refused(argv, capsys, names="index.json: 'cases' must be a list")
    (vectors / "index.json").write_text(json.dumps({"format": "refpeft-conformance/1", "cases": [{"case": "c"}]}))
    (vectors / "c.json").write_text(json.dumps({"format": "refpeft-conformance/1", "case": "c"}))
    refused(argv, capsys, names="c.json: 'file' must be a string")
    (vectors / "c.json").write_text(json.dumps({"format": "refpeft-conformance/1", "case": "c", "file": "../x",
                                                "sha256": "0", "dtype": "float64", "results": {}}))
    refused(argv, capsys, names="'file' must be a plain file name")


def test_outputs_that_would_destroy_an_input_are_refused(files, capsys):
    before = _snapshot(files)
    base = files / "base.safetensors"
    (files / "hard.safetensors").hardlink_to(base)
    (files / "soft.safetensors").symlink_to(base)
    for argv in (["quantize", base, base], ["quantize", base, files / "hard.safetensors"],
                 ["quantize", files / "soft.safetensors", base],
                 ["merge", files / "adapter", "--base", base, "-o", files / "hard.safetensors"],
                 ["fuse", files / "adapter", files / "other", "-o", files / "other"],
                 ["inspect", files / "adapter", "--plot", files / "adapter" / "adapter_config.json"]):
        refused(argv, capsys, names="would overwrite the input")
    assert {k: v for k, v in _snapshot(files).items() if k in before} == before


def test_outputs_that_cannot_be_written_are_refused_before_any_work(files, capsys):
    (files / "afile").write_bytes(b"x")
    refused(["quantize", files / "base.safetensors", files], capsys, names="is a folder")
    refused(["merge", files / "adapter", "--base", files / "base.safetensors", "-o", files / "afile" / "m"], capsys,
            names="afile is a file, not a folder")
    refused(["demo", "--out", files / "afile"], capsys, names="afile is a file, not a folder")


def test_plot_without_matplotlib_names_the_extra(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec then reports it missing
    refused(["inspect", files / "adapter", "--plot", files / "s.png"], capsys, names=r"pip install 'refpeft\[plot\]'")


def test_ctrl_c_says_interrupted_and_leaves_no_temporary_file(files, capsys, monkeypatch):
    def interrupted(*args, **kwargs):  # Ctrl-C once the temporary file is written, before its rename
        raise KeyboardInterrupt

    monkeypatch.setattr("os.fsync", interrupted)
    before = _snapshot(files)
    assert main(["quantize", str(files / "base.safetensors"), str(files / "q.safetensors"), "--no-progress"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "refpeft quantize: interrupted"
    assert _snapshot(files) == before


def test_a_reader_that_goes_away_ends_the_command_without_a_traceback(files):
    process = subprocess.Popen([sys.executable, "-m", "refpeft", "inspect", str(files / "adapter")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # `| head` that has read what it wanted, before refpeft writes
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_quantize_takes_its_output_as_dash_o_like_every_writer(files, capsys):
    base, out = files / "base.safetensors", files / "q.safetensors"
    refused(["quantize", base, files / "other.safetensors", "-o", out], capsys, names="give the output once")
    refused(["quantize", base], capsys, names="-o/--output")
    assert main(["quantize", str(base), "-o", str(out), "--no-progress"]) == 0 and out.is_file()
    assert main(["quantize", str(base), str(files / "p.safetensors"), "--no-progress"]) == 0  # the old form still works
