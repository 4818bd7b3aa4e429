"""`refpeft export`: a refpeft/PEFT adapter and its base as an ONNX model, verified before it is written."""

from __future__ import annotations

import argparse

from refpeft.commands import options

HELP = "export an adapter and its base to ONNX (merged, or unmerged with swappable adapter inputs; NF4 bases)"

DESCRIPTION = """\
Builds an ONNX graph of the base model (a stack of linear layers from one safetensors file) with a
HF PEFT adapter directory (LoRA, DoRA or VeRA; refpeft writes adapters in that format):

  --merged    (default) the adapter folded into each weight initializer: one MatMul per layer
  --unmerged  the base MatMul plus the adapter branch as separate nodes, every adapter tensor a
              graph input with a rank-0 default (no adapter = the base model); the adapter itself
              is written next to the model as an .onnx_adapter file for ONNX Runtime's multi-LoRA
  --nf4       the frozen weights stored as NF4 (~4.127 bits/parameter with double quantisation),
              computed by com.microsoft.MatMulBnb4 (--nf4-ops bnb4, ONNX Runtime) or by standard
              ops (--nf4-ops standard, any runtime). A base file already in bitsandbytes' 4-bit
              layout is exported as NF4 as it is.

Base file: `<layer>.weight` (d, k) and optional `<layer>.bias` tensors; the layer order and the
activation between layers come from its `refpeft.stack` metadata or from --layers/--activation.
The input x is (batch, sequence, k) with both leading axes symbolic.

Before anything is written, the graph must pass onnx.checker (full shape inference) and ONNX
Runtime's output must match refpeft's float64 reference on random inputs within the error bound
derived for the graph's dtype (refpeft.tolerance). Otherwise nothing is written and the command
says by how much the output missed (exit status 2).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapters", nargs="*", metavar="ADAPTER_DIR",
                   help="PEFT adapter directory (omit it to export the base alone); a whole model takes several "
                        "with --unmerged, each DIR or NAME=DIR, and PROMPT_TUNING, P_TUNING or PREFIX_TUNING "
                        "folders (as every layer's prefix keys and values; not mixed with other adapters)")
    add_base_options(p)
    p.add_argument("-o", "--output", required=True, metavar="MODEL.onnx|DIR",
                   help="ONNX model to write (a folder for a whole model)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--merged", dest="form", action="store_const", const="merged",
                      help="fold the adapter into the weights (default)")
    form.add_argument("--unmerged", dest="form", action="store_const", const="unmerged",
                      help="keep the adapter branch as separate nodes with swappable inputs")
    p.set_defaults(form="merged")
    p.add_argument("--adapter-out", metavar="FILE.onnx_adapter",
                   help="with --unmerged: where to write the adapter file (default: MODEL.onnx_adapter)")
    p.add_argument("--nf4-ops", choices=("bnb4", "standard"), default="bnb4",
                   help="NF4 bases: com.microsoft.MatMulBnb4 (ONNX Runtime) or standard ops (default: %(default)s)")
    p.add_argument("--opset", type=int, default=21, help="ONNX opset to record and use (21-23; default: %(default)s)")
    p.add_argument("--bound", choices=("rigorous", "probabilistic"), default="rigorous",
                   help="error model of the verification bound: the worst case over every summation order, or "
                        "Higham & Mary's probabilistic one, ~sqrt(k)/6 tighter (default: %(default)s)")
    p.set_defaults(func=run, command="export")


def add_base_options(p: argparse.ArgumentParser) -> None:
    """Options shared with `refpeft export-adapter`: the base model and the graph's dtype."""
    p.add_argument("--base", required=True, metavar="BASE",
                   help="the base: a safetensors stack of linear layers, or (export only) a whole model, a "
                        "transformers folder or a .gguf file")
    p.add_argument("--layers", metavar="NAME,NAME,...",
                   help="layer order (default: the base file's refpeft.stack metadata, or its one weight)")
    p.add_argument("--activation", choices=("relu", "gelu", "tanh", "identity"),
                   help="activation between layers (default: from the base file's metadata, else relu)")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                   help="the graph's dtype (default: %(default)s)")
    p.add_argument("--nf4", action="store_true", help="store the frozen weights as NF4")
    p.add_argument("--blocksize", type=options.blocksize, default=64, help="NF4 block size (default: %(default)s)")
    options.add_double_quant(p)


