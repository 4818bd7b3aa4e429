"""DoRA and VeRA forward+backward: refpeft (NumPy) vs HF PEFT (torch CPU), time and peak memory, one run.

Layer d = k = 4096, r = 16, 512 tokens, float32 (the issue's size); VeRA uses the same r.
- Time: median of `--repeats` runs after a warm-up, candidates in rotation (bench_lora's
  `interleaved_medians`), so load drift on a shared machine hits all alike.
- Peak memory: each candidate runs in a fresh subprocess; after set-up and a warm-up step the
  resident high-water mark is reset, and the figure is its growth over one step, with
  MALLOC_MMAP_THRESHOLD_ fixed so large arrays go back to the OS when freed (the figure is then
  the step's own peak of live memory, for NumPy and torch alike).
- DoRA's weight norm ||W0 + s B A|| alone: PEFT forms B A (d x k, via an identity of k x k) and
  W0 + s B A in full; refpeft forms V blockwise (refpeft.methods.dora.NORM_BLOCK_ELEMENTS at a time).
- The expanded norm ||W0_i||^2 + 2 s (W0 A^T)_i . B_i + s^2 B_i (A A^T) B_i^T, which forms no
  row of B A, is measured here for accuracy only (the reason refpeft does not use it).

Run: python benchmarks/bench_dora_vera.py   (the memory part takes a few subprocesses)
"""

from __future__ import annotations

import os

# torch's OpenMP threads spin after each op and starve OpenBLAS's on a small machine (measured
# here: 20-100x swings at d = 512); passive waiting is fair to both. Set before numpy/torch load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from measure import interleaved_medians, layer_parser, peak_of_one_step  # noqa: E402
from refpeft.methods.dora import dora_backward, dora_forward, dora_weight_norm, dora_init  # noqa: E402
from refpeft.methods.linear import LinearShape  # noqa: E402
from refpeft.methods.lora import lora_scaling  # noqa: E402
from refpeft.methods.vera import vera_backward, vera_forward, vera_projections  # noqa: E402

ALPHA = 32


