"""4-bit quantisation: refpeft (NumPy) vs bitsandbytes on CPU, one run; bits per parameter; Gaussian MSE.

Times quantising and dequantising a 4096 x 4096 float32 weight (NF4, block 64), with and without
double quantisation: refpeft in both rounding modes and bitsandbytes' CPU path, each the median of
`--repeats` runs in rotation after a warm-up (benchmarks/measure.py's `interleaved_medians`), so the
ratios printed (bitsandbytes time / refpeft time) compare runs under the same load.
It checks that refpeft's "bnb-cpu" bytes equal bitsandbytes' in the same run, measures the bits per
parameter from the stored tensors, and compares the measured MSE of NF4, FP4 and uniform int4 on
N(0, 1) data with the value the codebook predicts (refpeft.quant.codebooks.expected_gaussian_mse).
Run: python benchmarks/bench_quant.py
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import bitsandbytes.functional as F
from measure import interleaved_medians

from refpeft.quant.bnb_layout import to_state_dict
from refpeft.quant.codebooks import FP4_THRESHOLDS_CUDA, NF4_CODE, expected_gaussian_mse, fp4_code, thresholds
from refpeft.quant.double import quantize_absmax
from refpeft.quant.state import QuantState4bit, bits_per_parameter, dequantize_4bit, quantize_4bit


def timings(W: np.ndarray, repeats: int) -> None:
    Wt = torch.from_numpy(W)
    print(f"== {W.shape[0]}x{W.shape[1]} float32, NF4, block 64; median of {repeats} (seconds) ==")
    for double_quant in (False, True):
        label = "with double quantisation" if double_quant else "without double quantisation"
        quantise = {
            "refpeft bnb-cuda": lambda: quantize_4bit(W, double_quant=double_quant),
            "refpeft bnb-cpu": lambda: quantize_4bit(W, double_quant=double_quant, rounding="bnb-cpu"),
            "bitsandbytes": lambda: F.quantize_4bit(Wt, blocksize=64, quant_type="nf4",
                                                    compress_statistics=double_quant),
        }
        q = interleaved_medians(quantise, repeats)
        state = quantize_4bit(W, double_quant=double_quant)
        P, S = F.quantize_4bit(Wt, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        dequantise = {"refpeft": lambda: dequantize_4bit(state), "bitsandbytes": lambda: F.dequantize_4bit(P, S)}
        d = interleaved_medians(dequantise, repeats)
        print(f"-- {label}")
        for name, t in q.items():
            ratio = f"  bitsandbytes / this = {q['bitsandbytes'] / t:.2f}x" if name != "bitsandbytes" else ""
            print(f"quantise   {name:<18}{t:9.4f}{ratio}")
        for name, t in d.items():
            ratio = f"  bitsandbytes / this = {d['bitsandbytes'] / t:.2f}x" if name != "bitsandbytes" else ""
            print(f"dequantise {name:<18}{t:9.4f}{ratio}")
        identity(W, P, S, double_quant)


def identity(W: np.ndarray, P, S, double_quant: bool) -> None:
    cpu = quantize_4bit(W, rounding="bnb-cpu")
    same = np.array_equal(cpu.packed, P.numpy())
    if double_quant:  # the offset is a device-order float32 mean: reproduce bitsandbytes' (FINDINGS F-7)
        nested = quantize_absmax(cpu.absmax, rounding="bnb-cpu", offset=S.offset.item())
        same = same and np.array_equal(nested.codes, S.absmax.numpy()) and \
            np.array_equal(nested.nested_absmax, S.state2.absmax.numpy())
        cpu = QuantState4bit(packed=cpu.packed, absmax=nested, shape=cpu.shape, dtype="float32", blocksize=64,
                             quant_type="nf4")
    else:
        same = same and np.array_equal(cpu.absmax, S.absmax.numpy())
    values = np.array_equal(dequantize_4bit(cpu), F.dequantize_4bit(P, S).numpy())
    print(f"identical to bitsandbytes (rounding='bnb-cpu'): bytes and absmax {same}, dequantised values {values}")


def bits(W: np.ndarray) -> None:
    print("== bits per parameter, from the stored tensors ==")
    for double_quant in (False, True):
        state = quantize_4bit(W, double_quant=double_quant)
        tensors = to_state_dict(state)
        whole = sum(a.nbytes for a in tensors.values())
        print(f"double_quant={double_quant!s:<6} per-weight tensors {bits_per_parameter(state):.4f}   "
              f"whole state dict (maps and JSON record included) {8 * whole / state.numel:.4f}")


def accuracy(n: int) -> None:
    print(f"== MSE on N(0, 1), {n} values, block 64 ==")
    x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    fp4_values = sorted(set(fp4_code()))
    fp4_bounds = tuple(-t for t in reversed(FP4_THRESHOLDS_CUDA)) + FP4_THRESHOLDS_CUDA
    int4_values = tuple(k / 7 for k in range(-7, 8))
    int4_bounds = tuple((a + b) / 2 for a, b in zip(int4_values[:-1], int4_values[1:]))
    blocks = x.reshape(-1, 64).astype(np.float64)
    absmax = np.max(np.abs(blocks), axis=1, keepdims=True)
    int4 = np.round(blocks / absmax * 7) / 7 * absmax  # symmetric absmax int4: 15 uniform levels
    rows = [
        ("NF4", np.mean((dequantize_4bit(quantize_4bit(x)) - x.astype(np.float64)) ** 2),
         expected_gaussian_mse(NF4_CODE, thresholds("nf4", "bnb-cuda"), blocksize=64)),
        ("FP4", np.mean((dequantize_4bit(quantize_4bit(x, quant_type="fp4")) - x.astype(np.float64)) ** 2),
         expected_gaussian_mse(tuple(fp4_values), fp4_bounds, blocksize=64)),
        ("int4 (uniform, absmax)", np.mean((int4 - blocks) ** 2),
         expected_gaussian_mse(int4_values, int4_bounds, blocksize=64)),
    ]
    for name, measured, theory in rows:
        print(f"{name:<24} measured {measured:.6f}   from the codebook {theory:.6f}   "
              f"ratio to NF4 {measured / rows[0][1]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--mse-values", type=int, default=2**22)
    args = parser.parse_args()
    W = np.random.default_rng(0).standard_normal((args.size, args.size)).astype(np.float32)
    timings(W, args.repeats)
    bits(W)
    accuracy(args.mse_values)


if __name__ == "__main__":
    main()
