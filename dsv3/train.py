"""Pre-training loop with DeepSeek-V3's MoE recipe: next-token loss + λ·MTP loss + α·sequence-wise balance loss,
and auxiliary-loss-free balancing of the router bias after every step.

Facts: docs/architecture.md §3 (bias update, balance loss eqs. 17-20) and §5 (MTP loss eq. 25);
paper-V3 §4.2 for the optimiser (AdamW β=(0.9, 0.95), weight decay 0.1, gradient clip 1.0, warm-up then cosine).

    history = train(model, TrainConfig(steps=100, out_dir="runs/x"), tokens)   # tokens: 1-D token stream

Each checkpoint `out_dir/checkpoint-{step:06d}/` is a hub-layout model directory (config.json + model.safetensors)
plus `optimizer.pt` and `trainer_state.json`, written into a temporary directory and renamed into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import dsa
from .distributed import data_parallel, init
from .checkpoint import load_pretrained
from .arguments import REVISION_HELP, model_path
from .data import EpochSampler, PackedSequences
from .model import Transformer
from .moe import MoE
from .train_state import (MetricsLog, StopOnSignal, TrainingInterrupted, checkpoints, load_checkpoint,
                          refuse_earlier_run, rng_state, save_checkpoint)

DSA_STAGES = ("off", "warmup", "sparse")  # TrainConfig.dsa_stage / --dsa-stage


@dataclass(kw_only=True)
class TrainConfig:
    """Training hyper-parameters. Defaults: paper-V3 §4.2 / §2.1.2 / §2.2 where the paper gives one, else noted."""

    seq_len: int = 256
    batch_size: int = 16  # sequences per optimizer step
    micro_batch_size: int | None = None  # sequences per forward (gradient accumulation); None = batch_size
    steps: int = 1000
    lr: float = 1e-3  # small-model value; the paper's 2.2e-4 is for 671B parameters
    min_lr: float = 1e-4  # cosine floor; the paper decays to 10% of the peak (2.2e-5)
    warmup_steps: int = 100  # paper: 2000 steps (for a 14.8T-token run)
    weight_decay: float = 0.1  # paper §4.2; applied to matrices only, not to norm weights (1-D tensors)
    betas: tuple[float, float] = (0.9, 0.95)  # paper §4.2
    grad_clip: float = 1.0  # paper §4.2; 0 disables clipping (the norm is still logged)
    bias_update_speed: float = 0.001  # γ, paper §2.1.2 (first 14.3T tokens); 0 disables aux-loss-free balancing
    balance_loss_alpha: float = 0.0001  # α, paper §2.1.2 eq. 17; 0 disables the sequence-wise balance loss
    mtp_loss_weight: float = 0.3  # λ, paper §2.2 (first 10T tokens); 0 disables the MTP loss
    seed: int = 0
    eval_every: int = 200  # 0: no periodic evaluation (the final step is still evaluated when eval data exists)
    eval_batches: int = 20
    save_every: int = 500  # 0: only the final checkpoint
    keep_checkpoints: int = 2  # newest checkpoints kept in out_dir; 0 keeps all
    log_every: int = 10
    out_dir: str = "runs/train"
    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; or "float32" / "bfloat16" (autocast)
    # DeepSeek Sparse Attention stage (V3.2 report §2.1, dsv3/dsa.py): "off"; "warmup" (dense attention, only the
    # indexers learn, by their KL to the attention distribution); "sparse" (top-k attention, all weights learn)
    dsa_stage: str = "off"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), f.default)
        self.betas = tuple(float(b) for b in self.betas)
        positive = ("seq_len", "batch_size", "steps", "eval_batches", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "bias_update_speed", "balance_loss_alpha",
                     "mtp_loss_weight"):  # nan / inf would train on silently into a NaN model
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not all(math.isfinite(b) and 0 <= b < 1 for b in self.betas):  # AdamW's range
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.micro_batch_size is not None and (self.micro_batch_size <= 0
                                                  or self.batch_size % self.micro_batch_size):
            raise ValueError(f"TrainConfig.micro_batch_size={self.micro_batch_size} must divide "
                             f"batch_size={self.batch_size}")
        if self.dsa_stage not in DSA_STAGES:
            raise ValueError(f"TrainConfig.dsa_stage must be 'off', 'warmup' or 'sparse', got {self.dsa_stage!r}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"TrainConfig.dtype must be 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")

    @classmethod
    def from_json(cls, path: str | Path) -> "TrainConfig":
        """Read a JSON object of TrainConfig fields; an unknown key or a bad value is a ValueError naming the file."""
        from .data import read_text

        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of TrainConfig fields, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names:
                raise ValueError(f"{path}: unknown TrainConfig key {key!r}; known keys: {sorted(names)}")
        try:
            return cls(**data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "betas": list(self.betas)}


def _check_type(name: str, value: Any, default: Any) -> None:
    """Values read from JSON or flags must have the default's type (ints for floats too; None only where default)."""
    if isinstance(default, bool) or isinstance(value, bool):
        ok = type(value) is type(default)
    elif default is None or isinstance(default, int):  # micro_batch_size (default None) is an int too
        ok = isinstance(value, int) or (default is None and value is None)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and len(value) == len(default) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        like = "an integer or null" if default is None else f"a value like {default!r}"
        raise ValueError(f"TrainConfig.{name}: expected {like}, got {value!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up to lr, then cosine decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def moe_layers(model: Transformer) -> dict[str, MoE]:
    """Every MoE module by name (main layers, then MTP layers)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def compute_loss(model: Transformer, batch: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    """batch: [B, T+1] -> (total loss, parts). Total = CE(t+1) + λ·mean_k CE_mtp(t+k+2) + α·Σ_layers L_bal.

    MTP depth k (paper §2.2): module k takes the previous depth's hidden states (depth 0: the main model's final
    normed hidden states) and the embeddings of the tokens k+1 ahead; position i predicts token i+k+2.
    """
    x, y = batch[:, :-1], batch[:, 1:]
    moes = moe_layers(model).values()
    for m in moes:  # only MoE layers that run in this forward report (MTP layers are skipped when λ = 0)
        m.last_balance_loss = m.last_load = None
    for ind in dsa.indexers(model):  # likewise for the DSA indexers' KL
        ind.last_loss = None
    use_mtp = cfg.mtp_loss_weight > 0 and len(model.mtp) > 0
    logits, hidden = model(x, return_hidden=True)
    lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    total = lm_loss
    parts = {"lm_loss": lm_loss.detach()}
    if use_mtp:
        mtp_losses, ids = [], x
        for k in range(len(model.mtp)):
            hidden = model.mtp_hidden(hidden[:, :-1], ids, k)  # [B, T-k-1, D]
            mtp_logits = model.lm_head(model.mtp[k].shared_head.norm(hidden))
            mtp_losses.append(F.cross_entropy(mtp_logits.flatten(0, 1).float(), batch[:, k + 2:].flatten()))
            ids = ids[:, 1:]
        mtp_loss = torch.stack(mtp_losses).mean()
        total = total + cfg.mtp_loss_weight * mtp_loss
        parts["mtp_loss"] = mtp_loss.detach()
    kl = dsa.indexer_loss(model)  # DSA stages: the indexers' KL (their only training signal), summed over layers
    if kl is not None:
        total = total + kl
        parts["indexer_loss"] = kl.detach()
    balance = [m.last_balance_loss for m in moes if m.last_balance_loss is not None]
    if balance:
        balance_sum = torch.stack(balance).sum()
        if cfg.balance_loss_alpha > 0:
            total = total + cfg.balance_loss_alpha * balance_sum
        parts["balance_loss"] = balance_sum.detach() / len(balance)  # mean per layer: 1.0 = perfectly balanced
    return total, parts


@torch.no_grad()
def update_router_bias(loads: dict[str, torch.Tensor], moes: dict[str, MoE], gamma: float) -> None:
    """Aux-loss-free balancing (paper §2.1.2): b_i += γ·sign(mean load − load_i).

    loads: tokens per expert [E] over the whole step (all micro-batches). Overloaded experts' bias goes down,
    underloaded experts' up; the bias only affects which experts are chosen, never the gating weights.
    """
    for name, load in loads.items():
        bias = moes[name].gate.e_score_correction_bias
        if bias is not None:
            bias.add_(gamma * torch.sign(load.mean() - load).to(bias.dtype))


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = (max_i load_i − mean load) / mean load (Wang et al. 2024, the aux-loss-free balancing paper)."""
    mean = load.float().mean()
    return float((load.float().max() - mean) / mean) if mean > 0 else 0.0


