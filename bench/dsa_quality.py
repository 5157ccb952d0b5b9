"""Held-out loss of the bundled model with dense attention vs DSA (top-k) vs a sliding window of the same k.

    python bench/dsa_quality.py --json bench/results/dsa_quality.json \
        --indexers bench/results/dsa_indexers.safetensors      # ~5 minutes on one busy CPU core

Recipe (V3.2 report §2.1, shrunk to a CPU budget): add lightning indexers to the bundled model
(dsv3.dsa.add_indexers), run the dense warm-up (main model frozen, indexers trained by KL to the head-summed
attention distribution) on packed training sequences of --seq-len tokens, then evaluate next-token loss on packed
held-out sequences in four ways on the SAME main weights: dense, DSA with the untrained indexer, DSA after warm-up,
sliding window. No sparse-stage training is run here (it would change the main weights, and then dense would
need the same continued training to be a fair reference).

Caveat that decides how to read the numbers: the bundled model was trained on 128-token windows of WordNet glosses,
one short gloss per line, so nothing in its data rewards looking far back, and positions beyond 128 were never
trained; a long-context quality claim cannot be tested on it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import dsv3
from dsv3 import dsa
from dsv3.checkpoint import load_pretrained
from dsv3.data import PackedSequences, tokenize
from dsv3.train import TrainConfig, train

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"


def tokens(tok: dsv3.Tokenizer, path: Path, limit_chars: int) -> np.ndarray:
    """The first limit_chars of a corpus file, one document per line, as `dsv3 train` packs them."""
    return tokenize((line for line in path.read_text()[:limit_chars].splitlines() if line.strip()), tok)


@torch.no_grad()
def held_out_loss(model: dsv3.Transformer, seqs: PackedSequences, n: int) -> float:
    total, count = 0.0, 0
    for i in range(min(n, len(seqs))):
        batch = seqs[np.asarray([i])]
        logits = model(batch[:, :-1])
        total += float(F.cross_entropy(logits[0].float(), batch[0, 1:], reduction="sum"))
        count += batch.shape[1] - 1
    return total / count


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--eval-seqs", type=int, default=8)
    p.add_argument("--json", help="write the losses here")
    p.add_argument("--indexers", help="save the warmed-up indexer weights here (.safetensors)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    path = dsv3.bundled_model_path()
    tok = dsv3.Tokenizer.from_pretrained(path)
    model = load_pretrained(path, dtype=torch.float32)
    dsa.add_indexers(model, index_n_heads=4, index_head_dim=32, index_topk=args.topk)
    train_tokens = tokens(tok, CORPUS / "train.txt", 2_000_000)
    eval_seqs = PackedSequences(tokens(tok, CORPUS / "valid.txt", 400_000), args.seq_len)
    model.eval()
    results: dict[str, float] = {}
    for name, mode in (("dense", "dense"), ("window", "window"), ("dsa (untrained indexer)", "sparse")):
        dsa.set_mode(model, mode)
        results[name] = held_out_loss(model, eval_seqs, args.eval_seqs)
        print(f"{name}: {results[name]:.4f}", flush=True)
    t0 = time.perf_counter()
    cfg = TrainConfig(seq_len=args.seq_len, batch_size=2, steps=args.warmup_steps, lr=1e-3, min_lr=1e-3,
                      warmup_steps=0, eval_every=0, save_every=0, log_every=5, mtp_loss_weight=0.0,
                      out_dir=tempfile.mkdtemp(prefix="dsa-warmup-"), dsa_stage="warmup")
    history = train(model, cfg, train_tokens, progress=False)
    kl = [round(r["indexer_loss"], 4) for r in history]
    print(f"warm-up: {args.warmup_steps} steps in {time.perf_counter() - t0:.0f}s, indexer KL {kl}", flush=True)
    model.eval()
    dsa.set_mode(model, "sparse")
    results["dsa (after warm-up)"] = held_out_loss(model, eval_seqs, args.eval_seqs)
    print(f"dsa (after warm-up): {results['dsa (after warm-up)']:.4f}", flush=True)
    if args.indexers:  # the warmed-up indexers alone (the rest is the bundled model), for notebooks/07
        state = {k: v.contiguous() for k, v in model.state_dict().items() if ".indexer." in k}
        save_file(state, args.indexers, metadata={"index_n_heads": "4", "index_head_dim": "32",
                                                  "index_topk": str(args.topk)})
    if args.json:
        Path(args.json).write_text(json.dumps({"seq_len": args.seq_len, "topk": args.topk, "eval_seqs":
                                               args.eval_seqs, "warmup_steps": args.warmup_steps,
                                               "indexer_kl": kl, "loss": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
