"""`dsv3 train-vl`: train the vision path on the synthetic VQA set (dsv3/vision/data.py), DeepSeek-VL2's staging
(arXiv:2412.10302 §3.2) in miniature, after a stage VL2 does not need.

Stage 0 (steps < --stage0-steps): the encoder's pre-training. VL2 starts from a pre-trained SigLIP; ours starts
random, and a random encoder's image tokens differ too little between images for the frozen LM to give them any
gradient (docs/vision.md §3: without this stage the held-out accuracy stayed at chance for 1800 steps). So the
encoder + projector first learn with one linear head per question type over the flattened image tokens (the
answer as a class); the heads are thrown away after it. Stage 1 (steps < --stage1-steps): the encoder and projector
learn through the frozen LM. Stage 2: LoRA factors on every linear layer of the LM join them. Stages 1-2 take the
next-token cross-entropy on the answer tokens (and the end-of-sentence token after them) only: the prompt is given.
Checkpoints (`checkpoint-N/`: the VL weights as `save_vl` writes them, the heads, optimizer.pt, trainer_state.json)
are written atomically; --resume continues from the newest. metrics.jsonl logs the loss and, every --eval-every
steps the held-out accuracy per question type (stage 0: of the answer heads, "probe"; stages 1-2: of the model's
greedy answers, "heldout").
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from ..atomic import directory
from ..checkpoint import load_pretrained
from ..lora import apply_lora, lora_modules
from ..train_state import refuse_earlier_run
from ..tokenizer import Tokenizer
from . import data
from .config import VisionConfig
from .model import VisionLanguageModel, load_vl, save_vl
from .preprocess import to_pixels
from .prompt import expand_images

HEADS = "answer_heads.safetensors"
LORA_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                "down_proj"]


def encode(tokenizer: Tokenizer, ex: data.VQAExample, config: VisionConfig) -> tuple[list[int], int]:
    """An example -> (prompt + answer + eos ids, number of answer tokens incl. eos)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{config.image_token}\n{ex.question}"}],
                                         add_generation_prompt=True, tokenize=False)
    answer = tokenizer.encode(ex.answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    return expand_images(tokenizer, text, config) + answer, len(answer)


def batch(tokenizer: Tokenizer, examples: list[data.VQAExample], config: VisionConfig, pad_id: int):
    """-> ids [B, T] (right-padded), labels [B, T] (-100 but where the next token is an answer token), pixels."""
    rows = [encode(tokenizer, ex, config) for ex in examples]
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id)
    labels = torch.full((len(rows), T), -100)
    for b, (row, n) in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        labels[b, len(row) - n - 1:len(row) - 1] = torch.tensor(row[-n:])  # position t predicts token t + 1
    pixels = torch.stack([to_pixels(ex.image, config.image_size) for ex in examples])
    return ids, labels, pixels


class AnswerHeads(nn.Module):
    """Stage 0: one linear classifier per question type over an image's tokens [tokens_per_image, D], each
    RMS-normalised (their scale is the LM's embedding scale), flattened; classes are the type's answers."""

    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({t: nn.Linear(tokens * dim, len(data.ANSWERS[t])) for t in data.TYPES})

    def logits(self, image_tokens: torch.Tensor, exs: list[data.VQAExample]) -> list[torch.Tensor]:
        """image_tokens [B, tokens_per_image, D] -> per example its type's head's logits [n_answers]."""
        x = F.rms_norm(image_tokens, (image_tokens.shape[-1],)).flatten(1)
        return [self.heads[ex.qtype](x[b]) for b, ex in enumerate(exs)]

    def loss(self, image_tokens: torch.Tensor, exs: list[data.VQAExample]) -> torch.Tensor:
        """The mean cross-entropy of each example's answer under its type's head."""
        losses = [F.cross_entropy(z, torch.tensor(data.ANSWERS[ex.qtype].index(ex.answer)))
                  for z, ex in zip(self.logits(image_tokens, exs), exs)]
        return torch.stack(losses).mean()


