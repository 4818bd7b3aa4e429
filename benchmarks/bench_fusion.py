"""SVD fusion of 4 rank-16 adapters at d = k = 4096 to rank 16: refpeft vs PEFT, same run, same data.

    python benchmarks/bench_fusion.py [--d 4096] [--rank 16] [--adapters 4] [--dtype float32]

refpeft: `combine_modules(..., combination="svd")`, QR of the stacked factors and an SVD of the
64 x 64 core (refpeft.spectrum.factored_svd). PEFT 0.21: `add_weighted_adapter(...,
combination_type="svd")`, which forms the d x k delta of each adapter, their weighted sum, and a
full SVD of it. Both run once to warm up (BLAS buffers, lazy imports), then are measured. Each side runs in its own fresh process (same thread count), so the peak
resident memory it adds during the call (Linux VmHWM, reset just before the call through
/proc/self/clear_refs) is its own; refpeft also reports the tracemalloc peak of its NumPy arrays.

Error: both results are scored in float64 against the exact weighted sum Delta = B_cat A_cat,
||Delta - B A||_F computed on factors (refpeft.spectrum.product_norm, never forming d x k), next
to the Eckart-Young optimum sqrt(sum_{i > 16} S_i^2) of Delta.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure import reset_peak, status_kib  # noqa: E402

WEIGHTS = [0.5, 0.25, -0.375, 1.0]   # exactly representable in float32, PEFT's weight dtype


def make_adapters(path: Path, *, d: int, k: int, rank: int, count: int, dtype: str) -> None:
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(count):
        tensors[f"A{i}"] = rng.uniform(-1, 1, (rank, k)).astype(dtype) / np.sqrt(k).astype(dtype)
        tensors[f"B{i}"] = (0.01 * rng.standard_normal((d, rank))).astype(dtype)
    np.savez(path, **tensors)


def worker_refpeft(data: Path, out: Path, *, rank: int, alpha: float) -> dict:
    from refpeft.adapter import ModuleAdapter
    from refpeft.fusion import combine_modules

    loaded = np.load(data)
    count = len(loaded.files) // 2
    modules = [ModuleAdapter("lora", {"A": loaded[f"A{i}"], "B": loaded[f"B{i}"]}, alpha=alpha) for i in range(count)]
    combine_modules(modules, WEIGHTS[:count], combination="svd", rank=rank)   # warm-up: BLAS buffers, imports
    rss = status_kib("VmRSS")
    reset_peak()
    tracemalloc.start()
    start = time.perf_counter()
    fused, _ = combine_modules(modules, WEIGHTS[:count], combination="svd", rank=rank)
    seconds = time.perf_counter() - start
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    peak = status_kib("VmHWM") - rss
    np.savez(out, A=fused.A, B=fused.B * fused.scaling)
    return {"seconds": seconds, "peak_mib": peak / 1024, "traced_mib": traced / 2**20}


def worker_peft(data: Path, out: Path, *, rank: int, alpha: float) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    loaded = np.load(data)
    count = len(loaded.files) // 2
    d, k = loaded["B0"].shape[0], loaded["A0"].shape[1]
    dtype = getattr(torch, str(loaded["A0"].dtype))

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(k, d, bias=False, dtype=dtype)

    names = [f"task{i}" for i in range(count)]
    model = None
    for i, name in enumerate(names):
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"])
        model = get_peft_model(Layer(), config, adapter_name=name) if model is None else model
        if name not in model.peft_config:
            model.add_adapter(name, config)
        model.base_model.model.proj.lora_A[name].weight.data = torch.from_numpy(loaded[f"A{i}"])
        model.base_model.model.proj.lora_B[name].weight.data = torch.from_numpy(loaded[f"B{i}"])
    model.add_weighted_adapter(names, WEIGHTS[:count], "warm-up", combination_type="svd", svd_rank=rank)
    model.delete_adapter("warm-up")
    rss = status_kib("VmRSS")
    reset_peak()
    start = time.perf_counter()
    model.add_weighted_adapter(names, WEIGHTS[:count], "fused", combination_type="svd", svd_rank=rank)
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM") - rss
    layer = model.base_model.model.proj
    scaling = layer.scaling["fused"]
    np.savez(out, A=layer.lora_A["fused"].weight.detach().numpy(),
             B=layer.lora_B["fused"].weight.detach().numpy() * scaling)
    return {"seconds": seconds, "peak_mib": peak / 1024, "threads": torch.get_num_threads()}


def score(data: Path, result: Path, *, alpha: float) -> tuple[float, float, float]:
    """(||Delta - B A||_F, Eckart-Young optimum, ||Delta||_F) in float64, all on factors."""
    from refpeft.adapter import ModuleAdapter
    from refpeft.fusion import combine_modules
    from refpeft.spectrum import product_norm, singular_values

    loaded, fused = np.load(data), np.load(result)
    count = len(loaded.files) // 2
    rank = fused["A"].shape[0]
    modules = [ModuleAdapter("lora", {"A": loaded[f"A{i}"].astype(np.float64), "B": loaded[f"B{i}"].astype(np.float64)}, alpha=alpha) for i in range(count)]
    exact, _ = combine_modules(modules, WEIGHTS[:count], combination="cat")    # Delta = B_cat A_cat, scaling 1
    S = singular_values(exact.A, exact.B)
    A, B = fused["A"].astype(np.float64), fused["B"].astype(np.float64)
    error = product_norm(np.concatenate([exact.B, -B], axis=1), np.concatenate([exact.A, A], axis=0))
    return error, float(np.sqrt(np.sum(S[rank:] ** 2))), float(np.sqrt(np.sum(S ** 2)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=4096, help="d = k, the layer's size")
    parser.add_argument("--rank", type=int, default=16, help="rank of each adapter and of the result")
    parser.add_argument("--adapters", type=int, default=4, choices=range(1, len(WEIGHTS) + 1))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS/OpenMP threads of both sides (1 by default: the CPUs here are shared)")
    parser.add_argument("--worker", choices=("refpeft", "peft"), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    alpha = 2.0 * args.rank
    if args.worker:
        run = worker_refpeft if args.worker == "refpeft" else worker_peft
        print(json.dumps(run(args.data, args.out, rank=args.rank, alpha=alpha)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "adapters.npz"
        make_adapters(data, d=args.d, k=args.d, rank=args.rank, count=args.adapters, dtype=args.dtype)
        results = {}
        for side in ("refpeft", "peft"):
            out = Path(tmp) / f"{side}.npz"
            threads = str(args.threads)
            env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
            proc = subprocess.run([sys.executable, __file__, "--worker", side, "--data", str(data), "--out", str(out),
                                   "--rank", str(args.rank)], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[side]["error"], optimal, norm = score(data, out, alpha=alpha)
    ours, peft = results["refpeft"], results["peft"]
    print(f"svd fusion of {args.adapters} adapters of rank {args.rank}, d = k = {args.d}, {args.dtype}, "
          f"to rank {args.rank} ({os.cpu_count()} CPUs, torch threads {peft['threads']})")
    print(f"  ||Delta||_F = {norm:.6e}   Eckart-Young optimum = {optimal:.9e}")
    for name, r in (("refpeft", ours), ("peft", peft)):
        traced = f"   (NumPy arrays traced: {r['traced_mib']:.2f} MiB)" if "traced_mib" in r else ""
        print(f"  {name:8s} {r['seconds']:9.3f} s   peak +{r['peak_mib']:9.1f} MiB   error {r['error']:.9e} "
              f"(optimum + {(r['error'] - optimal) / optimal:.2e} relative){traced}")
    print(f"  speed-up {peft['seconds'] / ours['seconds']:.1f}x   peak memory ratio "
          f"{peft['peak_mib'] / max(ours['peak_mib'], 1e-3):.1f}x   error ratio refpeft/peft "
          f"{ours['error'] / peft['error']:.9f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
