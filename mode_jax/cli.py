"""The `mode-jax` command line: one subcommand per step of the MoDE workflow."""

from __future__ import annotations

import argparse
import importlib
import sys

from mode_jax.commands import COMMANDS
from mode_jax.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mode-jax",
        description="Modular Domain Experts (MoDE): adapt a frozen pretrained LM to several "
                    "domains with per-domain expert layers mixed in by a softmax gate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"mode_jax.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"mode-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mode-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
