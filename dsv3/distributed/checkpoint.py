"""Checkpoints under a process group: each rank reads only its slices of the hub safetensors
(`safe_open(...).get_slice`), FP8 weights with their 128x128 block scales; a parallel model saves by gathering its
pieces on rank 0, which writes the ordinary hub layout (any world size loads it, one process included).

Quantized checkpoints stay quantized (keep_fp8, and int8/int4 written by dsv3.quant): the meta model gets the
quantized layers the files hold (dsv3.quant.apply.prepare_for_load, from the safetensors headers only), parallelize
turns them into their parallel forms (quantized.py), and each packed tensor is read in its own units, e.g. an fp8
weight's rows [r·n, (r+1)·n) with `weight_scale_inv` block rows [r·n/128, (r+1)·n/128).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open

from ..config import ModelConfig
from ..checkpoint_headers import Stored, check_stored, compute_dtype, stored_tensors, without_absent_mtp
from ..hub import (FP8_BLOCK, FP32_KEYS, CheckpointError, check_finite, dequantize_fp8, safetensors_errors,
                   save_pretrained, to_model_key)
from ..model import Transformer
from ..quant import QuantizationError, QuantizedLinear
from ..quant.apply import loads_quantized, prepare_for_load
from ..quant.experts import stack_experts
from ..rope import RotaryEmbedding
from .init import active, rank, world_size
from .parallelize import Shard, parallelize, shards


def hub_key(key: str, n_layers: int) -> str:
    """dsv3 name -> hub name: `mtp.k.X` -> `model.layers.{n_layers + k}.X` (the inverse of hub.to_model_key)."""
    if key.startswith("mtp."):
        k, rest = key[4:].split(".", 1)
        return f"model.layers.{n_layers + int(k)}.{rest}"
    return key


def tensor_files(path: Path) -> dict[str, Path]:
    """hub key -> the safetensors file holding it (the index's weight_map, or the keys of model.safetensors)."""
    return {key: stored.file for key, stored in stored_tensors(path).items()}


def read_slice(f, key: str, s: Shard, fp8: bool, dtype: torch.dtype | None) -> torch.Tensor:
    """Rows/columns [s.start, s.stop) along s.dim of tensor `key` of the open file f (all of it for dim None).
    fp8: the tensor is an FP8 weight, read from the 128-block boundary below s.start to the one above s.stop and
    multiplied by its `weight_scale_inv` blocks (exactly those blocks), then cut to [start, stop)."""
    if s.dim is None:
        tensor = f.get_tensor(key)
        return dequantize_fp8(tensor, f.get_tensor(key + "_scale_inv"), dtype or torch.bfloat16) if fp8 else tensor
    lo, hi = s.start, s.stop
    if fp8:
        lo, hi = lo // FP8_BLOCK * FP8_BLOCK, min(-(-hi // FP8_BLOCK) * FP8_BLOCK, f.get_slice(key).get_shape()[s.dim])
    lead = (slice(None),) * s.dim
    tensor = f.get_slice(key)[lead + (slice(lo, hi),)]
    if not fp8:
        return tensor
    scale = f.get_slice(key + "_scale_inv")[lead + (slice(lo // FP8_BLOCK, -(-hi // FP8_BLOCK)),)]
    return dequantize_fp8(tensor, scale, dtype or torch.bfloat16).narrow(s.dim, s.start - lo, s.stop - s.start)


# a routed expert's tensor: `model.layers.1.mlp.experts.3.up_proj.weight`
EXPERT_KEY = re.compile(r"(.*\.experts\.)(\d+)(\..*)")


def full_state(model: Transformer) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Single-device name -> (shape, dtype) of every tensor the whole (unsplit) model holds, from a parallelized
    meta model: split dimensions times the world size, and every rank's experts (a rank holds only its own; all
    have its experts' shapes)."""
    world, local = world_size(), model.state_dict()
    n_experts = model.config.n_routed_experts
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, s in shards(model).items():
        shape = list(local[name].shape)
        if s.dim is not None:
            shape[s.dim] *= world
        out[s.key] = (tuple(shape), local[name].dtype)
        if m := EXPERT_KEY.match(s.key):
            for e in range(n_experts):
                out.setdefault(f"{m.group(1)}{e}{m.group(3)}", out[s.key])
    return out


def read_slices(path: Path, model: Transformer, dtype: torch.dtype | None, device, *,
                quantized: bool | None = None,
                stored: dict[str, Stored] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """This rank's tensors of the (parallelized, meta) model from the checkpoint at path, and their bytes (what
    this rank took from the checkpoint, in the model's dtype). The checkpoint is checked first as one process
    checks it (check_stored). quantized: the checkpoint loads quantized (default: whether `model` holds quantized
    layers); stored: stored_tensors(path), when already read."""
    stored = stored_tensors(path) if stored is None else stored
    if quantized is None:
        quantized = any(isinstance(m, QuantizedLinear) for m in model.modules())
    n_layers = model.config.num_hidden_layers
    check_stored(path, stored, full_state(model), n_layers, quantized)
    modules = dict(model.named_modules())
    model_dtype = compute_dtype(stored, dtype)
    state, read, handles, failed = {}, 0, {}, None
    try:
        for name, s in shards(model).items():
            key = hub_key(s.key, n_layers)
            file = stored[key].file
            with safetensors_errors(file):
                if file not in handles:
                    handles[file] = safe_open(file, framework="pt")
                fp8 = not quantized and stored[key].dtype == torch.float8_e4m3fn
                tensor = read_slice(handles[file], key, s, fp8, model_dtype)
            check_finite(file, key, tensor)  # this rank's slice (FP8: dequantised, so its scales are checked too)
            read += tensor.numel() * tensor.element_size()
            owner, _, leaf = name.rpartition(".")
            if isinstance(modules[owner], QuantizedLinear) and leaf != "bias":  # packed tensors keep their format
                target = tensor.dtype
            else:
                target = torch.float32 if FP32_KEYS.match(s.key) else model_dtype
            state[name] = tensor.to(device=device, dtype=target).contiguous()  # the packed kernels want rows
    except Exception as error:  # noqa: BLE001 - re-raised below, on every rank
        failed = error
    raise_together(failed)
    return state, read


def raise_together(error: Exception | None) -> None:
    """Raise on every rank when any rank failed to read its slices: each reads different bytes, and a rank raising
    alone would leave the others waiting at their next collective. The failing rank raises its own error, the
    others a CheckpointError that names that rank and repeats its message. One all_gather per load."""
    if active():
        messages = [None] * world_size()
        dist.all_gather_object(messages, None if error is None else str(error))
        first = next(((r, m) for r, m in enumerate(messages) if m is not None), None)
        if error is None and first is not None:
            raise CheckpointError(f"rank {first[0]} could not read its part of the checkpoint: {first[1]}")
    if error is not None:
        raise error


def quantized_meta_model(path: Path, config: ModelConfig, dtype: torch.dtype | None,
                         stored: dict[str, Stored] | None = None) -> Transformer:
    """A meta-device Transformer whose linears are the quantized layers the checkpoint holds (read from the
    safetensors headers: no tensor is loaded), computing in `dtype` (default: the embedding's stored dtype)."""
    stored = stored_tensors(path) if stored is None else stored
    tensors = {}
    for key, tensor in stored.items():
        name = to_model_key(key, config.num_hidden_layers)
        if name is not None:
            tensors[name] = (tensor.shape, tensor.dtype)
    with torch.device("meta"):
        model = Transformer(config)
    try:
        prepare_for_load(model, config.quantization_config, tensors, compute_dtype(stored, dtype))
    except QuantizationError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return model


def load_parallel(path: Path, config: ModelConfig, dtype: torch.dtype | None, device,
                  keep_fp8: bool = False) -> Transformer:
    """This rank's share of the checkpoint at path as a parallelized Transformer, reading only its slices.
    Quantized checkpoints (dsv3 int8/int4; FP8 with keep_fp8) give quantized parallel layers. What the
    single-process loader refuses is refused here too, with the same message (check_stored)."""
    stored = stored_tensors(path)
    config = without_absent_mtp(path, config, stored)
    try:
        quantized = loads_quantized(config.quantization_config, keep_fp8)
    except QuantizationError as e:  # as dsv3.checkpoint.load_pretrained words it
        raise type(e)(f"{path / 'config.json'}: {e}") from None
    if quantized:
        model = parallelize(quantized_meta_model(path, config, dtype, stored))
    else:
        with torch.device("meta"):
            model = parallelize(Transformer(config))
    state, _ = read_slices(path, model, dtype, device, quantized=quantized, stored=stored)
    model.load_state_dict(state, assign=True)
    model.rotary = RotaryEmbedding(config).to(device)
    if quantized:
        stack_experts(model)
    elif (config.quantization_config or {}).get("quant_method") == "fp8":  # dequantised while reading
        model.config = dataclasses.replace(config, quantization_config=None)
    return model.eval()


def gather_state_dict(model: Transformer) -> dict[str, torch.Tensor] | None:
    """The single-device state dict of a parallel model on rank 0 (None on the others): split tensors all-gathered
    and concatenated, each rank's experts renamed to their global ids. Every rank must call it."""
    world, out = world_size(), {}
    state = model.state_dict()
    for name, s in shards(model).items():
        tensor = state[name].detach().contiguous()
        if s.replicated:
            out[s.key] = tensor
            continue
        sent = tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor  # gloo has no float8
        pieces = [torch.empty_like(sent) for _ in range(world)]
        dist.all_gather(pieces, sent)
        pieces = [piece.view(tensor.dtype) for piece in pieces]
        if s.dim is not None:
            out[s.key] = torch.cat(pieces, dim=s.dim)
            continue
        prefix, local, rest = _expert_parts(name)
        per_rank = model.get_submodule(prefix.removesuffix(".experts")).n_experts
        for r, piece in enumerate(pieces):
            out[f"{prefix}.{r * per_rank + local}.{rest}"] = piece
    return out if rank() == 0 else None


def _expert_parts(name: str) -> tuple[str, int, str]:
    """`a.b.experts.3.up_proj.weight` -> ("a.b.experts", 3, "up_proj.weight")."""
    prefix, tail = name.split(".experts.", 1)
    local, rest = tail.split(".", 1)
    return prefix + ".experts", int(local), rest


def save_parallel(model: Transformer, path: str | Path, **kwargs) -> None:
    """hub.save_pretrained of the gathered model, written by rank 0 (the others wait at a barrier). A quantized
    model is written as dsv3.quant.save_quantized writes it (packed tensors and scales, no MTP copies)."""
    state = gather_state_dict(model)
    if state is not None:
        with torch.device("meta"):
            plain = Transformer(model.config)
        if any(isinstance(m, QuantizedLinear) for m in model.modules()):
            prepare_for_load(plain, model.config.quantization_config, {k: (t.shape, t.dtype) for k, t in state.items()},
                             model.model.embed_tokens.weight.dtype)
            kwargs.setdefault("mtp_copies", False)
        plain.load_state_dict(state, assign=True)
        save_pretrained(plain, path, **kwargs)
    dist.barrier()

