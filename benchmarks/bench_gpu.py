"""GPU figures for issue 18, measured with CUDA events: CuPy NF4 dequantise bandwidth, LoRA step vs PEFT on CUDA.

    python benchmarks/bench_gpu.py [--d 4096] [--k 4096] [--r 16] [--tokens 4096] [--repeats 20]

- NF4 dequantise in CuPy (refpeft.quant's dequantize_4bit on a CuPy state of a d x k weight, block
  64, double quantisation): bytes read (packed codes + absmax codes + nested constants) plus bytes
  written (float16 values), per second, as a fraction of the GPU's peak memory bandwidth (from
  its memory clock and bus width). Target >= 70%.
- LoRA forward + backward in CuPy (refpeft.methods.lora) against PEFT's LoRA layer on torch CUDA
  (forward, then backward of sum(y * dy)) at d x k, rank r, `tokens` tokens, float32 with TF32 off on
  both sides. Target ratio refpeft / torch <= 1.0.
Each figure is the median over `repeats` timed runs after warm-up. Without a CUDA device it says so
and exits 0: the script is prepared on CPU machines and run where a GPU is lent.
"""

from __future__ import annotations

import argparse
import statistics
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    try:
        import cupy
        devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CuPy missing, or no driver: nothing to measure here
        print(f"no CUDA device for CuPy ({type(exc).__name__}: {exc}); nothing measured")
        return 0
    if devices == 0:
        print("no CUDA device for CuPy; nothing measured")
        return 0
    props = cupy.cuda.runtime.getDeviceProperties(0)
    peak = 2 * props["memoryClockRate"] * 1e3 * props["memoryBusWidth"] / 8          # bytes/s, DDR
    print(f"GPU: {props['name'].decode()}, peak memory bandwidth {peak / 1e9:.0f} GB/s (from clock and bus width)")
    nf4_bandwidth(cupy, args, peak)
    lora_step(cupy, args)
    return 0


def _median_ms(cupy, run, repeats: int) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def nf4_bandwidth(cupy, args, peak: float) -> None:
    import numpy as np

    from refpeft.quant import dequantize_4bit, quantize_4bit
    from refpeft.quant.state import stored_bytes

    W = cupy.asarray(np.random.default_rng(0).standard_normal((args.d, args.k)).astype(np.float16))
    state = quantize_4bit(W, quant_type="nf4", blocksize=64, double_quant=True, rounding="bnb-cuda", dtype="float16")
    moved = sum(stored_bytes(state).values()) + args.d * args.k * 2                  # read the codes, write float16
    ms = _median_ms(cupy, lambda: dequantize_4bit(state), args.repeats)
    rate = moved / (ms / 1e3)
    print(f"NF4 dequantise {args.d} x {args.k} (CuPy): {ms:.3f} ms, {rate / 1e9:.0f} GB/s = "
          f"{rate / peak:.0%} of peak (target >= 70%)")


def lora_step(cupy, args) -> None:
    import numpy as np

    from refpeft.methods.lora import lora_backward, lora_forward

    rng = np.random.default_rng(1)
    x = rng.standard_normal((args.tokens, args.k)).astype(np.float32)
    W0 = (rng.standard_normal((args.d, args.k)) / args.k**0.5).astype(np.float32)
    A = (rng.standard_normal((args.r, args.k)) / args.k**0.5).astype(np.float32)
    B = (rng.standard_normal((args.d, args.r)) * 0.01).astype(np.float32)
    dy = rng.standard_normal((args.tokens, args.d)).astype(np.float32)
    ours = {name: cupy.asarray(a) for name, a in (("x", x), ("W0", W0), ("A", A), ("B", B), ("dy", dy))}
    cupy.cuda.set_allocator(cupy.cuda.MemoryPool().malloc)

    def refpeft_step():
        y, cache = lora_forward(ours["x"], ours["W0"], ours["A"], ours["B"], scaling=2.0)
        return lora_backward(ours["dy"], cache)

    ms_ours = _median_ms(cupy, refpeft_step, args.repeats)
    try:
        import torch
        import peft
    except ImportError as exc:
        print(f"LoRA step (CuPy): {ms_ours:.2f} ms; no torch/PEFT peer ({exc})")
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    layer = torch.nn.Sequential(torch.nn.Linear(args.k, args.d, bias=False))
    model = peft.get_peft_model(layer, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=["0"],
                                                       init_lora_weights=False)).cuda()
    inner = model.base_model.model[0]
    with torch.no_grad():
        inner.base_layer.weight.copy_(torch.from_numpy(W0))
        inner.lora_A["default"].weight.copy_(torch.from_numpy(A))
        inner.lora_B["default"].weight.copy_(torch.from_numpy(B))
    tx = torch.from_numpy(x).cuda().requires_grad_(True)
    tdy = torch.from_numpy(dy).cuda()

    def torch_step():
        model.zero_grad(set_to_none=True)
        tx.grad = None
        (model(tx) * tdy).sum().backward()

    ms_torch = _median_ms(cupy, torch_step, args.repeats)      # CUDA events on the same (default) stream
    print(f"LoRA forward+backward {args.tokens} x {args.k} -> {args.d}, r {args.r}, float32 (TF32 off): "
          f"refpeft/CuPy {ms_ours:.2f} ms, PEFT/torch {ms_torch:.2f} ms, ratio {ms_ours / ms_torch:.2f} "
          "(target <= 1.0)")


if __name__ == "__main__":
    sys.exit(main())
