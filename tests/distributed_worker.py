"""Jobs that tests/test_distributed.py runs in W gloo processes forked from the test process (several checks per
job: starting the ranks, not the checks, is what costs). Each job compares the parallel model with the
single-device one in the same process and returns plain numbers; rank 0's result is written to `out` as JSON."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import dsv3
from dsv3.distributed import init, parallelize, shards


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def tiny_configs() -> dict[str, dsv3.ModelConfig]:
    """V3-shaped tiny configs: groups + q-LoRA + MTP + YaRN; V2-Lite-shaped (no q-LoRA, softmax, greedy); DSA."""
    yarn = dict(rope_type="yarn", factor=4.0, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0,
                original_max_position_embeddings=64)
    return {
        "v3": dsv3.ModelConfig.tiny(n_routed_experts=8, n_group=4, topk_group=2, rope_scaling=yarn),
        "v2-lite": dsv3.ModelConfig.tiny(q_lora_rank=None, scoring_func="softmax", topk_method="greedy", n_group=1,
                                         topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
                                         n_shared_experts=2),
        "dsa": dsv3.ModelConfig.tiny(index_n_heads=4, index_head_dim=16, index_topk=6),
    }


def outputs(model: dsv3.Transformer, ids: torch.Tensor, greedy: int) -> dict[str, torch.Tensor]:
    """Logits in both MLA forms, MTP logits, prefill + cached decode steps, and `greedy` greedy tokens."""
    out = {}
    with torch.no_grad():
        for impl in ("naive", "absorb"):
            out[f"logits_{impl}"] = model(ids, attn_impl=impl)
        if model.mtp:
            _, hidden = model(ids, return_hidden=True)
            out["mtp"] = model.mtp_logits(hidden[:, :-1], ids)
        cache = model.new_cache(ids.shape[0], ids.shape[1] + 4)
        rows = [model(ids[:, :-3], cache)]
        rows += [model(ids[:, t:t + 1], cache, start_pos=t) for t in range(ids.shape[1] - 3, ids.shape[1])]
        out["cached"] = torch.cat(rows, dim=1)
    out["greedy"] = dsv3.generate(model, ids[:1, :5], greedy)
    return out


def compare(model: dsv3.Transformer, ids: torch.Tensor, greedy: int) -> dict:
    """The parallelized model's outputs against the single-device ones (computed on rank 0 only: the other ranks
    would repeat the same work on the same cores), and the resident parameter bytes against the bound."""
    ref = copy.deepcopy(model) if dist.get_rank() == 0 else None
    par = parallelize(model)
    got = outputs(par, ids, greedy)
    if ref is None:
        return {}
    want = outputs(ref, ids, greedy)
    out = {k: relative(got[k], want[k]) for k in want if k != "greedy"}
    out["greedy_equal"] = torch.equal(got["greedy"], want["greedy"])
    out["greedy_tokens"] = got["greedy"].shape[1] - 5
    out.update(parameter_bytes(ref, par))
    return out


def parameter_bytes(ref: torch.nn.Module, par: torch.nn.Module) -> dict:
    """Bytes this rank holds, and the bound: (split tensors' full bytes) / W + replicated tensors' bytes."""
    full = {k: v.numel() * v.element_size() for k, v in ref.state_dict().items()}
    held, split, replicated, state = 0, set(), 0, par.state_dict()  # once: int4's unpacks its kernel layout
    for name, s in shards(par).items():
        tensor = state[name]
        held += tensor.numel() * tensor.element_size()
        if s.replicated:
            replicated += full[s.key]
        else:
            split.add(s.key)
    for name in full:  # the other ranks' experts are split tensors too
        if ".experts." in name and name not in split:
            split.add(name)
    bound = sum(full[k] for k in split) / dist.get_world_size() + replicated
    return {"held_bytes": held, "bound_bytes": bound, "full_bytes": sum(full.values())}


def prepared_models() -> dict[str, tuple[dsv3.Transformer, torch.Tensor, int]]:
    """name -> (model, input ids, greedy tokens): the bundled model (fp32), the tiny configs and two quantized tiny
    models (int8, int4), seeded. Built once in the parent process; forked ranks inherit them."""
    torch.manual_seed(0)
    bundled = dsv3.load_pretrained(dsv3.bundled_model_path(), dtype=torch.float32)
    models = {"bundled": (bundled, torch.randint(0, bundled.config.vocab_size, (2, 12)), 32)}
    for name, config in tiny_configs().items():
        torch.manual_seed(1)
        models[name] = (dsv3.Transformer(config).eval(), torch.randint(0, config.vocab_size, (2, 10)), 8)
    for scheme, config in (("int8", dsv3.ModelConfig.tiny()),
                           ("int4", dsv3.ModelConfig.tiny(moe_intermediate_size=64))):
        torch.manual_seed(1)  # int4 in groups of 32: the shared expert's 64 inputs split into whole groups at W=2
        model = dsv3.quantize(dsv3.Transformer(config).eval(), scheme, group_size=32)
        models[scheme] = (model, torch.randint(0, config.vocab_size, (2, 10)), 8)
    return models


def job_models(models: dict) -> dict:
    """Every prepared model compared with its parallel form."""
    return {name: compare(model, ids, greedy) for name, (model, ids, greedy) in models.items()}


def job_checkpoint(payload: dict) -> dict:
    """Load each checkpoint of payload["load"] (name -> (directory, single-process logits of payload["ids"])) at
    this world size, reading only this rank's slices; save the plain one back from the parallel model."""
    from dsv3.distributed.checkpoint import read_slices
    out = {}
    for name, (path, want) in payload["load"].items():
        model = dsv3.load_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            out[f"{name}_logits"] = relative(model(payload["ids"]), want)
        with torch.device("meta"):
            meta = parallelize(dsv3.Transformer(model.config))
        out[f"{name}_bytes_read"] = read_slices(Path(path), meta, torch.float32, "cpu")[1]
        out[f"{name}_bytes_held"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        if name == "plain":
            dsv3.save_pretrained(model, payload["save"])
    out.update(quantized_checks(payload["quantized"], payload["ids"]))
    out.update(console_checks())
    try:
        dsv3.load_pretrained(payload["nan"], dtype=torch.float32)
        error = None
    except dsv3.checkpoint.CheckpointError as e:
        error = str(e)
    out["nan_errors"] = [None] * dist.get_world_size()
    dist.all_gather_object(out["nan_errors"], error)
    return out


def quantized_checks(load: dict, ids: torch.Tensor) -> dict:
    """Quantized checkpoints (name -> (directory, keep_fp8, single-process logits)) loaded at this world size:
    logits, which layer classes the slices became, the bytes this rank read and holds, the gathered save (to
    `directory`-saved), and for FP8 this rank's bytes against plan()'s, loaded in bf16 (plan counts bf16 for
    what FP8 leaves unquantized, fp32 for the router)."""
    from dsv3.distributed import plan
    from dsv3.distributed.checkpoint import quantized_meta_model, read_slices
    out = {}
    for name, (path, keep, want) in load.items():
        model = dsv3.load_pretrained(path, dtype=torch.float32, keep_fp8=keep)
        with torch.no_grad():
            out[f"{name}_logits"] = relative(model(ids), want)
        out[f"{name}_classes"] = sorted({type(m).__name__ for m in model.modules() if "Parallel" in type(m).__name__})
        meta = parallelize(quantized_meta_model(Path(path), model.config, torch.float32))
        out[f"{name}_bytes_read"] = read_slices(Path(path), meta, torch.float32, "cpu")[1]
        out[f"{name}_bytes_held"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        dsv3.save_pretrained(model, f"{path}-saved")
        if keep:
            model = dsv3.load_pretrained(path, dtype=torch.bfloat16, keep_fp8=True)
            out[f"{name}_bf16_bytes_held"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            out[f"{name}_bytes_plan"] = plan(model.config, dist.get_world_size(), torch.float8_e4m3fn).weight_bytes
    return out


def console_checks() -> dict:
    """dsv3 chat's helpers under torchrun (batched here: a spawn costs more than the check): rank 0's line reaches
    every rank, end of input too, and all ranks sample with one seed."""
    from dsv3.distributed import console
    lines = ["read on rank 0"] if dist.get_rank() == 0 else ["not rank 0's line"]

    def read(prompt: str) -> str:
        if not lines:
            raise EOFError
        return lines.pop()
    shared = console.shared_read(read)
    got = [shared(">>> ")]
    try:
        shared(">>> ")
    except EOFError:
        got.append("EOF")
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (got, console.shared_seed(None)))
    return {"console_line": " / ".join(sorted({" ".join(g) for g, _ in everyone})),
            "console_seeds_equal": len({seed for _, seed in everyone}) == 1}


def job_train(payload: dict) -> list[dict]:
    """dsv3.train.train on this rank's share of each global batch: payload holds the model, the TrainConfig and the
    token stream; the records (loss per step, router biases) are rank 0's."""
    from dsv3.train import train
    return train(payload["model"], payload["config"], payload["tokens"], progress=False)


def job_finetune(payload: dict) -> list[dict]:
    """dsv3.lora_train.LoRATrainer at this world size (each rank runs batch[rank::W]); rank 0's history."""
    from dsv3.lora_train import LoRATrainer
    trainer = LoRATrainer(payload["model"], payload["data"], **payload["options"])
    return trainer.train(epochs=2, batch_size=4)


JOBS = {"models": job_models, "checkpoint": job_checkpoint, "train": job_train, "finetune": job_finetune}


def run(rank: int, world: int, port: int, job: str, payload, out: str) -> None:
    """One rank: join the gloo group on 127.0.0.1:port, run JOBS[job](payload); rank 0 writes the result to out."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert init("gloo", timeout_s=60) == world
    try:
        result = JOBS[job](payload)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()
