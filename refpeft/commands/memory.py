"""`refpeft memory`: the bytes of full fine-tuning, LoRA and QLoRA for a model's dimensions."""

from __future__ import annotations

import argparse

from refpeft.commands import options
from refpeft.errors import ConfigError
from refpeft.memory import (BYTES, LINEARS, PRESETS, TRAINABLE_TOKENS, ModelShape, format_table, memory_table,
                            token_method_row)
from refpeft.model.prompt_methods import PROMPT_METHODS
from refpeft.model.p_tuning import ENCODERS

HELP = ("memory of full fine-tuning vs LoRA vs QLoRA (and prompt, prefix, trainable-token methods) for a model's "
        "dimensions (formulas in docs/memory.md)")

DESCRIPTION = """\
Prints, for full fine-tuning, LoRA and QLoRA, the bytes of the weights, the 4-bit quantisation
constants, the adapter, the gradients and the AdamW state, as a table in GiB. Give a preset
(--model) or the dimensions (--hidden, --intermediate, --layers, --vocab, optionally --kv).
Activations and the KV cache depend on batch and sequence length and are not included.

--method adds a row for a method that trains tokens on the frozen base: prompt (k x h), p-tuning
(k x h plus the encoder, --encoder mlp|lstm of width --encoder-hidden, --encoder-layers for the
LSTM), prefix (L x k x 2 x kv, plus the reparameterisation MLP with --projection) for
--virtual-tokens k, or trainable-tokens (n x h) for --tokens n.
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
    t = p.add_argument_group("methods that train tokens (--method)")
    t.add_argument("--method", choices=[*PROMPT_METHODS, TRAINABLE_TOKENS],
                   help="add a row for prompt tuning, P-tuning, prefix tuning or trainable tokens")
    t.add_argument("--virtual-tokens", type=options.positive, default=20, metavar="K",
                   help="virtual tokens k of prompt, p-tuning, prefix (default: %(default)s)")
    t.add_argument("--tokens", type=options.positive, default=None, metavar="N",
                   help="trainable-tokens: the number of trained token rows n")
    t.add_argument("--encoder", choices=[e.lower() for e in ENCODERS], default="mlp",
                   help="p-tuning's prompt encoder (default: %(default)s)")
    t.add_argument("--encoder-hidden", type=options.positive, default=None, metavar="E",
                   help="the encoder's (or prefix MLP's) width (default: PEFT's token_dim: h, or kv for prefix)")
    t.add_argument("--encoder-layers", type=options.positive, default=2,
                   help="p-tuning's LSTM layers (default: %(default)s)")
    t.add_argument("--projection", action="store_true", help="prefix: PEFT's prefix_projection MLP")
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
    if args.method is not None:
        rows.append(_token_row(model, args))
    print(format_table(rows))
    return 0


def _token_row(model: ModelShape, args: argparse.Namespace):
    """The --method row; --tokens belongs to trainable-tokens, --virtual-tokens to the others."""
    if (args.method == TRAINABLE_TOKENS) != (args.tokens is not None):
        raise ConfigError("--tokens N gives trainable-tokens' row count (and only its)")
    count = args.tokens if args.method == TRAINABLE_TOKENS else args.virtual_tokens
    return token_method_row(model, args.method, tokens=count, precision=args.precision,
                            adapter_precision=args.adapter_precision, encoder=args.encoder.upper(),
                            encoder_hidden_size=args.encoder_hidden, encoder_num_layers=args.encoder_layers,
                            projection=args.projection)
