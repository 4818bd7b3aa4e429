"""A plain install: `generate` skips (and names) cases needing a missing extra; `check --impl` imports from the current folder."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from refpeft.cli import main
from refpeft.conformance import families
from refpeft.conformance.catalogue import CASES
from refpeft.conformance.check import load_implementation
from refpeft.conformance.generate import generate_available
from refpeft.conformance.vectors import read_index
from refpeft.errors import ConfigError

COMMITTED = Path(__file__).resolve().parent.parent / "conformance" / "vectors"
SUBSET = [c for c in CASES if c.family in ("fusion_cat", "adam_step")]


def _without(monkeypatch, family: str) -> None:
    """Pretend `family` needs a module that is not installed (as export_forward needs onnx)."""
    monkeypatch.setitem(families.FAMILIES, family,
                        dataclasses.replace(families.FAMILIES[family], requires=("no_such_extra_module",)))


def test_generate_names_what_it_skipped_and_why(monkeypatch, tmp_path, capsys):
    _without(monkeypatch, "fusion_cat")
    assert main(["conformance", "generate", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    skipped = [c.name for c in CASES if c.family == "fusion_cat"]
    line = next(line for line in out.splitlines() if line.startswith("skipped"))
    assert f"skipped {len(skipped)} case(s) that need no_such_extra_module" in line
    assert all(name in line for name in skipped)
    written = set(read_index(tmp_path))
    assert not written & set(skipped) and len(written) == len(CASES) - len(skipped)


def test_a_skipped_case_keeps_its_previous_files_and_index_entry(monkeypatch, tmp_path):
    manifests, skipped = generate_available(tmp_path, cases=SUBSET)
    assert not skipped
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _without(monkeypatch, "fusion_cat")
    manifests, skipped = generate_available(tmp_path, cases=SUBSET)
    assert sorted(skipped) == sorted(c.name for c in SUBSET if c.family == "fusion_cat")
    assert len(manifests) == len(SUBSET) - len(skipped)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before     # index.json included


IMPL = '''
from refpeft_peers.refpeft_self import run


def impl(manifest, inputs):
    return run(manifest, inputs)
'''


def test_check_imports_the_implementation_from_the_current_folder(monkeypatch, tmp_path, capsys):
    (tmp_path / "my_kernel_in_cwd.py").write_text(IMPL)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    case = "multi-bgmv-lora-float32"
    assert main(["conformance", "check", "--impl", "my_kernel_in_cwd:impl", "--vectors", str(COMMITTED),
                 "--case", case]) == 0
    assert f"{case}" in capsys.readouterr().out
    assert str(tmp_path) not in sys.path          # the folder is searched for the import only


def test_an_unknown_module_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"not_here_module_xyz.*current folder"):
        load_implementation("not_here_module_xyz:impl")