def examples(split: str, start: int, n: int, seed: int, size: int) -> list[data.VQAExample]:
    return [data.example(i, split, seed, size) for i in range(start, start + n)]


def heldout(n: int, seed: int, size: int, batch_size: int = 50):
    """The first n held-out examples, in lists of at most batch_size."""
    for start in range(0, n, batch_size):
        yield examples("heldout", start, min(batch_size, n - start), seed, size)


@torch.no_grad()
def accuracy(model: VisionLanguageModel, tokenizer: Tokenizer, n: int, seed: int, batch_size: int = 50,
             blank: bool = False) -> dict[str, float]:
    """Held-out exact match per question type: greedy decoding gives the answer and then end-of-sentence iff every
    answer position's argmax is right (teacher forcing = greedy for a correct prefix). blank: grey images."""
    config = model.vision_config
    seen, right = [], []
    for exs in heldout(n, seed, config.image_size, batch_size):
        ids, labels, pixels = batch(tokenizer, exs, config, tokenizer.pad_token_id)
        if blank:
            pixels = torch.zeros_like(pixels)
        pred = model(ids, pixels).argmax(-1)
        seen += exs
        right += ((pred == labels) | (labels == -100)).all(dim=1).tolist()
    return data.accuracy_by_type(seen, right)


@torch.no_grad()
def probe_accuracy(model: VisionLanguageModel, heads: AnswerHeads, n: int, seed: int,
                   batch_size: int = 50) -> dict[str, float]:
    """Stage 0's measure: the answer heads' held-out accuracy per question type (what the image tokens carry)."""
    seen, right = [], []
    for exs in heldout(n, seed, model.vision_config.image_size, batch_size):
        logits = heads.logits(model.image_embeddings(model.pixels([ex.image for ex in exs])), exs)
        seen += exs
        right += [int(z.argmax()) == data.ANSWERS[ex.qtype].index(ex.answer) for z, ex in zip(logits, exs)]
    return data.accuracy_by_type(seen, right)


def build(args) -> tuple[VisionLanguageModel, AnswerHeads, Tokenizer]:
    """A fresh model (base LM in float32, LoRA on its linear layers, vision, projector and stage-0 heads random) or
    the newest checkpoint's (resume)."""
    base = Path(args.model)
    tokenizer = Tokenizer.from_pretrained(base)
    last = latest_checkpoint(Path(args.output)) if args.resume else None
    if last is not None:
        model = load_vl(last, dtype=torch.float32, merge=False)
        heads = AnswerHeads(model.vision_config.tokens_per_image, model.language_model.config.hidden_size)
        heads.load_state_dict(load_file(str(last / HEADS)))
        return model, heads, tokenizer
    lm = load_pretrained(base, dtype=torch.float32)
    config = VisionConfig(image_size=args.image_size, patch_size=args.patch_size, conv_stem=args.conv_stem,
                          language_model=str(base.resolve()),
                          lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank, lora_targets=LORA_TARGETS,
                          image_token_id=lm.config.vocab_size)
    torch.manual_seed(args.seed)
    if args.lora_rank:
        apply_lora(lm, args.lora_rank, config.lora_alpha, LORA_TARGETS, include_mtp=False)
    return VisionLanguageModel(lm, config), AnswerHeads(config.tokens_per_image, lm.config.hidden_size), tokenizer


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def stage_of(step: int, args) -> int:
    return 0 if step < args.stage0_steps else 1 if step < args.stage1_steps else 2


def set_stage(model: VisionLanguageModel, stage: int) -> None:
    """Stages 0-1: vision + projector train, the LM (and its LoRA) frozen; stage 2: the LoRA factors train too."""
    for p in model.language_model.parameters():
        p.requires_grad_(False)
    for m in lora_modules(model.language_model).values():
        m.lora_A.requires_grad_(stage == 2)
        m.lora_B.requires_grad_(stage == 2)
    for p in list(model.vision.parameters()) + list(model.projector.parameters()):
        p.requires_grad_(True)


