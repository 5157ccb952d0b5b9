"""dsv3 vs transformers vs the hardware floor on a DeepSeek-V2-Lite-shaped random model (issue 21's GPU targets).

    python bench/decode.py                 # CUDA, bf16, V2-Lite shape (bench/gpu.sh runs this)
    python bench/decode.py --quick         # targets only (no transformers, batches 1 and 64): a short lease
    python bench/decode.py --dry-run       # CPU, fp32, a tiny model of the same family: checks the script

Model: hidden 2048, 16 heads, 12 layers (first dense, 10944), 64 routed experts top-6 + 2 shared of width 1408,
kv_lora 512, no q-LoRA, vocab 102400 (6.9B parameters, 1.2B active). Built seeded on the device, saved once with
dsv3.save_pretrained and loaded by transformers from the same files, so both run the same weights. Logits and
greedy tokens are compared in bf16 and, with both models cast to fp32, again in fp32 (printed, not asserted: see
docs/results.md for what the H200 gave).
Figures (docs/performance.md §C): decode ms/token at batch 1, = (t(N) - t(1)) / (N - 1) of `generate`;
tokens/s at batch 8 and 64 (B·(N-1) / (t(N) - t(1))); prefill TFLOP/s at 2048 tokens (2·active·T matmul FLOPs
plus causal attention), eager and through torch.compile(model); decode again with generate(compile=True).
Floors: decode = (weights touched + KV read) / bandwidth, with the expected number of distinct experts per layer
E·(1-(1-K/E)^B); prefill = FLOPs / peak. --bandwidth/--peak default to the measured H200 figures (4.27 TB/s,
790 TFLOP/s); pass the card's own (bench/gpu_ceilings.py prints them; H100 SXM: about 3.0 TB/s) when known.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from pathlib import Path

import torch

import dsv3
import timeline

V2_LITE = dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
               moe_intermediate_size=1408, num_hidden_layers=12, num_attention_heads=16, q_lora_rank=None,
               kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
               n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, first_k_dense_replace=1,
               scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
               num_nextn_predict_layers=0, max_position_embeddings=4096)
TINY = dict(V2_LITE, vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2)


def timer(device):
    def run(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    return run


@torch.inference_mode()
def against_transformers(ours, theirs, prompt) -> tuple[float, int]:
    """(relative norm of the logits' difference, how many of 16 greedy tokens agree before the first mismatch)."""
    a, b = ours(prompt).float(), theirs(prompt).logits.float()
    mine = dsv3.generate(ours, prompt, 16)[0, prompt.shape[1]:]
    hf = theirs.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, prompt.shape[1]:]
    return ((a - b).norm() / b.norm()).item(), int((mine == hf).cumprod(0).sum())


def distinct_rows(prompt: torch.Tensor, B: int) -> torch.Tensor:
    """prompt [1, T] -> [B, T], row b starting with token b (distinct rows route to different experts)."""
    batch = prompt.expand(B, -1).clone()
    batch[:, 0] = torch.arange(B, device=prompt.device)
    return batch


def decode_seconds(run, gen, prompt, n: int, repeat: int) -> tuple[float, float]:
    """(seconds per decoding step: (t(n) - t(1)) / (n - 1), best of `repeat`; seconds of the warm-up call, which
    includes any compile and CUDA-graph recording for this shape)."""
    warmup = run(lambda: gen(prompt, 2))
    return min((run(lambda: gen(prompt, n)) - run(lambda: gen(prompt, 1))) / (n - 1) for _ in range(repeat)), warmup


