"""Every method's forward+backward: refpeft (NumPy, through the method table) vs HF PEFT (torch CPU), one run.

Layer d = k = 4096, 512 tokens, float32 (issue 14's size). Each method is initialised by its table
row's `init_modules` (refpeft) and by PEFT's own config (PEFT), at the same sizes:

    lora, dora, vera, loha, lokr   r = 16 (alpha 32)
    ia3                            one vector on the outputs
    oft, boft                      block size 32 (BOFT: one butterfly factor)

A step is forward then backward with a given dy (PEFT: `layer(x).backward(dy)`, x requiring a
gradient as refpeft's dx is always computed), and every gradient is dropped at its end (PEFT's
`.grad`s set to None, as refpeft's returned grads are freed): no step starts from the previous
one's gradients, so each peak counts that side's own allocations (a PEFT x.grad kept from the
warm-up step used to be freed inside the measured step, hiding 8 MiB of PEFT's peak). Times are
medians of `--repeats` interleaved runs (measure.interleaved_medians); peak memory is each step's
growth beyond set-up in a fresh process (measure.peak_of_one_step). Methods with no PEFT peer
(Pre-Diag, SORA) are timed alone. Ratios are refpeft / PEFT: the target is <= 1 for both.

The last row, "gemm", is the floor every step shares: the two (n, k) x (k, d) products x W0^T and
dy W0 alone, in NumPy (OpenBLAS) and in torch (MKL). They are nearly all of a step's time at this
size, so a method's time ratio is read against this row's ratio, which is the two BLAS libraries'
under the run's load, not refpeft's or PEFT's.

Run: python benchmarks/bench_methods.py [--methods lora,oft] [--no-memory]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # see bench_dora_vera: fair to OpenBLAS and torch

import numpy as np  # noqa: E402

from measure import interleaved_medians, layer_parser, peak_of_one_step  # noqa: E402
from refpeft.methods import METHODS  # noqa: E402

RANK, ALPHA, BLOCK = 16, 32.0, 32
# method -> (its table rank argument, PEFT's config class and options); None: no PEFT peer
PEFT_CONFIGS = {
    "lora": (RANK, "LoraConfig", {"r": RANK, "lora_alpha": ALPHA}),
    "dora": (RANK, "LoraConfig", {"r": RANK, "lora_alpha": ALPHA, "use_dora": True}),
    "vera": (RANK, "VeraConfig", {"r": RANK, "projection_prng_key": 0}),
    "ia3": (RANK, "IA3Config", {"feedforward_modules": []}),
    "loha": (RANK, "LoHaConfig", {"r": RANK, "alpha": ALPHA}),
    "lokr": (RANK, "LoKrConfig", {"r": RANK, "alpha": ALPHA}),
    "oft": (BLOCK, "OFTConfig", {"r": 0, "oft_block_size": BLOCK}),
    "boft": (BLOCK, "BOFTConfig", {"boft_block_size": BLOCK, "boft_n_butterfly_factor": 1}),
    "prediag": (RANK, None, {}),
    "sora": (RANK, None, {}),
}


def setup(d: int, k: int, tokens: int, methods: str) -> dict:
    """float32 data, the base weight and each chosen method's refpeft module (perturbed off its init)."""
    rng = np.random.default_rng(0)
    W0 = (rng.standard_normal((d, k)) / np.sqrt(k)).astype(np.float32)
    state = {"x": rng.standard_normal((tokens, k)).astype(np.float32),
             "dy": rng.standard_normal((tokens, d)).astype(np.float32), "W0": W0, "modules": {}}
    for name in methods.split(","):
        spec = METHODS[name]
        modules, shared, _ = spec.init_modules({"layer": W0}, ranks={"layer": PEFT_CONFIGS[name][0]},
                                               alphas={"layer": ALPHA}, seed=0)
        module = modules["layer"]
        module = module.replace(**{t: (np.asarray(v) + 0.01 * rng.standard_normal(v.shape)).astype(np.float32)
                                   for t, v in module.tensors.items() if t in spec.trainable})
        state["modules"][name] = (spec, module, shared)
    return state