def optimizer_for(model: VisionLanguageModel, heads: AnswerHeads, args) -> torch.optim.AdamW:
    vision = list(model.vision.parameters()) + list(model.projector.parameters())
    lora = [p for m in lora_modules(model.language_model).values() for p in (m.lora_A, m.lora_B)]
    return torch.optim.AdamW([{"params": vision, "lr": args.lr}, {"params": lora, "lr": args.lora_lr},
                              {"params": list(heads.parameters()), "lr": args.lr}], weight_decay=0.01)


def lr_factor(step: int, total: int, warmup: int = 50) -> float:
    """Linear warm-up, then cosine down to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def save(out: Path, step: int, model: VisionLanguageModel, heads: AnswerHeads, opt, tokenizer_dir: Path) -> None:
    with directory(out / f"checkpoint-{step}") as tmp:
        save_vl(model, tmp, tokenizer_dir)
        save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(tmp / HEADS))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step}) + "\n")


def example_range(step: int, args) -> tuple[int, int]:
    """(index of the step's first training example, batch size): stage 0 takes --stage0-batch-size examples a step,
    stages 1-2 --batch-size; every example is seen once."""
    if step < args.stage0_steps:
        return step * args.stage0_batch_size, args.stage0_batch_size
    return args.stage0_steps * args.stage0_batch_size + (step - args.stage0_steps) * args.batch_size, args.batch_size


def train_step(model, heads, opt, tokenizer, args, step: int) -> float:
    config = model.vision_config
    start, size = example_range(step, args)
    exs = examples("train", start, size, args.seed, config.image_size)
    ids, labels, pixels = batch(tokenizer, exs, config, tokenizer.pad_token_id)
    if stage_of(step, args) == 0:  # the encoder's pre-training: no LM forward
        loss = heads.loss(model.image_embeddings(pixels), exs)
    else:
        logits = model(ids, pixels)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"] if p.grad is not None], 1.0)
    for group, base_lr in zip(opt.param_groups, (args.lr, args.lora_lr, args.lr)):
        group["lr"] = base_lr * lr_factor(step, args.steps)
    opt.step()
    return loss.item()


def run(args) -> int:
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    if not args.resume:  # a fresh run must not log beside (or overwrite) an earlier run's checkpoints
        try:
            refuse_earlier_run(out, "--output", "--resume")
        except FileExistsError as e:
            raise SystemExit(f"dsv3 train-vl: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    model, heads, tokenizer = build(args)
    opt = optimizer_for(model, heads, args)
    last = latest_checkpoint(out) if args.resume else None
    step = 0
    if last is not None:
        opt.load_state_dict(torch.load(last / "optimizer.pt", weights_only=True))
        step = json.loads((last / "trainer_state.json").read_text())["step"]
    metrics = out / "metrics.jsonl"  # resumed: the records up to the checkpoint's step, then this run's
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    metrics.write_text("".join(line + "\n" for line in kept))
    log = metrics.open("a")
    start = time.time()
    model.train()
    end = min(args.steps, args.until or args.steps)
    for step in tqdm(range(step, end), initial=step, total=args.steps, desc="train-vl"):
        stage = stage_of(step, args)
        set_stage(model, stage)
        loss = train_step(model, heads, opt, tokenizer, args, step)
        record = {"step": step + 1, "stage": stage, "loss": round(loss, 5), "seconds": round(time.time() - start, 1)}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            if stage:
                record["heldout"] = accuracy(model, tokenizer, args.eval_size, args.seed)
            else:
                record["probe"] = probe_accuracy(model, heads, args.eval_size, args.seed)
            model.train()
            tqdm.write(json.dumps(record))
        log.write(json.dumps(record) + "\n")
        log.flush()
        if (step + 1) % args.save_every == 0 or step + 1 == end:
            save(out, step + 1, model, heads, opt, Path(args.model))
    return 0


def add_cli(subparsers) -> None:
    """Register `dsv3 train-vl`."""
    p = subparsers.add_parser("train-vl", help="train the vision path on the synthetic VQA set",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="base language model directory (default: the bundled model)")
    p.add_argument("--output", required=True, help="directory for checkpoints and metrics.jsonl; new or empty, unless "
                   "--resume continues the run in it")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps (default 1500)")
    p.add_argument("--until", type=int, help="stop after this step (the schedule still spans --steps); a later "
                   "--resume with a larger --steps stretches the schedule from there")
    p.add_argument("--stage0-steps", type=int, default=1000,
                   help="steps of the encoder's pre-training with answer heads, no LM (default 1000)")
    p.add_argument("--stage1-steps", type=int, default=1100,
                   help="steps before the LoRA factors train: stage 0 and then the LM frozen (default 1100)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step of stages 1-2 (default 32)")
    p.add_argument("--stage0-batch-size", type=int, default=64,
                   help="examples per step of stage 0, which runs no LM and so costs less each (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="vision + projector learning rate (default 1e-3)")
    p.add_argument("--lora-lr", type=float, default=2e-3, help="LoRA learning rate (default 2e-3)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank on the LM's linear layers; 0 = LM frozen")
    p.add_argument("--image-size", type=int, default=64, help="pixels per side (default 64)")
    p.add_argument("--patch-size", type=int, default=16, help="ViT patch side in pixels (default 16)")
    p.add_argument("--conv-stem", type=_channels, default=[32, 64], metavar="C1,C2,...",
                   help="channels of the stride-2 convolutions before the patch projection (default 32,64; "
                   "'' for SigLIP's plain patch embedding)")
    p.add_argument("--eval-every", type=int, default=100, help="held-out accuracy every N steps (default 100)")
    p.add_argument("--eval-size", type=int, default=200, help="held-out examples per evaluation (default 200)")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    p.add_argument("--seed", type=int, default=0, help="data and init seed (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.set_defaults(func=_main)


def _channels(text: str) -> list[int]:
    try:
        channels = [int(c) for c in text.split(",")] if text.strip() else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated channel counts, got {text!r}") from None
    if any(c <= 0 for c in channels):
        raise argparse.ArgumentTypeError(f"expected positive channel counts, got {text!r}")
    return channels


def _main(args: argparse.Namespace) -> int:
    for flag in ("steps", "batch_size", "stage0_batch_size", "eval_every", "eval_size", "save_every", "threads"):
        if getattr(args, flag) <= 0:
            raise SystemExit(f"--{flag.replace('_', '-')}: expected a positive integer, got {getattr(args, flag)}")
    for flag in ("lr", "lora_lr"):  # nan / inf would train on silently into a NaN model
        if not (math.isfinite(getattr(args, flag)) and getattr(args, flag) >= 0):
            raise SystemExit(f"--{flag.replace('_', '-')}: expected a finite number >= 0, got {getattr(args, flag)}")
    if args.until is not None and args.until < 1:
        raise SystemExit(f"--until: expected >= 1, got {args.until}")
    if args.lora_rank < 0:
        raise SystemExit(f"--lora-rank: expected >= 0, got {args.lora_rank}")
    if not 0 <= args.stage0_steps <= args.stage1_steps <= args.steps:  # stage boundaries within the schedule
        raise SystemExit(f"--stage0-steps {args.stage0_steps}, --stage1-steps {args.stage1_steps}, --steps "
                         f"{args.steps}: expected 0 <= --stage0-steps <= --stage1-steps <= --steps (the stages "
                         "end at those steps of the schedule)")
    if args.model is None:
        from .. import bundled_model_path
        args.model = str(bundled_model_path())
    return run(args)
