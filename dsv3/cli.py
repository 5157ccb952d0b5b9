"""`dsv3` command line: each subcommand lives beside the code it runs and registers itself via `add_cli`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands, each with `add_cli(subparsers)`; imported only when the CLI starts.
COMMAND_MODULES = [
    "dsv3.chat",
    "dsv3.train",
    "dsv3.eval.mmlu",
    "dsv3.server",
    "dsv3.lora_train",
    "dsv3.quant",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in readable PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
