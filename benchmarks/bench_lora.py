"""LoRA forward+backward: refpeft (NumPy) vs HF PEFT on torch CPU vs the two-GEMM floor, one run.

Layer d = k = 4096, r = 16, 512 tokens, float32 (the issue's size). Each timing is the median of
`--repeats` runs after a warm-up, the candidates run in rotation. The floor is the two products no LoRA implementation can skip:
x W0^T (forward) and dy W0 (backward, for dx). Run: python benchmarks/bench_lora.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from measure import interleaved_medians  # noqa: E402
from refpeft.methods.lora import lora_backward, lora_forward, lora_scaling  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    d, k, r, n = args.d, args.k, args.r, args.tokens
    rng = np.random.default_rng(0)
    f32 = np.float32
    x = rng.standard_normal((n, k)).astype(f32)
    W0 = (rng.standard_normal((d, k)) / np.sqrt(k)).astype(f32)
    A = (rng.standard_normal((r, k)) / np.sqrt(k)).astype(f32)
    B = rng.standard_normal((d, r)).astype(f32)
    dy = rng.standard_normal((n, d)).astype(f32)
    s = lora_scaling(32, r)

    def refpeft_step():
        y, cache = lora_forward(x, W0, A, B, scaling=s)
        lora_backward(dy, cache)

    def floor():
        x @ W0.T
        dy @ W0

    candidates = {"refpeft (NumPy)": refpeft_step, "two bare GEMMs (NumPy)": floor}
    try:
        import torch
        from peft import LoraConfig, get_peft_model
    except ImportError:
        torch = None
    if torch is not None:
        torch.manual_seed(0)
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(k, d, bias=False)),
                               LoraConfig(r=r, lora_alpha=32, target_modules=["0"]))
        layer = model.base_model.model[0]
        with torch.no_grad():
            layer.base_layer.weight.copy_(torch.from_numpy(W0))
            layer.lora_A["default"].weight.copy_(torch.from_numpy(A))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(B))
        tx, tdy = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(dy)

        def peft_step():
            tx.grad = None
            layer(tx).backward(tdy)

        candidates["HF PEFT (torch CPU)"] = peft_step
        candidates["two bare GEMMs (torch)"] = lambda: (torch.from_numpy(x) @ torch.from_numpy(W0).T,
                                                        tdy @ torch.from_numpy(W0))
    results = interleaved_medians(candidates, args.repeats)

    print(f"LoRA forward+backward, d={d} k={k} r={r} tokens={n} float32, median of {args.repeats}")
    for name, seconds in results.items():
        print(f"  {name:24s} {seconds * 1e3:9.1f} ms")
    ours = results["refpeft (NumPy)"]
    print(f"  ratio refpeft / two-GEMM floor (NumPy): {ours / results['two bare GEMMs (NumPy)']:.3f}  (target <= 1.15)")
    if "HF PEFT (torch CPU)" in results:
        print(f"  ratio refpeft / PEFT:                   {ours / results['HF PEFT (torch CPU)']:.3f}  (target <= 1.0)")
        print(f"  ratio PEFT / two-GEMM floor (torch):    "
              f"{results['HF PEFT (torch CPU)'] / results['two bare GEMMs (torch)']:.3f}")


if __name__ == "__main__":
    main()
