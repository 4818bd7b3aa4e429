"""`refpeft fuse`: combine PEFT LoRA adapters with weights into one adapter, and say what it cost."""

from __future__ import annotations

import argparse

from refpeft.commands import options
from refpeft.fusion import COMBINATIONS, SIGN_METHODS

HELP = "combine LoRA adapters with weights (cat, svd, linear, TIES/DARE) into one PEFT adapter"

DESCRIPTION = """\
Reads two or more HF PEFT LoRA adapter directories over the same base model, combines them layer
by layer with the given weights, writes the result as a PEFT adapter directory, and prints for
every layer what the result costs against the exact weighted sum Delta = sum_i w_i s_i B_i A_i:
its rank, ||Delta||_F, the measured error ||Delta - B A||_F, the Eckart-Young optimum for that
rank (the least error any adapter of that rank can have) and the energy fraction it must discard.

Combinations (HF PEFT's add_weighted_adapter, same numbers):
  cat        exact: ranks add up (recommended when the rank budget allows)
  svd        the best rank-r approximation of Delta, computed on the factors without ever forming
             the d x k matrix (recommended to compress; --rank or --energy picks r)
  linear     PEFT's equal-rank average of A's and B's: has cross terms, not the weighted sum
  ties, dare_linear, dare_ties, magnitude_prune     (need --density; dare_* need --seed)
  ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd   (dense, then truncated SVD)
The result has r = lora_alpha per layer (scaling 1), as PEFT's. See docs/fusion.md.
"""

EPILOG = """\
examples:
  refpeft fuse math/ code/ --weights 0.7 0.3 -o fused/                    exact (cat)
  refpeft fuse math/ code/ chat/ --combination svd --rank 16 -o fused/    compressed to rank 16
  refpeft fuse math/ code/ --combination svd --energy 0.95 -o fused/      smallest rank keeping 95%
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fuse", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="PEFT LoRA adapter directories")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="directory for the fused adapter")
    p.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="one weight per adapter (default 1 each); negative weights subtract")
    p.add_argument("--combination", default="cat", choices=COMBINATIONS, help="how to combine (default: cat)")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--rank", type=int, help="svd family: target rank (default: the largest input rank)")
    target.add_argument("--energy", type=float, metavar="F",
                        help="svd: per layer, the smallest rank keeping this fraction of the energy (e.g. 0.95)")
    p.add_argument("--density", type=float, help="TIES/DARE/magnitude_prune: fraction of entries kept")
    p.add_argument("--majority-sign", default="total", choices=SIGN_METHODS,
                   help="TIES sign election: by total mass or by count (default: total)")
    p.add_argument("--seed", type=options.seed, help="DARE: seed of the random drop (required for dare_*)")
    p.add_argument("--clamp", type=float, metavar="Q", help="svd family: PEFT's svd_clamp quantile")
    p.add_argument("--peft-weights", action="store_true",
                   help="round the weights to float32 as PEFT does, to reproduce its numbers bit for bit")
    p.add_argument("--dtype", choices=("float64", "float32"),
                   help="compute (and write) in this dtype (default: the files' own)")
    p.set_defaults(func=run, command="fuse")


def run(args: argparse.Namespace) -> int:
    from refpeft.errors import ConfigError
    from refpeft.fusion import combine_adapters
    from refpeft.io import check_outputs
    from refpeft.peft_format import adapter_files, read_peft_adapter, write_peft_adapter

    weights = args.weights if args.weights is not None else [1.0] * len(args.adapters)
    if len(weights) != len(args.adapters):
        raise ConfigError(f"{len(args.adapters)} adapters but {len(weights)} weights")
    check_outputs(adapter_files(args.output), inputs=args.adapters)
    adapters = [read_peft_adapter(path, dtype=args.dtype) for path in args.adapters]
    fused, reports = combine_adapters(
        adapters, weights, combination=args.combination, rank=args.rank, energy=args.energy,
        density=args.density, majority_sign_method=args.majority_sign, seed=args.seed, clamp=args.clamp,
        weight_dtype="float32" if args.peft_weights else "float64")
    write_peft_adapter(args.output, fused)
    print(f"{args.combination} of {len(adapters)} adapters, weights {', '.join(f'{w:g}' for w in weights)} "
          f"-> {args.output}")
    print(format_reports(reports))
    return 0


def format_reports(reports: dict) -> str:
    """One row per layer: rank, ||Delta||, measured error, Eckart-Young optimum, discarded energy."""
    from refpeft.commands.inspect import format_table

    columns = [("module", "module"), ("rank", "rank"), ("norm", "||Delta||_F"), ("error", "error"),
               ("relative", "rel. error"), ("optimal", "optimal error"), ("discarded", "discarded energy")]
    rows = [{"module": path, "rank": str(r.rank), "norm": f"{r.norm:.6g}", "error": f"{r.error:.6g}",
             "relative": f"{r.relative_error:.3e}", "optimal": f"{r.optimal_error:.6g}",
             "discarded": f"{r.discarded_energy:.4%}"} for path, r in reports.items()]
    worst = max(reports.values(), key=lambda r: r.relative_error)
    return format_table(rows, columns) + f"\nworst relative error: {worst.relative_error:.3e}"
