"""Dense MLA vs DeepSeek Sparse Attention vs a sliding window (same token budget k): time and FLOPs vs context.

    python bench/attention.py                       # CPU, contexts 1k..16k, k = 256, ~3 minutes on one core
    python bench/attention.py --contexts 1024 4096 --topk 128 --device cuda --json out.json

For each context T (one sequence, prefill) it times (a) one attention layer (MLA module forward: projections,
indexer, attention, o_proj) and (b) the whole model forward, for the three variants of the same weights:
- dense: plain MLA in its prefill form (naive / MHA mode: keys and values expanded per head, SDPA with the causal
  mask), run in query blocks of dsa.BLOCK so that 16k fits in memory (dsa mode "blocked"; unblocked, the CPU
  SDPA materialises [H, T, T] scores: 16 GB at 16k);
- dsa: lightning indexer + top-k, absorbed MLA over the gathered k latent entries per query (dsv3/dsa.py);
- window: the last k tokens per query through the same gathered path (no indexer).
FLOPs are analytic multiply-adds × 2 of the causal work (what each algorithm needs, not what a kernel wastes).
The model is small (hidden 256) so that 16k fits a CPU run; the attention share of a forward grows with hidden
size only through the head count, so read the attention-layer column for the mechanism, the forward column for
this model. Results: a table on stdout and, with --json, the raw numbers (notebooks/07 reads them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import dsv3
from dsv3 import dsa

VARIANTS = ("dense", "dsa", "window")


def bench_config(topk: int) -> dsv3.ModelConfig:
    return dsv3.ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=16, q_lora_rank=96, kv_lora_rank=128, qk_nope_head_dim=32,
                            qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=0, max_position_embeddings=65536,
                            index_n_heads=4, index_head_dim=32, index_topk=topk)


def attention_flops(c: dsv3.ModelConfig, T: int, variant: str) -> float:
    """Causal FLOPs of one layer's attention core (no q/kv/o projections, which all variants share)."""
    H, d_n, d_r, d_v, d_c, k = (c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim,
                                c.kv_lora_rank, c.index_topk)
    pairs = T * (T + 1) / 2  # (query, visible key) pairs
    if variant == "dense":  # expand keys/values through kv_b_proj, then q·k and p·v per head
        return 2 * T * d_c * H * (d_n + d_v) + 2 * pairs * H * (d_n + d_r + d_v)
    sel = sum(min(k, t + 1) for t in range(T))  # (query, selected key) pairs
    core = 2 * T * H * d_n * d_c + 2 * sel * H * (2 * d_c + d_r) + 2 * T * H * d_c * d_v  # absorb, scores, values
    if variant == "window":
        return core
    H_I, d_I = c.index_n_heads, c.index_head_dim
    indexer = 2 * T * (c.q_lora_rank * H_I * d_I + c.hidden_size * (d_I + H_I)) + 2 * pairs * H_I * (d_I + 1)
    return core + indexer


def forward_flops(model: dsv3.Transformer, T: int, variant: str) -> float:
    """2·(non-embedding activated parameters)·T plus every layer's attention core (indexer weights only for dsa)."""
    params = model.num_parameters(activated=True) - model.model.embed_tokens.weight.numel()
    index_params = sum(p.numel() for i in dsa.indexers(model.model) for p in i.parameters())
    params -= 0 if variant == "dsa" else index_params
    c = model.config
    return 2 * params * T + c.num_hidden_layers * attention_flops(c, T, variant)


def timed(fn, repeats: int) -> float:
    if repeats > 1:
        fn()  # warm-up (allocator, one-off dispatch); skipped for the single long runs
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def set_variant(model: dsv3.Transformer, variant: str) -> None:
    dsa.set_mode(model, {"dense": "blocked", "dsa": "sparse", "window": "window"}[variant])


@torch.no_grad()
def run(contexts: list[int], topk: int, device: str, repeats_at: dict[int, int], on_row=None) -> list[dict]:
    torch.manual_seed(0)
    model = dsv3.Transformer(bench_config(topk)).to(device).eval()
    layer = model.model.layers[0]
    rows = []
    for T in contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, T), device=device)
        x = torch.randn(1, T, model.config.hidden_size, device=device)
        ctx = model.attend_context(1, T, device, None, 0)
        repeats = repeats_at.get(T, 1)
        row = {"context": T, "topk": topk}
        for v in VARIANTS:
            set_variant(model, v)
            sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
            row[f"attn_s/{v}"] = timed(lambda: (layer.self_attn(x, ctx),
                                                sync()), repeats)
            row[f"forward_s/{v}"] = timed(lambda: (model(ids), sync()), repeats)
            row[f"attn_gflop/{v}"] = attention_flops(model.config, T, v) / 1e9
            row[f"forward_gflop/{v}"] = forward_flops(model, T, v) / 1e9
        rows.append(row)
        print(format_row(row), flush=True)
        if on_row:
            on_row(rows)
    return rows


def format_row(r: dict) -> str:
    def saving(kind: str, v: str) -> str:
        return f"{100 * (1 - r[f'{kind}/{v}'] / r[f'{kind}/dense']):+.0f}%"
    return (f"| {r['context']:>6} | " + " | ".join(f"{1e3 * r[f'attn_s/{v}']:9.1f}" for v in VARIANTS)
            + f" | {saving('attn_s', 'dsa'):>6} | " + " | ".join(f"{1e3 * r[f'forward_s/{v}']:9.1f}" for v in VARIANTS)
            + f" | {saving('forward_s', 'dsa'):>6} | {saving('forward_s', 'window'):>6} | "
            + f"{r['forward_gflop/dense']:8.1f} | {r['forward_gflop/dsa']:8.1f} | {saving('forward_gflop', 'dsa'):>6} |")


HEADER = ("| context | attn dense ms | attn dsa ms | attn window ms | attn saving dsa | fwd dense ms | fwd dsa ms "
          "| fwd window ms | fwd saving dsa | fwd saving window | fwd GFLOP dense | fwd GFLOP dsa | FLOP saving dsa |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--topk", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: the machine is shared)")
    p.add_argument("--json", help="write the raw rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = {n: 2 if n <= 2048 else 1 for n in args.contexts}
    print(f"dense MLA vs DSA (top-{args.topk}) vs sliding window ({args.topk}) on {args.device}, "
          f"{args.threads} thread(s); best of 1-2 runs\n{HEADER}", flush=True)

    def save(rows: list[dict]) -> None:  # after every context, so a long run that is cut off still reports
        crossover = next((r["context"] for r in rows if r["forward_s/dsa"] < r["forward_s/dense"]), None)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"device": args.device, "threads": args.threads, "rows": rows,
                                                   "crossover": crossover}, indent=1) + "\n")
        return crossover

    crossover = save(run(args.contexts, args.topk, args.device, repeats, save))
    print(f"crossover (first context where the DSA forward is faster): {crossover}")


if __name__ == "__main__":
    main()
