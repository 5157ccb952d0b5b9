"""Export a `dsv3 train-vl` checkpoint as the bundled VL model: python scripts/export_vl.py RUN_DIR OUT_DIR.

Writes OUT_DIR/config.json (the vision section, `language_model` pointing at the text model one directory up),
model.safetensors (vision tower, projector, the LM's LoRA factors in bfloat16: half the bytes of float32,
and the same 1000 held-out answers in bench/vqa.py), the tokenizer files, and the training
log (metrics.jsonl, read by notebooks/08_multimodal.ipynb). The text model's weights are not copied.
"""

import shutil
import sys
from pathlib import Path

import torch

from dsv3.vision.model import load_vl, save_vl
from dsv3.vision.train import latest_checkpoint


def main(run: str, out: str) -> None:
    last = latest_checkpoint(Path(run))
    if last is None:
        raise SystemExit(f"{run}: no checkpoint-N directory; run dsv3 train-vl first")
    model = load_vl(last, dtype=torch.float32, merge=False)
    model.vision_config.language_model = ".."
    save_vl(model, out, tokenizer_dir=last, dtype=torch.bfloat16)
    shutil.copyfile(Path(run) / "metrics.jsonl", Path(out) / "metrics.jsonl")
    print(f"{last} -> {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python scripts/export_vl.py RUN_DIR OUT_DIR")
    main(*sys.argv[1:])
