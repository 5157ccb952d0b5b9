"""Export a finished `dsv3 train` run as the bundled model: bf16 weights, tokenizer, and a measured model card.

    python scripts/export_bundled.py --run runs/bundled --out dsv3/bundled

Measures on the held-out split: the model's next-token loss (float32 compute on the exported bf16 weights) and a
unigram baseline (token frequencies of the training split, add-one smoothed), and writes README.md with them.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import dsv3
from dsv3.train_state import checkpoints

ROOT = Path(__file__).resolve().parent.parent


def heldout_loss(model: dsv3.Transformer, tokens: np.ndarray, seq_len: int) -> float:
    """Mean next-token cross-entropy (nats) over the whole held-out stream, in windows of seq_len."""
    n = (len(tokens) - 1) // seq_len
    x = torch.from_numpy(tokens[: n * seq_len + 1].astype(np.int64))
    total = 0.0
    with torch.inference_mode():
        for i in range(0, n, 32):
            idx = torch.arange(i, min(n, i + 32))[:, None] * seq_len + torch.arange(seq_len + 1)
            batch = x[idx]
            logits = model(batch[:, :-1]).float()
            total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
    return total / (n * seq_len)


def unigram_loss(train: np.ndarray, heldout: np.ndarray, vocab: int) -> float:
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[heldout[1:]].mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/bundled")
    p.add_argument("--out", default="dsv3/bundled")
    args = p.parse_args()
    run, out = Path(args.run), Path(args.out)
    ckpt = checkpoints(run)[-1]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    cfg = state["train_config"]
    model = dsv3.load_pretrained(ckpt, dtype=torch.float32)
    dsv3.save_pretrained(model, out, dtype=torch.bfloat16, mtp_copies=False)  # 25 MB budget
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if not (out / name).exists():
            shutil.copy(ckpt / name, out / name)
    model = dsv3.load_pretrained(out, dtype=torch.float32)  # measure what ships: bf16 weights
    tokenizer = dsv3.Tokenizer.from_pretrained(out)

    caches = sorted((run / "data").glob("tokens-*.npy"), key=lambda f: f.stat().st_size)
    heldout, train = np.load(caches[0]), np.load(caches[-1])
    loss = heldout_loss(model, heldout, cfg["seq_len"])
    base = unigram_loss(train, heldout, model.config.vocab_size)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_tokens = cfg["batch_size"] * cfg["seq_len"]
    seconds = sum(cfg["log_every"] * step_tokens / r["tokens_per_s"] for r in records)
    samples = []
    for prompt in ("dog (noun):", "run (verb):", "bright (adjective):", "library (noun):"):
        ids = torch.tensor([tokenizer.encode(prompt)])
        ids = dsv3.generate(model, ids, max_new_tokens=40, stop_token_ids=[tokenizer.eos_token_id])
        samples.append(tokenizer.decode(ids[0].tolist(), skip_special_tokens=True))
    c = model.config
    facts = {
        "total": model.num_parameters(), "activated": model.num_parameters(activated=True),
        "with_mtp": model.num_parameters(include_mtp=True), "steps": state["step"],
        "tokens": state["step"] * step_tokens, "train_tokens": len(train), "heldout_tokens": len(heldout),
        "loss": loss, "ppl": math.exp(loss), "unigram": base, "unigram_ppl": math.exp(base),
        "hours": seconds / 3600, "bytes": (out / "model.safetensors").stat().st_size,
        "torch": torch.__version__, "cpu": subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip(),
    }
    (out / "README.md").write_text(CARD.format(c=c, cfg=cfg, f=facts, samples="\n".join(f"    {s}" for s in samples),
                                               dense_last=c.first_k_dense_replace - 1,
                                               epochs=facts["tokens"] / facts["train_tokens"],
                                               wordnet=(ROOT / "data/corpus/SOURCE.md").read_text()))
    print(json.dumps(facts, indent=1))
    print("\n".join(samples))


CARD = """# dsv3 bundled model

A DeepSeek-V3-architecture language model in miniature, trained from scratch by `dsv3 train` on CPU. It is the
default model of `dsv3 serve`, `dsv3 chat`, the notebooks and the tests, so that everything works offline.
It loads in dsv3 (`dsv3.load_pretrained(dsv3.bundled_model_path())`) and in transformers
(`AutoModelForCausalLM.from_pretrained(path)`, `AutoTokenizer.from_pretrained(path)`) with the same logits.

## Architecture (config.json)

- {c.num_hidden_layers} layers, hidden {c.hidden_size}; layers 0–{dense_last} dense SwiGLU (width {c.intermediate_size}), the rest DeepSeekMoE
- MLA: {c.num_attention_heads} heads, q-LoRA rank {c.q_lora_rank}, kv-LoRA rank {c.kv_lora_rank}, nope/rope/value head dims {c.qk_nope_head_dim}/{c.qk_rope_head_dim}/{c.v_head_dim}
- MoE: {c.n_routed_experts} routed experts (width {c.moe_intermediate_size}) in {c.n_group} groups, {c.topk_group} groups and {c.num_experts_per_tok} experts per token, {c.n_shared_experts} shared expert;
  sigmoid affinities with the aux-loss-free correction bias (`noaux_tc`), routed scaling {c.routed_scaling_factor}
- {c.num_nextn_predict_layers} multi-token-prediction module (stored as `model.layers.{c.num_hidden_layers}`), vocabulary {c.vocab_size} (byte-level BPE)
- Parameters: {f[total]:,} in the main model ({f[activated]:,} activated per token), {f[with_mtp]:,} with the MTP module;
  {f[bytes]:,} bytes of bf16 safetensors

## Training

- Data: WordNet 3.0 glosses, one synset per line (`data/corpus/`, built by `scripts/build_corpus.py`):
  {f[train_tokens]:,} training tokens, {f[heldout_tokens]:,} held-out tokens.
- `dsv3 train`: {f[steps]} steps of {cfg[batch_size]} × {cfg[seq_len]} tokens ({f[tokens]:,} tokens, {epochs:.2f} epochs), AdamW lr {cfg[lr]} (warm-up
  {cfg[warmup_steps]} steps, cosine to {cfg[min_lr]}), weight decay {cfg[weight_decay]}, clip {cfg[grad_clip]}; DeepSeek-V3's recipe: bias update speed
  γ = {cfg[bias_update_speed]}, sequence-wise balance loss α = {cfg[balance_loss_alpha]}, MTP loss λ = {cfg[mtp_loss_weight]}. Float32 on one CPU core
  ({f[cpu]}, torch {f[torch]}), about {f[hours]:.2f} hours of training.
- Rebuild end to end: `bash scripts/build_bundled.sh` (corpus, tokenizer, training, this card).

## Results (held-out split, next-token loss in nats)

| model | loss | perplexity |
|---|---|---|
| unigram baseline (training-split token frequencies) | {f[unigram]:.3f} | {f[unigram_ppl]:.1f} |
| this model (bf16 weights) | {f[loss]:.3f} | {f[ppl]:.1f} |

Greedy samples:

{samples}

## Limits

A model of this size trained for well under an hour on one CPU core knows the *form* of a dictionary entry and
common words; its definitions of rarer words are often wrong, and it knows nothing outside WordNet's glosses. It is
not instruction-tuned: the chat template works mechanically, but answers read like glosses. On MMLU it scores at
chance level. Use it to exercise code paths, not for its answers.

## Corpus licence (WordNet 3.0)

{wordnet}
"""


if __name__ == "__main__":
    main()
