"""Checks the conformance test files share: committed vectors regenerate, every case passes, a wrong
kernel fails naming the case and element, and the bounds hold on draws other than the committed ones.

COMMITTED is conformance/vectors; each helper asserts, so a test body is the call and its own checks.
"""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pytest

from refpeft.conformance.check import check_directory
from refpeft.conformance.generate import generate
from refpeft.conformance.report import run_report
from refpeft.conformance.vectors import read_case
from refpeft_peers import Runner
from refpeft_peers.refpeft_self import run as refpeft_run

COMMITTED = Path(__file__).resolve().parent.parent / "conformance" / "vectors"


def assert_regenerated_byte_identically(cases: Sequence[Any], tmp_path: Path) -> None:
    """`generate` writes every case's .json and .safetensors byte for byte as committed."""
    generate(tmp_path, cases=cases)
    for case in cases:
        for suffix in (".json", ".safetensors"):
            written, committed = tmp_path / f"{case.name}{suffix}", COMMITTED / f"{case.name}{suffix}"
            assert written.read_bytes() == committed.read_bytes(), case.name


def assert_every_case_passes(runner: Runner, names: Sequence[str], folder: Path = COMMITTED) -> list:
    """`runner` passes each named case in `folder`; the reports, for checks of their ratios."""
    reports = check_directory(runner.run, folder, implementation=runner.name, names=names)
    assert [r.status for r in reports] == ["pass"] * len(names), [(r.case, r.message) for r in reports]
    return reports


def assert_wrong_kernel_fails(kernel: Callable[[dict, dict], dict], case: str, results: Iterable[str], *,
                              family: str | None = None) -> None:
    """The report on `case` (of `family`, when given) with `kernel` fails, naming each of `results` with its
    worst element, far past the bound."""
    if family is not None:
        assert read_case(COMMITTED, case).manifest["family"] == family
    out = io.StringIO()
    assert run_report(COMMITTED, runners=[Runner("wrong-kernel", kernel)], names=[case], out=out) is False
    line = next(line for line in out.getvalue().splitlines() if line.startswith(case))
    assert " fail " in line
    for result in results:
        found = re.search(rf"{result}: worst at \[([\d, ]+)\]: .*error/bound ([0-9.e+]+|inf)\)", line)
        assert found, (result, line)
        assert float(found.group(2)) > 10.0


def assert_fresh_draw_passes(cases: Iterable[Any], label: str, seed: int, tmp_path: Path) -> list:
    """The float32 case `label` drawn again (seed 10000 * seed + its own) into tmp_path: refpeft and PEFT
    (skipped when torch or peft is missing) both pass it; their reports, refpeft's first."""
    peft_torch = pytest.importorskip("refpeft_peers.peft_torch", reason="needs torch and peft")
    committed = next(c for c in cases if c.name == f"{label}-float32")
    case = dataclasses.replace(committed, seed=10_000 * seed + committed.seed)
    generate(tmp_path, cases=[case])
    return [report for runner in (Runner("refpeft", refpeft_run), peft_torch.implementations()[0])
            for report in assert_every_case_passes(runner, [case.name], tmp_path)]
