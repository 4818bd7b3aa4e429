"""`refpeft export-adapter`: an adapter as an .onnx_adapter file for an unmerged ONNX graph."""

from __future__ import annotations

import argparse

from refpeft.commands.export import add_base_options, load, require_onnx

HELP = "write a PEFT adapter as an ONNX Runtime .onnx_adapter file for an unmerged exported graph"

DESCRIPTION = """\
Writes the tensors of a HF PEFT adapter directory (LoRA, DoRA, VeRA) in ONNX Runtime's adapter
format (onnxruntime.AdapterFormat), named after the inputs of the graph `refpeft export --unmerged`
builds over the same base: {layer}.lora_A_t, .lora_B_t, .lora_scaling (+ .dora_scale, the fixed
per-row DoRA scale m / ||W0 + s B A||, which needs the base weights), or VeRA's .vera_lambda_d and
.vera_lambda_b. Load it with onnxruntime.LoraAdapter and activate it per run
(RunOptions.add_active_adapter), or through refpeft_onnx.serving.AdapterSession.

With --model, every tensor is checked against that graph's inputs (names, dtype, sizes) before
the file is written; give the same --dtype (and --nf4 options, for DoRA on an NF4 base) as the export.

For a whole model (--base a transformers folder or .gguf file), --model is required: the decoder
`refpeft export --unmerged` or `refpeft attach` wrote; the file takes the graph's dtype, and this
is how one more adapter joins an exported model without exporting it again.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export-adapter", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter", metavar="ADAPTER_DIR", help="PEFT adapter directory")
    add_base_options(p)
    p.add_argument("-o", "--output", required=True, metavar="FILE.onnx_adapter", help="adapter file to write")
    p.add_argument("--model", metavar="MODEL.onnx", help="the unmerged graph the file is for: check against its inputs")
    p.set_defaults(func=run, command="export-adapter")


def run(args: argparse.Namespace) -> int:
    require_onnx()
    from refpeft.io import check_outputs
    from refpeft_onnx.decoder_export import is_model_base
    from refpeft_onnx.exporter import export_adapter_file

    check_outputs([args.output], inputs=[args.adapter, args.base, *([args.model] if args.model else [])])
    if is_model_base(args.base):
        return run_decoder(args)
    stack, adapter = load(args)
    path = export_adapter_file(args.output, stack, adapter, dtype=args.dtype, model=args.model)
    checked = f", checked against {args.model}" if args.model else ""
    print(f"refpeft export-adapter: {adapter.method} adapter, {len(adapter.modules)} modules, {args.dtype}{checked}: "
          f"wrote {path}")
    return 0


def run_decoder(args: argparse.Namespace) -> int:
    """An adapter file for a whole decoder already exported (refpeft_onnx.decoder_export)."""
    from refpeft.errors import ConfigError
    from refpeft_onnx.decoder_export import export_decoder_adapter, load_base, read_adapters

    if args.model is None:
        raise ConfigError("a whole model's adapter file needs --model: the decoder graph it is for")
    model, _ = load_base(args.base, nf4_blocksize=args.blocksize if args.nf4 else None,
                         double_quant=args.double_quant)
    [(name, adapter)] = read_adapters(model, [args.adapter]).items()
    path = export_decoder_adapter(args.output, args.model, model, adapter)
    from refpeft.commands.export import describe_adapter

    print(f"refpeft export-adapter: {name} ({describe_adapter(adapter)}), checked against "
          f"{args.model}: wrote {path}")
    return 0
