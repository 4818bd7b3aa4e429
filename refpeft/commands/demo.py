"""`refpeft demo`: train an adapter on the embedded task and report what it learned."""

from __future__ import annotations

import argparse
import sys
import tempfile

from refpeft.backend import FLOAT_NAMES
from refpeft.demo import GRADIENT_TOLERANCE, METHODS, DemoConfig, DemoReport, resolved, run_demo

HIDDEN = {"lora": "rank 4", "dora": "rank 4", "vera": "VeRA vectors on the shared projections",
          "qlora": "rank 4, NF4 base"}

HELP = "fine-tune an adapter on an embedded task with a known answer, checking gradients on the way"

DESCRIPTION = """\
Fine-tunes an adapter on a built-in task: a frozen linear layer whose targets come from the
same layer plus a hidden low-rank delta. The adapter has to find that delta. On the way the
hand-written gradients are checked against float64 finite differences; at the end the report
gives the loss, how much of the hidden delta's energy the learned adapter captured, parameter
counts (full fine-tuning vs adapter) and the wall time.

The command exits with status 1 if a gradient check fails or the loss does not fall 100x.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    defaults = DemoConfig()
    p = subparsers.add_parser("demo", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=sorted(METHODS), default=defaults.method, help="adapter method (default: %(default)s)")
    p.add_argument("--rank", type=int, default=defaults.rank, help="adapter rank r (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=defaults.alpha, help="LoRA alpha; scaling is alpha / r (default: %(default)s)")
    p.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps (default: %(default)s)")
    p.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--loraplus-ratio", type=float, default=None, metavar="RATIO",
                   help="use LoRA+ parameter groups: B learns RATIO times faster than A")
    p.add_argument("--dora-gradient", choices=("detached", "exact"), default=defaults.dora_gradient,
                   help="DoRA backward: the norm detached as in PEFT, or differentiated exactly (default: %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the task and the initialisation (default: %(default)s)")
    p.add_argument("--dtype", choices=FLOAT_NAMES, default=None,
                   help="training precision; bfloat16 is emulated in float32 (default: float64; "
                        "bfloat16 for qlora, computed as bitsandbytes + PEFT do)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="keep the exported ONNX graphs and adapter file in DIR (default: a temporary directory)")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export step")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.set_defaults(func=run, command="demo")


def run(args: argparse.Namespace) -> int:
    config = DemoConfig(method=args.method, rank=args.rank, alpha=args.alpha, steps=args.steps, lr=args.lr,
                        seed=args.seed, dtype=args.dtype, loraplus_ratio=args.loraplus_ratio,
                        dora_gradient=args.dora_gradient)
    config = resolved(config)
    print(f"refpeft demo: {config.method} r={config.rank} on a {config.d}x{config.k} layer (hidden delta: "
          f"{HIDDEN[config.method]}), {config.tokens} tokens, {config.dtype}")
    from tqdm import tqdm

    with tqdm(total=config.steps, desc="training", unit="step", disable=args.no_progress,
              file=sys.stderr, dynamic_ncols=True) as bar:
        def progress(step: int, loss: float) -> None:
            bar.update(1)
            if step % 10 == 0 or step == config.steps - 1:
                bar.set_postfix(loss=f"{loss:.3e}")

        report = run_demo(config, progress=progress)
    print(format_report(report))
    exported = True if args.no_export else export_step(report, args.out)
    return 0 if report.gradients_ok and report.loss_drop >= 100 and exported else 1


def export_step(report: DemoReport, out: str | None) -> bool:
    """Export the trained adapter to ONNX and check ONNX Runtime against refpeft; False if it disagrees."""
    try:
        from refpeft_onnx.demo import export_and_check, skip_reason
    except ImportError:
        print("  ONNX export      skipped: the exporter package refpeft_onnx is not installed")
        return True
    reason = skip_reason()
    if reason:
        print(f"  {reason}")
        return True
    with tempfile.TemporaryDirectory(prefix="refpeft-demo-") as tmp:
        lines = export_and_check(out or tmp, W0=report.frozen["W0"], bias=report.frozen["bias"],
                                 adapter=report.adapter())
    print("  ONNX export" + ("" if out else " (to a temporary directory; --out DIR keeps the files)"))
    for line in lines:
        print(f"    {line}")
    return not any("FAILED" in line for line in lines)


def format_report(report: DemoReport) -> str:
    grad_lines = ", ".join(f"d{name} {err:.1e}" for name, err in sorted(report.gradient_errors.items()))
    verdict = "ok" if report.gradients_ok else f"FAILED (tolerance {GRADIENT_TOLERANCE:.0e})"
    share = report.trainable_parameters / report.full_parameters
    return "\n".join([
        f"  loss            {report.losses[0]:.4e} -> {report.losses[-1]:.4e}  ({report.loss_drop:.3g}x lower)",
        f"  captured energy {report.captured_energy:.6f}  of the hidden delta (1 = recovered exactly)",
        f"  gradient check  {verdict}: worst relative error vs finite differences: {grad_lines}",
        f"  parameters      {report.trainable_parameters:,} trainable vs {report.full_parameters:,} for full "
        f"fine-tuning ({share:.2%})",
        f"  wall time       {report.seconds:.2f} s",
    ])