def candidates(a: dict) -> dict:
    """name -> zero-argument step: "<method> refpeft" for each, "<method> PEFT" where PEFT has it."""
    steps = {}
    for name, (spec, module, shared) in a["modules"].items():
        def step(spec=spec, module=module, shared=shared):
            _, cache = spec.forward(a["x"], a["W0"], module, shared=shared)
            spec.backward(a["dy"], cache)
        steps[f"{name} refpeft"] = step
    steps["gemm refpeft"] = lambda: (a["x"] @ a["W0"].T, a["dy"] @ a["W0"])   # NumPy's BLAS, the same products
    try:
        import peft
        import torch
    except ImportError:
        return steps
    d, k = a["W0"].shape
    tx, tdy = torch.from_numpy(a["x"]).requires_grad_(True), torch.from_numpy(a["dy"])
    tW0 = torch.from_numpy(a["W0"])
    steps["gemm PEFT"] = lambda: (tx.detach() @ tW0.T, tdy @ tW0)                  # torch's BLAS
    for name in a["modules"]:
        _, config_class, options = PEFT_CONFIGS[name]
        if config_class is None:
            continue
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(k, d, bias=False))
        with torch.no_grad():
            base[0].weight.copy_(torch.from_numpy(a["W0"]))
        layer = peft.get_peft_model(base, getattr(peft, config_class)(target_modules=["0"], **options))
        layer = layer.base_model.model[0]
        with torch.no_grad():                       # off PEFT's identity init, as refpeft's modules are
            for p in layer.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))

        def step(layer=layer):
            layer(tx).backward(tdy)
            tx.grad = None                          # freed after the step, as refpeft's returned grads are:
            layer.zero_grad(set_to_none=True)       # nothing carried into the next step's peak
        steps[f"{name} PEFT"] = step
    return steps


def main() -> None:
    parser = layer_parser(__doc__, repeats=5)
    parser.add_argument("--methods", default=",".join(m for m in PEFT_CONFIGS if m in METHODS),
                        help="comma-separated method names (default: every one in the table)")
    args = parser.parse_args()
    sizes = (args.d, args.k, args.tokens, args.methods)
    steps = candidates(setup(*sizes))
    times = interleaved_medians(steps, args.repeats)
    peaks = {} if args.no_memory else {name: peak_of_one_step("bench_methods", name, sizes) for name in steps}
    print(f"forward+backward, d={args.d} k={args.k} tokens={args.tokens} float32, median of {args.repeats}; "
          "peak = memory held beyond set-up during one step")
    print(f"  {'method':10s} {'refpeft ms':>11s} {'PEFT ms':>9s} {'time ratio':>10s} {'refpeft MiB':>12s} "
          f"{'PEFT MiB':>9s} {'peak ratio':>10s}")
    for name in [*args.methods.split(","), "gemm"]:
        ours, theirs = times[f"{name} refpeft"], times.get(f"{name} PEFT")
        ours_peak, theirs_peak = peaks.get(f"{name} refpeft"), peaks.get(f"{name} PEFT")
        cells = [f"{ours * 1e3:11.1f}", f"{theirs * 1e3:9.1f}" if theirs else f"{'-':>9s}",
                 f"{ours / theirs:10.3f}" if theirs else f"{'-':>10s}",
                 f"{ours_peak:12.1f}" if ours_peak is not None else f"{'-':>12s}",
                 f"{theirs_peak:9.1f}" if theirs_peak is not None else f"{'-':>9s}",
                 f"{ours_peak / theirs_peak:10.3f}" if ours_peak is not None and theirs_peak else f"{'-':>10s}"]
        print(f"  {name:10s} " + " ".join(cells))


if __name__ == "__main__":
    main()