@torch.no_grad()
def evaluate(model: Transformer, data: PackedSequences, cfg: TrainConfig, device, autocast) -> float:
    """Mean next-token cross-entropy over the first eval_batches batches of `data`, in order."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    micro = cfg.micro_batch_size or cfg.batch_size
    for start in range(0, min(len(data), cfg.eval_batches * cfg.batch_size), micro):
        batch = data[np.arange(start, min(start + micro, len(data)))].to(device)
        with autocast:
            logits = model(batch[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        count += batch[:, 1:].numel()
    model.train(was_training)
    return float(total) / count


# ---------------------------------------------------------------------------------------------- the loop
def _device_and_autocast(cfg: TrainConfig):
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    return device, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (linears, embedding, router), none on 1-D tensors (RMSNorm weights)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    cuda = params[0].device.type == "cuda"  # fused kernel on GPU; multi-tensor (foreach) updates on CPU
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=cuda or None, foreach=None if cuda else True)


def train(model: Transformer, cfg: TrainConfig, train_data, eval_data=None, *, resume: bool = False,
          stop_at: int | None = None, extra_files: Sequence[str | Path] = (), progress: bool = True) -> list[dict]:
    """Train `model` in place; returns the logged records (also in out_dir/metrics.jsonl and .csv).

    train_data / eval_data: 1-D token streams (numpy array, tensor or list; see dsv3.data) packed into seq_len + 1
    windows. resume: continue from the newest checkpoint in out_dir (same data order, optimizer, RNG states).
    stop_at: stop after this step (with a checkpoint), e.g. to train in slices; the schedule still spans cfg.steps.
    extra_files: copied into every checkpoint (e.g. the tokenizer files, to make it a complete hub directory).
    SIGINT (Ctrl-C) or SIGTERM finishes the step in flight, saves a checkpoint and raises TrainingInterrupted (a
    KeyboardInterrupt) saying where it is; `resume=True` continues from it exactly. A second signal stops at once.
    """
    out_dir = Path(cfg.out_dir)
    if stop_at is not None and stop_at < 1:
        raise ValueError(f"stop_at: expected >= 1, got {stop_at}")
    max_pos = model.config.max_position_embeddings
    if cfg.seq_len > max_pos:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings {max_pos}")
    if not resume:  # a fresh run's retention and logs would destroy an earlier run's (every rank looks, then waits)
        refuse_earlier_run(out_dir, "out_dir", "resume=True")
        data_parallel.barrier()
    out_dir.mkdir(parents=True, exist_ok=True)
    device, autocast = _device_and_autocast(cfg)
    model.to(device).train()
    if cfg.dsa_stage != "off":  # before the optimizer: the warm-up freezes all but the indexers
        dsa.configure_training(model, cfg.dsa_stage)
    train_seqs = PackedSequences(train_data, cfg.seq_len)
    eval_seqs = PackedSequences(eval_data, cfg.seq_len) if eval_data is not None else None
    optimizer = make_optimizer(model, cfg)
    moes = moe_layers(model)
    step = position = 0  # optimizer steps done; sequences consumed (the sampler's position)
    if resume:  # every rank restores the same checkpoint (data-parallel replicas start identical)
        found = checkpoints(out_dir)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint-* directory with trainer_state.json in {out_dir}")
        state = load_checkpoint(found[-1], model, optimizer, cfg.to_dict())
        step, position = state["step"], state["data_position"]
    else:
        random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    is_main = data_parallel.is_main()  # under torchrun rank 0 writes the config, logs and checkpoints
    if is_main:
        (out_dir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    log = MetricsLog(out_dir, list(moes), step if resume else None) if is_main else None
    sampler = EpochSampler(len(train_seqs), cfg.seed)
    micro = cfg.micro_batch_size or cfg.batch_size
    last = min(cfg.steps, stop_at or cfg.steps)
    history: list[dict] = []
    sums: dict[str, torch.Tensor] = {}
    t0, n_since = time.perf_counter(), 0
    saved = step

    def save() -> Path:
        state = {"step": step, "data_position": position, "rng": rng_state(), "train_config": cfg.to_dict()}
        target = out_dir / f"checkpoint-{step:06d}"
        if is_main:
            save_checkpoint(target, model, optimizer, state, extra_files)
            if cfg.keep_checkpoints:
                for old in checkpoints(out_dir)[:-cfg.keep_checkpoints]:
                    shutil.rmtree(old)
        data_parallel.barrier()
        return target

    bar = tqdm(total=last, initial=step, desc="train", disable=not (progress and is_main), dynamic_ncols=True)
    with StopOnSignal() as stop:
        while step < last and not stop.received:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = train_seqs[sampler.indices(position, cfg.batch_size)].to(device, non_blocking=True)
            position += cfg.batch_size
            loads: dict[str, torch.Tensor] = {}
            step_parts: dict[str, torch.Tensor] = {}
            for mb in data_parallel.share(batch).split(micro):  # the whole batch without a process group
                with autocast:
                    loss, parts = compute_loss(model, mb, cfg)
                (loss * (mb.shape[0] / cfg.batch_size)).backward()
                parts["loss"] = loss.detach()
                for k, v in parts.items():
                    step_parts[k] = step_parts.get(k, 0) + v * (mb.shape[0] / cfg.batch_size)
                for name, m in moes.items():
                    if m.last_load is not None:
                        loads[name] = loads[name] + m.last_load if name in loads else m.last_load
            data_parallel.sum_gradients(model)  # data-parallel ranks: the global batch's gradient, loads, losses
            loads, step_parts = data_parallel.sum_tensors(loads), data_parallel.sum_tensors(step_parts)
            for k, v in step_parts.items():
                sums[k] = sums.get(k, 0) + v
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            sums["grad_norm"] = sums.get("grad_norm", 0) + grad_norm.detach()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cfg.bias_update_speed > 0 and cfg.dsa_stage != "warmup":  # the warm-up leaves the main model as is
                update_router_bias(loads, moes, cfg.bias_update_speed)
            step += 1
            n_since += 1
            bar.update(1)
            is_last = step == last
            do_eval = eval_seqs is not None and ((cfg.eval_every and step % cfg.eval_every == 0)
                                                 or step == cfg.steps)
            if step % cfg.log_every == 0 or is_last or do_eval:
                # float() waits for the device, so the time below covers the work done; eval comes after it
                record = {"step": step, **{k: float(v) / n_since for k, v in sums.items()}, "lr": lr}
                record["tokens_per_s"] = n_since * cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)
                vio = {name: max_violation(load) for name, load in loads.items()}
                if vio:
                    record["maxvio"] = sum(vio.values()) / len(vio)
                    record.update({f"maxvio/{n}": v for n, v in vio.items()})
                    record["load"] = {n: load.tolist() for n, load in loads.items()}
                    record["bias"] = {n: moes[n].gate.e_score_correction_bias.tolist() for n in loads
                                      if moes[n].gate.e_score_correction_bias is not None}
                if do_eval:
                    record["eval_loss"] = evaluate(model, eval_seqs, cfg, device, autocast)
                if log is not None:
                    log.append(record)
                history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                **({"eval": f"{record['eval_loss']:.3f}"} if do_eval else {}))
                sums, n_since = {}, 0
                t0 = time.perf_counter()
            if (cfg.save_every and step % cfg.save_every == 0) or is_last:
                save()
                saved, t0 = step, time.perf_counter()
        bar.close()
        if stop.received:  # after the step in flight: nothing since the last checkpoint is lost
            where = save() if step != saved else out_dir / f"checkpoint-{step:06d}"
            raise TrainingInterrupted(f"{stop.received} after step {step}: checkpoint {where} saved; continue "
                                      "with the same command plus --resume" if step else f"{stop.received} before "
                                      "the first step: nothing to save")
    return history


# ---------------------------------------------------------------------------------------------- CLI
_BUNDLED = Path(__file__).parent / "bundled"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    model = p.add_mutually_exclusive_group()
    model.add_argument("--config", help="HF config.json of a fresh, randomly initialised model (the bundled model's: "
                       "scripts/bundled/config.json)")
    model.add_argument("--model", help="checkpoint directory (hub layout) or hub id to start from")
    p.add_argument("--revision", help=REVISION_HELP)
    p.add_argument("--data", nargs="+", metavar="FILE", help="plain-text training files")
    p.add_argument("--dataset", help="a `datasets` hub id or local .json/.jsonl/.csv/.parquet/.txt file")
    p.add_argument("--dataset-config", help="configuration name of --dataset")
    p.add_argument("--split", default="train", help="split of --dataset (default: train)")
    p.add_argument("--text-column", default="text", help="text column of --dataset (default: text)")
    p.add_argument("--doc-split", choices=["line", "paragraph", "file"], default="line",
                   help="what one document is in the text files (default: each non-empty line)")
    p.add_argument("--eval-data", nargs="+", metavar="FILE", help="held-out plain-text files")
    p.add_argument("--eval-fraction", type=float, default=0.01,
                   help="without --eval-data: hold out this fraction of the training tokens (default 0.01; 0: none)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model's if it has one, else the bundled one)")
    p.add_argument("--out", required=True, help="output directory: checkpoints, metrics, token cache; new or empty, "
                   "unless --resume continues the run in it")
    p.add_argument("--train-config", help="JSON file of TrainConfig fields (flags below override it)")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "out_dir":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "betas":
            p.add_argument(flag, type=float, nargs=2, metavar=("B1", "B2"))
        else:
            kind = {"micro_batch_size": int}.get(f.name, type(f.default))
            p.add_argument(flag, type=kind, choices=DSA_STAGES if f.name == "dsa_stage" else None,
                           help=f"TrainConfig.{f.name} (default {f.default})")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--stop-at", type=int, help="stop after this step (the schedule still spans --steps)")
    p.add_argument("--no-bias-balance", action="store_true", help="γ = 0: no aux-loss-free bias updates")
    p.add_argument("--no-balance-loss", action="store_true", help="α = 0: no sequence-wise balance loss")
    p.add_argument("--no-mtp", action="store_true", help="λ = 0: no MTP loss")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--index-topk", type=int, help="with --dsa-stage on a dense model: add lightning indexers "
                   "keeping this many tokens per query (DeepSeek Sparse Attention)")
    p.add_argument("--index-n-heads", type=int, default=4, help="indexer heads for --index-topk (default 4)")
    p.add_argument("--index-head-dim", type=int, default=32, help="indexer head dim for --index-topk (default 32)")


def _train_config(args: argparse.Namespace) -> TrainConfig:
    base = TrainConfig.from_json(args.train_config).to_dict() if args.train_config else {}
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "out_dir"]
    base.update({n: getattr(args, n) for n in names if getattr(args, n) is not None})
    base["out_dir"] = args.out
    for flag, name in (("no_bias_balance", "bias_update_speed"), ("no_balance_loss", "balance_loss_alpha"),
                       ("no_mtp", "mtp_loss_weight")):
        if getattr(args, flag):
            base[name] = 0.0
    return TrainConfig(**base)


def run(args: argparse.Namespace) -> int:
    """`dsv3 train`: build or load the model, tokenize (cached), train, report where the checkpoint is."""
    from . import data
    from .config import ModelConfig
    from .tokenizer import Tokenizer

    if bool(args.data) == bool(args.dataset):
        raise SystemExit("dsv3 train: give exactly one of --data FILE... or --dataset NAME")
    init()  # under torchrun: data-parallel ranks (gloo on CPU, NCCL on GPUs); alone: nothing
    given = [("--data", f) for f in args.data or []] + [("--eval-data", f) for f in args.eval_data or []] + [
        (flag, f) for flag, f in (("--config", args.config), ("--train-config", args.train_config)) if f]
    for flag, file in given:  # before the model and the tokenizing: a typo fails at once
        if not Path(file).exists():
            raise SystemExit(f"dsv3 train: {flag} {file}: no such file")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise SystemExit(f"dsv3 train: --out {args.out}: a file is there; expected a directory (new or existing)")
    try:
        cfg = _train_config(args)
    except (OSError, ValueError) as error:  # --train-config's file, or a field's value
        raise SystemExit(f"dsv3 train: {error}") from None
    if not (math.isfinite(args.eval_fraction) and 0 <= args.eval_fraction < 1):
        raise SystemExit(f"dsv3 train: --eval-fraction: expected a number in [0, 1) (0: none), "
                         f"got {args.eval_fraction}")
    if args.stop_at is not None and args.stop_at < 1:
        raise SystemExit(f"dsv3 train: --stop-at: expected >= 1, got {args.stop_at}")
    out = Path(cfg.out_dir)
    if args.resume and not checkpoints(out) and (args.config or args.model):  # neither: the message below
        raise SystemExit(f"dsv3 train: --resume: no checkpoint-* directory with trainer_state.json in {out}")
    if not args.resume:  # before the model and the tokenizing: nothing of an earlier run in --out is overwritten
        try:
            refuse_earlier_run(out, "--out", "--resume")
        except FileExistsError as error:
            raise SystemExit(f"dsv3 train: {error}") from None
        data_parallel.barrier()  # under torchrun: every rank has looked before rank 0 writes
    source_dir = model_path(args.model, args.revision) if args.model else None
    if args.config:
        try:
            model_config = ModelConfig.from_hf(args.config)
        except (OSError, ValueError) as error:
            raise SystemExit(f"dsv3 train: --config {error}") from None
        torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only
        model = Transformer(model_config)
    elif args.model:
        model = load_pretrained(source_dir, dtype=torch.float32, parallel=False)
    elif args.resume and checkpoints(out):
        model = load_pretrained(checkpoints(out)[-1], dtype=torch.float32, parallel=False)
    else:
        raise SystemExit("dsv3 train: give --config CONFIG.json or --model DIR (or --resume with checkpoints in --out)")
    if args.index_topk is not None:
        if cfg.dsa_stage == "off" or model.config.uses_dsa:
            raise SystemExit("dsv3 train: --index-topk adds indexers to a dense model for --dsa-stage warmup|sparse")
        torch.manual_seed(cfg.seed)  # the new indexers' initial weights depend on the seed only
        dsa.add_indexers(model, args.index_n_heads, args.index_head_dim, args.index_topk)
    elif cfg.dsa_stage != "off" and not model.config.uses_dsa:
        raise SystemExit(f"dsv3 train: --dsa-stage {cfg.dsa_stage} needs a model with indexers (config index_topk) "
                         "or --index-topk K to add them")
    if cfg.seq_len > model.config.max_position_embeddings:
        raise SystemExit(f"dsv3 train: --seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    tok_dir = Path(args.tokenizer or (source_dir if source_dir and Path(source_dir, "tokenizer.json").is_file()
                                      else _BUNDLED))
    tokenizer = Tokenizer.from_pretrained(tok_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise SystemExit(f"dsv3 train: the tokenizer in {tok_dir} has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {model.config.vocab_size}")
    source = dict(tokenizer=tokenizer, tokenizer_dir=tok_dir, cache_dir=out / "data", doc_split=args.doc_split)
    try:  # a file that is not UTF-8 text, a dataset without the column, too few tokens: one line naming it
        if args.data:
            tokens = data.load_tokens(files=args.data, **source)
        else:
            tokens = data.load_tokens(dataset=args.dataset, split=args.split, text_column=args.text_column,
                                      dataset_config=args.dataset_config, **source)
        eval_tokens = None
        if args.eval_data:
            eval_tokens = data.load_tokens(files=args.eval_data, **source)
        elif args.eval_fraction > 0:
            tokens, eval_tokens = data.split_holdout(tokens, args.eval_fraction, cfg.seq_len)
    except (OSError, ValueError) as error:
        raise SystemExit(f"dsv3 train: {error}") from None
    n_params = model.num_parameters(include_mtp=True)
    data_parallel.say(f"dsv3 train: {n_params / 1e6:.2f}M parameters, {len(tokens):,} training tokens"
                      + (f", {len(eval_tokens):,} held-out tokens" if eval_tokens is not None else ""))
    tok_files = [tok_dir / n for n in ("tokenizer.json", "tokenizer_config.json") if (tok_dir / n).is_file()]
    try:
        history = train(model, cfg, tokens, eval_tokens, resume=args.resume, stop_at=args.stop_at,
                        extra_files=tok_files, progress=not args.no_progress)
    except TrainingInterrupted as stopped:
        print(f"dsv3 train: {stopped}", file=sys.stderr)
        return 130
    except ValueError as error:  # --resume into a run with another seq_len / batch_size / seed; too little data
        raise SystemExit(f"dsv3 train: {error}") from None
    final = checkpoints(out)[-1]
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    data_parallel.say(f"dsv3 train: checkpoint {final}" + (f", eval loss {evals[-1]:.4f}" if evals else ""))
    return 0


def add_cli(subparsers) -> None:
    """Register `dsv3 train`."""
    p = subparsers.add_parser("train", help="train a model (DeepSeek-V3 losses and balancing)",
                              description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """`python -m dsv3.train ...` (the same arguments as `dsv3 train`)."""
    parser = argparse.ArgumentParser(prog="dsv3 train")
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
