"""`dsv3 quantize`: read a checkpoint directory, quantize it, write a quantized one (tokenizer files copied along).

    dsv3 quantize --model DIR --scheme int4 --group-size 128 --output DIR [--no-pad] [--skip lm_head gate ...]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

_WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


def _run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_pretrained
    from ..arguments import model_path
    from .apply import quantize, quantized_layers, save_quantized
    from .base import QuantizationError

    source = model_path(args.model, args.revision)
    output = Path(args.output)
    if source.resolve() == output.resolve():
        raise SystemExit("--output must differ from --model (the source checkpoint is not overwritten)")
    if output.exists() and not output.is_dir():
        raise SystemExit(f"--output {output}: a file is there; expected a new or empty directory")
    if output.is_dir() and any(output.iterdir()):  # an earlier checkpoint, a training run: never replaced
        held = sorted(p.name for p in output.iterdir())
        listed = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise SystemExit(f"--output {output}: not empty (holds {listed}); give a new or empty directory, so "
                         "that nothing there is overwritten")
    model = load_pretrained(source)
    before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    try:
        quantize(model, args.scheme, args.group_size, tuple(args.skip), pad=args.pad)
    except QuantizationError as error:
        raise SystemExit(f"dsv3 quantize: {error}") from None
    after = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    save_quantized(model, output)
    for item in source.iterdir():  # tokenizer, README, generation config: whatever is not the weights
        if item.is_file() and item.name not in _WEIGHT_FILES and not item.name.endswith(".safetensors"):
            shutil.copyfile(item, output / item.name)  # a new file: the umask's mode, not the source's
    print(f"{args.scheme}: {len(quantized_layers(model))} layers quantized; {before / 2**20:.1f} MiB -> "
          f"{after / 2**20:.1f} MiB; written to {output}")
    return 0


def add_cli(subparsers) -> None:
    from ..arguments import REVISION_HELP
    from .apply import DEFAULT_SKIP, SCHEMES
    from .int4 import GROUP_SIZES

    p = subparsers.add_parser(
        "quantize", help="quantize a checkpoint's weights (int8, int4, fp8)",
        description="Quantize a checkpoint directory's linear layers and write a loadable quantized checkpoint "
                    "(config.json carries the quantization_config; dsv3.load_pretrained and dsv3 serve read it).",
        epilog="example: dsv3 quantize --model dsv3/bundled --scheme int4 --group-size 128 --output out/int4")
    p.add_argument("--model", required=True, help="checkpoint directory (hub layout) or hub id")
    p.add_argument("--revision", help=REVISION_HELP)
    p.add_argument("--scheme", required=True, choices=sorted(SCHEMES), help="weight format")
    p.add_argument("--group-size", type=int, default=128, choices=GROUP_SIZES,
                   help="int4: input columns sharing a scale and zero, 32, 64, 128 or 256 (default 128)")
    p.add_argument("--pad", action=argparse.BooleanOptionalAction, default=True,
                   help="int4: zero-pad input widths the group size does not divide, as `dsv3 serve --quantize` "
                        "does (default; --no-pad: such a width is an error)")
    p.add_argument("--skip", nargs="*", default=list(DEFAULT_SKIP),
                   help=f"module name parts left unquantized (default: {' '.join(DEFAULT_SKIP)})")
    p.add_argument("--output", required=True, help="directory to write the quantized checkpoint to")
    p.set_defaults(func=_run)
