"""Files: atomic writes and checked safetensors reads. Nothing here ever unpickles.

- `atomic_write_bytes` (and `atomic_open`, its streaming form, and `atomic_path` for writers that
  take a file name) writes to a temporary file in the target's directory, flushes and fsyncs it,
  then renames it over the target (`os.replace`, atomic on POSIX): an interrupted write leaves the
  previous file intact and never a partial one. Replacing a file keeps its permission mode; a new
  file gets 0666 less the umask, as open() would give it.
- One run writes an output at a time: `atomic_path` holds an exclusive lock (`flock` on the hidden
  file `.NAME.refpeft.lock` beside it, which the kernel releases when the holder exits, even by
  SIGKILL) and a second run writing the same output is an OutputError saying so. The temporary file
  is named `.NAME.refpeft-XXXXXXXX.tmp`; one whose run was killed outright is abandoned, and the
  next write into that folder removes it (and its lock file) once it holds that output's lock, so a
  live run's temporary file is never touched and an abandoned one is never taken for an output.
- An output that cannot be written (a folder, under a file, on a read-only or full file system)
  is an OutputError naming it, and `check_outputs` refuses an output that is one of the run's
  inputs (the same path, or the same file through a link) before anything is read or written.
- `read_safetensors` turns every way a file can be wrong (missing, truncated, a corrupt header,
  data that does not fit its declared shape) into a FormatError naming the file, and reads every
  dtype the format has (float8 too); `require_float` refuses, by name, a tensor that is not a float
  weight where one is expected; `parse_json` does
  the same for JSON, including what Python's parser cannot hold (nesting deeper than its recursion
  limit, integers of more than 4300 digits).
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping

import ml_dtypes  # (registers bfloat16 with NumPy, so safetensors can write it)
import numpy as np
import safetensors.numpy

from refpeft.errors import FormatError, OutputError

try:
    import fcntl
except ImportError:  # Windows: no flock; outputs are written without the lock
    fcntl = None

# What only writing can fail with: the output's file system is full, over quota, read-only, or the
# file too large for it. Raised from inside an atomic_open block, these are the output's fault.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file name in the target's folder to write `path` through (for writers that take
    a file name): renamed over `path` when the block ends normally, deleted (leaving any previous
    `path` untouched) when the block raises or is interrupted. The block holds `path`'s lock
    (`output_lock`); a write the file system refuses (full, read-only) is an OutputError naming
    `path`."""
    target = output_file(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{target}: cannot be written ({exc.strerror or exc})") from None
    with output_lock(target):
        remove_abandoned_temporaries(target.parent, writing=target.name)
        try:
            handle, tmp = tempfile.mkstemp(prefix=f".{target.name}{TEMPORARY_MARK}", suffix=".tmp", dir=target.parent)
            os.close(handle)
        except OSError as exc:
            raise OutputError(f"{target}: cannot be written ({exc.strerror or exc})") from None
        try:
            yield Path(tmp)
            if target.exists():  # a replaced file keeps its mode; a new one gets open()'s
                os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
            else:
                usual_permissions(tmp)
            os.replace(tmp, target)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
                raise OutputError(f"{target}: cannot be written ({exc.strerror}); it was left as it was") from None
            raise


# The hidden files beside an output being written: `.NAME.refpeft-XXXXXXXX.tmp` (mkstemp's eight
# random characters) and `.NAME.refpeft.lock`.
TEMPORARY_MARK, LOCK_SUFFIX = ".refpeft-", ".refpeft.lock"
BESIDE_OUTPUT = re.compile(r"\.(?P<name>.+)(?:(?P<tmp>\.refpeft-[a-z0-9_]{8}\.tmp)|\.refpeft\.lock)")
LOCK_GRACE_S = 0.1  # how long a busy lock is retried: another run's clean-up holds it only for an instant


@contextmanager
def output_lock(target: Path, *, grace_s: float = LOCK_GRACE_S) -> Iterator[None]:
    """Hold the exclusive lock on writing `target` for the block; OutputError if another run still
    holds it after `grace_s` seconds.

    The lock is `flock` on `.NAME.refpeft.lock`, removed when the block ends. A run that opened that
    file just before its holder removed it would hold a lock nobody else sees, so after locking it
    checks that the name still leads to the file it locked, and starts again if not."""
    lock = target.with_name(f".{target.name}{LOCK_SUFFIX}")
    deadline = time.monotonic() + grace_s
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise OutputError(f"{target}: cannot be written ({exc.strerror or exc})") from None
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(grace_s / 10)
                continue
            raise OutputError(f"{target}: another run is writing it; wait for that run to end or choose "
                              "another output") from None
        except OSError:  # a file system without flock (ENOLCK, EOPNOTSUPP): write without the lock
            pass
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def remove_abandoned_temporaries(folder: Path, *, writing: str) -> None:
    """Remove the temporary and lock files of runs killed outright (SIGKILL, power loss) in `folder`.

    Those of the output `writing` (whose lock the caller holds) are abandoned by definition; another
    output's are removed only if its lock can be taken now, so a live run's files are left alone."""
    left: dict[str, list[Path]] = {}  # output name -> its temporary files
    with os.scandir(folder) as entries:
        for found in filter(None, (BESIDE_OUTPUT.fullmatch(entry.name) for entry in entries)):
            left.setdefault(found["name"], []).extend([folder / found[0]] if found["tmp"] else [])
    for name, temporaries in left.items():
        if name == writing:
            for tmp in temporaries:
                tmp.unlink(missing_ok=True)
            continue
        try:
            with output_lock(folder / name, grace_s=0):  # removes the lock file as it ends
                for tmp in temporaries:
                    tmp.unlink(missing_ok=True)
        except OutputError:  # that output is being written now, or its folder refuses us
            pass


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write `path` through (`atomic_path`), flushed and fsynced before the rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def output_file(path: str | os.PathLike) -> Path:
    """`path` as a file to write; OutputError if it is a folder or a folder above it is a file."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"{target}: is a folder; give the path of a file to write")
    above = next((parent for parent in target.parents if parent.exists()), None)
    if above is not None and not above.is_dir():
        raise OutputError(f"{target}: {above} is a file, not a folder")
    return target


def check_outputs(outputs: Iterable[str | os.PathLike], *, inputs: Iterable[str | os.PathLike]) -> None:
    """What a command checks before it reads or computes anything: each of `outputs` can be written
    as a file (`output_file`), and writing it would not replace one of `inputs` (the same path, or
    the same file through a symbolic or hard link); OutputError otherwise. An input folder stands
    for every file in it."""
    read = []
    for source in map(Path, inputs):
        read.extend(sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source])
    for output in map(output_file, outputs):
        for source in read:
            if output.exists() and source.exists() and os.path.samefile(output, source):
                raise OutputError(f"{output}: writing it would overwrite the input {source}; choose another output")


def usual_permissions(path: str | os.PathLike) -> None:
    """Give a file made by mkstemp (0600) or a folder made by mkdtemp (0700) the permissions open()
    or mkdir() would have given it: 0666 or 0777 less the umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def write_files_together(folder: str | os.PathLike, files: Mapping[str, bytes]) -> None:
    """Write every file of `files` (name -> bytes) into `folder`, or none of them: each goes to its
    temporary file first (`atomic_path`), and only when all are written are they renamed into
    place, which needs no space. A full disk midway leaves the folder as it was."""
    with ExitStack() as stack:
        for name, data in files.items():
            tmp = stack.enter_context(atomic_path(Path(folder) / name))
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                if exc.errno in WRITE_ERRNOS:
                    raise OutputError(f"{Path(folder) / name}: cannot be written ({exc.strerror}); nothing was "
                                      "written") from None
                raise


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
    """All tensors (in memory) and the metadata of a safetensors file; FormatError on any defect.
    The header is checked by `refpeft.checkpoint.SafetensorsFile`, so float8 tensors read as their
    ml_dtypes types (the safetensors package's NumPy reader cannot make them)."""
    from refpeft.checkpoint import SafetensorsFile  # it builds on this module

    checkpoint = SafetensorsFile(path)
    return {name: np.array(checkpoint.read(name)) for name in checkpoint.keys()}, dict(checkpoint.metadata)


# The dtypes a float weight may be stored in. float8 weights (they come with scales a reader must
# apply), integers and bools are refused by name where a weight is expected, never converted.
FLOAT_WEIGHTS = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def require_float(array: np.ndarray, *, name: str, source: str | os.PathLike,
                  accepted: Iterable[np.dtype] = FLOAT_WEIGHTS, hint: str = "") -> np.ndarray:
    """`array` (tensor `name` of `source`) if its dtype is one of `accepted`; FormatError naming the
    tensor and its dtype (and `hint`, what to do) otherwise."""
    accepted = tuple(map(np.dtype, accepted))
    if array.dtype not in accepted:
        *others, last = map(str, accepted)
        raise FormatError(f"{source}: tensor {name!r} has dtype {array.dtype}; a weight here must be "
                          f"{', '.join(others)} or {last}{hint}")
    return array


# Files often given where safetensors is expected, known by their first bytes or, for ONNX's
# protobuf (no magic number), by their suffix.
FOREIGN_MAGIC = {b"GGUF": "a GGUF model", b"PK\x03\x04": "a zip archive (torch.save's format, a pickle)"}
FOREIGN_SUFFIXES = {".onnx": "an ONNX model", ".onnx_adapter": "an ONNX Runtime adapter file"}


def not_safetensors(path: str | os.PathLike, problem: str) -> FormatError:
    """The FormatError for a file that is not safetensors: what it is instead when its first bytes
    or its suffix say (an ONNX model, a GGUF model, torch.save's zip), else `problem`."""
    path = Path(path)
    with open(path, "rb") as f:
        start = f.read(4)
    what = next((name for magic, name in FOREIGN_MAGIC.items() if start.startswith(magic)), None)
    what = what or FOREIGN_SUFFIXES.get(path.suffix.lower())
    return FormatError(f"{path}: {what}, not a safetensors file" if what else f"{path}: {problem}")


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file holding one object (a config); FormatError naming the file if it is not one."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FormatError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    value = parse_json(raw, source=path)
    if not isinstance(value, dict):
        raise FormatError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def metadata_json(metadata: dict[str, str], key: str, *, source: str | os.PathLike) -> Any:
    """A JSON value stored under `key` in safetensors metadata; FormatError if absent or invalid."""
    if key not in metadata:
        raise FormatError(f"{source}: metadata key {key!r} is missing")
    return parse_json(metadata[key], source=f"{source}: metadata key {key!r}")


def parse_json(text: str | bytes, *, source: str | os.PathLike) -> Any:
    """The value JSON `text` holds; FormatError naming `source` if it is not valid UTF-8 JSON or
    holds what Python's parser refuses (nesting deeper than the recursion limit, an integer of
    more than 4300 digits)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise FormatError(f"{source}: JSON nested too deeply to read") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, the integer digit limit
        raise FormatError(f"{source}: not valid JSON ({exc})") from None
