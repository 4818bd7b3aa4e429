"""Golden-vector files: one safetensors file and one JSON manifest per case, plus an index.

Layout of a vectors directory (conformance/README.md is the specification for other languages):

    index.json              {"format", "cases": [{"case", "family", "dtype", "manifest", "sha256"}, ...]}
    NAME.json               the manifest of case NAME (sizes, options, parameters, tensors, tolerance)
    NAME.safetensors        tensors "input.X", "expected.Y", "bound.Y"; metadata {"format": FORMAT}

An input or result that is JSON rather than a tensor (the adapter-config cases) lives in the
manifest itself: an input as {"json": VALUE}, a result as {"check": "json", "value": VALUE}.

Both files are written byte-deterministically: JSON with sorted keys, two-space indent, a final
newline and Python's shortest round-trip float repr; safetensors with a single metadata key (the
format orders tensors by dtype then name, so the bytes depend only on the contents).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from refpeft.backend import UNIT_ROUNDOFF
from refpeft.conformance.families import FAMILIES, Case, Vectors
from refpeft.errors import FormatError
from refpeft.checkpoint import SafetensorsFile
from refpeft.io import read_json_object
from refpeft.tolerance import Precision

FORMAT = "refpeft-conformance/1"
INPUT, EXPECTED, BOUND = "input.", "expected.", "bound."


def json_bytes(value: Any) -> bytes:
    """The one JSON serialisation used for every manifest (sorted keys, indent 2, final newline)."""
    return (json.dumps(value, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


def _describe(array: np.ndarray) -> dict[str, Any]:
    return {"dtype": str(array.dtype), "shape": list(array.shape)}


def _is_tensor(value: Any) -> bool:
    """Whether a Vectors entry is a tensor (to the safetensors file) or a JSON value (to the manifest)."""
    return isinstance(value, np.ndarray)


def case_files(case: Case, vectors: Vectors) -> tuple[bytes, dict[str, Any]]:
    """The safetensors bytes and the manifest of one case."""
    tensors = {INPUT + n: a for n, a in vectors.inputs.items() if _is_tensor(a)}
    tensors.update({EXPECTED + n: a for n, a in vectors.expected.items() if _is_tensor(a)})
    tensors.update({BOUND + n: a for n, a in vectors.bounds.items()})
    data = safetensors.numpy.save({n: np.ascontiguousarray(a) for n, a in tensors.items()}, metadata={"format": FORMAT})
    family = FAMILIES[case.family]
    precision = Precision(case.dtype)
    results = {}
    for name, array in vectors.expected.items():
        if not _is_tensor(array):
            results[name] = {"check": "json", "value": array}
            continue
        entry = {"tensor": EXPECTED + name, **_describe(array)}
        if name in vectors.bounds:
            entry.update(check="bound", bound=BOUND + name)
        else:
            entry.update(check="bytes")
        results[name] = entry
    manifest = {
        "format": FORMAT,
        "case": case.name,
        "family": case.family,
        "method": family.method,
        "computes": family.summary,
        "dtype": case.dtype,
        "seed": case.seed,
        "sizes": case.sizes,
        "options": case.options,
        "parameters": vectors.parameters,
        "file": f"{case.name}.safetensors",
        "sha256": hashlib.sha256(data).hexdigest(),
        "inputs": {n: {"tensor": INPUT + n, **_describe(a)} if _is_tensor(a) else {"json": a}
                   for n, a in vectors.inputs.items()},
        "results": results,
        "tolerance": {
            "model": precision.model,
            "storage": precision.storage,
            "accumulation": "float32" if case.dtype in ("float16", "bfloat16") else case.dtype,
            "unit_roundoff": UNIT_ROUNDOFF[case.dtype],
            "reference": "float64, every reduction correctly rounded",
            "rule": "pass iff |actual - expected| <= bound for every element (both read as float64); "
                    "report max(|actual - expected| / bound), 0/0 counting as 0",
        },
    }
    return data, manifest


def index_bytes(manifests: list[dict[str, Any]]) -> bytes:
    """index.json's content for the cases of `manifests`, in their order."""
    entries = [{"case": m["case"], "family": m["family"], "dtype": m["dtype"], "manifest": f"{m['case']}.json",
                "sha256": m["sha256"]} for m in manifests]
    return json_bytes({"format": FORMAT, "cases": entries})


