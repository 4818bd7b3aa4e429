"""What the benchmarks share: interleaved timing and Linux process-memory figures."""

from __future__ import annotations

import statistics
import time
from typing import Any


def interleaved_medians(candidates: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each candidate, run in rotation so load drift hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM, ...), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (/proc/self/clear_refs, Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child_peak_rss(command: list[str], *, pythonpath: str | None = None) -> tuple[int, float]:
    """Peak resident set size (bytes) and wall time of one child process (its own ru_maxrss)."""
    import os
    import subprocess

    start = time.perf_counter()
    env = {**os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {})}
    pid = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL).pid
    _, status, usage = os.wait4(pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed with status {status}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def peak_of_one_step(module: str, name: str, sizes: tuple) -> float:
    """MiB of memory candidate `name` of benchmark `module` holds at its peak during one step, beyond what
    set-up left, in a fresh process (`module.candidates(module.setup(*sizes))[name]`).

    After set-up and one warm-up step the kernel's resident high-water mark is reset (reset_peak); the
    figure is VmHWM after the step minus VmRSS before it. MALLOC_MMAP_THRESHOLD_ is fixed so large
    arrays go back to the OS when freed: the figure is the step's own peak of live memory, for NumPy
    and torch alike.
    """
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 16), MALLOC_TRIM_THRESHOLD_=str(1 << 16))
    code = (f"import sys, json; sys.path[:0] = {{path!r}}; import {module} as b, measure; "
            "step = b.candidates(b.setup(*{sizes!r}))[{name!r}]; step(); "
            "measure.reset_peak(); before = measure.status_kib('VmRSS'); step(); "
            "print(json.dumps(measure.status_kib('VmHWM') - before))")
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", code.format(path=[here, *sys.path], sizes=sizes, name=name)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) / 1024.0


def layer_parser(description: str, *, repeats: int) -> Any:
    """The options every one-layer benchmark takes: the layer's d and k (4096 each), --tokens (512),
    --repeats and --no-memory; a benchmark adds its own."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess peak-memory measurement")
    return parser


def step_peak_rise_mib(step: Any) -> float:
    """MiB the peak RSS rises above the current RSS while `step()` runs in this process, after glibc's
    malloc_trim has handed the freed heap back (without it, a step that fits in memory earlier steps
    freed shows no rise at all)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak()
    before = status_kib("VmRSS")
    step()
    return (status_kib("VmHWM") - before) / 1024
