#!/usr/bin/env bash
# Rebuild the bundled vision-language model (dsv3/bundled/vl, docs/vision.md): train the vision path on the
# synthetic VQA set from the bundled text model, export the final checkpoint, measure it. CPU: about 40 minutes
# on 2 shared cores.
#   bash scripts/build_vl.sh [RUN_DIR]        (default runs/vl; re-running resumes from its newest checkpoint)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/vl}
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1
# stage 0: 2000 steps of 64 images (the encoder with a 2-convolution stem, answer heads); stage 1: 200 steps of 16
# through the frozen LM; stage 2: 1800 steps of 16 with LoRA rank 16 on every linear layer of the LM
nice -n 2 python -m dsv3 train-vl --output "$RUN" --steps 4000 --stage0-steps 2000 --stage1-steps 2200 \
    --stage0-batch-size 64 --batch-size 16 --lr 2e-3 --lora-lr 2e-3 --image-size 64 --patch-size 16 \
    --conv-stem 32,64 --lora-rank 16 --eval-every 200 --eval-size 200 --save-every 200 --threads 1 --resume
python scripts/export_vl.py "$RUN" dsv3/bundled/vl
python bench/vqa.py --model dsv3/bundled/vl --n 1000
