"""Checking one implementation against the golden vectors.

The Python protocol for any implementation (the runners in refpeft_peers follow it):

    def impl(manifest: dict, inputs: dict[str, numpy.ndarray]) -> dict[str, numpy.ndarray] | None

`manifest` is the case's JSON manifest (family, dtype, options, parameters such as the LoRA
scaling); `inputs` holds the input tensors in the case's dtype. Return every result the manifest
lists, by name, as arrays of any float dtype (bit-exact results in their exact dtype), or None
(or raise `Unsupported`) for a case the implementation does not cover: it is reported, not failed.
`refpeft conformance check --impl module:function` imports such a function and runs it.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from refpeft.conformance.vectors import LoadedCase, read_case, read_index
from refpeft.errors import ConfigError
from refpeft.io import read_json_object
from refpeft.tolerance import compare

Implementation = Callable[[dict, dict], "dict[str, Any] | None"]


class Unsupported(Exception):
    """Raised by an implementation for a case it does not cover (reported as unsupported, not failed)."""


@dataclass(frozen=True)
class ResultCheck:
    """One result of one case: by bound (ratio), bit for bit (differing bytes) or as a JSON value."""

    name: str
    check: str                       # "bound", "bytes" or "json"
    passed: bool
    ratio: float | None = None       # max |actual - expected| / bound
    max_error: float | None = None
    differing_bytes: int | None = None
    message: str = ""


@dataclass(frozen=True)
class CaseReport:
    """How one implementation did on one case."""

    implementation: str
    case: str
    dtype: str
    status: str                      # pass, fail, known-deviation, unsupported, error
    results: tuple[ResultCheck, ...] = ()
    message: str = ""
    finding: str = ""                # the FINDINGS.md entry a known deviation refers to

    @property
    def worst_ratio(self) -> float | None:
        ratios = [r.ratio for r in self.results if r.ratio is not None]
        return max(ratios) if ratios else None

    @property
    def differing_bytes(self) -> int | None:
        counts = [r.differing_bytes for r in self.results if r.differing_bytes is not None]
        return sum(counts) if counts else None


def check_result(name: str, spec: dict[str, Any], actual: Any, loaded: LoadedCase) -> ResultCheck:
    """Compare one returned result with the expected tensor (or JSON value) of the case."""
    expected = loaded.expected[name]
    if actual is None:
        return ResultCheck(name, spec["check"], False, message="not returned")
    if spec["check"] == "json":
        difference = json_difference(actual, expected)
        return ResultCheck(name, "json", difference is None, message=difference or "")
    actual = np.asarray(actual)
    if tuple(actual.shape) != tuple(expected.shape):
        return ResultCheck(name, spec["check"], False,
                           message=f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if spec["check"] == "bytes":
        if actual.dtype != expected.dtype:
            return ResultCheck(name, "bytes", False, message=f"dtype {actual.dtype}, expected {expected.dtype}")
        bytes_actual = np.ascontiguousarray(actual).view(np.uint8).reshape(-1)
        bytes_expected = np.ascontiguousarray(expected).view(np.uint8).reshape(-1)
        where = np.flatnonzero(bytes_actual != bytes_expected)
        message = "" if where.size == 0 else (f"first differing byte at offset {int(where[0])}: "
                                             f"{int(bytes_actual[where[0]]):#04x} vs expected {int(bytes_expected[where[0]]):#04x}")
        return ResultCheck(name, "bytes", where.size == 0, differing_bytes=int(where.size), message=message)
    if actual.dtype.kind != "f" and not str(actual.dtype) == "bfloat16":
        return ResultCheck(name, "bound", False, message=f"dtype {actual.dtype} is not floating")
    c = compare(actual.astype(np.float64), expected, loaded.bounds[name])
    return ResultCheck(name, "bound", c.passed, ratio=c.ratio, max_error=c.max_error,
                       message="" if c.passed else c.describe())


def json_difference(actual: Any, expected: Any, where: str = "") -> str | None:
    """None when `actual` equals the JSON value `expected`, else where they first differ and how.

    Objects compare key by key (the same keys), arrays element by element, numbers as float64
    (16 == 16.0), true/false only with booleans (not with 1/0), strings and null exactly."""
    at = f"at {where}: " if where else ""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{at}{_short(actual)}, expected an object"
        for key in sorted(set(expected) | set(actual), key=str):
            if key not in actual or key not in expected:
                return f"{at}key {key!r} {'missing' if key not in actual else 'not expected'}"
            found = json_difference(actual[key], expected[key], f"{where}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(expected, list):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            return f"{at}{_short(actual)}, expected a list of {len(expected)}"
        return next((d for i, (a, e) in enumerate(zip(actual, expected))
                     if (d := json_difference(a, e, f"{where}[{i}]"))), None)
    numbers = (int, float, np.integer, np.floating)
    same = (isinstance(actual, (bool, np.bool_)) and isinstance(expected, bool) and bool(actual) == expected) or (
        isinstance(expected, numbers) and not isinstance(expected, bool) and isinstance(actual, numbers)
        and not isinstance(actual, (bool, np.bool_)) and float(actual) == float(expected)) or (
        (expected is None or isinstance(expected, str)) and type(actual) is type(expected) and actual == expected)
    return None if same else f"{at}{_short(actual)}, expected {_short(expected)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_case(impl: Implementation, loaded: LoadedCase, *, implementation: str,
               known_deviations: dict[str, str] | None = None) -> CaseReport:
    """Run `impl` on one case and compare every result; exceptions become an `error` status."""
    m = loaded.manifest
    base = dict(implementation=implementation, case=loaded.name, dtype=m["dtype"])
    inputs = {name: copy.deepcopy(value) for name, value in loaded.inputs.items()}   # arrays and JSON values
    try:
        outputs = impl(m, inputs)
    except Unsupported as exc:
        return CaseReport(**base, status="unsupported", message=str(exc))
    except Exception as exc:  # an implementation's failure is a result to report, whatever it is
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return CaseReport(**base, status="error", message=last)
    if outputs is None:
        return CaseReport(**base, status="unsupported")
    results = tuple(check_result(name, spec, outputs.get(name), loaded) for name, spec in sorted(m["results"].items()))
    passed = all(r.passed for r in results)
    finding = (known_deviations or {}).get(loaded.name, "")
    if passed:
        status = "pass"
    else:
        status = "known-deviation" if finding else "fail"
    failing = [f"{r.name}: {r.message}" for r in results if r.message]
    return CaseReport(**base, status=status, results=results, message="; ".join(failing), finding=finding)


def check_directory(impl: Implementation, directory: str | Path, *, implementation: str,
                    known_deviations: dict[str, str] | None = None,
                    names: Iterable[str] | None = None) -> list[CaseReport]:
    """Check `impl` on every case of a vectors directory (or the named ones)."""
    selected = list(names) if names is not None else read_index(Path(directory))
    return [check_case(impl, read_case(Path(directory), name), implementation=implementation,
                       known_deviations=known_deviations) for name in selected]


def results_directory(directory: str | Path) -> Implementation:
    """The files-only protocol: an implementation in any language writes, for each case NAME it
    covers, `DIRECTORY/NAME.safetensors` holding one tensor per result name, and for JSON results
    (the adapter_config family) `DIRECTORY/NAME.json`, an object {result name: value}; cases with
    neither file are unsupported. `refpeft conformance check --results DIRECTORY` reads them."""
    from refpeft.checkpoint import SafetensorsFile

    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"--results {root}: no such directory")

    def read_results(manifest: dict, inputs: dict) -> dict[str, Any]:
        path, text = root / f"{manifest['case']}.safetensors", root / f"{manifest['case']}.json"
        if not path.is_file() and not text.is_file():
            raise Unsupported(f"no {path.name} or {text.name} in {root}")
        found = read_json_object(text) if text.is_file() else {}
        if path.is_file():
            results = SafetensorsFile(path)
            found.update({name: np.array(results.read(name)) for name in results.keys()})
        return found

    return read_results


def load_implementation(spec: str) -> Implementation:
    """Import `module:function` (the `--impl` argument)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"--impl must be MODULE:FUNCTION, got {spec!r}")
    # the current folder first, as `python -m` would have it: the `refpeft` script's own sys.path[0]
    # is its bin folder, so `check --impl mymod:fn` next to mymod.py would otherwise not find it
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} (searched the current folder {cwd} and "
                          f"the installed packages): {exc}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    impl = getattr(module, attribute, None)
    if not callable(impl):
        raise ConfigError(f"{module_name!r} has no callable {attribute!r}")
    return impl


@dataclass
class Summary:
    """Counts per status, and the worst ratio among passing bound checks."""

    counts: dict[str, int] = field(default_factory=dict)
    worst_ratio: float = 0.0

    @classmethod
    def of(cls, reports: Iterable[CaseReport]) -> "Summary":
        s = cls()
        for r in reports:
            s.counts[r.status] = s.counts.get(r.status, 0) + 1
            if r.status == "pass" and r.worst_ratio is not None:
                s.worst_ratio = max(s.worst_ratio, r.worst_ratio)
        return s

    @property
    def ok(self) -> bool:
        return self.counts.get("fail", 0) == 0 and self.counts.get("error", 0) == 0
