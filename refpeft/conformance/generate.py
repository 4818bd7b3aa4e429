"""`refpeft conformance generate`: write every catalogued case's golden vectors into a directory."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from refpeft.conformance.catalogue import CASES
from refpeft.conformance.families import Case, make_vectors
from refpeft.conformance.vectors import write_case, write_index


def generate(directory: str | Path, *, cases: Iterable[Case] = CASES, progress: bool = False) -> list[dict]:
    """Generate the vectors of `cases` into `directory`, replacing its previous case files.

    Files of cases no longer in the catalogue are removed, but only from a directory that already
    holds an index.json (a vectors directory), never from an arbitrary one.
    """
    directory = Path(directory)
    cases = list(cases)
    if (directory / "index.json").is_file():
        keep = {f"{c.name}{suffix}" for c in cases for suffix in (".json", ".safetensors")} | {"index.json"}
        for stale in [*directory.glob("*.json"), *directory.glob("*.safetensors")]:
            if stale.name not in keep:
                stale.unlink()
    iterator = cases
    if progress:
        from tqdm import tqdm

        iterator = tqdm(cases, desc="generating cases", unit="case")
    manifests = [write_case(directory, case, make_vectors(case)) for case in iterator]
    write_index(directory, manifests)
    return manifests
