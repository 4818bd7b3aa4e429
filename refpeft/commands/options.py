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


def _integer(text: str, *, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {minimum}")
    return value
