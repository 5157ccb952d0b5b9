"""`dsv3` command line: each subcommand lives beside the code it runs and registers itself via `add_cli`.

Every mistake a user can make ends the same way: exit status 1 (2 for a bad flag) and one line on stderr naming the
flag, file or field and what was expected; never a traceback. Subcommands raise SystemExit("message") for what
they check themselves; `main` turns the library's own errors (ValueError: CheckpointError, QuantizationError,
DataError, config and JSON errors; OSError: files) into that line too.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands, each with `add_cli(subparsers)`; imported only when the CLI starts.
COMMAND_MODULES = [
    "dsv3.chat",
    "dsv3.train",
    "dsv3.eval.mmlu",
    "dsv3.server",
    "dsv3.lora_train",
    "dsv3.quant.cli",
    "dsv3.vision.train",
]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors, reported by the (sub)command the flag was given to: its usage goes to stdout,
    `dsv3 serve: error: ...` to stderr. (Plain argparse reports a subcommand's unknown flag with the top-level
    usage, since the top-level parser collects what the subparser left.)"""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:  # dsv3 only calls parse_args, so whatever is left here is a mistake
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def error(self, message: str):
        self.print_usage(sys.stdout)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="dsv3", description="DeepSeek-V3 in readable PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # inductor imports torch.utils.cpp_extension, which logs "No CUDA runtime is found" on machines with a CUDA
    # toolkit path but no GPU: noise between chat prompts, nothing the user can act on
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"dsv3 {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as error:  # the library's errors name the file, key or field at fault
        print(f"dsv3 {args.command}: {' '.join(str(error).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
