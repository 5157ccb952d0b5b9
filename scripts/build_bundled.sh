#!/usr/bin/env bash
# Rebuild the bundled model end to end: corpus -> tokenizer -> training -> dsv3/bundled/ with its model card.
# Needs Debian's wordnet-base (apt-get install wordnet-base). About an hour on one CPU core; faster on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python scripts/build_corpus.py
python scripts/train_tokenizer.py
OMP_NUM_THREADS=1 dsv3 train --config scripts/bundled/config.json \
    --data data/corpus/train.txt --eval-data data/corpus/valid.txt --tokenizer dsv3/bundled --out runs/bundled \
    --seq-len 128 --batch-size 16 --steps 700 --warmup-steps 40 --lr 2e-3 --min-lr 2e-4 \
    --eval-every 100 --eval-batches 10 --save-every 50 --log-every 10 "$@"
python scripts/export_bundled.py --run runs/bundled --out dsv3/bundled
