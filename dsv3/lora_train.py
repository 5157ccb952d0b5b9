"""LoRA fine-tuning on chat or prompt/completion data (`dsv3 finetune`), with held-out loss and resumable checkpoints.

Data: a jsonl file, one example per line, either
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}
      -> rendered with the tokenizer's chat template; the loss is on assistant tokens only (each assistant turn's
         content and its end-of-sentence token), found by rendering the prefixes before and after each turn;
    {"prompt": "...", "completion": "..."}
      -> bos + prompt + completion + eos; the loss is on the completion and eos only.

    trainer = LoRATrainer(dsv3.bundled_model_path(), "data/lora/reply_format.jsonl", rank=8, alpha=16,
                          output_dir="runs/lora")
    history = trainer.train(epochs=2, batch_size=16)   # runs/lora: the adapter (PEFT format) + checkpoints

Each epoch ends with the held-out loss (a seeded split of the data) and a checkpoint
`output_dir/checkpoint-epoch{NNN}/`: the adapter in PEFT format, the exact LoRA tensors by dsv3 name, the optimizer
state and trainer_state.json, written into a temporary directory and renamed into place. `resume=True` continues
from the newest one.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .atomic import directory, write_file
from .checkpoint import load_pretrained
from .data import read_text
from .distributed import data_parallel, init
from .arguments import REVISION_HELP, model_path
from .lora import LORA_TARGETS, apply_lora, lora_modules, quantized_reference_forward, save_adapter
from .model import Transformer
from .tokenizer import Tokenizer
from .train_state import refuse_earlier_run

DEFAULT_TARGETS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
IGNORE = -100


@dataclass
class Example:
    """ids: [T] token ids; labels: [T], the id where the loss applies, else -100 (predicted from the position before)."""

    ids: list[int]
    labels: list[int]


class DataError(ValueError):
    """A malformed dataset line; the message names the file and line number."""


def _chat_example(messages, tokenizer: Tokenizer, where: str) -> Example:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn from")
    try:
        ids = tokenizer.apply_chat_template(messages)
        labels = [IGNORE] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prefix = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
            upto = tokenizer.apply_chat_template(messages[:i + 1])
            if ids[:len(upto)] != upto or upto[:len(prefix)] != prefix:
                raise DataError(f"{where}: messages[{i}]: the conversation's prefix tokenizes differently from the "
                                "whole, so the assistant tokens cannot be located")
            labels[len(prefix):len(upto)] = upto[len(prefix):]
    except (TypeError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{where}: {e}") from None
    return Example(ids, labels)


def _completion_example(prompt, completion, tokenizer: Tokenizer, where: str) -> Example:
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise DataError(f"{where}: 'prompt' and 'completion' must be strings (completion non-empty)")
    head = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
    tail = tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
    return Example(head + tail, [IGNORE] * len(head) + tail)


def read_examples(path: str | Path, tokenizer: Tokenizer, max_length: int) -> list[Example]:
    """Parse the jsonl file; examples longer than max_length are cut at max_length tokens (a warning counts them);
    ones with no loss token left are dropped. Raises DataError naming the line of the first malformed example."""
    path = Path(path)
    examples, cut, dropped = [], 0, 0
    try:
        lines = read_text(path).splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except ValueError as e:  # not UTF-8: names path:line
        raise DataError(str(e)) from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if isinstance(record, dict) and "messages" in record:
            ex = _chat_example(record["messages"], tokenizer, where)
        elif isinstance(record, dict) and "prompt" in record and "completion" in record:
            ex = _completion_example(record["prompt"], record["completion"], tokenizer, where)
        else:
            raise DataError(f"{where}: expected an object with 'messages' or with 'prompt' and 'completion'")
        if len(ex.ids) > max_length:
            cut += 1
            ex = Example(ex.ids[:max_length], ex.labels[:max_length])
        if all(label == IGNORE for label in ex.labels[1:]):
            dropped += 1
            continue
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no usable examples")
    if cut or dropped:
        print(f"dsv3 finetune: {cut} example(s) cut to max_length={max_length}, {dropped} left with no target "
              "tokens were dropped")
    return examples


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids [B, T], targets [B, T-1] (labels shifted: position t predicts token t+1; padding is -100)."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    return ids, labels[:, 1:]


def example_loss(model: Transformer, ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over the target tokens, and their count."""
    logits = model(ids[:, :-1]).float()
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten().to(logits.device), ignore_index=IGNORE,
                           reduction="sum")
    return loss, int((targets != IGNORE).sum())


