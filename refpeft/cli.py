"""The `refpeft` command line: one subcommand per job, each defined in refpeft/commands/."""

from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module

from refpeft.errors import RefpeftError

# Subcommand modules, in the order `refpeft --help` lists them. Each exposes
# `add_parser(subparsers)`, which registers the command and sets `func` to its `run(args) -> int`.
COMMANDS = ("demo", "inspect", "merge", "fuse", "quantize", "memory",
            "conformance", "export", "export_adapter", "attach", "train", "generate")

DESCRIPTION = """\
refpeft: the exact, framework-free reference for parameter-efficient fine-tuning.

LoRA, DoRA and VeRA with hand-written gradients, torch-exact Adam/AdamW/LoRA+, NF4/FP4 that is
byte-for-byte bitsandbytes, adapter fusion, HF PEFT files and ONNX export, all in plain array-API
Python (NumPy by default) and checked against the real peers.
"""

EPILOG = "Run `refpeft COMMAND --help` for a command's options. Start with `refpeft demo`."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refpeft", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from refpeft import __version__

    parser.add_argument("--version", action="version", version=f"refpeft {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMANDS:
        import_module(f"refpeft.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so that a reader gone away is handled below rather than at exit
        return status
    except RefpeftError as exc:
        print(f"refpeft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the writers (refpeft.io) have already removed their temporary files
        print(f"refpeft {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `refpeft inspect ... | head`: the reader has what it wanted
        _discard_stdout()
        return 1


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what is left does not fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # a stdout without a file descriptor (io.UnsupportedOperation)
        pass


if __name__ == "__main__":
    sys.exit(main())
