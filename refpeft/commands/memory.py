"""`refpeft memory`: the bytes of full fine-tuning, LoRA and QLoRA for a model's dimensions."""

from __future__ import annotations

import argparse

from refpeft.commands import options
from refpeft.errors import ConfigError
from refpeft.memory import BYTES, LINEARS, PRESETS, ModelShape, format_table, memory_table

HELP = "memory of full fine-tuning vs LoRA vs QLoRA for a model's dimensions (formulas in docs/memory.md)"

DESCRIPTION = """\
Prints, for full fine-tuning, LoRA and QLoRA, the bytes of the weights, the 4-bit quantisation
constants, the adapter, the gradients and the AdamW state, as a table in GiB. Give a preset
(--model) or the dimensions (--hidden, --intermediate, --layers, --vocab, optionally --kv).
Activations and the KV cache depend on batch and sequence length and are not included.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("memory", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(PRESETS), help="a preset model shape")
    p.add_argument("--hidden", type=options.positive, help="hidden size h")
    p.add_argument("--intermediate", type=options.positive, help="MLP intermediate size f")
    p.add_argument("--layers", type=options.positive, help="number of transformer blocks L")
    p.add_argument("--vocab", type=options.positive, help="vocabulary size V")
    p.add_argument("--kv", type=options.positive, default=None, help="key/value width with grouped-query attention (default: h)")
    p.add_argument("--tied-embeddings", action="store_true", help="lm_head shares the embedding matrix")
    p.add_argument("--rank", type=options.positive, default=16, help="adapter rank r (default: %(default)s)")
    p.add_argument("--targets", default=",".join(LINEARS),
                   help="comma-separated adapted linears (default: all seven: %(default)s)")
    p.add_argument("--precision", choices=sorted(BYTES), default="bfloat16",
                   help="precision of the (non-quantised) weights and of full fine-tuning (default: %(default)s)")
    p.add_argument("--adapter-precision", choices=sorted(BYTES), default="float32",
                   help="precision of adapter weights and gradients (default: %(default)s, PEFT's)")
    p.add_argument("--blocksize", type=options.blocksize, default=64, help="4-bit block size (default: %(default)s)")
    options.add_double_quant(p)
    p.set_defaults(func=run, command="memory")


def run(args: argparse.Namespace) -> int:
    dims = (args.hidden, args.intermediate, args.layers, args.vocab)
    if args.model is not None:
        model = PRESETS[args.model]
    elif all(v is not None for v in dims):
        model = ModelShape(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                           vocab=args.vocab, kv=args.kv, tied_embeddings=args.tied_embeddings)
    else:
        raise ConfigError("give --model or all of --hidden, --intermediate, --layers, --vocab")
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    rows = memory_table(model, rank=args.rank, targets=targets, precision=args.precision,
                        adapter_precision=args.adapter_precision, blocksize=args.blocksize,
                        double_quant=args.double_quant)
    name = args.model or f"h={model.hidden} f={model.intermediate} L={model.layers} V={model.vocab}"
    print(f"{name}: {model.parameters():,} parameters; rank {args.rank} on {', '.join(targets)}; "
          f"{args.precision} weights, {args.adapter_precision} adapters, NF4 block {args.blocksize}"
          f"{' + double quantisation' if args.double_quant else ''}")
    print(format_table(rows))
    return 0
