"""Peer: refpeft.quant.torch_sum against torch's own CPU float32 sum and mean, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refpeft.errors import ConfigError, DTypeError, ShapeError
from refpeft.quant.torch_sum import GRAIN_SIZE, torch_cpu_mean, torch_cpu_sum

torch = pytest.importorskip("torch", reason="torch is the peer whose summation order is reproduced")

# Every length up to 600 (each branch of the cascade's first levels), then lengths around the
# level sizes and the thread split.
LENGTHS = list(range(1, 600)) + [1023, 1024, 1025, 4095, 4096, 4097, 2**16 + 3, GRAIN_SIZE - 1, GRAIN_SIZE,
                                 2 * GRAIN_SIZE + 5, 300_001]


def torch_threads(threads: int):
    class Threads:
        def __enter__(self):
            self.before = torch.get_num_threads()
            torch.set_num_threads(threads)

        def __exit__(self, *exc):
            torch.set_num_threads(self.before)
    return Threads()


def draw(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(n) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_sum_and_mean_equal_torch_on_every_length(threads):
    with torch_threads(threads):
        for n in LENGTHS:
            x = draw(n, n)
            t = torch.from_numpy(x)
            assert torch_cpu_sum(x, threads=threads) == t.sum().item(), n
            assert torch_cpu_mean(x, threads=threads) == t.mean().item(), n


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1), exponent=st.integers(-149, 100),
       zeros=st.booleans())
def test_mean_equals_torch_on_hypothesis_vectors(n, seed, exponent, zeros):
    """Magnitudes from subnormal to near overflow (where the float32 sum turns inf, as torch's)."""
    x = draw(n, seed) * np.float32(2.0 ** min(exponent, 127))
    if zeros:
        x[::3] = 0.0
    with torch_threads(1):
        assert np.float32(torch_cpu_mean(x)).tobytes() == torch.from_numpy(x).mean().numpy().tobytes()


def test_thread_count_changes_large_sums():
    """The documented exception: from 32,768 terms on, torch's T threads each sum a chunk."""
    x = draw(4 * GRAIN_SIZE, 7)
    sums = {t: torch_cpu_sum(x, threads=t) for t in (1, 2, 4)}
    assert len(set(sums.values())) > 1                      # the order really differs ...
    for t, s in sums.items():
        with torch_threads(t):
            assert s == torch.from_numpy(x).sum().item()    # ... and each is torch's
    small = draw(GRAIN_SIZE - 1, 7)                         # one piece below the grain size
    assert len({torch_cpu_sum(small, threads=t) for t in (1, 2, 4)}) == 1


SCRIPT = """
import sys, numpy as np, torch
from refpeft.quant.torch_sum import torch_cpu_mean
torch.set_num_threads(2)
print(torch.backends.cpu.get_cpu_capability())
rng = np.random.default_rng(0)
for n in list(range(1, 300)) + [5000, 70001]:
    x = (rng.random(n) * 10).astype(np.float32)
    assert torch_cpu_mean(x, threads=2) == torch.from_numpy(x).mean().item(), n
print("ok")
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_order_is_the_same_on_every_x86_capability(capability):
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        pytest.skip("torch's x86 kernels only")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    used, verdict = run.stdout.split()[-2:]
    if used != capability.upper():
        pytest.skip(f"this CPU cannot run torch's {capability} kernels (torch chose {used})")
    assert verdict == "ok"


def test_errors_name_the_problem():
    with pytest.raises(DTypeError, match="float64"):
        torch_cpu_mean(np.ones(3))
    with pytest.raises(ShapeError, match=r"\(2, 2\)"):
        torch_cpu_mean(np.ones((2, 2), dtype=np.float32))
    with pytest.raises(ShapeError):
        torch_cpu_sum(np.ones(0, dtype=np.float32))
    with pytest.raises(ConfigError, match="threads"):
        torch_cpu_sum(np.ones(3, dtype=np.float32), threads=0)
