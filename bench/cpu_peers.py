"""dsv3 against llama.cpp on the CPU (issue 21): prefill tokens/s and decode ms/token of the bundled model, one
thread, the same token ids, llama.cpp running a GGUF that llama.cpp's own converter made from the bundled checkpoint.

    pip install -e ".[bench]"                  # llama-cpp-python + gguf: builds llama.cpp from source (minutes)
    python bench/cpu_peers.py [--prompt-len 256] [--new-tokens 64] [--repeat 9] [--types f32] [--compile] [--bf16]

Each round runs every engine once (prefill, then --new-tokens greedy tokens) in turn, so a change in the machine's
load hits all alike; the table gives the median and the best (min) round and each figure's ratio against llama.cpp
f32 measured in the same run. Prefill = one forward over the prompt (llama.cpp `eval`, dsv3 `generate` of one
token); decode ms/token = (t(N) - t(1)) / (N - 1) for dsv3 (`bench/forward.py`'s definition) and the mean of the
N - 1 one-token `eval` calls with an argmax for llama.cpp. llama.cpp keeps its default f16 KV cache.
Checks printed: the relative error of llama.cpp's last-position logits against dsv3's (fp32), and how many greedy
tokens agree before the first difference.

The converter: llama.cpp's convert_hf_to_gguf.py is not in llama-cpp-python's wheel; it comes from its source
distribution (which vendors llama.cpp), fetched once with `pip download` into --cache. What it needed for this
model: its BPE pre-tokenizer check recognises a tokenizer by the hash of its output on a fixed text, and ours (trained
by scripts/train_tokenizer.py) is not one it knows, so `get_vocab_base_pre` is made to answer "deepseek-v3" (token
ids go to llama.cpp directly: its tokenizer is not used here). f16, Q8_0 and Q4_0 are made from the f32 file with
llama.cpp's `llama_model_quantize`. With llama-cpp-python 0.3.36 built from source on the 2-core test machine, every
f16 / Q8_0 / Q4_0 file of this model (from the converter or from `llama_model_quantize`) aborted llama.cpp's context
set-up (GGML_ASSERT(*cur_backend_id != -1) in ggml_backend_sched_split_graph, whatever the KV type or flash
attention): the default is f32 alone until that is understood.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

import dsv3
from forward import turn_times

CONVERTER = "vendor/llama.cpp/convert_hf_to_gguf.py"


def converter(cache: Path, version: str) -> Path:
    """llama.cpp's convert_hf_to_gguf.py (with its conversion/ and gguf-py/ packages) from llama-cpp-python's
    source distribution of `version`, downloaded and unpacked into `cache` once."""
    root = cache / f"llama_cpp_python-{version}"
    if not (root / CONVERTER).exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(cache)], check=True)
        with tarfile.open(cache / f"llama_cpp_python-{version}.tar.gz") as tar:
            wanted = [m for m in tar.getmembers() if m.name.startswith(
                (f"{root.name}/{CONVERTER}", f"{root.name}/vendor/llama.cpp/conversion/",
                 f"{root.name}/vendor/llama.cpp/gguf-py/"))]
            tar.extractall(cache, members=wanted, filter="data")
    return root / CONVERTER


def convert(script: Path, model_dir: Path, outtype: str, out: Path) -> None:
    """Run llama.cpp's converter on model_dir in a child process, its pre-tokenizer check answered (see above)."""
    code = f"""
import runpy, sys
d = {str(script.parent)!r}
sys.path[:0] = [d, d + "/gguf-py"]
import conversion.base as base
for name in dir(base):
    cls = getattr(base, name)
    if isinstance(cls, type) and "get_vocab_base_pre" in vars(cls):
        cls.get_vocab_base_pre = lambda self, tokenizer: "deepseek-v3"
sys.argv = ["convert_hf_to_gguf.py", {str(model_dir)!r}, "--outtype", {outtype!r}, "--outfile", {str(out)!r}]
runpy.run_path({str(script)!r}, run_name="__main__")
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def requantize(src: Path, out: Path, gguf_type: str) -> None:
    """The f32 GGUF -> f16 / q8_0 / q4_0 with llama.cpp's own `llama_model_quantize`."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    params.nthread = 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {src} -> {gguf_type}")


