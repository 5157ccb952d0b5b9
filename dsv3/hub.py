"""Hub I/O: checkpoints in the Hugging Face layout (config.json + safetensors, sharded or not) read and written
tensor by tensor, and the key mapping between the hub's names and dsv3's (docs/architecture.md §5, §7). Used by
dsv3/checkpoint.py (plain and FP8 checkpoints), dsv3/quant (quantized ones) and the CLI (hub ids).

MTP layers: the hub stores MTP module k as `model.layers.{num_hidden_layers + k}` with its own copies of the
embedding and output head; dsv3 keeps them as `mtp.k` sharing the main model's. FP8 weights (§6): float8_e4m3fn with
a float32 `weight_scale_inv` per 128×128 block.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import write_file

FP8_BLOCK = 128  # DeepSeek-V3's weight_block_size [128, 128]
# Copies of shared tensors that the hub stores inside each MTP layer; dsv3 shares the main model's.
MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
# Kept in float32 whatever the model dtype: router logits are computed in fp32 (as transformers keeps them).
FP32_KEYS = re.compile(r".*mlp\.gate\.(weight|e_score_correction_bias)$")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names the keys, shapes or file at fault."""


def e4m3_to_half_scaled(weight: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [...] -> float16 [...] holding the values · 2^-8, exactly, by moving bits (CPU fast path).

    torch's CPU build converts float8 one element at a time (~5 ns each on AVX2: 1.1 ms for a 768x256 weight, 20x
    the bf16 matvec it feeds). e4m3's sign, 4 exponent and 3 mantissa bits are a float16's sign, low 4 exponent and
    top 3 mantissa bits: the exponent biases differ by 15 - 7 = 8 and subnormals agree (0.m · 2^(1 - bias) in both),
    so the float16 holds the value · 2^-8, and torch's vectorised half -> float cast reads it exactly, subnormals
    included (a float32 target would make e4m3 subnormals float32 subnormals, which `torch.set_flush_denormal(True)`
    zeroes). The NaN codes S.1111.111 read as ±1.875 (e4m3fn has no infinities): `e4m3_nan_codes` finds them.
    """
    return (weight.view(torch.int8).to(torch.int16)  # sign-extended: bit 7 -> bits 7..15
            .bitwise_left_shift_(7).bitwise_and_(_HALF_SIGN_EXP_MANT).view(torch.float16))


_HALF_SIGN_EXP_MANT = 0xBF80 - 0x10000  # as an int16: the sign bit, and e4m3's 7 bits moved to half's bits 7-13
_E4M3_TO_HALF_SCALE = 2.0 ** 8


def e4m3_nan_codes(weight: torch.Tensor) -> bool:
    """Whether a float8_e4m3fn tensor holds a NaN code (what e4m3_to_half_scaled cannot carry): 0x7F, the largest
    byte read as int8, or 0xFF, the largest read as uint8 (two vectorised max reductions; a comparison of every byte
    with a mask costs ~20x more on a CPU)."""
    if weight.numel() == 0:
        return False
    return int(weight.view(torch.int8).max()) == 0x7F or int(weight.view(torch.uint8).max()) == 0xFF


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                   block: int = FP8_BLOCK) -> torch.Tensor:
    """W[i, j] = fp8[i, j] · scale_inv[i // 128, j // 128] (a multiply, despite the name; DeepSeek's README_WEIGHTS).

    weight: [out, in] float8_e4m3fn; scale_inv: [ceil(out/128), ceil(in/128)] float32. The product is taken in
    float32, then cast to dtype: eager on a CPU through `dequantize_fp8_rows` (the same bits; on AVX2 4-5x faster
    for the bundled model's weights, 2.4-3.3x for a 2048x7168 one, which no longer fits the caches); on other
    devices, inside a compiled graph and for weights the bit read cannot carry (NaN codes, scales that overflow) as
    `dequantize_fp8_reference`, the definition.
    """
    out_dim, in_dim = weight.shape
    expected = (-(-out_dim // block), -(-in_dim // block))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} "
                              f"for a [{out_dim}, {in_dim}] weight in {block}x{block} blocks")
    # inductor writes its own cast, and a compiled graph takes no data-dependent checks
    rows = None if torch.compiler.is_compiling() else fp8_row_scales(weight, scale_inv, block)
    if rows is None:
        return dequantize_fp8_reference(weight, scale_inv, dtype, block)
    return dequantize_fp8_rows(weight, rows, dtype, block)


def fp8_row_scales(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor | None:
    """What `dequantize_fp8_rows` needs: float32 [out, in blocks], each row's block scales · 2^8 (the factor
    e4m3_to_half_scaled leaves out; exact, a power of two), or None where the bit read cannot go: a weight off the
    CPU, NaN codes, or scales · 2^8 that overflow."""
    if not weight.is_cpu or e4m3_nan_codes(weight):
        return None
    rows = scaled_block_rows(scale_inv, weight.shape[0], block)
    return rows if rows.isfinite().all() else None


def scaled_block_rows(scale_inv: torch.Tensor, out_features: int, block: int = FP8_BLOCK) -> torch.Tensor:
    """scale_inv [..., ceil(out/block), in blocks] -> float32 [..., out, in blocks]: each row's block scales · 2^8,
    unchecked (`fp8_row_scales` checks them)."""
    return scale_inv.float().repeat_interleave(block, -2)[..., :out_features, :] * _E4M3_TO_HALF_SCALE


def dequantize_fp8_rows(weight: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype,
                        block: int = FP8_BLOCK) -> torch.Tensor:
    """dequantize_fp8 for a CPU weight [..., out, in] without NaN codes, given its scales as `fp8_row_scales` gives
    them ([..., out, in blocks], finite): the values · 2^-8 from e4m3_to_half_scaled times the scales · 2^8 are the
    reference's real products, rounded once, so the same bits; each block's scale multiplies its 128 columns
    through a [..., out, blocks, 128] view, not a weight-sized copy. Leading dims: stacked experts."""
    in_dim = weight.shape[-1]
    w = e4m3_to_half_scaled(weight).float()  # [..., out, in]
    full = in_dim // block * block
    if full:
        w[..., :full].unflatten(-1, (-1, block)).mul_(rows[..., :full // block, None])
    if full < in_dim:  # the last, partial block of columns
        w[..., full:].mul_(rows[..., -1:])
    return w.to(dtype)


def dequantize_fp8_reference(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                             block: int = FP8_BLOCK) -> torch.Tensor:
    """The definition, as DeepSeek's `weight_dequant`: torch's float8 cast times the block scales, in float32."""
    out_dim, in_dim = weight.shape
    scale = scale_inv.float().repeat_interleave(block, 0)[:out_dim].repeat_interleave(block, 1)[:, :in_dim]
    return (weight.float() * scale).to(dtype)


INDEX = "model.safetensors.index.json"
# The shard names transformers and DeepSeek write: model-00001-of-00163.safetensors
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _weight_map(index: Path) -> dict[str, str]:
    """hub key -> shard file name, the weight_map of `index` (model.safetensors.index.json), every name checked to be
    a plain file name: the index never leads a read outside its directory."""
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as e:  # a directory, unreadable, not UTF-8, not JSON
        raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object): "
                              f"{type(e).__name__}: {e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        found = type(data).__name__ if not isinstance(data, dict) else (
            "no weight_map" if "weight_map" not in data else f"weight_map a {type(weight_map).__name__}")
        raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object of tensor name -> "
                              f"shard file name; found {found})")
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{index}: weight_map[{key!r}] is {name!r}; expected a shard file name (a string)")
        if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise CheckpointError(f"{index}: weight_map[{key!r}] is {name!r}; expected the plain name of a file in "
                                  f"{index.parent} (no directories, no absolute paths)")
    return weight_map


def _index_shards(index: Path) -> dict[str, str]:
    """shard file name -> the first key the index maps to it (_weight_map: names checked)."""
    shards: dict[str, str] = {}
    for key, name in _weight_map(index).items():
        shards.setdefault(name, key)
    return shards


def index_weight_map(path: Path) -> dict[str, str] | None:
    """The weight_map (hub key -> shard file name) of the checkpoint directory's index, its names checked; None for
    a checkpoint without one (a single model.safetensors)."""
    index = path / INDEX
    return _weight_map(index) if index.exists() else None


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the index's shards, or model.safetensors; each a file of the
    directory (an index naming a path elsewhere is refused)."""
    index = path / INDEX
    if index.exists():
        files = []
        for name, key in sorted(_index_shards(index).items()):
            file = path / name
            if not file.exists():
                raise CheckpointError(f"{file}: listed in the index ({INDEX}, for {key}) but missing")
            files.append(file)
    else:
        single = path / "model.safetensors"
        if not single.exists():
            pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
            hint = f" (found {pickles}: pickled weights are never loaded; convert them to safetensors)" \
                if pickles else ""
            raise CheckpointError(f"{path}: no model.safetensors or {INDEX}{hint}")
        files = [single]
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: a directory (or other non-file); expected a safetensors file")
    return files


@contextmanager
def safetensors_errors(file: Path) -> Iterator[None]:
    """What safe_open and its reads raise for a missing file, a directory or a truncated / corrupt one, as a one-line
    CheckpointError naming the file (read_tensors here; the tensor-parallel loader's slice reads)."""
    try:
        yield
    except FileNotFoundError:
        raise CheckpointError(f"{file}: listed in the index but missing") from None
    except IsADirectoryError:
        raise CheckpointError(f"{file}: a directory; expected a safetensors file") from None
    except SafetensorError as e:
        raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({e})") from None


def read_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(hub key, tensor, file) for every tensor of `files`, one at a time, each checked to be finite as it is read
    (check_finite; the loaders check the headers first: dsv3.checkpoint_headers)."""
    for file in files:
        with safetensors_errors(file), safe_open(file, framework="pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                check_finite(file, key, tensor)
                yield key, tensor, file


def check_finite(file: Path, key: str, tensor: torch.Tensor) -> None:
    """Refuse a floating tensor holding NaN or inf (a corrupt or diverged checkpoint), which would load silently and
    make every output NaN. Integer and packed tensors cannot hold them. Cheap on the good path: float8_e4m3fn weights
    on their bytes (e4m3_nan_codes; e4m3fn has no infinities), other floats by their min and max, one pass (NaN
    propagates, so both are finite only when every value is; ~15x faster than isfinite().all() on a CPU)."""
    if not tensor.dtype.is_floating_point or tensor.numel() == 0:
        return
    if tensor.dtype == torch.float8_e4m3fn:
        if not e4m3_nan_codes(tensor):
            return
        values = tensor.float()
    else:  # other float8 dtypes (the loaders refuse them by dtype) have no aminmax kernel: through float32
        values = tensor.float() if is_float8(tensor.dtype) else tensor
        # compared as Python floats: isfinite() on the two 0-d results costs twice the pass on the many small tensors
        if all(math.isfinite(bound.item()) for bound in torch.aminmax(values)):
            return
    bad = int((~values.isfinite()).sum())
    raise CheckpointError(f"{file}: {key} holds {bad} non-finite values (NaN or inf); expected finite values")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def is_float8(dtype: torch.dtype) -> bool:
    """float8 (and smaller) floating dtypes: e4m3fn, e5m2, the fnuz variants, e8m0."""
    return dtype.is_floating_point and dtype.itemsize == 1


def check_dtype(file: Path, key: str, tensor: torch.Tensor, expected: torch.dtype) -> None:
    """Refuse a stored tensor whose dtype cannot give the model's tensor of dtype `expected`: a packed or FP8 tensor
    (int8, uint8, float8_e4m3fn: what the quantized layers hold) must have exactly that dtype; a floating one
    (weights, norms, biases, scales) must be a 16-, 32- or 64-bit float (converted as the loader decides), never
    an integer, bool or float8 tensor, which a cast would turn silently into other numbers."""
    if expected.is_floating_point and not is_float8(expected):
        if tensor.dtype.is_floating_point and not is_float8(tensor.dtype):
            return
        want = "a floating-point dtype (bfloat16, float16 or float32)"
        if tensor.dtype == torch.float8_e4m3fn:
            want += " (an FP8 weight needs its weight_scale_inv beside it)"
    elif tensor.dtype == expected:
        return
    else:
        want = dtype_name(expected)
    raise CheckpointError(f"{file}: {key} has dtype {dtype_name(tensor.dtype)}, expected {want}")


def to_model_key(key: str, n_layers: int) -> str | None:
    """Hub name -> dsv3 name: `model.layers.{n_layers + k}.X` -> `mtp.k.X`; None for the MTP's shared copies."""
    m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
    if m and int(m.group(1)) >= n_layers:
        rest = m.group(2)
        return None if rest in MTP_SHARED_COPIES else f"mtp.{int(m.group(1)) - n_layers}.{rest}"
    return key


def few(keys) -> str:
    """The first five of `keys`, sorted, for an error message."""
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


def hub_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None, *,
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
        out = {k: v if FP32_KEYS.match(k) else v.to(dtype) for k, v in out.items()}
    # safetensors refuses shared storage: give each entry its own contiguous memory
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def save_pretrained(model: torch.nn.Module, path: str | Path, *, dtype: torch.dtype | None = None,
                    mtp_copies: bool = True) -> None:
    """Write `config.json` + `model.safetensors` so that dsv3 and transformers' AutoModelForCausalLM load it.

    mtp_copies: see `hub_state_dict`.
    Each file is written to a temporary name and renamed (dsv3.atomic), so a crash never leaves a half-written file.
    Into a directory holding an earlier save, as transformers' save_pretrained: the weights go first, then the
    earlier save's weight files that this one replaces are removed (a sharded checkpoint's index and its shards,
    which loaders would otherwise prefer to the new model.safetensors), then config.json, so an interrupted save
    never leaves a new config.json over old weights. Other files (tokenizer, trainer state) are left alone.
    """
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "" if blocker == path else f" (saving to {path})"
        raise CheckpointError(f"{blocker}: a file is there; expected a directory to save the checkpoint in{where}")
    path.mkdir(parents=True, exist_ok=True)
    stale = stale_weight_files(path)
    tensors = hub_state_dict(model, dtype, mtp_copies=mtp_copies)
    hf = model.config.to_hf()
    hf["torch_dtype"] = str(dtype or model.lm_head.weight.dtype).removeprefix("torch.")
    write_file(path / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    for file in stale:  # the index first: without it no loader reads the shards
        file.unlink(missing_ok=True)
    write_file(path / "config.json", lambda p: p.write_text(json.dumps(hf, indent=2) + "\n"))


def stale_weight_files(path: Path) -> list[Path]:
    """The weight files of an earlier sharded save in `path` that a save of model.safetensors replaces: the index,
    the shards it names (plain file names ending .safetensors only) and files named like shards
    (model-00001-of-00002.safetensors), the index first. An unreadable index is still removed, its shards by name."""
    index = path / INDEX
    names = {p.name for p in path.iterdir() if SHARD_NAME.fullmatch(p.name) and p.is_file()}
    if index.is_file():
        try:
            names |= {name for name in _index_shards(index) if name.endswith(".safetensors")}
        except CheckpointError:
            pass
    names.discard("model.safetensors")
    files = [path / name for name in sorted(names) if (path / name).is_file() or (path / name).is_symlink()]
    return ([index] if index.is_file() else []) + files
