"""`refpeft quantize`: a safetensors file's weights to NF4/FP4 in the bitsandbytes layout, with the error."""

from __future__ import annotations

import argparse
import functools
import math
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from refpeft.checkpoint import SafetensorsFile, dtype_code, write_safetensors_streaming
from refpeft.commands import options
from refpeft.errors import ConfigError, NonFiniteError
from refpeft.io import check_outputs, require_float
from refpeft.patterns import matches
from refpeft.quant.bnb_layout import to_state_dict
from refpeft.quant.chunked import flat_chunks, quantization_error, quantize_4bit_chunked
from refpeft.quant.codebooks import QUANT_TYPES, ROUNDINGS
from refpeft.quant.state import QuantState4bit, nominal_bits_per_parameter, stored_bytes

HELP = "quantise a safetensors file's weights to NF4/FP4 in the bitsandbytes layout and report the error"

DESCRIPTION = """\
Reads a safetensors file, quantises every 2-D tensor whose name matches --include (default: names
ending in "weight", except embeddings and lm_head, as bitsandbytes leaves them) to 4 bits, and
writes all tensors to OUTPUT in the layout bitsandbytes and transformers load (weight,
weight.absmax, weight.quant_map, [weight.nested_absmax, weight.nested_quant_map],
weight.quant_state.bitsandbytes__nf4). Other tensors (float8 ones too) are copied as they are.
A selected tensor must be float32, float16 or bfloat16: any other dtype (float8, an integer, an
already quantised weight) is refused by name; leave it out with --exclude.

Per tensor it reports the RMS error, the relative Frobenius error ||W - Q(W)|| / ||W|| and the
largest absolute error, then the bits per quantised parameter measured from the stored bytes.
A NaN or infinity anywhere is refused before anything is written; the output is written
atomically (temporary file, then rename).

Memory: the input is memory-mapped and read one tensor at a time, each weight quantised in chunks
of 2^18 elements, and the output streamed to disk: the peak is about one tensor above the baseline,
whatever the checkpoint's size. Each weight is quantised twice (the file's header, written first,
holds the double-quantisation offset, known only once a weight is quantised); it costs ~0.1 s per
64 MiB.
"""

DEFAULT_INCLUDE = r"weight$"
DEFAULT_EXCLUDE = r"(embed|lm_head|wte|wpe)"

# The float formats bitsandbytes quantises (a float64 weight is refused by name, not rounded silently).
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))

def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="safetensors file with float weights")
    p.add_argument("-o", "--output", type=Path, help="safetensors file to write (bitsandbytes 4-bit layout)")
    p.add_argument("positional_output", nargs="?", type=Path, metavar="OUTPUT", help="the same, given positionally")
    p.add_argument("--quant-type", choices=QUANT_TYPES, default="nf4", help="4-bit code (default: %(default)s)")
    p.add_argument("--blocksize", type=options.blocksize, default=64, help="block size (default: %(default)s)")
    options.add_double_quant(p)
    p.add_argument("--rounding", choices=ROUNDINGS, default="bnb-cuda",
                   help="which bitsandbytes implementation to reproduce bit for bit (default: %(default)s)")
    p.add_argument("--include", default=DEFAULT_INCLUDE, help="regex of tensor names to quantise (default: %(default)s)")
    p.add_argument("--exclude", default=DEFAULT_EXCLUDE, help="regex of names never quantised (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    p.set_defaults(func=run, command="quantize")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if (args.output is None) == (args.positional_output is None):
        problem = "give the output once" if args.output else "say where to write"
        raise ConfigError(f"{problem}: -o/--output OUTPUT.safetensors (or OUTPUT after the input)")
    args.output = args.output or args.positional_output
    check_outputs([args.output], inputs=[args.input])
    base = SafetensorsFile(args.input)
    names = base.keys()
    selected = {name for name in names
                if len(base.info(name).shape) == 2 and _named(args.include, name, "--include")
                and not (args.exclude and _named(args.exclude, name, "--exclude"))}
    quantize = functools.partial(_quantize, base, quant_type=args.quant_type, blocksize=args.blocksize,
                                 double_quant=args.double_quant, rounding=args.rounding)
    # Pass 1 (nothing written): refuse what cannot be quantised, and learn each weight's layout (the
    # quant_state record holds the double-quantisation offset, known only once quantised).
    entries = []
    for name in tqdm(names, desc="checking", unit="tensor", disable=args.no_progress, file=sys.stderr):
        if name in selected:
            entries += [(key, dtype_code(a.dtype), a.shape) for key, a in to_state_dict(quantize(name), prefix=name).items()]
        else:
            entries.append((name, base.info(name).dtype, base.info(name).shape))
    print(f"refpeft quantize: {len(selected)} of {len(names)} tensors to {args.quant_type} (block {args.blocksize}"
          f"{', double quantisation' if args.double_quant else ''}, rounding {args.rounding})")
    print(f"{'tensor':<48}{'shape':>16}{'rms err':>12}{'rel err':>10}{'max err':>12}")
    # Pass 2: quantise again, one weight at a time, as the writer asks for its tensors.
    held: dict[str, np.ndarray] = {}   # the other tensors of the weight being written
    total_sq = total_ref = 0.0
    stored = params = 0

    def produce(key: str) -> np.ndarray:
        nonlocal total_sq, total_ref, stored, params
        if key in held:
            return held.pop(key)
        if key not in selected:
            return base.read(key)
        state = quantize(key)
        error = quantization_error(base.read(key), state)
        total_sq, total_ref = total_sq + error.squared_error, total_ref + error.squared_norm
        stored, params = stored + sum(stored_bytes(state).values()), params + state.numel
        tqdm.write(f"{key:<48}{str(state.shape):>16}{error.rms:>12.4e}{error.relative:>10.4f}"
                   f"{error.max_abs_error:>12.4e}", file=sys.stdout)
        held.update(to_state_dict(state, prefix=key))
        return held.pop(key)

    with tqdm(total=sum(base.info(n).nbytes for n in names), desc="writing", unit="B", unit_scale=True,
              disable=args.no_progress, file=sys.stderr) as bar:
        write_safetensors_streaming(args.output, entries, produce, metadata=base.metadata or None,
                                    progress=lambda key, _: bar.update(base.info(key).nbytes if key in base else 0))
    if params:
        print(f"total: relative error {math.sqrt(total_sq / total_ref) if total_ref else 0.0:.4f}, "
              f"{8 * stored / params:.4f} bits per quantised parameter from the stored codes and constants "
              f"(nominal {nominal_bits_per_parameter(args.blocksize, double_quant=args.double_quant):.4f} "
              "without partial blocks)")
    print(f"wrote {args.output}")
    return 0


def _quantize(base: SafetensorsFile, name: str, **options) -> QuantState4bit:
    """Weight `name` of `base` quantised a chunk at a time; a weight that is not float32, float16 or
    bfloat16, or holds a NaN or infinity, is refused by name."""
    weight = require_float(base.read(name), name=name, source=base.path, accepted=_FLOAT_DTYPES,
                           hint="; leave it out with --exclude (it is then copied as it is)")
    bad = sum(int(np.count_nonzero(~np.isfinite(piece.astype(np.float32)))) for piece in flat_chunks(weight))
    if bad:
        raise NonFiniteError(f"{base.path}: tensor {name!r} holds {bad} non-finite value(s); nothing was written")
    return quantize_4bit_chunked(weight, **options)


def _named(pattern: str, name: str, option: str) -> bool:
    return matches(pattern, name, mode="search", where=f"quantize {option}")