def floors(config: dsv3.ModelConfig, model: dsv3.Transformer, batch: int, context: int, bw: float,
           elem: int) -> float:
    """Decode step floor in seconds at `batch` rows of `context` cached tokens each."""
    moe = [l.mlp for l in model.model.layers if isinstance(l.mlp, dsv3.moe.MoE)]
    per_expert = sum(p.numel() for p in moe[0].experts[0].parameters()) if moe else 0
    E, K = config.n_routed_experts, config.num_experts_per_tok
    dense = model.num_parameters() - model.model.embed_tokens.weight.numel() - len(moe) * E * per_expert
    touched = E * (1 - (1 - K / E) ** batch)
    weights = (dense + len(moe) * touched * per_expert) * elem
    kv = batch * context * (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * elem
    return (weights + kv) / bw


def prefill_flops(config: dsv3.ModelConfig, model: dsv3.Transformer, T: int) -> float:
    active = model.num_parameters(activated=True) - model.model.embed_tokens.weight.numel()
    H, L = config.num_attention_heads, config.num_hidden_layers
    attn = 2 * H * (T * (T + 1) / 2) * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * L
    return 2 * active * T + attn


def compiled_rows(args, ours, prompt, n, run, hf_times, report, floor) -> None:
    """generate(..., compile=True) (CUDA graphs on a GPU): same tokens as eager, then decode at batch 1 and the
    largest --batches size, against transformers' eager times measured before (hf_times: batch -> s/step)."""
    eager = dsv3.generate(ours, prompt, 8)
    start = time.perf_counter()
    compiled = dsv3.generate(ours, prompt, 8, compile=True)
    print(f"torch.compile warm-up {time.perf_counter() - start:.1f} s; same tokens as eager: "
          f"{torch.equal(compiled, eager)}", flush=True)
    def gen(x, k):
        return dsv3.generate(ours, x, k, compile=True)

    (t_c, warm), t_hf = decode_seconds(run, gen, prompt, n, args.repeat), hf_times.get(1)
    report("decode batch 1 (compile)", t_c * 1e3, t_hf and t_hf * 1e3, floor(1) * 1e3, "ms/token", False, warm)
    if args.quick:  # the batch-64 step is a second compile (about a minute on an H200)
        return
    B = max(int(b) for b in args.batches.split(","))
    (t_c, warm), t_hf = decode_seconds(run, gen, distinct_rows(prompt, B), n, args.repeat), hf_times.get(B)
    report(f"decode batch {B} (compile)", B / t_c, t_hf and B / t_hf, B / floor(B), "tokens/s", True, warm)


def profile(args, ours, prompt, long, device, compiled_prefill=None) -> None:
    """torch.profiler over one decode step (compiled unless --no-compile; 5 steps recorded) at batch 1 and at the
    largest --batches size, and over the prefill (eager, and compiled when given): DIR/{decode_b1,decode_bB,
    prefill,prefill_compile}.txt (bench/timeline.py's per-call kernel summary on a GPU, then torch.profiler's table by
    device time) and .json (Chrome traces, for Perfetto)."""
    from torch.profiler import ProfilerActivity
    from dsv3.fast import mark_static_cache, prepare
    from dsv3.generation import decode_step
    args.profile.mkdir(parents=True, exist_ok=True)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    compiled = not args.no_compile

    def record(name, fn, reps):
        for _ in range(3):
            fn()
        run = timer(device)
        wall = min(run(fn) for _ in range(10))
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(reps):
                fn()
            if cuda:
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=90)
        trace = args.profile / f"{name}.json"
        prof.export_chrome_trace(str(trace))
        kernels = timeline.summary(trace, reps) if cuda else ""
        (args.profile / f"{name}.txt").write_text(f"{name}: {wall * 1e3:.3f} ms per call (best of 10, no profiler)"
                                                  f", {reps} calls recorded\n{kernels}\n{table}\n")
        print(f"profile {name}: {wall * 1e3:.3f} ms per call -> {args.profile / name}.txt", flush=True)
        print(kernels, end="", flush=True)

    step = decode_step(compiled, device.type)
    prepare(ours)
    length = -(-(args.prompt_len + args.new_tokens - 1) // 256) * 256  # generate's cache length (compiled)
    for B in [1] if args.quick else sorted({1, max(int(b) for b in args.batches.split(","))}):
        x = distinct_rows(prompt, B)  # as in the timed rows
        cache = ours.new_cache(B, length)
        if compiled and cuda:
            mark_static_cache(cache)
        ours(x, cache, 0)
        tokens, pos = x[:, -1], torch.full((B,), x.shape[1], device=device)
        record(f"decode_b{B}", lambda: step(ours, tokens, cache, pos), 5)
    if args.quick:
        return
    record("prefill", lambda: ours(long), 1)
    if compiled_prefill is not None:
        record("prefill_compile", lambda: compiled_prefill(long), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny model on CPU in fp32: checks the script only")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--batches", default="8,64")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--bandwidth", type=float, default=4.27e12, help="bytes/s (H200 measured copy: 4.27e12)")
    p.add_argument("--peak", type=float, default=790e12, help="FLOP/s (H200 measured bf16 matmul: 790e12)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile decode row (compiling takes "
                   "minutes on a loaded CPU: use it with --dry-run here)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers (dsv3 and floors only)")
    p.add_argument("--profile", type=Path, metavar="DIR", help="write torch.profiler kernel tables (and Chrome "
                   "traces) of one compiled decode step at batch 1 and at the largest --batches size, and of the "
                   "prefill, into DIR")
    p.add_argument("--triton-down", action="store_true", help="compiled steps run the routed experts' down "
                   "projection as dsv3/fast/triton_moe.py's Triton kernel instead of inductor's (CompiledMoE)")
    p.add_argument("--quick", action="store_true", help="for a short GPU lease: no transformers rows, "
                   "batches 1 and 64 eager, batch 1 compiled, no grouped-MoE row, no compiled prefill, profile of the "
                   "batch-1 step only")
    args = p.parse_args()
    if args.quick:
        args.no_hf, args.batches, args.repeat = True, "64", min(args.repeat, 2)
    if args.dry_run:
        device, dtype, shape = torch.device("cpu"), torch.float32, TINY
        args.new_tokens, args.prompt_len, args.prefill_len, args.repeat = 6, 8, 32, 1
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/decode.py needs a CUDA GPU (or --dry-run)")
        device, dtype, shape = torch.device("cuda"), torch.bfloat16, V2_LITE
    config = dsv3.ModelConfig(**shape)
    torch.manual_seed(0)
    with torch.device(device):
        ours = dsv3.Transformer(config)
    ours = ours.to(dtype).eval()
    if args.triton_down:
        from dsv3.fast.triton_moe import routed_down
        for moe in (m for m in dsv3.fast.prepare(ours).modules() if isinstance(m, dsv3.moe.MoE)):
            moe.routed_down_kernel = routed_down
    elem = torch.finfo(dtype).bits // 8
    run = timer(device)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    print(f"{card} | torch {torch.__version__} | {ours.num_parameters() / 1e6:.1f}M parameters, "
          f"{ours.num_parameters(activated=True) / 1e6:.1f}M active | {dtype}", flush=True)
    gen = torch.Generator(device).manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len), device=device, generator=gen)

    theirs = None
    if not args.no_hf:
        import transformers
        try:
            with tempfile.TemporaryDirectory() as tmp:
                dsv3.save_pretrained(ours, tmp)
                theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
        except Exception:  # noqa: BLE001 - one GPU session is short: keep dsv3's figures and floors
            traceback.print_exc()
            print(f"transformers {transformers.__version__} could not load the model: dsv3 and floors only")
    if theirs is not None:
        theirs.generation_config.eos_token_id = None  # run N tokens without suppressing EOS (min_new_tokens would)
        err, same = against_transformers(ours, theirs, prompt)
        print(f"check: logits relative error vs transformers {err:.2e} (bf16 expects ~1e-2); "
              f"greedy tokens equal for the first {same}/16", flush=True)
        assert err < (5e-2 if dtype == torch.bfloat16 else 1e-4), f"logits differ from transformers: {err:.2e}"
        if dtype != torch.float32:  # bf16 rounding moves logits by ~1e-2: fp32 (same weights) is the tighter check
            ours.float(), theirs.float()
            err, same = against_transformers(ours, theirs, prompt)
            print(f"check in fp32 (same weights): logits relative error {err:.2e}; greedy tokens equal for the first "
                  f"{same}/16", flush=True)
            ours.to(dtype), theirs.to(dtype)

    def ours_gen(compile=False):
        return lambda x, n: dsv3.generate(ours, x, n, compile=compile)

    def hf_gen(x, n):
        return theirs.generate(x, max_new_tokens=n, do_sample=False, pad_token_id=0)

    rows = []

    def report(name, ours_v, hf_v, floor_v, unit, higher_better, warmup):
        ratio = (ours_v / hf_v if higher_better else hf_v / ours_v) if hf_v else float("nan")
        vs_floor = (ours_v / floor_v if higher_better else floor_v / ours_v)
        rows.append((name, ours_v, hf_v, floor_v, unit, ratio, vs_floor))
        print(f"{name:<26}{ours_v:>12.4g} {hf_v or float('nan'):>13.4g} {floor_v:>12.4g}  {unit:<9}"
              f"{ratio:>8.2f}x {100 * vs_floor:>7.1f}% of floor {warmup:>8.1f} s", flush=True)

    def guarded(name, fn):
        """Run one figure; a failure prints its traceback and the run goes on to the next figure."""
        try:
            fn()
            return True
        except Exception:  # noqa: BLE001 - keep what the other figures measure
            print(f"{name}: failed", flush=True)
            traceback.print_exc()
            return False

    print(f"{'':<26}{'dsv3':>12} {'transformers':>13} {'floor':>12}  {'unit':<9}{'vs HF':>9} {'':>16}"
          f"{'warm-up':>9}")
    n = args.new_tokens
    ctx = args.prompt_len + n // 2
    hf_times = {}

    def decode_row(B):
        x = prompt if B == 1 else distinct_rows(prompt, B)
        t_ours, warm = decode_seconds(run, ours_gen(), x, n, args.repeat)
        t_hf = hf_times[B] = decode_seconds(run, hf_gen, x, n, 1)[0] if theirs is not None else None
        floor = floors(config, ours, B, ctx, args.bandwidth, elem)
        if B == 1:
            report("decode batch 1", t_ours * 1e3, t_hf and t_hf * 1e3, floor * 1e3, "ms/token", False, warm)
        else:
            report(f"decode batch {B}", B / t_ours, t_hf and B / t_hf, B / floor, "tokens/s", True, warm)

    def grouped_row():
        # eager MoE at batch 1: "auto" gathers the chosen experts' weights on a GPU (copies; fused away only under
        # torch.compile); on CPU grouped matmuls were faster at every batch size (docs/results.md): compare here
        moes = [layer.mlp for layer in ours.model.layers if isinstance(layer.mlp, dsv3.moe.MoE)]
        try:
            for moe in moes:
                moe.path = "grouped"
            t_grouped, warm = decode_seconds(run, ours_gen(), prompt, n, args.repeat)
            t_hf = hf_times.get(1)
            report("decode batch 1 (grouped)", t_grouped * 1e3, t_hf and t_hf * 1e3,
                   floors(config, ours, 1, ctx, args.bandwidth, elem) * 1e3, "ms/token", False, warm)
        finally:
            for moe in moes:
                moe.path = "auto"

    T = args.prefill_len
    long = torch.randint(0, config.vocab_size, (1, T), device=device, generator=gen)

    def prefill_row(model=ours, label=""):
        """One forward over T tokens (eager, or torch.compile(model): one graph, compiled by its first call)."""
        flops = prefill_flops(config, ours, T)
        warm = run(lambda: model(long))
        t_ours = min(run(lambda: model(long)) for _ in range(args.repeat))
        t_hf = hf_times.get("prefill")
        if theirs is not None and t_hf is None:
            theirs(long)
            t_hf = hf_times["prefill"] = min(run(lambda: theirs(long)) for _ in range(args.repeat))
        report(f"prefill {T} tokens {label}".strip(), flops / t_ours / 1e12, t_hf and flops / t_hf / 1e12,
               args.peak / 1e12, "TFLOP/s", True, warm)

    compiled_prefill = torch.compile(dsv3.fast.prepare(ours))  # compiles at its first call
    with torch.inference_mode():
        guarded("decode batch 1", lambda: decode_row(1))
        if not args.quick:
            guarded("decode batch 1 (grouped)", grouped_row)
        for B in (int(b) for b in args.batches.split(",")):
            guarded(f"decode batch {B}", lambda: decode_row(B))
        guarded("prefill", prefill_row)
        if not args.no_compile:  # last, so that a failure to compile cannot cost the eager figures above
            if not args.quick:
                guarded("prefill (compile)", lambda: prefill_row(compiled_prefill, "(compile)"))
            guarded("compile=True", lambda: compiled_rows(args, ours, prompt, n, run, hf_times, report, lambda B:
                                                          floors(config, ours, B, ctx, args.bandwidth, elem)))
        if args.profile:
            guarded("profile", lambda: profile(args, ours, prompt, long, device,
                                               None if args.no_compile or args.quick else compiled_prefill))
    print(f"floors: bandwidth {args.bandwidth / 1e12:.2f} TB/s, peak {args.peak / 1e12:.0f} TFLOP/s; decode context "
          f"{ctx} tokens; targets (issue 21): batch 1 <= 1.0 ms/token, batch 64 >= 12000 tokens/s compiled, prefill >= 400")


if __name__ == "__main__":
    main()
