"""Load checkpoints in the Hugging Face hub layout into a dsv3 Transformer (safetensors only; bf16, fp32, FP8, or
quantized by dsv3.quant); the reading, writing and key mapping are dsv3/hub.py's.

Layout facts: docs/architecture.md §5 (MTP as `model.layers.{num_hidden_layers + k}`), §6 (FP8 weights
with a float32 `weight_scale_inv` per 128×128 block), §7 (tensor names). Loading builds the model on the meta device
and assigns each tensor as it is read, so the weights are never held twice.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .config import ModelConfig
from .distributed import checkpoint as parallel_checkpoint
from .distributed import world_size
from .checkpoint_headers import check_stored, compute_dtype, stored_tensors, without_absent_mtp
from .hub import (FP8_BLOCK, FP32_KEYS, HUB_FILES, CheckpointError, dequantize_fp8, hub_state_dict, read_tensors,
                  resolve_model, shard_files, to_model_key)
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
    stored = stored_tensors(path)
    config = without_absent_mtp(path, config, stored)
    with torch.device("meta"):
        model = Transformer(config)
    n_layers = config.num_hidden_layers
    check_stored(path, stored, {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()},
                 n_layers, quantized=False)  # every key, shape and dtype, before anything is read
    model_dtype = compute_dtype(stored, dtype)
    state: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}  # FP8 block scales, keyed by the weight they scale
    for key, tensor, _ in read_tensors(shard_files(path)):
        if key.endswith(".weight_scale_inv"):
            weight_key = key.removesuffix("_scale_inv")
            scales[to_model_key(weight_key, n_layers) or weight_key] = tensor
        elif (name := to_model_key(key, n_layers)) is not None:
            state[name] = tensor
    for name, tensor in state.items():
        if tensor.dtype == torch.float8_e4m3fn:
            tensor = dequantize_fp8(tensor, scales[name], model_dtype)
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
