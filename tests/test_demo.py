"""`refpeft demo --layer` (refpeft.demo): the one-layer job learns the hidden delta, checks its gradients,
and runs as a CLI. The whole-model demo (`refpeft demo`) is tested in tests/test_demo_model.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from refpeft.cli import main
from refpeft.demo import METHODS, DemoConfig, run_demo
from refpeft.errors import ConfigError


@pytest.mark.parametrize("method", sorted(METHODS))
def test_demo_learns_the_hidden_delta(method):
    report = run_demo(DemoConfig(method=method))
    assert report.loss_drop >= 100
    assert report.captured_energy > 0.99
    assert report.gradients_ok, report.gradient_errors
    assert report.trainable_parameters < report.full_parameters


@pytest.mark.parametrize("method,dtype", [("lora", "float32"), ("lora", "bfloat16"), ("qlora", "float64")])
def test_demo_trains_in_other_precisions(method, dtype):
    report = run_demo(DemoConfig(method=method, dtype=dtype, steps=200))
    assert report.loss_drop >= 100 and report.captured_energy > 0.99 and report.gradients_ok


def test_qlora_refuses_precisions_it_does_not_emulate():
    with pytest.raises(ConfigError, match="qlora trains in bfloat16, float64, not float32"):
        run_demo(DemoConfig(method="qlora", dtype="float32"))


def test_loraplus_groups_train_too():
    assert run_demo(DemoConfig(loraplus_ratio=4.0, lr=5e-3, steps=200)).loss_drop >= 100


def test_same_seed_same_losses():
    a, b = run_demo(DemoConfig(steps=5)), run_demo(DemoConfig(steps=5))
    assert a.losses == b.losses


def test_cli_reports_and_refuses_bad_options(capsys):
    assert main(["demo", "--layer", "--steps", "120", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("refpeft demo --layer: lora r=8")
    assert "captured energy" in out and "gradient check  ok" in out
    assert main(["demo", "--layer", "--steps", "0", "--no-progress"]) == 2
    assert "steps must be at least 1" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="hidden rank"):
        run_demo(DemoConfig(hidden_rank=0))


def test_demo_exports_its_adapter_and_onnx_runtime_agrees(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="onnxruntime is in the onnx extra")
    assert main(["demo", "--layer", "--method", "dora", "--steps", "150", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("of the float32 bound") == 2 and "FAILED" not in out
    assert {p.name for p in tmp_path.iterdir()} >= {"merged.onnx", "unmerged.onnx", "unmerged.onnx_adapter"}


def test_python_dash_m_and_help():
    done = subprocess.run([sys.executable, "-m", "refpeft", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in done.stdout and "refpeft COMMAND --help" in done.stdout
