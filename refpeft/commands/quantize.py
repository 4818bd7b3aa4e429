"""`refpeft quantize`: a safetensors file's weights to NF4/FP4 in the bitsandbytes layout, with the error."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from refpeft.errors import ConfigError, NonFiniteError
from refpeft.io import check_outputs, read_safetensors, require_float, write_safetensors
from refpeft.patterns import matches
from refpeft.quant.blockwise import BLOCKSIZES
from refpeft.quant.bnb_layout import to_state_dict
from refpeft.quant.codebooks import QUANT_TYPES, ROUNDINGS
from refpeft.quant.state import dequantize_4bit, nominal_bits_per_parameter, quantize_4bit, stored_bytes

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
"""

DEFAULT_INCLUDE = r"weight$"
DEFAULT_EXCLUDE = r"(embed|lm_head|wte|wpe)"

# The float formats a weight may be stored in. Importing ml_dtypes registers "bfloat16" with NumPy,
# which is what lets safetensors' NumPy reader and writer (refpeft.io) handle bfloat16 tensors.
_FLOAT_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                np.dtype(ml_dtypes.bfloat16): "bfloat16"}

def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", type=Path, help="safetensors file with float weights")
    p.add_argument("-o", "--output", type=Path, help="safetensors file to write (bitsandbytes 4-bit layout)")
    p.add_argument("positional_output", nargs="?", type=Path, metavar="OUTPUT", help="the same, given positionally")
    p.add_argument("--quant-type", choices=QUANT_TYPES, default="nf4", help="4-bit code (default: %(default)s)")
    p.add_argument("--blocksize", type=int, choices=BLOCKSIZES, default=64, help="block size (default: %(default)s)")
    p.add_argument("--double-quant", action="store_true", help="also quantise the absmaxes to 8 bits (QLoRA's recipe)")
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
    tensors, _ = read_safetensors(args.input)
    selected = [name for name, a in tensors.items()
                if a.ndim == 2 and _named(args.include, name, "--include")
                and not (args.exclude and _named(args.exclude, name, "--exclude"))]
    for name in selected:  # refuse before quantising or writing anything
        require_float(tensors[name], name=name, source=args.input, accepted=_FLOAT_NAMES,
                      hint="; leave it out with --exclude (it is then copied as it is)")
        bad = int(np.count_nonzero(~np.isfinite(tensors[name].astype(np.float32))))
        if bad:
            raise NonFiniteError(f"{args.input}: tensor {name!r} holds {bad} non-finite value(s); nothing was written")
    out = {n: v for n, v in tensors.items() if n not in selected}
    print(f"refpeft quantize: {len(selected)} of {len(tensors)} tensors to {args.quant_type} (block {args.blocksize}"
          f"{', double quantisation' if args.double_quant else ''}, rounding {args.rounding})")
    print(f"{'tensor':<48}{'shape':>16}{'rms err':>12}{'rel err':>10}{'max err':>12}")
    total_sq = total_ref = 0.0
    stored = params = 0
    for name in tqdm(selected, desc="quantising", unit="tensor", disable=args.no_progress, file=sys.stderr):
        array = tensors[name]
        dtype = _FLOAT_NAMES[array.dtype]
        weight = array if dtype == "float16" else array.astype(np.float32)
        state = quantize_4bit(weight, quant_type=args.quant_type, blocksize=args.blocksize,
                              double_quant=args.double_quant, rounding=args.rounding, dtype=dtype)
        error = np.asarray(dequantize_4bit(state), dtype=np.float64) - weight.astype(np.float64)
        sq, ref = float(np.sum(error**2)), float(np.sum(weight.astype(np.float64) ** 2))
        total_sq, total_ref = total_sq + sq, total_ref + ref
        stored, params = stored + sum(stored_bytes(state).values()), params + state.numel
        print(f"{name:<48}{str(state.shape):>16}{math.sqrt(sq / state.numel):>12.4e}"
              f"{math.sqrt(sq / ref) if ref else 0.0:>10.4f}{float(np.max(np.abs(error))):>12.4e}")
        out.update(to_state_dict(state, prefix=name))
    write_safetensors(args.output, out)
    if params:
        print(f"total: relative error {math.sqrt(total_sq / total_ref) if total_ref else 0.0:.4f}, "
              f"{8 * stored / params:.4f} bits per quantised parameter from the stored codes and constants "
              f"(nominal {nominal_bits_per_parameter(args.blocksize, double_quant=args.double_quant):.4f} "
              "without partial blocks)")
    print(f"wrote {args.output}")
    return 0


def _named(pattern: str, name: str, option: str) -> bool:
    return matches(pattern, name, mode="search", where=f"quantize {option}")
