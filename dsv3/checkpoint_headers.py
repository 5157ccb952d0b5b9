"""A checkpoint's safetensors headers, checked before any tensor is read: every key, shape and dtype against the
model that will hold them, FP8 weights against their block scales (docs/architecture.md §6, §7).

The single-process loaders (dsv3.checkpoint.load_pretrained for plain and FP8 checkpoints, dsv3.quant.apply's
load_quantized for int8 / int4 / kept FP8) and the tensor-parallel one (dsv3.distributed.checkpoint, on every rank)
all run `check_stored`, so a bad file is refused alike, in one line naming the file and key, whichever path reads it.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from .hub import (INDEX, CheckpointError, check_dtype, dequantize_fp8, dtype_name, few, index_weight_map, is_float8,
                  safetensors_errors, shard_files, to_model_key)


@dataclasses.dataclass(frozen=True)
class Stored:
    """A tensor as the safetensors header describes it (nothing is read): its file, shape and dtype."""
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    def meta(self) -> torch.Tensor:
        """An empty meta tensor of this shape and dtype, for the checks that look at those only."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


# safetensors' dtype names (the header's "dtype" field)
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
           "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "C64": torch.complex64,
           "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16}


def stored_tensors(path: Path) -> dict[str, Stored]:
    """hub key -> Stored for every tensor of the checkpoint at path, from the headers of shard_files (the index
    checked, names outside the directory refused); a key stored in two files is refused, and so is a key that the
    index does not list under the shard holding it (check_listed)."""
    out: dict[str, Stored] = {}
    for file in shard_files(path):
        with safetensors_errors(file), safe_open(file, framework="pt") as f:
            keys = list(f.keys())
            for key in keys:
                if key in out:
                    raise CheckpointError(f"{key} is stored twice, in {out[key].file} and in {file}; a tensor must "
                                          "be in one shard only")
            for key in keys:
                piece = f.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(piece.get_dtype())
                out[key] = Stored(file, tuple(piece.get_shape()),
                                  dtype if dtype is not None else f.get_tensor(key).dtype)
    check_listed(path, out)
    return out


def check_listed(path: Path, stored: dict[str, Stored]) -> None:
    """Refuse a sharded checkpoint whose shards hold a key that the index does not list under them: the index says
    which shard holds each tensor, so a shard holding more means the two disagree (a stale index, shards of another
    save), and what loads would depend on which of them a loader believes. Run after every header is read, so that
    a key stored twice is named as such first."""
    weight_map = index_weight_map(path)
    if weight_map is None:
        return
    for key, tensor in stored.items():
        listed = weight_map.get(key)
        if listed != tensor.file.name:
            where = "does not list" if listed is None else f"lists under {listed}"
            raise CheckpointError(f"{tensor.file}: holds {key}, which {INDEX} {where}; the index and its shards "
                                  "disagree (expected each shard to hold only the keys the index lists under it)")


def compute_dtype(stored: dict[str, Stored], dtype: torch.dtype | None) -> torch.dtype:
    """The model's dtype: `dtype`, else the embedding's as stored (bfloat16 for an FP8 or non-float one), so that a
    checkpoint mixing float dtypes loads as one, as transformers casts to one dtype."""
    embed = stored.get("model.embed_tokens.weight")
    if dtype is not None:
        return dtype
    if embed is None or not embed.dtype.is_floating_point or is_float8(embed.dtype):
        return torch.bfloat16
    return embed.dtype


