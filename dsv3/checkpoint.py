"""Load and save checkpoints in the Hugging Face hub layout (config.json + safetensors), safetensors only.

Layout facts: docs/architecture.md §5 (MTP as `model.layers.{num_hidden_layers + k}`), §6 (FP8 weights
with a float32 `weight_scale_inv` per 128×128 block), §7 (tensor names). Loading builds the model on the meta device
and assigns each tensor as it is read, so the weights are never held twice.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import write_file
from .config import ModelConfig
from .model import Transformer
from .rope import RotaryEmbedding

FP8_BLOCK = 128  # DeepSeek-V3's weight_block_size [128, 128]
# Copies of shared tensors that the hub stores inside each MTP layer; dsv3 shares the main model's.
_MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
# Kept in float32 whatever the model dtype: router logits are computed in fp32 (as transformers keeps them).
_FP32_KEYS = re.compile(r".*mlp\.gate\.(weight|e_score_correction_bias)$")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the keys, shapes or file at fault."""


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                   block: int = FP8_BLOCK) -> torch.Tensor:
    """W[i, j] = fp8[i, j] · scale_inv[i // 128, j // 128] (a multiply, despite the name; DeepSeek's README_WEIGHTS).

    weight: [out, in] float8_e4m3fn; scale_inv: [ceil(out/128), ceil(in/128)] float32.
    """
    out_dim, in_dim = weight.shape
    expected = (-(-out_dim // block), -(-in_dim // block))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} "
                              f"for a [{out_dim}, {in_dim}] weight in {block}x{block} blocks")
    scale = scale_inv.float().repeat_interleave(block, 0)[:out_dim].repeat_interleave(block, 1)[:, :in_dim]
    return (weight.float() * scale).to(dtype)


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object): {e}") from None
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    hint = f" (found {pickles}: pickled weights are never loaded; convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")


def _read_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key), file
        except FileNotFoundError:
            raise CheckpointError(f"{file}: listed in the index but missing") from None
        except SafetensorError as e:
            raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({e})") from None


def _to_model_key(key: str, n_layers: int) -> str | None:
    """Hub name -> dsv3 name: `model.layers.{n_layers + k}.X` -> `mtp.k.X`; None for the MTP's shared copies."""
    m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
    if m and int(m.group(1)) >= n_layers:
        rest = m.group(2)
        return None if rest in _MTP_SHARED_COPIES else f"mtp.{int(m.group(1)) - n_layers}.{rest}"
    return key


