"""DSA quality at long context: dense vs DeepSeek Sparse Attention vs a sliding window, each continue-trained.

    python bench/dsa_long.py --seq-len 1024 --topk 64 --steps 180 --warmup-steps 40 --eval-seqs 64 \
        --json bench/results/dsa_long.json > bench/results/dsa_long.log
    # 49 minutes wall (2 worker processes, one thread each, on a shared 2-core x86_64 CPU machine)

Three arms start from the bundled model (plus freshly initialised lightning indexers, dsv3.dsa.add_indexers) and
see the same training sequences of --seq-len tokens in the same order (TrainConfig seed), with the same schedule:
- dense:  --steps steps of dense continued training;
- dsa:    the V3.2 report §2.1 recipe: --warmup-steps of the dense warm-up (main model frozen, only the indexers
          learn, by KL to the head-summed L1-normalised attention; TrainConfig(dsa_stage="warmup")), then --steps
          steps of sparse continued training (top-k attention, all weights learn from the LM loss, the indexers only
          from their KL over the selected keys; dsa_stage="sparse"). The main weights get exactly as many updates
          and tokens as the dense arm's; the warm-up steps are extra (indexer-only) compute;
- window: --steps steps of continued training with sliding-window attention over the last --topk tokens (the
          same token budget as DSA, no indexer; dsv3.dsa.set_mode(model, "window") trains through train()).
All three are then scored on the same packed held-out sequences of data/corpus/valid.txt, each in its own
attention mode and, for context, in the others' (and the bundled model itself, before any training). Per-sequence
losses are kept, so differences to the dense arm come with a paired standard error over sequences.

Arms run in parallel processes (--workers, one thread each), the dsa arm first (it is the longest).

Caveat: the corpus is WordNet glosses, one short independent gloss per line, packed back to back; a next token
rarely depends on anything more than one gloss (~30 tokens) back, so long-range dependencies are weak here and the
comparison says little about tasks that need them. What it does test: whether DSA's top-k selection loses quality
against dense attention at the same training compute, and whether it beats a plain local window of the same k.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import dsv3
from dsv3 import dsa
from dsv3.checkpoint import load_pretrained
from dsv3.data import PackedSequences, read_documents, tokenize
from dsv3.train import TrainConfig, train

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"
EVAL_MODES = {"bundled": ("dense", "window", "sparse"), "dense": ("dense", "window"),
              "dsa": ("sparse", "dense", "window"), "window": ("window", "dense")}
OWN_MODE = {"bundled": "dense", "dense": "dense", "dsa": "sparse", "window": "window"}


def corpus_tokens(tok: dsv3.Tokenizer, name: str) -> np.ndarray:
    """A corpus file, one document per line, packed as `dsv3 train` packs it."""
    return tokenize(read_documents([CORPUS / name]), tok)


@torch.no_grad()
def sequence_losses(model: dsv3.Transformer, seqs: PackedSequences, n: int, batch: int = 4) -> list[float]:
    """Mean next-token cross-entropy of each of the first n held-out sequences."""
    model.eval()
    out: list[float] = []
    for start in range(0, n, batch):
        b = seqs[np.arange(start, min(start + batch, n))]
        logits = model(b[:, :-1])
        ce = F.cross_entropy(logits.flatten(0, 1).float(), b[:, 1:].flatten(), reduction="none")
        out += ce.view(b.shape[0], -1).mean(1).tolist()
    return out


def train_config(args, out_dir: Path, **kw) -> TrainConfig:
    """Continued-training settings shared by all arms (MTP off: only the main model is scored)."""
    base = dict(seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, lr=args.lr,
                min_lr=args.lr / 10, warmup_steps=args.lr_warmup, eval_every=0, save_every=0, log_every=10,
                mtp_loss_weight=0.0, out_dir=str(out_dir))
    return TrainConfig(**{**base, **kw})


def curve(history: list[dict], key: str) -> list[list[float]]:
    return [[r["step"], round(r[key], 4)] for r in history]


def run_arm(arm: str, args, train_tokens: np.ndarray, eval_tokens: np.ndarray) -> dict:
    """Train one arm (nothing for "bundled") and score it on the held-out sequences in its EVAL_MODES."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = load_pretrained(dsv3.bundled_model_path(), dtype=torch.float32)
    dsa.add_indexers(model, index_n_heads=args.index_heads, index_head_dim=args.index_dim, index_topk=args.topk)
    result: dict = {"train_steps": 0 if arm == "bundled" else args.steps}
    with tempfile.TemporaryDirectory(prefix=f"dsa-long-{arm}-") as tmp:  # train()'s checkpoints and metrics
        train_arm(arm, model, args, train_tokens, Path(tmp), result)
    seqs = PackedSequences(eval_tokens, args.seq_len)
    result["eval"] = {}
    for mode in EVAL_MODES[arm]:
        dsa.set_mode(model, mode)
        per_seq = sequence_losses(model, seqs, args.eval_seqs)
        result["eval"][mode] = {"loss": float(np.mean(per_seq)), "per_sequence": [round(v, 5) for v in per_seq]}
        print(f"[{arm}] eval {mode}: {np.mean(per_seq):.4f}", flush=True)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    return result


