"""`refpeft conformance`: generate the golden vectors, check an implementation, report on the peers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "golden vectors: generate them, check an implementation against them, report on every peer"

DESCRIPTION = """\
The conformance suite: refpeft as an oracle for other implementations.

  generate   write every catalogued case (inputs in the case's dtype, float64 expected results,
             per-element error bounds) as safetensors + JSON manifests; byte-identical on any machine
  check      run one implementation (a Python function, MODULE:FUNCTION) on every case
  report     run every installed runner (refpeft itself, HF PEFT on torch, bitsandbytes,
             ONNX Runtime) and print a table per implementation: pass/fail, worst error / bound,
             differing bytes for bit-exact results
  onnx       check someone else's ONNX decoder and .onnx_adapter against the PEFT adapter they
             claim to represent, naming what is wrong (exit 2) when they disagree

A result passes when |actual - expected| <= bound for every element; the bound is derived from the
computation (refpeft.tolerance, docs/tolerance.md). conformance/README.md specifies the format.
Exit status: 0 when every expected pass passes, 1 otherwise (`onnx`: 0 when they agree, 2 otherwise).
"""

DEFAULT_VECTORS = Path("conformance") / "vectors"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("conformance", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(title="subcommands", metavar="SUBCOMMAND", required=True)
    g = sub.add_parser("generate", help="write the golden vectors of every case",
                       description="Write NAME.safetensors and NAME.json for every catalogued case, and index.json.")
    g.add_argument("--out", type=Path, default=DEFAULT_VECTORS, help="vectors directory (default: %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    g.set_defaults(func=run_generate)
    c = sub.add_parser("check", help="check one implementation (MODULE:FUNCTION, or a directory of results)",
                       description="Import FUNCTION from MODULE and run it on every case (the protocol: "
                                   "impl(manifest: dict, inputs: dict[str, ndarray]) -> dict[str, ndarray] | None), "
                                   "or read the results an implementation in any language wrote as "
                                   "DIRECTORY/NAME.safetensors (one tensor per result name); conformance/README.md.")
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--impl", metavar="MODULE:FUNCTION", help="the Python implementation to check")
    which.add_argument("--results", type=Path, metavar="DIRECTORY", help="results written by any implementation")
    c.add_argument("--vectors", type=Path, default=DEFAULT_VECTORS, help="vectors directory (default: %(default)s)")
    c.add_argument("--case", action="append", metavar="NAME", help="only this case (repeatable)")
    c.set_defaults(func=run_check)
    r = sub.add_parser("report", help="run every installed runner and print a table per implementation",
                       description="Run refpeft itself, HF PEFT (torch CPU, CUDA when present), bitsandbytes and "
                                   "ONNX Runtime on every case; runners whose peer is missing are listed as not run.")
    r.add_argument("--vectors", type=Path, default=None,
                   help="vectors directory (default: conformance/vectors when present, else generated afresh)")
    r.add_argument("--case", action="append", metavar="NAME", help="only this case (repeatable)")
    r.add_argument("--runner", action="append", metavar="MODULE",
                   help="only this runner module (refpeft_self, peft_torch, bitsandbytes_cpu, onnxruntime, "
                        "adapters_library; repeatable)")
    r.set_defaults(func=run_report)
    o = sub.add_parser("onnx", help="check an ONNX decoder + .onnx_adapter against the PEFT adapter they represent",
                       description="Run MODEL.onnx with ADAPTER.onnx_adapter's tensors as inputs in ONNX Runtime on "
                                   "random token ids and compare every logit with refpeft's float64 decoder with the "
                                   "PEFT adapter, within the rounding bound of the graph's dtype. When they disagree, "
                                   "each hypothesis (scale not folded or folded twice, A/B transposed, rank/alpha "
                                   "pattern ignored, DoRA magnitude dropped, no adapter applied, names that do not "
                                   "match the graph) is tested against the reference and the ones that fit are "
                                   "named. Without ADAPTER the graph is checked as it is (an adapter baked into its "
                                   "weights). Exit status: 0 when they agree, 2 otherwise.")
    o.add_argument("model", type=Path, metavar="MODEL.onnx", help="the decoder graph (any exporter)")
    o.add_argument("adapter", type=Path, nargs="?", metavar="ADAPTER.onnx_adapter",
                   help="the adapter's tensors for the graph's inputs (omit for an adapter baked into the graph)")
    o.add_argument("--peft", type=Path, required=True, metavar="ADAPTER_DIR", help="the PEFT adapter folder")
    o.add_argument("--base", type=Path, required=True, metavar="BASE", help="the base: a model folder or a GGUF file")
    o.add_argument("--seed", type=int, default=0, help="seed of the random token ids (default: %(default)s)")
    o.set_defaults(func=run_onnx)
    p.set_defaults(command="conformance")


def run_generate(args: argparse.Namespace) -> int:
    from refpeft.conformance.generate import generate_available

    manifests, skipped = generate_available(args.out, progress=not args.no_progress)
    print(f"wrote {len(manifests)} cases to {args.out}")
    reasons: dict[tuple[str, ...], list[str]] = {}
    for name, missing in skipped.items():
        reasons.setdefault(tuple(missing), []).append(name)
    for missing, names in sorted(reasons.items()):
        hint = " (install refpeft[onnx] for exported graphs)" if "onnx" in missing else ""
        print(f"skipped {len(names)} case(s) that need {', '.join(missing)}, not importable here{hint}: "
              f"{', '.join(names)}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from refpeft.conformance.check import Summary, check_directory, load_implementation, results_directory
    from refpeft.conformance.report import format_summary, format_table

    impl = load_implementation(args.impl) if args.impl else results_directory(args.results)
    name = args.impl or str(args.results)
    reports = check_directory(impl, args.vectors, implementation=name, names=args.case)
    print(format_table([r for r in reports if r.status != "unsupported"]))
    print(format_summary(name, reports))
    return 0 if Summary.of(reports).ok else 1


def run_onnx(args: argparse.Namespace) -> int:
    from refpeft_onnx import missing_extra

    problem = missing_extra()
    if problem is not None:
        print(f"refpeft conformance onnx: {problem}", file=sys.stderr)
        return 2
    from refpeft_onnx.artifact_check import check_artifacts

    report = check_artifacts(args.model, args.adapter, args.peft, args.base, seed=args.seed)
    print(report.format())
    return 0 if report.passed else 2


def run_report(args: argparse.Namespace) -> int:
    # The one place refpeft imports the peers' runners (conformance/refpeft_peers): the report itself
    # takes them as an argument, so refpeft.conformance never depends on the package that wraps the peers.
    from refpeft.conformance.report import run_report as report
    from refpeft_peers import RUNNER_MODULES, load_runners

    modules = tuple(args.runner) if args.runner else RUNNER_MODULES
    unknown = sorted(set(modules) - set(RUNNER_MODULES))
    if unknown:
        print(f"refpeft conformance: unknown runner(s) {', '.join(unknown)}; choose from "
              f"{', '.join(RUNNER_MODULES)}", file=sys.stderr)
        return 2
    runners, missing = load_runners(modules)
    vectors = args.vectors
    if vectors is None and (DEFAULT_VECTORS / "index.json").is_file():
        vectors = DEFAULT_VECTORS
    return 0 if report(vectors, runners=runners, missing=missing, names=args.case, out=sys.stdout) else 1
