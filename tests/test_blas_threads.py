"""benchmarks/blas_threads.py: one thread count for NumPy's OpenBLAS and torch in the step benchmarks."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from blas_threads import pin_threads  # noqa: E402


def test_the_threads_flag_is_written_for_openblas(monkeypatch):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    assert pin_threads(["--batch", "2", "--threads", "3"]) == 3
    assert os.environ["OPENBLAS_NUM_THREADS"] == "3"
    assert pin_threads(["--batch", "2"], default=2) == 2
    assert os.environ["OPENBLAS_NUM_THREADS"] == "2"


def test_fewer_than_one_thread_is_refused(monkeypatch):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    with pytest.raises(SystemExit, match="at least 1"):
        pin_threads(["--threads", "0"])


def _openblas_library() -> str | None:
    """NumPy's bundled scipy-openblas (wheels), which says how many threads it runs; None elsewhere."""
    folder = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    found = glob.glob(str(folder / "libscipy_openblas64_*.so"))
    return found[0] if found else None


@pytest.mark.parametrize("threads", [1, 2])
def test_openblas_runs_on_the_pinned_count_when_pinned_before_numpy(threads):
    library = _openblas_library()
    if library is None:
        pytest.skip("NumPy does not bundle scipy-openblas here")
    script = (f"import sys, ctypes; sys.path.insert(0, {str(BENCHMARKS)!r}); from blas_threads import pin_threads; "
              f"pin_threads(['--threads', '{threads}']); import numpy; "
              f"print(ctypes.CDLL({library!r}).scipy_openblas_get_num_threads64_())")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == threads
