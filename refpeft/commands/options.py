"""Argument types shared by the subcommands: a value out of its range is argparse's usage error
(exit status 2, one line naming the option and the value), before any work is done."""

from __future__ import annotations

import argparse


def seed(text: str) -> int:
    """A random seed: an integer >= 0 (NumPy's generators take no negative seeds)."""
    return _integer(text, minimum=0)


def positive(text: str) -> int:
    """A size or a count: an integer >= 1."""
    return _integer(text, minimum=1)


def blocksize(text: str) -> int:
    """A 4-bit block size bitsandbytes accepts (refpeft.quant.blockwise.BLOCKSIZES: 32 to 4096, powers of two)."""
    from refpeft.quant.blockwise import BLOCKSIZES

    try:
        value = int(text)
    except ValueError:
        value = None
    if value not in BLOCKSIZES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a block size bitsandbytes accepts "
                                         f"({', '.join(map(str, BLOCKSIZES))})")
    return value


# Double quantisation is on by default in every command, as in QLoRA's recipe and bitsandbytes'
# Linear4bit (compress_statistics=True); transformers' BitsAndBytesConfig defaults to off.
DOUBLE_QUANT_DEFAULT = True


def add_double_quant(p: argparse.ArgumentParser) -> None:
    """--double-quant / --no-double-quant, one default (DOUBLE_QUANT_DEFAULT) for every command."""
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=DOUBLE_QUANT_DEFAULT,
                   help="store each 4-bit weight's absmax as 8-bit codes (QLoRA's double quantisation, "
                        "~4.127 bits/parameter at block 64, against 4.5 without; default: on, as QLoRA and "
                        "bitsandbytes' Linear4bit)")


def _integer(text: str, *, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {minimum}")
    return value