def _few(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


# What a hub snapshot needs for dsv3: weights, configs and tokenizer files (no pickles, no remote code).
HUB_FILES = ("*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def resolve_model(name: str | Path, revision: str | None = None) -> Path:
    """A checkpoint directory for `name`: a local directory as is, else a Hugging Face hub id
    ("deepseek-ai/DeepSeek-V3") fetched with huggingface_hub's `snapshot_download` into its cache (HF_HOME,
    HF_HUB_CACHE; HF_HUB_OFFLINE=1 uses the cache only), HUB_FILES only. revision: branch, tag or commit (hub only).
    """
    path = Path(name)
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(f"{path}: a local directory has no revision; --revision applies to hub ids")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(str(name))
    except HFValidationError:
        raise CheckpointError(f"{name}: no such directory (nor a hub id like deepseek-ai/DeepSeek-V3)") from None
    try:
        return Path(snapshot_download(str(name), revision=revision, allow_patterns=list(HUB_FILES)))
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{name}: no such directory, and hub id {name}"
                              + (f" at revision {revision}" if revision else "")
                              + " is not in the Hugging Face cache while offline (HF_HUB_OFFLINE=1 or no network); "
                                "download it once online or give a local directory") from None
    except HfHubHTTPError as error:  # not found, gated, bad revision: the hub's own message, first line
        raise CheckpointError(f"{name}: no such directory, and the hub refused it: "
                              f"{str(error).splitlines()[0]}") from None


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, *, keep_fp8: bool = False,
                    revision: str | None = None) -> Transformer:
    """Load a deepseek_v3 / deepseek_v2 checkpoint (single file or sharded; bf16, fp32 or FP8).

    dtype: the model's dtype (default: the checkpoint's; FP8 weights are dequantised to bf16 unless given).
    The MTP layers (`model.layers.{num_hidden_layers}+`) load into `model.mtp`.
    keep_fp8: keep an FP8 checkpoint's weights in FP8 (dsv3.quant.FP8Linear) instead of dequantising them.
    Checkpoints written by dsv3.quant.save_quantized (int8/int4) always load quantized.
    path: a directory or a hub id (`resolve_model`; revision: the hub revision).
    """
    path = resolve_model(path, revision)
    config = ModelConfig.from_hf(path)
    from .quant import apply as quant  # here, not at the top: dsv3.quant imports this module

    if quant.loads_quantized(config.quantization_config, keep_fp8):
        return quant.load_quantized(path, config, dtype, device)
    with torch.device("meta"):
        model = Transformer(config)
    expected = model.state_dict()
    files = _shard_files(path)
    state: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor, file in _read_tensors(files):
        if key.endswith(".weight_scale_inv"):  # FP8 block scales, keyed by the weight they scale
            weight_key = key.removesuffix("_scale_inv")
            scales[_to_model_key(weight_key, config.num_hidden_layers) or weight_key] = tensor
            continue
        name = _to_model_key(key, config.num_hidden_layers)
        if name is None:
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{file.name}: {key} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(expected[name].shape)} from config.json")
        state[name] = tensor
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
        parts = ([f"missing keys: {_few(missing)}"] if missing else []) + (
            [f"unexpected keys: {_few(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{path}: checkpoint does not match config.json ({'; '.join(parts)})")
    for name in scales:
        if name not in state or state[name].dtype != torch.float8_e4m3fn:
            raise CheckpointError(f"{path}: {name}_scale_inv has no FP8 weight {name} beside it")
    for name, tensor in state.items():
        if tensor.dtype == torch.float8_e4m3fn:
            if name not in scales:
                raise CheckpointError(f"{path}: FP8 weight {name} has no weight_scale_inv beside it")
            tensor = dequantize_fp8(tensor, scales[name], dtype or torch.bfloat16)
        target = torch.float32 if _FP32_KEYS.match(name) else (dtype or tensor.dtype)
        state[name] = tensor.to(device=device, dtype=target)
    model.load_state_dict(state, assign=True)
    model.rotary = RotaryEmbedding(config).to(device)  # non-persistent buffer: recompute, not loaded
    if scales:  # dequantised: the model no longer holds FP8 weights, so a later save must not claim it does
        model.config = dataclasses.replace(config, quantization_config=None)
    return model.eval()


def hub_state_dict(model: Transformer, dtype: torch.dtype | None = None, *,
                   mtp_copies: bool = True) -> dict[str, torch.Tensor]:
    """The model's tensors under hub names, MTP layers as `model.layers.{L + k}`.

    mtp_copies: also store the embedding and output head inside each MTP layer, as DeepSeek-V3's checkpoints do
    (loaders, dsv3's included, use the main model's; dropping the copies saves 2 × vocab × hidden per MTP layer).
    """
    n_layers = model.config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("mtp."):
            k, rest = name[4:].split(".", 1)
            name = f"model.layers.{n_layers + int(k)}.{rest}"
        out[name] = tensor
    for k in range(len(model.mtp) if mtp_copies else 0):
        out[f"model.layers.{n_layers + k}.embed_tokens.weight"] = model.model.embed_tokens.weight
        out[f"model.layers.{n_layers + k}.shared_head.head.weight"] = model.lm_head.weight
    if dtype is not None:
        out = {k: v if _FP32_KEYS.match(k) else v.to(dtype) for k, v in out.items()}
    # safetensors refuses shared storage: give each entry its own contiguous memory
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def save_pretrained(model: Transformer, path: str | Path, *, dtype: torch.dtype | None = None,
                    mtp_copies: bool = True) -> None:
    """Write `config.json` + `model.safetensors` so that dsv3 and transformers' AutoModelForCausalLM load it.

    mtp_copies: see `hub_state_dict`.
    Each file is written to a temporary name and renamed (dsv3.atomic), so a crash never leaves a half-written file.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = hub_state_dict(model, dtype, mtp_copies=mtp_copies)
    hf = model.config.to_hf()
    hf["torch_dtype"] = str(dtype or model.lm_head.weight.dtype).removeprefix("torch.")
    write_file(path / "config.json", lambda p: p.write_text(json.dumps(hf, indent=2) + "\n"))
    write_file(path / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
