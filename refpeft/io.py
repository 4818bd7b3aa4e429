"""Files: atomic writes and checked safetensors reads. Nothing here ever unpickles.

- `atomic_write_bytes` (and `atomic_open`, its streaming form) writes to a temporary file in the
  target's directory, flushes and fsyncs it, then renames it over the target (`os.replace`,
  atomic on POSIX): an interrupted write leaves the previous file intact and never a partial one.
- `read_safetensors` turns every way a file can be wrong (missing, truncated, a corrupt header,
  data that does not fit its declared shape) into a FormatError naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, so safetensors can read and write it)
import numpy as np
import safetensors
import safetensors.numpy

from refpeft.errors import FormatError


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: a temporary file in the target's directory that is
    flushed, fsynced and renamed over `path` when the block ends normally, and deleted (leaving
    any previous `path` untouched) when the block raises or is interrupted."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        usual_permissions(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def usual_permissions(path: str | os.PathLike) -> None:
    """Give a file made by mkstemp (0600) or a folder made by mkdtemp (0700) the permissions open()
    or mkdir() would have given it: 0666 or 0777 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temporary file + fsync + rename); returns the path."""
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> Path:
    """Save NumPy arrays as a safetensors file, atomically."""
    contiguous = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    return atomic_write_bytes(path, safetensors.numpy.save(contiguous, metadata=metadata))


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; FormatError on any defect."""
    source = Path(path)
    if not source.is_file():
        raise FormatError(f"{source}: no such file")
    try:
        with safetensors.safe_open(str(source), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except FormatError:
        raise
    except Exception as exc:  # safetensors raises several foreign types for corrupt files
        raise FormatError(f"{source}: not a readable safetensors file ({exc})") from None
    return tensors, metadata


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file holding one object (a config); FormatError naming the file if it is not one."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def metadata_json(metadata: dict[str, str], key: str, *, source: str | os.PathLike) -> Any:
    """A JSON value stored under `key` in safetensors metadata; FormatError if absent or invalid."""
    if key not in metadata:
        raise FormatError(f"{source}: metadata key {key!r} is missing")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise FormatError(f"{source}: metadata key {key!r} is not valid JSON ({exc})") from None
