"""Outputs under concurrent and killed runs (issue 17): refpeft.io's lock, temporary files and modes.

Specification: while one run writes an output, a second run writing the same output is refused with
an OutputError saying another run is writing it, and the first run's file is the one that lands; the
temporary file of a run killed outright (SIGKILL) is removed by the next write into that folder,
while a live run's temporary file is left alone; no lock or temporary file outlives a finished
write; replacing an existing output keeps that file's permission mode.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from refpeft.cli import main
from refpeft.errors import OutputError
from refpeft.io import atomic_open, atomic_write_bytes

# A run that starts writing `path` through atomic_open, says "writing" and waits to be killed.
WRITER = """
import sys, time
from refpeft.io import atomic_open
with atomic_open(sys.argv[1]) as f:
    f.write(b"partial")
    f.flush()
    print("writing", flush=True)
    time.sleep(600)
"""


def writer(path: Path) -> subprocess.Popen:
    """A process in the middle of writing `path` (WRITER); returns once it holds the output."""
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    return process


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_second_writer_of_the_same_output_is_refused_and_the_first_one_lands(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_open(target) as f:
        f.write(b"first")
        with pytest.raises(OutputError, match=r"out.bin: another run is writing it"):
            atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"first"
    assert names(tmp_path) == ["out.bin"]  # neither the lock nor a temporary file is left


def test_a_second_run_of_the_cli_writing_the_same_output_says_so(tmp_path, capsys):
    rng = np.random.default_rng(0)
    safetensors.numpy.save_file({"l1.weight": rng.standard_normal((6, 64)).astype(np.float32)},
                                str(tmp_path / "base.safetensors"))
    target = tmp_path / "q.safetensors"
    first = writer(target)
    try:
        assert main(["quantize", str(tmp_path / "base.safetensors"), str(target), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "q.safetensors: another run is writing it" in err[0], err
        assert not target.exists()
    finally:
        first.kill()
        first.wait()


def test_a_killed_runs_temporary_file_is_removed_by_the_next_write_in_its_folder(tmp_path):
    killed, live = writer(tmp_path / "big.safetensors"), writer(tmp_path / "live.bin")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        left = [n for n in names(tmp_path) if n.startswith(".big.safetensors.")]
        assert left and all(n.endswith((".tmp", ".lock")) for n in left)  # hidden, never named like an output
        atomic_write_bytes(tmp_path / "other.json", b"{}")
        remaining = names(tmp_path)
        assert not any(n.startswith(".big.safetensors.") for n in remaining), remaining
        assert "other.json" in remaining and not (tmp_path / "big.safetensors").exists()
        assert any(n.startswith(".live.bin.") and n.endswith(".tmp") for n in remaining), remaining  # still writing
    finally:
        live.kill()
        live.wait()
    atomic_write_bytes(tmp_path / "live.bin", b"done")  # its own next write also clears what the kill left
    assert names(tmp_path) == ["live.bin", "other.json"]


def test_replacing_an_output_keeps_its_permission_mode(tmp_path):
    target = tmp_path / "out.json"
    target.write_bytes(b"old")
    for mode in (0o640, 0o604, 0o755):
        os.chmod(target, mode)
        atomic_write_bytes(target, b"new")
        assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == mode


def test_a_failed_adapter_write_leaves_no_empty_folder(tmp_path, monkeypatch):
    """fuse/train/demo on a full disk: the folder write_peft_adapter made is gone, one that was there stays."""
    import numpy as np

    import refpeft.peft_format as peft_format
    from refpeft.adapter import Adapter, ModuleAdapter
    from refpeft.errors import OutputError

    adapter = Adapter({"layer": ModuleAdapter("lora", {"A": np.ones((2, 3)), "B": np.zeros((4, 2))}, alpha=2.0)})

    def full_disk(path, tensors, metadata=None):       # as refpeft.io.atomic_path does: the folder, then ENOSPC
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        raise OutputError(f"{path}: no space left on device")

    monkeypatch.setattr(peft_format, "write_safetensors", full_disk)
    with pytest.raises(OutputError, match="no space left"):
        peft_format.write_peft_adapter(tmp_path / "fused", adapter)
    assert not (tmp_path / "fused").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    with pytest.raises(OutputError):
        peft_format.write_peft_adapter(tmp_path / "run", adapter)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["keep.txt"]


def test_conformance_generate_on_a_full_disk_leaves_the_old_vectors_whole(tmp_path, monkeypatch):
    """`conformance generate` writes every file or none: a failure on the third file changes nothing."""
    import refpeft.io as io_module
    from refpeft.conformance.catalogue import CASES
    from refpeft.conformance.generate import generate
    from refpeft.errors import OutputError

    vectors = tmp_path / "vectors"
    cases = [c for c in CASES if c.name.startswith(("lora-forward", "dora-forward"))][:3]
    generate(vectors, cases=cases)
    first = vectors / f"{cases[0].name}.json"
    first.write_bytes(first.read_bytes() + b" ")               # a run that got as far as this file would rewrite it
    before = {p.name: p.read_bytes() for p in vectors.iterdir()}
    real_open, opened = open, []

    def failing_open(path, mode="r", *args, **kwargs):
        if "w" in mode and ".refpeft-" in str(path):
            opened.append(path)
            if len(opened) == 3:
                raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(io_module, "open", failing_open, raising=False)
    with pytest.raises(OutputError, match="No space left on device"):
        generate(vectors, cases=cases)
    assert {p.name: p.read_bytes() for p in vectors.iterdir()} == before      # no half set, no temporaries
