"""Atomic writes: what refpeft writes gets the permissions open() / mkdir() would give it (less the umask)."""

from __future__ import annotations

import os

import numpy as np

from refpeft.io import atomic_write_bytes, write_safetensors


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    expected = 0o666 & ~_umask()
    atomic_write_bytes(tmp_path / "a.json", b"{}")
    write_safetensors(tmp_path / "w.safetensors", {"w": np.zeros(2, dtype=np.float32)})
    with open(tmp_path / "plain.txt", "wb"):
        pass
    for name in ("a.json", "w.safetensors", "plain.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


def test_onnx_adapter_files_get_the_usual_permissions(tmp_path):
    import pytest

    pytest.importorskip("onnxruntime")
    from refpeft_onnx.adapter_files import write_onnx_adapter

    write_onnx_adapter(tmp_path / "a.onnx_adapter", {"x": np.ones(2, dtype=np.float32)})
    assert (tmp_path / "a.onnx_adapter").stat().st_mode & 0o777 == 0o666 & ~_umask()
