"""`refpeft inspect`: what a PEFT adapter holds, module by module."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

HELP = "list a PEFT adapter's modules with their ranks, alphas, scalings and parameter counts"

DESCRIPTION = """\
Reads a HF PEFT adapter directory (adapter_model.safetensors + adapter_config.json), checks it
completely (keys, shapes, ranks against the config, finite values) and prints one row per
adapted module: its method, layer size (d x k: outputs x inputs), rank r, alpha, scaling s
(alpha / r, or alpha / sqrt(r) with rsLoRA) and trainable parameter count, then the modules
saved in full (PEFT's modules_to_save) with their tensors' shapes, and the totals.
VeRA files do not record a layer's input size k; it is shown when the projections are saved
(as k_max) or with --base. Exit status 2 and a message naming the file and key if anything is wrong.

--compare OTHER and --amplification (with --base) add the LoRA paper's section 7 analyses
(refpeft.analysis, docs/lora_analyses.md): the subspace similarity of two adapters' A matrices, and
how much an update amplifies directions the base weight barely uses.
"""

# Columns of the module table, in order: (row key, heading). A command option that adds a column
# (say a spectrum summary) appends to this list and fills the key in each row (see `module_rows`).
COLUMNS = [("module", "module"), ("method", "method"), ("size", "d x k"), ("r", "r"), ("alpha", "alpha"),
           ("scaling", "scaling"), ("params", "params")]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="PEFT adapter directory")
    p.add_argument("--base", metavar="MODEL.safetensors",
                   help="base checkpoint: also check every adapted layer's size against it")
    p.add_argument("--spectrum", action="store_true",
                   help="also print each layer's singular values of s B A and energy curve E(r) (refpeft.plots)")
    p.add_argument("--plot", metavar="FILE.png", help="write the spectra and energy curves as a PNG (matplotlib); "
                   "with --compare, the subspace-similarity heatmaps instead")
    p.add_argument("--compare", metavar="OTHER_ADAPTER_DIR",
                   help="the LoRA paper's subspace similarity phi(A1, A2, i, j) against another adapter of the "
                        "same layers (any ranks), beside the random baseline max(i, j) / k")
    p.add_argument("--amplification", action="store_true",
                   help="with --base: the LoRA paper's amplification factor ||dW|| / ||U^T W V|| per layer, and "
                        "the DoRA paper's magnitude and direction change of the merged weight")
    p.set_defaults(func=run, command="inspect")


def run(args: argparse.Namespace) -> int:
    from refpeft.checkpoint import SafetensorsFile
    from refpeft.peft_format import read_peft_adapter, read_peft_adapter_with_base

    if args.amplification and args.base is None:
        from refpeft.errors import ConfigError

        raise ConfigError("--amplification compares the adapter with its base weights: give --base MODEL.safetensors")
    if args.plot:
        from refpeft.io import check_outputs
        from refpeft.plots import require_matplotlib

        require_matplotlib()
        check_outputs([args.plot], inputs=[args.adapter, *(p for p in (args.base, args.compare) if p)])
    base_shapes = None
    if args.base is None:
        adapter = read_peft_adapter(args.adapter)
    else:
        base = SafetensorsFile(args.base)
        adapter = read_peft_adapter_with_base(args.adapter, base)
        # VeRA's tensors do not give k: the base's header does (every layer is there, checked above).
        base_shapes = base.linear_shapes(adapter.modules, fan_in_fan_out=bool(adapter.config.get("fan_in_fan_out")))
    print(describe(adapter, source=args.adapter, base_shapes=base_shapes))
    if args.compare:
        _print_similarity(adapter, args)
    if args.amplification:
        from refpeft.commands.inspect_analyses import AMPLIFICATION_COLUMNS, amplification_rows

        print("amplification (LoRA paper, section 7.3) and magnitude/direction change (DoRA paper):")
        print(format_table(amplification_rows(adapter, base), AMPLIFICATION_COLUMNS))
    if args.spectrum or (args.plot and not args.compare):
        from refpeft.plots import format_spectra, plot_spectra
        from refpeft.spectrum import adapter_spectra

        spectra = adapter_spectra(adapter)
        print(format_spectra(spectra))
        if args.plot:
            print(f"plot: {plot_spectra(spectra, args.plot, title=str(args.adapter))}")
    return 0


def _print_similarity(adapter: Any, args: argparse.Namespace) -> None:
    from refpeft.commands.inspect_analyses import SIMILARITY_COLUMNS, similarity_rows
    from refpeft.peft_format import read_peft_adapter

    rows, grids = similarity_rows(adapter, read_peft_adapter(args.compare))
    print(f"subspace similarity against {args.compare} (LoRA paper, section 7.2; m = min(r1, r2)):")
    print(format_table(rows, SIMILARITY_COLUMNS))
    if args.plot:
        from refpeft.plots import plot_similarity

        print(f"plot: {plot_similarity(grids, args.plot, labels=(str(args.adapter), str(args.compare)))}")


def describe(adapter: Any, *, source: str, columns: list[tuple[str, str]] = COLUMNS,
             base_shapes: Mapping[str, Any] | None = None) -> str:
    """The report `refpeft inspect` prints: a header line, the module table and the totals.
    base_shapes: each layer's LinearShape from the base (--base), for the sizes the file does not record."""
    config = adapter.config
    rows = module_rows(adapter, base_shapes=base_shapes)
    kind = adapter.method if adapter.modules else "embedding rows only"
    lines = [f"{source}: {config['peft_type']} adapter ({kind}), {len(rows)} modules"
             + (", rsLoRA" if config.get("use_rslora") else "")
             + (", fan_in_fan_out" if config.get("fan_in_fan_out") else "")
             + (f", bias={config['bias']!r}" if config.get("bias", "none") != "none" else "")]
    if any(m.spec.shared for m in adapter.modules.values()):             # VeRA's projections
        seed = config.get("projection_prng_key")
        lines.append("shared projections: " + (f"vera_A {tuple(adapter.vera_A.shape)}, vera_B "
                                               f"{tuple(adapter.vera_B.shape)}" if adapter.vera_A is not None else
                                               f"not saved; regenerated from projection_prng_key = {seed} "
                                               "with the base's sizes (--base)"))
    lines.append(format_table(rows, columns))
    saved = adapter.saved_modules
    if saved:
        lines.append(f"saved in full (modules_to_save: {', '.join(adapter.saved_module_paths)}): "
                     + ", ".join(f"{name} {' x '.join(map(str, value.shape))}" for name, value in saved.items()))
    if adapter.token_indices:
        shown = ", ".join(map(str, adapter.token_indices[:12])) + (", ..." if len(adapter.token_indices) > 12 else "")
        lines.append(f"trainable tokens: {len(adapter.token_indices)} rows of the embedding (ids {shown}), values "
                     f"{' x '.join(map(str, adapter.token_values.shape))}")
    total = sum(int(row["params"]) for row in rows)
    tokens = int(adapter.token_values.size) if adapter.token_indices else 0
    extra = sum(int(b.size) for b in adapter.base_biases.values())
    whole = sum(int(v.size) for v in saved.values())
    lines.append(f"total: {total} adapter parameters" + (f" + {extra} trained bias values" if extra else "")
                 + (f" + {whole} values of saved modules" if whole else "")
                 + (f" + {tokens} values of trainable token rows" if tokens else ""))
    return "\n".join(lines)


def module_rows(adapter: Any, *, base_shapes: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
    """One dict per module with a string for each key of COLUMNS; a size the file does not record
    (VeRA's k) comes from base_shapes when given, else is shown as the bound <= k_max or "?"."""
    rows = []
    k_max = adapter.vera_A.shape[1] if adapter.vera_A is not None else None
    for path, m in adapter.modules.items():
        d, k = m.out_features, m.in_features
        if base_shapes is not None and path in base_shapes:   # sizes the file does not record (VeRA's k)
            k = base_shapes[path].k if k is None else k
            d = base_shapes[path].d if d is None else d
        size = f"{d} x {k}" if k is not None else f"{d} x " + (f"<={k_max}" if k_max is not None else "?")
        params = m.spec.parameter_count(k, d, m)
        alpha, scaling = (f"{m.alpha:g}", f"{m.scaling:.6g}") if m.spec.scaled else ("-", "-")
        rows.append({"module": path, "method": m.method, "size": size, "r": str(m.r), "alpha": alpha,
                     "scaling": scaling, "params": str(params)})
    return rows


def format_table(rows: list[dict[str, str]], columns: list[tuple[str, str]]) -> str:
    """Rows as aligned text columns (text left-aligned, the rest right-aligned)."""
    widths = [max([len(head)] + [len(row[key]) for row in rows]) for key, head in columns]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line([head for _, head in columns])] + [line([row[key] for key, _ in columns]) for row in rows])
