"""What the benchmarks share: interleaved timing and Linux process-memory figures."""

from __future__ import annotations

import statistics
import time


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