# name -> [low, high): each value finite and in it (nan / inf would train on silently into a NaN adapter)
_RANGES = {"lr": (0, math.inf), "alpha": (0, math.inf), "weight_decay": (0, math.inf), "eval_fraction": (0, 1),
           "dropout": (0, 1)}


def check_hyperparameters(prefix: str = "", **values: float) -> None:
    """Each value finite and in its _RANGES range, else a ValueError naming it (prefix + name, e.g. "--lr")."""
    for name, value in values.items():
        low, high = _RANGES[name]
        if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value < high):
            want = "a finite number >= 0" if high == math.inf else f"a number in [{low}, {high})"
            flag = prefix + (name.replace("_", "-") if prefix else name)
            raise ValueError(f"{flag}: expected {want}, got {value}")


class LoRATrainer:
    """Fine-tunes LoRA adapters on a frozen base (plain or quantized: QLoRA) with AdamW.

    base_model: a dsv3 Transformer, or a checkpoint directory (loaded in float32 on CPU, bfloat16 on CUDA).
    tokenizer: default — the one in the checkpoint directory, else the bundled one.
    eval_fraction: share of examples held out (seeded split; at least one when there are two or more).
    """

    def __init__(self, base_model: Transformer | str | Path, dataset_path: str | Path, rank: int = 16,
                 alpha: float = 32, target_modules=DEFAULT_TARGETS, lr: float = 2e-4, max_length: int = 512, *,
                 output_dir: str | Path = "runs/lora", dropout: float = 0.0, use_rslora: bool = False,
                 eval_fraction: float = 0.1, seed: int = 0, weight_decay: float = 0.0, keep_checkpoints: int = 2,
                 tokenizer: Tokenizer | None = None, device: str | torch.device | None = None,
                 progress: bool = True) -> None:
        check_hyperparameters(lr=lr, alpha=alpha, weight_decay=weight_decay, eval_fraction=eval_fraction,
                              dropout=dropout)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        from_dir = isinstance(base_model, (str, Path))
        if tokenizer is None:
            own = from_dir and Path(base_model, "tokenizer.json").is_file()
            tokenizer = Tokenizer.from_pretrained(base_model if own else Path(__file__).parent / "bundled")
        examples = read_examples(dataset_path, tokenizer, max_length)  # before the model: a bad line fails at once
        if from_dir:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self.base_path = str(base_model)
            model = load_pretrained(base_model, dtype=dtype, device=self.device, parallel=False)
        else:
            self.base_path, model = None, base_model.to(self.device)
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        torch.manual_seed(seed)  # the A initialisation
        # q_proj or q_a_proj/q_b_proj exist depending on q_lora_rank: drop the absent form from the list
        available = {n.rpartition(".")[2] for n, _ in model.named_modules()}
        targets = target_modules if isinstance(target_modules, str) else \
            [t for t in target_modules if t in available or t not in ("q_proj", "q_a_proj", "q_b_proj")]
        # the loss is the next-token loss only, so adapters in the MTP layers would never train
        self.model = apply_lora(model, rank, alpha, targets, dropout, use_rslora, include_mtp=False)
        self.lr, self.weight_decay, self.seed = lr, weight_decay, seed
        self.output_dir, self.keep_checkpoints, self.progress = Path(output_dir), keep_checkpoints, progress
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        n_eval = 0 if len(examples) < 2 else max(1, round(eval_fraction * len(examples)))
        self.eval_examples = [examples[i] for i in order[:n_eval]]
        self.train_examples = [examples[i] for i in order[n_eval:]]
        self.params = [p for m in lora_modules(self.model).values() for p in (m.lora_A, m.lora_B)]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)

    # ------------------------------------------------------------------ loop
    def train(self, epochs: int = 1, batch_size: int = 8, resume: bool = False,
              max_steps: int | None = None) -> list[dict]:
        """Train `epochs` epochs in total (resume: counting those already done). Returns the history: one record
        per step ({"step", "epoch", "loss"}) and one per epoch end ({"epoch", "train_loss", "eval_loss"}).

        max_steps: stop after this many optimizer steps in total; the epoch it stops in ends there (held-out loss,
        checkpoint), so a resume goes on with the next epoch.
        """
        start_epoch, step, history = 0, 0, []
        if not resume:  # a fresh run's retention and adapter would replace an earlier run's (every rank looks)
            refuse_earlier_run(self.output_dir, "output_dir", "resume=True", "checkpoint-epoch*",
                               ("adapter_model.safetensors", "adapter_config.json"))
            data_parallel.barrier()
        if resume and self.checkpoints():
            start_epoch, step, history = self._load_checkpoint(self.checkpoints()[-1])
        steps_per_epoch = -(-len(self.train_examples) // batch_size)
        total = steps_per_epoch * max(epochs - start_epoch, 0)
        if max_steps is not None:
            total = min(total, max(max_steps - step, 0))
        bar = tqdm(total=total, desc="finetune", disable=not (self.progress and data_parallel.is_main()))
        with quantized_reference_forward(self.model):
            for epoch in range(start_epoch, epochs):
                if max_steps is not None and step >= max_steps:
                    break
                self.model.train()
                order = list(range(len(self.train_examples)))
                random.Random(self.seed * 1000 + epoch).shuffle(order)
                total, count = 0.0, 0
                for b in range(0, len(order), batch_size):
                    if max_steps is not None and step >= max_steps:
                        break
                    loss_sum, n = self.step_loss([self.train_examples[i] for i in order[b:b + batch_size]])
                    self.optimizer.step()
                    step += 1
                    total, count = total + loss_sum.item(), count + n
                    history.append({"step": step, "epoch": epoch + 1, "loss": loss_sum.item() / n})
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum.item() / n:.3f}")
                record = {"epoch": epoch + 1, "step": step, "train_loss": total / count,
                          "eval_loss": self.evaluate(batch_size)}
                history.append(record)
                if data_parallel.is_main():  # under torchrun rank 0 reports and writes, the others wait
                    bar.write(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}"
                              + (f", held-out loss {record['eval_loss']:.4f}" if record["eval_loss"] is not None
                                 else ""))
                    self._save_checkpoint(epoch + 1, step, history)
                data_parallel.barrier()
        bar.close()
        self.model.eval()
        if data_parallel.is_main():
            save_adapter(self.model, self.output_dir, self.base_path)
        data_parallel.barrier()
        return history

    def step_loss(self, batch: list[Example]) -> tuple[torch.Tensor, int]:
        """Gradients of the mean loss per target token of `batch` (set, not accumulated); its summed loss and
        target count. Under torchrun (data-parallel) each rank runs the examples batch[rank::W] and the summed
        losses, counts and gradients are totalled over ranks, as one process running the whole batch."""
        self.optimizer.zero_grad(set_to_none=True)
        mine = batch[data_parallel.rank()::data_parallel.world_size()]
        loss_sum, n = torch.zeros((), device=self.device), 0
        if mine:
            ids, targets = collate(mine, self.pad_id)
            loss_sum, n = example_loss(self.model, ids.to(self.device), targets)
        total = data_parallel.sum_tensors({"loss": loss_sum.detach(), "n": torch.tensor(float(n), device=self.device)})
        if mine:
            (loss_sum / total["n"]).backward()
        data_parallel.sum_gradients(self.model)
        return total["loss"], int(total["n"])

    @torch.no_grad()
    def evaluate(self, batch_size: int = 8) -> float | None:
        """Mean loss per target token on the held-out examples (None when there are none)."""
        if not self.eval_examples:
            return None
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for b in range(0, len(self.eval_examples), batch_size):
            ids, targets = collate(self.eval_examples[b:b + batch_size], self.pad_id)
            loss_sum, n = example_loss(self.model, ids.to(self.device), targets)
            total, count = total + loss_sum.item(), count + n
        self.model.train(was_training)
        return total / count

    # ------------------------------------------------------------------ checkpoints
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints in output_dir, oldest first."""
        return sorted(p for p in self.output_dir.glob("checkpoint-epoch*") if (p / "trainer_state.json").is_file())

    def _save_checkpoint(self, epoch: int, step: int, history: list[dict]) -> Path:
        target = self.output_dir / f"checkpoint-epoch{epoch:03d}"
        with directory(target) as tmp:
            save_adapter(self.model, tmp, self.base_path)
            lora = {f"{n}.{k}": getattr(m, k).detach().contiguous() for n, m in lora_modules(self.model).items()
                    for k in ("lora_A", "lora_B")}
            write_file(tmp / "lora_state.safetensors", lambda p: save_file(lora, str(p)))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            state = {"epoch": epoch, "step": step, "history": history,
                     "train_examples": len(self.train_examples), "eval_examples": len(self.eval_examples)}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
        if self.keep_checkpoints:
            for old in self.checkpoints()[:-self.keep_checkpoints]:
                shutil.rmtree(old)
        return target

    def _load_checkpoint(self, path: Path) -> tuple[int, int, list[dict]]:
        """Restore the exact LoRA tensors (by dsv3 name) and the optimizer state."""
        state = json.loads((path / "trainer_state.json").read_text())
        tensors = load_file(str(path / "lora_state.safetensors"))
        modules = lora_modules(self.model)
        with torch.no_grad():
            for key, t in tensors.items():
                name, _, kind = key.rpartition(".")
                param = getattr(modules[name], kind) if name in modules else None
                if param is None or param.shape != t.shape:
                    raise ValueError(f"{path}: {key} {tuple(t.shape)} does not fit this trainer's adapters (were "
                                     "rank / target modules changed since the checkpoint?)")
                param.copy_(t)
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device,
                                                  weights_only=True))
        return state["epoch"], state["step"], state["history"]


# ---------------------------------------------------------------------------------------------- CLI
def run(args: argparse.Namespace) -> int:
    from . import bundled_model_path

    counts = dict(rank=args.rank, epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
                  max_steps=1 if args.max_steps is None else args.max_steps)
    for name, value in counts.items():
        if value < 1:
            raise SystemExit(f"dsv3 finetune: --{name.replace('_', '-')} must be at least 1, got {value}")
    try:
        check_hyperparameters("--", lr=args.lr, alpha=args.alpha, eval_fraction=args.eval_fraction,
                              dropout=args.dropout)
    except ValueError as e:
        raise SystemExit(f"dsv3 finetune: {e}") from None
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise SystemExit(f"dsv3 finetune: --output {args.output}: a file is there; expected a directory")
    if not args.resume:  # before the model and the data: nothing of an earlier run in --output is overwritten
        try:
            refuse_earlier_run(args.output, "--output", "--resume", "checkpoint-epoch*",
                               ("adapter_model.safetensors", "adapter_config.json"))
        except FileExistsError as e:
            raise SystemExit(f"dsv3 finetune: {e}") from None
    if not Path(args.data).is_file():
        raise SystemExit(f"dsv3 finetune: --data {args.data}: no such file")
    model_dir = model_path(args.model, args.revision) if args.model else bundled_model_path()
    init()  # under torchrun: data-parallel ranks; alone: nothing
    try:
        trainer = LoRATrainer(model_dir, args.data, rank=args.rank, alpha=args.alpha,
                              target_modules=args.target_modules, lr=args.lr, max_length=args.max_length,
                              output_dir=args.output, dropout=args.dropout, use_rslora=args.rslora,
                              eval_fraction=args.eval_fraction, seed=args.seed, progress=not args.no_progress)
    except (DataError, ValueError) as e:
        raise SystemExit(f"dsv3 finetune: {e}") from None
    n_train = sum(p.numel() for p in trainer.params)
    n_all = sum(p.numel() for p in trainer.model.parameters())
    data_parallel.say(f"dsv3 finetune: {len(trainer.train_examples)} training / {len(trainer.eval_examples)} "
                      f"held-out examples, {n_train:,} trainable parameters ({100 * n_train / n_all:.2f}% of "
                      f"{n_all:,})")
    history = trainer.train(args.epochs, args.batch_size, resume=args.resume, max_steps=args.max_steps)
    last = [r for r in history if "train_loss" in r]
    data_parallel.say(f"dsv3 finetune: adapter written to {args.output}"
                      + (f" (held-out loss {last[-1]['eval_loss']:.4f})" if last and last[-1]["eval_loss"] is not None else ""))
    return 0


def add_cli(subparsers) -> None:
    """Register `dsv3 finetune`."""
    p = subparsers.add_parser("finetune", help="LoRA fine-tuning on chat or prompt/completion jsonl",
                              description=__doc__.split("\n\n")[0],
                              epilog="example: dsv3 finetune --data data/lora/reply_format.jsonl --output runs/lora")
    p.add_argument("--model", help="base checkpoint directory or hub id (default: the bundled model)")
    p.add_argument("--revision", help=REVISION_HELP)
    p.add_argument("--data", required=True, help="jsonl: {'messages': [...]} or {'prompt', 'completion'} per line")
    p.add_argument("--output", required=True, help="directory for the adapter (PEFT format) and checkpoints; new or "
                   "empty, unless --resume continues the run in it")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=float, default=16, help="LoRA alpha: updates scale by alpha/r (default 16)")
    p.add_argument("--target-modules", nargs="+", default=list(DEFAULT_TARGETS), choices=LORA_TARGETS,
                   metavar="NAME", help=f"linear layers to adapt, of {', '.join(LORA_TARGETS)} (default: attention)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapters' input (default 0)")
    p.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training examples (default 3)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (default: --epochs' worth)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step (default 32)")
    p.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate (default 5e-3: LoRA on a small model "
                   "learns the shipped data's reply format in 3 epochs; 2e-4 barely moves it)")
    p.add_argument("--max-length", type=int, default=64,
                   help="tokens per example; longer ones are cut (default 64: the shipped examples fit)")
    p.add_argument("--eval-fraction", type=float, default=0.1,
                   help="share of examples held out for the held-out loss (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the shuffles and the A init (default 0)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
