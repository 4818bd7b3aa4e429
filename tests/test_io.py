"""refpeft.io: atomic writes, checked outputs, checked JSON.

Specification: what refpeft writes gets the permissions open() / mkdir() would give it (less the
umask); an output that is a folder, lies under a file, or sits on a full or read-only file system
is an OutputError naming it and leaves any previous file as it was; an output that is one of the
inputs (by path or through a link) is refused before anything is written; JSON that Python's parser
cannot hold (too deep, too long an integer) is a FormatError naming its source.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from refpeft.errors import FormatError, OutputError
from refpeft.io import atomic_open, atomic_write_bytes, check_outputs, parse_json, read_json_object, write_safetensors


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
    pytest.importorskip("onnxruntime")
    from refpeft_onnx.adapter_files import write_onnx_adapter

    write_onnx_adapter(tmp_path / "a.onnx_adapter", {"x": np.ones(2, dtype=np.float32)})
    assert (tmp_path / "a.onnx_adapter").stat().st_mode & 0o777 == 0o666 & ~_umask()


# --- outputs that cannot be written, and outputs that would destroy an input -----------------------


def test_an_output_that_is_a_folder_or_under_a_file_is_an_output_error(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(OutputError, match="is a folder"):
        atomic_write_bytes(tmp_path, b"{}")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        atomic_write_bytes(tmp_path / "file" / "out.json", b"{}")
    assert (tmp_path / "file").read_bytes() == b"x"


def test_a_full_or_read_only_file_system_is_an_output_error_and_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(OutputError, match="out.bin: cannot be written .No space left on device"):
        with atomic_open(target) as f:
            f.write(b"new")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write() raises on a full disk
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(OutputError, match="out.bin: cannot be written .Read-only file system"):
        atomic_write_bytes(target, b"new")


def test_check_outputs_refuses_an_input_by_path_and_through_links(tmp_path):
    source = tmp_path / "in.safetensors"
    source.write_bytes(b"data")
    (tmp_path / "hard").hardlink_to(source)
    (tmp_path / "soft").symlink_to(source)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    for output, inputs in [(source, [source]), (tmp_path / "hard", [source]), (tmp_path / "soft", [source]),
                           (tmp_path / "." / "in.safetensors", [source]),
                           (folder / "adapter_config.json", [folder])]:
        with pytest.raises(OutputError, match="would overwrite the input"):
            check_outputs([output], inputs=inputs)
    check_outputs([tmp_path / "new.safetensors", folder / "other.json"], inputs=[source, folder])  # no error


def test_json_python_cannot_hold_is_a_format_error(tmp_path):
    for text in ("[" * 100_000 + "]" * 100_000, "7" * 5000, "{"):
        with pytest.raises(FormatError, match="where: (JSON nested too deeply|not valid JSON)"):
            parse_json(text, source="where")
    (tmp_path / "deep.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(FormatError, match="deep.json: JSON nested too deeply"):
        read_json_object(tmp_path / "deep.json")
