"""`refpeft conformance generate`: write every catalogued case's golden vectors into a directory."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from refpeft.conformance.catalogue import CASES
from refpeft.conformance.families import Case, make_vectors, missing_requirements
from refpeft.conformance.vectors import case_files, index_bytes, json_bytes
from refpeft.io import read_json_object, write_files_together


def generate(directory: str | Path, *, cases: Iterable[Case] = CASES, progress: bool = False) -> list[dict]:
    """Generate the vectors of `cases` into `directory`, replacing its previous case files.

    Files of cases no longer in the catalogue are removed, but only from a directory that already
    holds an index.json (a vectors directory), never from an arbitrary one.
    """
    return generate_available(directory, cases=cases, progress=progress, skip_missing=False)[0]


def generate_available(directory: str | Path, *, cases: Iterable[Case] = CASES, progress: bool = False,
                       skip_missing: bool = True) -> tuple[list[dict], dict[str, list[str]]]:
    """`generate`, skipping the cases whose family needs a module not importable here (an extra).

    Returns the manifests written and, per skipped case, the missing modules. A skipped case keeps
    the files and index entry it already had in `directory` (a checkout's committed vectors stay
    whole without the extra); in a new directory it is simply absent.
    """
    directory = Path(directory)
    cases = list(cases)
    skipped = {c.name: missing_requirements(c) for c in cases} if skip_missing else {}
    skipped = {name: missing for name, missing in skipped.items() if missing}
    kept = [m for m in (_previous_manifest(directory, name) for name in skipped) if m is not None]
    iterator = [c for c in cases if c.name not in skipped]
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="generating cases", unit="case")
    files: dict[str, bytes] = {}                 # every case first, in memory (a few MB): then one write
    manifests = []
    for case in iterator:
        data, manifest = case_files(case, make_vectors(case))
        files.update({manifest["file"]: data, f"{case.name}.json": json_bytes(manifest)})
        manifests.append(manifest)
    order = {c.name: i for i, c in enumerate(cases)}
    files["index.json"] = index_bytes(sorted(manifests + kept, key=lambda m: order[m["case"]]))
    write_files_together(directory, files)       # all or none: a full disk leaves the old set whole
    if (directory / "index.json").is_file():
        keep = {f"{c.name}{suffix}" for c in cases for suffix in (".json", ".safetensors")} | {"index.json"}
        for stale in [*directory.glob("*.json"), *directory.glob("*.safetensors")]:
            if stale.name not in keep:
                stale.unlink()
    return manifests, skipped


def _previous_manifest(directory: Path, name: str) -> dict | None:
    """The manifest a skipped case already has in `directory`, when both its files are there."""
    path = directory / f"{name}.json"
    if not (path.is_file() and (directory / f"{name}.safetensors").is_file()):
        return None
    return read_json_object(path)
