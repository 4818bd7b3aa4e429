"""`refpeft conformance report`: every given runner on every case, one table per implementation.

The report takes its runners as an argument and imports no peer: the runners that wrap real
implementations live in conformance/refpeft_peers (which imports refpeft, never the reverse), and
the CLI verb (refpeft.commands.conformance) loads them and passes them here.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, TextIO

from refpeft.conformance.check import CaseReport, Summary, check_directory

HEADER = ("case", "dtype", "result", "error/bound", "bytes", "note")


@dataclass(frozen=True)
class Runner:
    """One implementation to report on: its name, its function (the protocol of
    refpeft.conformance.check) and the cases it is known to fail, each with the
    conformance/FINDINGS.md entry that explains why (shown, not counted as failures)."""

    name: str
    run: Callable
    known_deviations: dict[str, str] = field(default_factory=dict)


def _ratio(r: CaseReport) -> str:
    if r.worst_ratio is None:
        return "-"
    return "inf" if math.isinf(r.worst_ratio) else f"{r.worst_ratio:.2e}"


def _row(r: CaseReport) -> tuple[str, ...]:
    bytes_ = "-" if r.differing_bytes is None else str(r.differing_bytes)
    note = r.finding if r.status == "known-deviation" else r.message
    return (r.case, r.dtype, r.status, _ratio(r), bytes_, note)


def format_table(reports: list[CaseReport]) -> str:
    """A plain-text table: case, dtype, result, worst error / bound, differing bytes, note."""
    rows = [HEADER, *(_row(r) for r in reports)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + ("  " + row[-1] if row[-1] else "")
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def format_summary(name: str, reports: list[CaseReport]) -> str:
    """Counts per status, and over passing float32 cases the largest and smallest worst error / bound:
    the largest says how close to failing a peer came, the smallest how loose the bound is at worst."""
    s = Summary.of(reports)
    counts = ", ".join(f"{n} {k}" for k, n in sorted(s.counts.items()))
    f32 = [r.worst_ratio for r in reports if r.dtype == "float32" and r.status == "pass" and r.worst_ratio is not None]
    tight = (f"; float32 error/bound per case: max {max(f32):.2e}, min {min(f32):.2e}" if f32 else "")
    return f"{name}: {counts}{tight}"


def run_report(directory: str | Path | None, *, runners: Iterable[Runner], missing: Mapping[str, str] | None = None,
               names: list[str] | None = None, out: TextIO) -> bool:
    """Check every runner on the vectors in `directory`; print the tables.

    `missing` names the runners that could not run here, each with the reason (listed in the
    summary). With `directory` None the vectors are generated afresh into a temporary directory.
    Returns True when no runner has an unexpected failure or error.
    """
    missing = dict(missing or {})
    with tempfile.TemporaryDirectory() as tmp:
        if directory is None:
            from refpeft.conformance.generate import generate

            directory = Path(tmp)
            generate(directory)
        ok = True
        summaries = []
        for runner in runners:
            reports = check_directory(runner.run, directory, implementation=runner.name,
                                      known_deviations=runner.known_deviations, names=names)
            covered = [r for r in reports if r.status != "unsupported"]
            print(f"\n== {runner.name} ==", file=out)
            print(format_table(covered) if covered else "(no case covered)", file=out)
            summaries.append(format_summary(runner.name, reports))
            ok = ok and Summary.of(reports).ok
    print("\n== summary ==", file=out)
    for line in summaries:
        print(line, file=out)
    for module, reason in sorted(missing.items()):
        print(f"{module}: not run: {reason}", file=out)
    print("all expected passes pass" if ok else "UNEXPECTED FAILURES (see the tables above)", file=out)
    return ok