class LlamaCpp:
    """One GGUF file loaded by llama-cpp-python, fed token ids."""

    def __init__(self, path: Path, n_ctx: int) -> None:
        from llama_cpp import Llama
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=1, n_threads_batch=1,
                         verbose=False)

    def logits(self) -> np.ndarray:
        """The last evaluated position's logits [V] (llama-cpp-python fills `scores` only with logits_all=True,
        which would compute the output head for every prompt position)."""
        import llama_cpp
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))

    def prefill(self, ids: list[int]) -> np.ndarray:
        """The prompt's forward from an empty cache -> last-position logits [V]."""
        self.llm.reset()
        self.llm.eval(ids)
        return self.logits().copy()

    def generate(self, ids: list[int], n: int) -> tuple[list[int], float]:
        """Greedy tokens after the prompt, and the seconds of the n - 1 one-token steps after the first."""
        out = [int(np.argmax(self.prefill(ids)))]
        start = time.perf_counter()
        for _ in range(n - 1):
            self.llm.eval([out[-1]])
            out.append(int(np.argmax(self.logits())))
        return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--types", default="f32", help="GGUF types for llama.cpp, e.g. f32,f16,q8_0,q4_0 (f32 is always "
                   "run; the others aborted llama.cpp's context set-up here, see the module docstring)")
    p.add_argument("--compile", action="store_true", help="also dsv3's generate(..., compile=True)")
    p.add_argument("--bf16", action="store_true", help="also dsv3 with bf16 weights and activations (llama.cpp's "
                   "peer for it: --types f16); compiled too with --compile")
    p.add_argument("--cache", type=Path, default=Path("runs/cpu_peers"), help="converter and GGUF files")
    args = p.parse_args()
    import llama_cpp

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model_dir = Path(dsv3.bundled_model_path())
    ours = dsv3.load_pretrained(model_dir, dtype=torch.float32)
    args.cache.mkdir(parents=True, exist_ok=True)
    script = converter(args.cache, llama_cpp.__version__)
    types = ["f32"] + [t for t in args.types.split(",") if t and t != "f32"]
    files = {}
    for t in types:
        files[t] = args.cache / f"bundled-{t}.gguf"
        if not files[t].exists():
            if t == "f32":
                convert(script, model_dir, t, files[t])
            else:
                requantize(files["f32"], files[t], t)
    n_ctx = args.prompt_len + args.new_tokens + 8

    vocab, n = ours.config.vocab_size, args.new_tokens
    prompt = torch.randint(3, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    ids = prompt[0].tolist()
    with torch.inference_mode():
        reference = ours(prompt)[0, -1].numpy()
    expected = dsv3.generate(ours, prompt, n)[0, args.prompt_len:].tolist()
    print(f"{platform.processor() or platform.machine()} | torch {torch.__version__} | llama-cpp-python "
          f"{llama_cpp.__version__} | bundled model, {args.prompt_len}-token prompt, {n} greedy tokens, one thread")
    models = {"": ours} | ({" bf16": dsv3.load_pretrained(model_dir, dtype=torch.bfloat16)} if args.bf16 else {})
    variants = {f"dsv3 {mode}{tag}": (model, compile) for tag, model in models.items()
                for mode, compile in [("eager", False)] + [("compile=True", True)] * args.compile}
    for name, (model, compile) in variants.items():
        start = time.perf_counter()
        dsv3.generate(model, prompt, 2, compile=compile)  # compiles here, once
        if compile:
            print(f"{name}: compile {time.perf_counter() - start:.0f} s (not counted)")

    def ours_fns(name, model, compile):
        return {f"{name} prefill": lambda: dsv3.generate(model, prompt, 1, compile=compile),
                f"{name} N": lambda: dsv3.generate(model, prompt, n, compile=compile)}

    # one llama.cpp model in the process at a time (a second Llama aborted in llama_init_from_model with 0.3.36):
    # each GGUF type's rounds alternate with dsv3's, so every ratio compares figures of the same rounds
    rows = {}
    for t in types:
        name, peer = f"llama.cpp {t}", LlamaCpp(files[t], n_ctx)
        logits = peer.prefill(ids)
        tokens, _ = peer.generate(ids, n)
        same = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), n)
        err = np.linalg.norm(logits - reference) / np.linalg.norm(reference)
        print(f"check {name}: logits relative error vs dsv3 {err:.1e}; greedy tokens equal for the first {same}/{n}",
              flush=True)
        fns, decode_s = {}, []
        for ours_name, (model, compile) in variants.items():
            fns |= ours_fns(ours_name, model, compile)
        fns[f"{name} prefill"] = lambda: peer.prefill(ids)
        fns[f"{name} N"] = lambda: decode_s.append(peer.generate(ids, n)[1])
        times = turn_times(fns, args.repeat)
        peer.llm.close()
        for engine in list(variants) + [name]:
            prefill = times[f"{engine} prefill"]
            if engine == name:
                decode = [s / (n - 1) for s in decode_s[1:]]  # the warm-up round is not counted
            else:
                decode = [(a - b) / (n - 1) for a, b in zip(times[f"{engine} N"], prefill)]
            row = (args.prompt_len / statistics.median(prefill), args.prompt_len / min(prefill),
                   statistics.median(decode) * 1e3, min(decode) * 1e3)
            rows[engine if engine == name else f"{engine} (with {t})"] = row
    base = rows["llama.cpp f32"]
    print(f"\n{'engine':<30}{'prefill tok/s':>16}{'vs llama.cpp f32':>18}{'decode ms/token':>18}"
          f"{'vs llama.cpp f32':>18}   (median / min of {args.repeat} rounds)")
    for name, (pm, pb, dm, db) in rows.items():
        print(f"{name:<30}{pm:>8.0f} / {pb:<6.0f}{pm / base[0]:>8.2f} / {pb / base[1]:<6.2f}"
              f"{dm:>9.2f} / {db:<6.2f}{base[2] / dm:>8.2f} / {base[3] / db:<6.2f}")
    print("ratios: above 1 = faster than llama.cpp f32 (prefill: tokens/s over its; decode: its ms over ours); "
          "dsv3's rows are listed per llama.cpp block, whose rounds they alternated with")

if __name__ == "__main__":
    main()
