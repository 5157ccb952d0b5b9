"""Load checkpoints in the Hugging Face hub layout into a dsv3 Transformer (safetensors only; bf16, fp32, FP8, or
quantized by dsv3.quant); the reading, writing and key mapping are dsv3/hub.py's.

Layout facts: docs/architecture.md §5 (MTP as `model.layers.{num_hidden_layers + k}`), §6 (FP8 weights
with a float32 `weight_scale_inv` per 128×128 block), §7 (tensor names). Loading builds the model on the meta device
and assigns each tensor as it is read, so the weights are never held twice.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from .config import ModelConfig
from .distributed import checkpoint as parallel_checkpoint
from .distributed import world_size
from .hub import (FP8_BLOCK, FP32_KEYS, HUB_FILES, CheckpointError, check_dtype, dequantize_fp8, dtype_name, few,
                  hub_state_dict, is_float8, read_tensors, resolve_model, shard_files, to_model_key)
from .hub import save_pretrained as save_plain
from .model import Transformer
from .quant import apply as quant
from .rope import RotaryEmbedding

__all__ = ["FP8_BLOCK", "HUB_FILES", "CheckpointError", "dequantize_fp8", "hub_state_dict", "load_pretrained",
           "resolve_model", "save_pretrained"]


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, *, keep_fp8: bool = False,
                    revision: str | None = None, parallel: bool | None = None) -> Transformer:
    """Load a deepseek_v3 / deepseek_v2 checkpoint (single file or sharded; bf16, fp32 or FP8).

    dtype: the model's dtype (default: the checkpoint's embedding's: a checkpoint mixing float dtypes loads in that
    one; FP8 weights are dequantised to it). Every tensor's dtype is checked against what its key needs.
    The MTP layers (`model.layers.{num_hidden_layers}+`) load into `model.mtp`.
    keep_fp8: keep an FP8 checkpoint's weights in FP8 (dsv3.quant.FP8Linear) instead of dequantising them.
    Checkpoints written by dsv3.quant.save_quantized (int8/int4) always load quantized.
    path: a directory or a hub id (`resolve_model`; revision: the hub revision).
    Under a process group of W > 1 ranks (dsv3.distributed.init) each rank reads only its slices and returns its
    share of the model (dsv3.distributed.parallelize; docs/distributed.md), quantized layers (keep_fp8, int8/int4)
    as quantized slices. parallel: True/False forces or
    forbids that (data-parallel training loads the whole model on every rank); None: when W > 1.
    """
    path = resolve_model(path, revision)
    config = ModelConfig.from_hf(path)
    if world_size() > 1 if parallel is None else parallel:
        return parallel_checkpoint.load_parallel(path, config, dtype, device, keep_fp8)
    try:
        quantized = quant.loads_quantized(config.quantization_config, keep_fp8)
    except quant.QuantizationError as e:
        raise type(e)(f"{path / 'config.json'}: {e}") from None
    if quantized:
        return quant.load_quantized(path, config, dtype, device)
    with torch.device("meta"):
        model = Transformer(config)
    expected = model.state_dict()
    files = shard_files(path)
    state: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    where: dict[str, tuple[str, Path]] = {}  # model name -> (hub key, file) of state's and scales' tensors
    unexpected: list[str] = []
    for key, tensor, file in read_tensors(files):
        if key.endswith(".weight_scale_inv"):  # FP8 block scales, keyed by the weight they scale
            weight_key = key.removesuffix("_scale_inv")
            name = to_model_key(weight_key, config.num_hidden_layers) or weight_key
            check_dtype(file, key, tensor, torch.float32)
            scales[name] = tensor
            where[name + "_scale_inv"] = (key, file)
            continue
        name = to_model_key(key, config.num_hidden_layers)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{file.name}: {key} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(expected[name].shape)} from config.json")
        state[name] = tensor
        where[name] = (key, file)
    missing = set(expected) - set(state)
    if config.num_nextn_predict_layers and all(k.startswith("mtp.") for k in expected if k not in state) \
            and not any(k.startswith("mtp.") for k in state):
        # transformers drops the MTP layer when it re-saves a checkpoint: keep the main model, say so.
        warnings.warn(f"{path}: config.json declares {config.num_nextn_predict_layers} MTP layer(s) but the "
                      "checkpoint has none (re-saved by transformers?); loading without the MTP head")
        config = dataclasses.replace(config, num_nextn_predict_layers=0)
        with torch.device("meta"):
            model = Transformer(config)
        expected = model.state_dict()
        missing = set(expected) - set(state)
    if missing or unexpected:
        parts = ([f"missing keys: {few(missing)}"] if missing else []) + (
            [f"unexpected keys: {few(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{path}: checkpoint does not match config.json ({'; '.join(parts)})")
    for name, tensor in state.items():
        if tensor.dtype != torch.float8_e4m3fn:  # FP8 weights: checked against their scales below
            check_dtype(where[name][1], where[name][0], tensor, expected[name].dtype)
    for name in scales:
        if name not in state or state[name].dtype != torch.float8_e4m3fn:
            key, file = where[name + "_scale_inv"]
            found = f"is {dtype_name(state[name].dtype)}" if name in state else "is missing"
            raise CheckpointError(f"{file}: {key} has no FP8 weight beside it ({name} {found}; expected "
                                  "float8_e4m3fn)")
    # one dtype for the model (the router aside): `dtype`, else the embedding's as stored, so that a checkpoint
    # mixing float dtypes loads as one (as transformers casts to one dtype); FP8 weights dequantise to it too
    embed = state["model.embed_tokens.weight"].dtype
    model_dtype = dtype or (embed if not is_float8(embed) else torch.bfloat16)
    for name, tensor in state.items():
        if tensor.dtype == torch.float8_e4m3fn:
            key, file = where[name]
            if name not in scales:
                raise CheckpointError(f"{file}: FP8 weight {key} has no {key}_scale_inv beside it")
            if tensor.dim() != 2:
                raise CheckpointError(f"{file}: FP8 weight {key} has shape {tuple(tensor.shape)}; FP8 block "
                                      "scales apply to 2-D weights only")
            try:
                tensor = dequantize_fp8(tensor, scales[name], model_dtype)
            except CheckpointError as e:
                raise CheckpointError(f"{where[name + '_scale_inv'][1]}: {key}_scale_inv: {e}") from None
        target = torch.float32 if FP32_KEYS.match(name) else model_dtype
        state[name] = tensor.to(device=device, dtype=target)
    model.load_state_dict(state, assign=True)
    model.rotary = RotaryEmbedding(config).to(device)  # non-persistent buffer: recompute, not loaded
    if scales:  # dequantised: the model no longer holds FP8 weights, so a later save must not claim it does
        model.config = dataclasses.replace(config, quantization_config=None)
    return model.eval()


def save_pretrained(model: torch.nn.Module, path: str | Path, **kwargs) -> None:
    """dsv3.hub.save_pretrained (config.json + model.safetensors, the hub layout); a parallelized model's pieces
    are gathered and written by rank 0 (every rank must call it)."""
    if getattr(model, "parallel", None):
        return parallel_checkpoint.save_parallel(model, path, **kwargs)
    return save_plain(model, path, **kwargs)
