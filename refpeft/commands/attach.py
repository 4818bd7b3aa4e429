"""`refpeft attach`: PEFT adapters attached to an ONNX export of the base made elsewhere."""

from __future__ import annotations

import argparse

HELP = "attach PEFT adapters (unmerged, swappable) to an ONNX export of the base made by another tool"

DESCRIPTION = """\
Takes MODEL.onnx, the base decoder exported by another tool (torch.onnx, optimum, the
onnxruntime-genai model builder), the base itself (--base: a transformers folder or a .gguf file)
and PEFT adapter folders (DIR or NAME=DIR). Each adapted layer's MatMul is found in the graph by
its weight's value (W^T, W behind a Transpose, or a column block of a fused q/k/v weight), and
refpeft's unmerged branch is inserted after it with its tensors as swappable inputs (no adapter
fed = the base). Attaches: LoRA, rsLoRA, rank/alpha patterns, DoRA, VeRA, LoHa (as rank r^2
low-rank factors) and LoKr (full or low-rank factors, decompose_both), the branches that add to
x W0^T or rescale it (Pre-Diag too, from Python: refpeft_onnx.decoder_export.attach_adapters).
Refused (exit status 2): IA3 and OFT, which scale or rotate the layer's input the graph's MatMul
already consumed (export them with `refpeft export`), merged-only methods (BOFT, SORA), prompt
learning, adapters that train base biases, modules_to_save or trainable tokens. Writes
OUT_DIR/model.onnx, OUT_DIR/adapters/NAME.onnx_adapter and copies the files beside MODEL.onnx
(genai_config.json, the tokenizer), after ONNX Runtime's logits with each adapter agree with refpeft's float64 reference
within the bound for the graph's dtype; nothing is written otherwise (exit status 2).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("attach", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL.onnx", help="the base exported to ONNX by another tool")
    p.add_argument("adapters", nargs="+", metavar="ADAPTER_DIR", help="PEFT adapter folders, each DIR or NAME=DIR")
    p.add_argument("--base", required=True, metavar="BASE", help="the base model: a transformers folder or .gguf file")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="folder to write (must not exist)")
    p.set_defaults(func=run, command="attach")


def run(args: argparse.Namespace) -> int:
    from refpeft.commands.export import require_onnx

    require_onnx()
    from refpeft_onnx.decoder_export import attach_adapters, load_base, read_adapters

    model, _ = load_base(args.base)
    adapters = read_adapters(model, args.adapters)
    inputs = [args.base, *(spec.rpartition("=")[2] for spec in args.adapters)]
    result = attach_adapters(args.output, args.model, model, adapters, inputs=inputs)
    print(f"refpeft attach: {', '.join(f'{n} ({a.method}, {len(a.modules)} modules)' for n, a in adapters.items())} "
          f"attached to {args.model} in {result.seconds:.1f} s")
    print(f"  verified: {result.report.summary()}")
    print(f"  wrote {result.folder} (model.onnx, adapters/{', '.join(result.adapter_files)})")
    return 0
