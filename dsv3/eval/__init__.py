"""Benchmarks (`dsv3 eval ...`): each benchmark module adds its command to the shared `eval` group."""

from __future__ import annotations

import argparse


def eval_subparsers(subparsers) -> argparse._SubParsersAction:
    """The subparsers of the `dsv3 eval` group, created by whichever benchmark module registers first."""
    parser = subparsers.choices.get("eval")
    if parser is None:
        parser = subparsers.add_parser("eval", help="benchmark a model (MMLU, ...)",
                                       description="Benchmark a dsv3 model or an OpenAI-compatible server.")
        parser.benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    return parser.benchmarks