def train_arm(arm: str, model: dsv3.Transformer, args, train_tokens: np.ndarray, work: Path, result: dict) -> None:
    """The continued training of one arm (see the module docstring); curves and stage times go into result."""

    def stage(name: str, **kw) -> list[dict]:
        began = time.perf_counter()
        print(f"[{arm}] {name}: metrics in {work / name}/metrics.jsonl", flush=True)
        history = train(model, train_config(args, work / name, **kw), train_tokens, progress=False)
        result[f"{name}_s"] = round(time.perf_counter() - began, 1)
        print(f"[{arm}] {name}: {kw.get('steps', args.steps)} steps in {result[f'{name}_s']:.0f}s, lm loss "
              + " ".join(f"{step}:{v:.3f}" for step, v in curve(history, "lm_loss")), flush=True)
        return history

    if arm == "dense":
        dsa.set_mode(model, "dense")
        result["lm_loss"] = curve(stage("train"), "lm_loss")
    elif arm == "window":
        dsa.set_mode(model, "window")
        result["lm_loss"] = curve(stage("train"), "lm_loss")
    elif arm == "dsa":
        warm = stage("warmup", dsa_stage="warmup", steps=args.warmup_steps, lr=1e-3, min_lr=1e-3, warmup_steps=0)
        result["warmup_steps"] = args.warmup_steps
        result["warmup_indexer_kl"] = curve(warm, "indexer_loss")
        sparse = stage("train", dsa_stage="sparse")
        result["lm_loss"] = curve(sparse, "lm_loss")
        result["indexer_kl"] = curve(sparse, "indexer_loss")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=1024, help="training and held-out sequence length L")
    p.add_argument("--topk", type=int, default=64, help="tokens per query for DSA and the window (k)")
    p.add_argument("--steps", type=int, default=180, help="continued-training steps of every arm")
    p.add_argument("--warmup-steps", type=int, default=40, help="DSA dense warm-up steps (indexers only)")
    p.add_argument("--eval-seqs", type=int, default=64, help="held-out sequences of L tokens scored")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--lr", type=float, default=5e-4, help="peak lr of the continued training (cosine to lr/10)")
    p.add_argument("--lr-warmup", type=int, default=10, help="linear lr warm-up steps of the continued training")
    p.add_argument("--index-heads", type=int, default=4)
    p.add_argument("--index-dim", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="arms trained in parallel (one thread each)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tok = dsv3.Tokenizer.from_pretrained(dsv3.bundled_model_path())
    train_tokens, eval_tokens = corpus_tokens(tok, "train.txt"), corpus_tokens(tok, "valid.txt")
    available = len(PackedSequences(eval_tokens, args.seq_len))
    if args.eval_seqs > available:
        raise SystemExit(f"--eval-seqs {args.eval_seqs}: valid.txt has only {available} sequences of {args.seq_len}")
    print(f"L={args.seq_len} k={args.topk} steps={args.steps} (+{args.warmup_steps} warm-up for dsa), "
          f"batch {args.batch_size}, {len(train_tokens):,} training tokens, {args.eval_seqs} held-out sequences",
          flush=True)
    arms = ("dsa", "dense", "window", "bundled")  # longest first
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_arm, arm, args, train_tokens, eval_tokens): arm for arm in arms}
        results = {futures[f]: f.result() for f in as_completed(futures)}  # a failed arm stops the run at once
    ref = np.asarray(results["dense"]["eval"]["dense"]["per_sequence"])
    table = []
    print(f"\n{'arm':8} {'steps':>6} {'eval mode':10} {'loss':>7} {'vs dense':>9} {'± s.e.':>7}")
    for arm in ("dense", "dsa", "window", "bundled"):
        for mode in EVAL_MODES[arm]:
            per_seq = np.asarray(results[arm]["eval"][mode]["per_sequence"])
            loss = results[arm]["eval"][mode]["loss"]
            diff = (per_seq - ref) / ref.mean()
            row = {"arm": arm, "train_steps": results[arm]["train_steps"], "eval_mode": mode,
                   "own_mode": mode == OWN_MODE[arm], "loss": round(loss, 4),
                   "rel_to_dense": round(float(diff.mean()), 5),
                   "rel_se": round(float(diff.std(ddof=1) / np.sqrt(len(diff))), 5)}
            table.append(row)
            print(f"{arm:8} {row['train_steps']:6} {mode:10} {loss:7.4f} {100 * row['rel_to_dense']:+8.2f}% "
                  f"{100 * row['rel_se']:6.2f}%")
    own = {r["arm"]: r for r in table if r["own_mode"]}
    verdict = {"dsa_within_1pct_of_dense": own["dsa"]["rel_to_dense"] <= 0.01,
               "dsa_better_than_window": own["dsa"]["loss"] < own["window"]["loss"]}
    wall = time.perf_counter() - t0
    print(f"\nverdict: {verdict}; wall time {wall / 60:.1f} min")
    if args.json:
        out = {"seq_len": args.seq_len, "topk": args.topk, "steps": args.steps, "warmup_steps": args.warmup_steps,
               "batch_size": args.batch_size, "lr": args.lr, "eval_seqs": args.eval_seqs,
               "index_heads": args.index_heads, "index_dim": args.index_dim, "workers": args.workers,
               "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} CPU cores, torch {torch.__version__}"
                          ", one thread per arm",
               "wall_s": round(wall, 1), "table": table, "verdict": verdict, "arms": results}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