def load(args: argparse.Namespace):
    """The base stack (NF4-quantised with --nf4) and the adapter, from the shared options."""
    from refpeft_onnx.exporter import load_inputs
    from refpeft_onnx.nf4 import quantize_stack

    layers = args.layers.split(",") if args.layers else None
    stack, adapter = load_inputs(args.base, args.adapter, layers=layers, activation=args.activation)
    if args.nf4:
        stack = quantize_stack(stack, blocksize=args.blocksize, double_quant=args.double_quant)
    return stack, adapter


def require_onnx() -> None:
    """ConfigError (exit status 2, a clear message) when the `onnx` extra is missing."""
    from refpeft.errors import ConfigError
    from refpeft_onnx import missing_extra

    problem = missing_extra()
    if problem:
        raise ConfigError(f"ONNX export is unavailable: {problem}")


def run(args: argparse.Namespace) -> int:
    require_onnx()
    from refpeft.errors import ConfigError
    from refpeft.io import check_outputs
    from refpeft_onnx.decoder_export import is_model_base
    from refpeft_onnx.exporter import export_model

    if is_model_base(args.base):
        return run_decoder(args)
    if len(args.adapters) > 1:
        raise ConfigError(f"a stack of linear layers takes one adapter, got {len(args.adapters)}")
    args.adapter = args.adapters[0] if args.adapters else None
    check_outputs([args.output, *([args.adapter_out] if args.adapter_out else [])],
                  inputs=[args.base, *([args.adapter] if args.adapter else [])])
    stack, adapter = load(args)
    result = export_model(args.output, stack, adapter, form=args.form, dtype=args.dtype, nf4_ops=args.nf4_ops,
                          opset=args.opset, adapter_path=args.adapter_out, bound_model=args.bound)
    what = "the base" if adapter is None else f"a {adapter.method} adapter ({len(adapter.modules)} modules)"
    print(f"refpeft export: {args.form} {args.dtype} graph of {what} on {len(stack.layers)} layers, opset {args.opset}")
    print(f"  verified: {result.report.summary()}")
    for name, bits in result.bits_per_parameter.items():
        print(f"  {name}: NF4 ({args.nf4_ops}), {bits:.4f} bits per parameter stored")
    print(f"  wrote {result.model_path}" + (f" and {result.adapter_path}" if result.adapter_path else ""))
    return 0


def run_decoder(args: argparse.Namespace) -> int:
    """A whole model (refpeft_onnx.decoder_export): a folder onnxruntime-genai runs."""
    from refpeft.errors import ConfigError
    from refpeft_onnx.decoder_export import export_decoder, load_base, read_adapters

    stack_only = [flag for flag, value in (("--layers", args.layers), ("--activation", args.activation),
                                           ("--adapter-out", args.adapter_out)) if value is not None]
    if stack_only:
        raise ConfigError(f"{', '.join(stack_only)} apply to a stack of linear layers, not to a whole model")
    model, tokenizer = load_base(args.base, nf4_blocksize=args.blocksize if args.nf4 else None,
                                 double_quant=args.double_quant)
    adapters = read_adapters(model, args.adapters)
    inputs = [args.base, *(spec.rpartition("=")[2] for spec in args.adapters)]
    result = export_decoder(args.output, model, tokenizer, adapters, form=args.form, dtype=args.dtype,
                            nf4_ops=args.nf4_ops, opset=args.opset, inputs=inputs)
    what = "the base" if not adapters else ", ".join(f"{n} ({describe_adapter(a)})" for n, a in adapters.items())
    c = model.config
    print(f"refpeft export: {args.form} {args.dtype} {c.model_type} decoder ({c.num_hidden_layers} layers) with "
          f"{what}{', NF4 base' if args.nf4 else ''}, opset {args.opset}, in {result.seconds:.1f} s")
    print(f"  verified: {result.report.summary()}")
    print(f"  wrote {result.folder} (model.onnx, genai_config.json{', tokenizer' if tokenizer else ''}"
          f"{', adapters/' + ', '.join(result.adapter_files) if result.adapter_files else ''})")
    return 0


def describe_adapter(adapter) -> str:
    """An adapter's method and size: its adapted modules, or a prompt adapter's virtual tokens."""
    from refpeft_onnx.prefix_graph import PromptAdapter

    if isinstance(adapter, PromptAdapter):
        return f"{adapter.peft_type}, {adapter.length} virtual tokens"
    return f"{adapter.method}, {len(adapter.modules)} modules"