def setup(d: int, k: int, r: int, n: int) -> dict:
    """float32 layer, adapter and data (B and lambda_b non-zero, as after some training)."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    W0 = (rng.standard_normal((d, k)) / np.sqrt(k)).astype(f32)
    A = (rng.standard_normal((r, k)) / np.sqrt(k)).astype(f32)
    B = (0.01 * rng.standard_normal((d, r))).astype(f32)
    s = lora_scaling(ALPHA, r)
    m = (dora_init(W0, A, B, scaling=s) * (1 + 0.1 * rng.standard_normal(d))).astype(f32)
    vera_A, vera_B = vera_projections(LinearShape(k=k, d=d), r, seed=0, dtype="float32")
    return dict(x=rng.standard_normal((n, k)).astype(f32), dy=rng.standard_normal((n, d)).astype(f32), W0=W0, A=A,
                B=B, m=m, s=s, vera_A=vera_A, vera_B=vera_B, lambda_d=rng.standard_normal(r).astype(f32),
                lambda_b=rng.standard_normal(d).astype(f32))


def candidates(a: dict) -> dict:
    """name -> zero-argument step, for every implementation available here."""
    steps = {}

    def dora_step(gradient):
        def step():
            _, cache = dora_forward(a["x"], a["W0"], a["A"], a["B"], a["m"], scaling=a["s"], gradient=gradient)
            dora_backward(a["dy"], cache)
        return step

    def vera_step():
        _, cache = vera_forward(a["x"], a["W0"], a["vera_A"], a["vera_B"], a["lambda_d"], a["lambda_b"])
        vera_backward(a["dy"], cache)

    steps["dora refpeft detached"] = dora_step("detached")
    steps["dora refpeft exact"] = dora_step("exact")
    steps["dora norm refpeft (blockwise)"] = lambda: dora_weight_norm(a["W0"], a["A"], a["B"], scaling=a["s"])
    steps["dora norm formed in full (NumPy)"] = lambda: np.linalg.norm(a["W0"] + a["s"] * (a["B"] @ a["A"]), axis=1)
    steps["vera refpeft"] = vera_step
    try:
        import torch
        from peft import LoraConfig, VeraConfig, get_peft_model
    except ImportError:
        return steps
    d, k = a["W0"].shape
    r = a["A"].shape[0]
    torch.manual_seed(0)
    dora = get_peft_model(torch.nn.Sequential(torch.nn.Linear(k, d, bias=False)), LoraConfig(
        r=r, lora_alpha=ALPHA, use_dora=True, target_modules=["0"])).base_model.model[0]
    vera = get_peft_model(torch.nn.Sequential(torch.nn.Linear(k, d, bias=False)), VeraConfig(
        r=r, projection_prng_key=0, target_modules=["0"])).base_model.model[0]
    with torch.no_grad():
        for layer in (dora, vera):
            layer.base_layer.weight.copy_(torch.from_numpy(a["W0"]))
        dora.lora_A["default"].weight.copy_(torch.from_numpy(a["A"]))
        dora.lora_B["default"].weight.copy_(torch.from_numpy(a["B"]))
        dora.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(a["m"]))
        vera.vera_lambda_d["default"].copy_(torch.from_numpy(a["lambda_d"]))
        vera.vera_lambda_b["default"].copy_(torch.from_numpy(a["lambda_b"]))
    tx, tdy = torch.from_numpy(a["x"]).requires_grad_(True), torch.from_numpy(a["dy"])

    def peft_step(layer):
        def step():
            tx.grad = None
            layer(tx).backward(tdy)
        return step

    magnitude = dora.lora_magnitude_vector["default"]

    def peft_norm():  # what PEFT's DoRA forward does for the norm
        with torch.no_grad():
            lora_weight = magnitude.get_lora_weight(dora.lora_A["default"], dora.lora_B["default"])
            magnitude.get_weight_norm(dora.base_layer.weight, lora_weight, a["s"])

    steps["dora PEFT"] = peft_step(dora)
    steps["dora norm PEFT"] = peft_norm
    steps["vera PEFT"] = peft_step(vera)
    return steps


def norm_accuracy(d: int, k: int, r: int) -> list[tuple[str, float, float]]:
    """Worst relative error of float32 row norms, formed (blockwise) vs expanded, against float64.

    Rows are made to cancel to a fraction `c` of ||W0_i||: W0_i = -s (B A)_i + c * noise_i.
    """
    rng = np.random.default_rng(1)
    A = rng.standard_normal((r, k)) / np.sqrt(k)
    B = rng.standard_normal((d, r))
    s = lora_scaling(ALPHA, r)
    rows = []
    for c in (None, 1e-1, 1e-2, 1e-3):
        if c is None:
            W0, label = rng.standard_normal((d, k)) / np.sqrt(k), "no cancellation (random W0)"
        else:
            noise = rng.standard_normal((d, k))
            noise *= c * np.linalg.norm(s * B @ A, axis=1, keepdims=True) / np.linalg.norm(noise, axis=1, keepdims=True)
            W0, label = -s * (B @ A) + noise, f"||W0 + sBA|| = {c:g} ||W0||"
        W32, A32, B32 = (M.astype(np.float32) for M in (W0, A, B))
        exact = np.linalg.norm(W32.astype(np.float64) + s * (B32.astype(np.float64) @ A32.astype(np.float64)), axis=1)
        formed = dora_weight_norm(W32, A32, B32, scaling=s).astype(np.float64)
        WAt, AAt = W32 @ A32.T, A32 @ A32.T
        squared = np.sum(W32 * W32, axis=1) + 2 * s * np.sum(WAt * B32, axis=1) + s * s * np.sum((B32 @ AAt) * B32, axis=1)
        expanded = np.sqrt(np.maximum(squared, np.float32(0))).astype(np.float64)
        rows.append((label, float(np.max(np.abs(formed - exact) / exact)), float(np.max(np.abs(expanded - exact) / exact))))
    return rows


def main() -> None:
    parser = layer_parser(__doc__, repeats=7)
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args()
    sizes = (args.d, args.k, args.r, args.tokens)
    steps = candidates(setup(*sizes))
    times = interleaved_medians(steps, args.repeats)
    peaks = {} if args.no_memory else {name: peak_of_one_step("bench_dora_vera", name, sizes) for name in steps}

    print(f"DoRA / VeRA forward+backward, d={args.d} k={args.k} r={args.r} tokens={args.tokens} float32, "
          f"median of {args.repeats}; peak = memory held beyond set-up during one step")
    for name, seconds in times.items():
        peak = f"{peaks[name]:9.1f} MiB" if name in peaks else ""
        print(f"  {name:34s} {seconds * 1e3:9.1f} ms  {peak}")
    pairs = [("dora refpeft detached", "dora PEFT"), ("dora refpeft exact", "dora PEFT"),
             ("vera refpeft", "vera PEFT"), ("dora norm refpeft (blockwise)", "dora norm PEFT")]
    for ours, theirs in pairs:
        if theirs in times:
            memory = f", peak {peaks[ours] / peaks[theirs]:.3f}" if peaks and peaks[theirs] > 0 else ""
            print(f"  ratio {ours} / {theirs}: time {times[ours] / times[theirs]:.3f}{memory}  (target <= 1)")
    print(f"DoRA weight norm accuracy in float32 (worst relative error over {args.d} rows vs float64):")
    for label, formed, expanded in norm_accuracy(args.d, args.k, args.r):
        print(f"  {label:32s} formed {formed:9.2e}   expanded {expanded:9.2e}")


if __name__ == "__main__":
    main()
