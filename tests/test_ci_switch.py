"""REFPEFT_REQUIRE_PEERS=1 (.ci/run) turns a peer's skip into a failure that names it; GPU skips stay skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = '''
import pytest

def test_a_peer_that_is_not_there():
    pytest.importorskip("refpeft_no_such_peer", reason="the no-such-peer extra")

def test_a_gpu_check():
    pytest.skip("CUDAExecutionProvider is not available (needs onnxruntime-gpu and a GPU)")
'''


def _run(tmp_path: Path, require: str | None) -> subprocess.CompletedProcess:
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("REFPEFT_REQUIRE_PEERS", "CI")}
    if require is not None:
        env["REFPEFT_REQUIRE_PEERS"] = require
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "--rootdir", str(tmp_path), str(probe)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_the_switch_fails_a_peer_skip_and_keeps_a_gpu_skip(tmp_path):
    required = _run(tmp_path, "1")
    assert required.returncode != 0
    assert "1 failed, 1 skipped" in required.stdout and "the no-such-peer extra" in required.stdout
    relaxed = _run(tmp_path, None)
    assert relaxed.returncode == 0 and "2 skipped" in relaxed.stdout