def check_stored(path: Path, stored: dict[str, Stored], expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 n_layers: int, quantized: bool) -> None:
    """Refuse, from the headers alone and before any tensor is read, a checkpoint that does not fit the model:
    unexpected or missing keys, wrong shapes, dtypes that do not fit the key (check_dtype), FP8 weights without
    their scales or scales without their FP8 weights, scales of the wrong shape. expected: model name -> (shape,
    dtype) of every tensor the (whole, unsplit) model holds; quantized: its packed layers are quantized layers
    (dsv3.quant.apply.load_quantized), else plain or FP8 weights (dsv3.checkpoint.load_pretrained). The
    tensor-parallel loader runs the same checks on every rank, so both refuse a file alike."""
    names = {key: to_model_key(key, n_layers) for key in stored}
    if quantized:
        present = {name for name in names.values() if name is not None}
        missing, unexpected = set(expected) - present, present - set(expected)
        if missing or unexpected:
            parts = ([f"missing keys: {few(missing)}"] if missing else []) + (
                [f"unexpected keys: {few(unexpected)}"] if unexpected else [])
            raise CheckpointError(f"{path}: quantized checkpoint does not match config.json ({'; '.join(parts)})")
        for key, name in names.items():
            if name is None:
                continue
            shape, dtype = expected[name]
            if stored[key].shape != shape:
                raise CheckpointError(f"{path}: {name} has shape {stored[key].shape}, expected {shape} from "
                                      "config.json and quantization_config")
            check_dtype(stored[key].file, key, stored[key].meta(), dtype)
        return
    state: dict[str, str] = {}  # model name -> hub key, of the weights (not the FP8 scales)
    scales: dict[str, str] = {}  # model name of the weight -> hub key of its weight_scale_inv
    unexpected = []
    for key, name in names.items():
        if key.endswith(".weight_scale_inv"):
            weight_key = key.removesuffix("_scale_inv")
            check_dtype(stored[key].file, key, stored[key].meta(), torch.float32)
            scales[to_model_key(weight_key, n_layers) or weight_key] = key
            continue
        if name is None:
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        if stored[key].shape != expected[name][0]:
            raise CheckpointError(f"{stored[key].file.name}: {key} has shape {stored[key].shape}, "
                                  f"expected {expected[name][0]} from config.json")
        state[name] = key
    missing = set(expected) - set(state)
    if missing or unexpected:
        parts = ([f"missing keys: {few(missing)}"] if missing else []) + (
            [f"unexpected keys: {few(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{path}: checkpoint does not match config.json ({'; '.join(parts)})")
    for name, key in state.items():
        if stored[key].dtype != torch.float8_e4m3fn:
            check_dtype(stored[key].file, key, stored[key].meta(), expected[name][1])
    for name, scale_key in scales.items():
        if name not in state or stored[state[name]].dtype != torch.float8_e4m3fn:
            found = f"is {dtype_name(stored[state[name]].dtype)}" if name in state else "is missing"
            raise CheckpointError(f"{stored[scale_key].file}: {scale_key} has no FP8 weight beside it ({name} "
                                  f"{found}; expected float8_e4m3fn)")
    for name, key in state.items():
        if stored[key].dtype != torch.float8_e4m3fn:
            continue
        file = stored[key].file
        if name not in scales:
            raise CheckpointError(f"{file}: FP8 weight {key} has no {key}_scale_inv beside it")
        if len(stored[key].shape) != 2:
            raise CheckpointError(f"{file}: FP8 weight {key} has shape {stored[key].shape}; FP8 block scales apply "
                                  "to 2-D weights only")
        try:  # on meta tensors: dequantize_fp8's own check of the scale's shape, nothing computed
            dequantize_fp8(stored[key].meta(), stored[scales[name]].meta())
        except CheckpointError as e:
            raise CheckpointError(f"{stored[scales[name]].file}: {key}_scale_inv: {e}") from None


def without_absent_mtp(path: Path, config, stored: dict[str, Stored]):
    """config, with no MTP layers when it declares some but the checkpoint holds none: transformers drops the MTP
    layer when it re-saves a checkpoint; keep the main model, say so."""
    n_layers = config.num_hidden_layers
    if config.num_nextn_predict_layers and not any((to_model_key(k, n_layers) or "").startswith("mtp.")
                                                   for k in stored):
        warnings.warn(f"{path}: config.json declares {config.num_nextn_predict_layers} MTP layer(s) but the "
                      "checkpoint has none (re-saved by transformers?); loading without the MTP head")
        return dataclasses.replace(config, num_nextn_predict_layers=0)
    return config