@dataclass(frozen=True)
class LoadedCase:
    """A case read back from disk: its manifest and the three groups of tensors."""

    manifest: dict[str, Any]
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    bounds: dict[str, np.ndarray]

    @property
    def name(self) -> str:
        return self.manifest["case"]


def read_index(directory: Path) -> list[str]:
    """Case names listed in a vectors directory's index.json; FormatError if it is malformed."""
    path = Path(directory) / "index.json"
    if not path.is_file():
        raise FormatError(f"{path}: no such file (generate vectors with `refpeft conformance generate`)")
    index = read_json_object(path)
    _require_format(index, path)
    cases = index.get("cases")
    if not isinstance(cases, list) or not all(isinstance(entry, dict) and _plain_name(entry.get("case"))
                                              for entry in cases):
        raise FormatError(f"{path}: 'cases' must be a list of objects whose 'case' is a plain file name")
    return [entry["case"] for entry in cases]


def read_case(directory: Path, name: str) -> LoadedCase:
    """Read and verify one case (its manifest's form, its file's sha256, a tensor for every result)."""
    directory = Path(directory)
    if not _plain_name(name):
        raise FormatError(f"{directory}: case name {name!r} is not a plain file name")
    manifest_path = directory / f"{name}.json"
    if not manifest_path.is_file():
        raise FormatError(f"{manifest_path}: no such file")
    manifest = read_json_object(manifest_path)
    _check_manifest(manifest, manifest_path)
    data_path = directory / manifest["file"]
    digest = hashlib.sha256(data_path.read_bytes()).hexdigest() if data_path.is_file() else None
    if digest != manifest["sha256"]:
        raise FormatError(f"{data_path}: sha256 {digest} does not match the manifest's {manifest['sha256']}")
    checkpoint = SafetensorsFile(data_path)      # reads BF16 too (as ml_dtypes.bfloat16)
    tensors = {key: np.array(checkpoint.read(key)) for key in checkpoint.keys()}
    groups: dict[str, dict[str, np.ndarray]] = {INPUT: {}, EXPECTED: {}, BOUND: {}}
    for key, array in tensors.items():
        head, dot, rest = key.partition(".")
        if head + dot not in groups:
            raise FormatError(f"{data_path}: unexpected tensor {key!r}")
        groups[head + dot][rest] = array
    groups[INPUT].update({name: spec["json"] for name, spec in manifest.get("inputs", {}).items()
                          if isinstance(spec, dict) and "json" in spec})
    for result, spec in manifest["results"].items():
        if spec["check"] == "json":
            groups[EXPECTED][result] = spec.get("value")
            continue
        needed = [EXPECTED] + ([BOUND] if spec["check"] == "bound" else [])
        missing = [prefix + result for prefix in needed if result not in groups[prefix]]
        if missing:
            raise FormatError(f"{data_path}: no tensor {' or '.join(map(repr, missing))} for result {result!r}")
    return LoadedCase(manifest, groups[INPUT], groups[EXPECTED], groups[BOUND])


CHECKS = ("bytes", "bound", "json")   # how a result is compared (refpeft.conformance.check.check_result)


def _check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """The fields the checker reads, each of the type it needs."""
    _require_format(manifest, path)
    for key in ("case", "file", "sha256", "dtype"):
        if not isinstance(manifest.get(key), str):
            raise FormatError(f"{path}: {key!r} must be a string, got {manifest.get(key)!r}")
    if not _plain_name(manifest["file"]):
        raise FormatError(f"{path}: 'file' must be a plain file name in the same folder, got {manifest['file']!r}")
    results = manifest.get("results")
    if not isinstance(results, dict) or not all(isinstance(spec, dict) and spec.get("check") in CHECKS
                                                for spec in results.values()):
        raise FormatError(f"{path}: 'results' must map each result name to an object whose 'check' is "
                          f"{' or '.join(map(repr, CHECKS))}")


def _require_format(record: dict[str, Any], path: Path) -> None:
    if record.get("format") != FORMAT:
        raise FormatError(f"{path}: format {record.get('format')!r}, expected {FORMAT!r}")


def _plain_name(name: Any) -> bool:
    """A file name without folders: what a vectors directory's index and manifests may refer to."""
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name and "\\" not in name
