"""Quantize a model in place, and save / load quantized checkpoints.

`quantize(model, scheme)` swaps every `nn.Linear` outside `skip` for the scheme's quantized linear: attention
projections, dense MLPs, shared experts, each routed expert (dsv3 stores experts one module each, as the hub does)
and the MTP layers' blocks. The router (`mlp.gate`, fp32) and the embedding are not `nn.Linear`s and never change;
`lm_head` is skipped by default (the same three DeepSeek keeps in BF16 in its FP8 release, docs/architecture.md §6).

Checkpoints keep the hub layout (config.json + model.safetensors) with a `quantization_config` in config.json:
- fp8: DeepSeek's own `{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
  "weight_block_size": [128, 128]}`, tensors `<name>.weight` (e4m3) + `<name>.weight_scale_inv` (fp32).
- int8 / int4: ours, `{"quant_method": "dsv3", "scheme": "int4", "group_size": 128, "skip": [...], "pad": false}`;
  int8 tensors `<name>.weight` (int8) + `<name>.weight_scale`; int4 `<name>.qweight`, `.scales`, `.zeros`.
Which layers are quantized is read from the tensors themselves when loading, so a checkpoint with a hand-edited
skip list still loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..checkpoint_headers import check_stored, compute_dtype, stored_tensors
from ..hub import FP32_KEYS, CheckpointError, read_tensors, save_pretrained, shard_files, to_model_key
from ..model import Transformer
from ..rope import RotaryEmbedding
from .base import QuantizationError, QuantizedLinear
from .experts import stack_experts
from .fp8 import FP8Linear
from .int4 import GROUP_SIZES, Int4Linear
from .int8 import Int8Linear

SCHEMES: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "int4": Int4Linear, "fp8": FP8Linear}
DEFAULT_SKIP = ("embed", "lm_head", "gate")
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def skipped(name: str, skip: Sequence[str]) -> bool:
    """Whether module `name` is left in high precision.

    An entry with a dot matches as a substring of the full name ("layers.0.", "mlp.experts.3."); otherwise it
    matches a dotted component that equals it or starts with it plus "_" ("embed" -> embed_tokens), except that a
    `*_proj` component only matches itself: "gate" means the router, never gate_proj.
    """
    parts = name.split(".")
    for entry in skip:
        if "." in entry:
            if entry in name:
                return True
        elif any(p == entry or (p.startswith(entry + "_") and not p.endswith("_proj")) for p in parts):
            return True
    return False


def quantization_config(scheme: str, group_size: int = 128, skip: Sequence[str] = DEFAULT_SKIP,
                        pad: bool = False) -> dict:
    if scheme == "fp8":
        return dict(FP8_CONFIG)
    config = {"quant_method": "dsv3", "scheme": scheme, "skip": list(skip)}
    return config | ({"group_size": group_size, "pad": pad} if scheme == "int4" else {})


@torch.no_grad()
def quantize(model: nn.Module, scheme: str, group_size: int = 128, skip: Sequence[str] = DEFAULT_SKIP, *,
             pad: bool = False) -> nn.Module:
    """Quantize `model`'s linear layers in place and return it; records the scheme in `model.config`.

    scheme: "int8" | "int4" | "fp8". group_size: int4 only (32, 64, 128, 256), along the input dimension.
    pad: int4 only — zero-pad input widths that group_size does not divide (else that layer's name is reported).
    Every layer is checked before any is changed, so an error leaves the model as it was.
    """
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r}; expected one of {sorted(SCHEMES)}")
    if scheme == "int4" and group_size not in GROUP_SIZES:
        raise QuantizationError(f"int4 group_size {group_size} not supported; expected one of {GROUP_SIZES}")
    done = quantized_layers(model)
    if done:
        name, layer = next(iter(done.items()))
        raise QuantizationError(f"the model is already quantized ({name} is {layer.scheme}); quantize the "
                                "unquantized checkpoint instead of quantizing twice")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and not skipped(name, skip)]
    if scheme == "int4" and not pad:
        bad = [(name, m.in_features) for name, m in targets if m.in_features % group_size]
        if bad:
            listed = ", ".join(f"{n} (in_features {k})" for n, k in bad[:4]) + (" ..." if len(bad) > 4 else "")
            raise QuantizationError(f"int4 group_size {group_size} does not divide the input width of {listed}; "
                                    "pass pad=True (--pad) to zero-pad them, or a group size that divides them")
    cls = SCHEMES[scheme]
    for name, linear in targets:
        _set_module(model, name, cls.from_linear(linear, group_size=group_size))
    stack_experts(model)
    if hasattr(model, "config"):
        model.config.quantization_config = quantization_config(scheme, group_size, skip, pad)
    return model


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def set_impl(model: nn.Module, impl: str) -> nn.Module:
    """Pick the forward of every quantized layer: "auto", "reference" or "kernel"."""
    for layer in quantized_layers(model).values():
        layer.impl = impl
    return model


def save_quantized(model: nn.Module, path: str | Path) -> None:
    """Write a quantized model as config.json (with its quantization_config) + model.safetensors.

    Without the MTP layers' copies of the embedding and output head (hub_state_dict's mtp_copies): loaders use the
    main model's, and the copies would add 2 × vocab × hidden high-precision weights per MTP layer to the file.
    """
    if not quantized_layers(model) or not getattr(model.config, "quantization_config", None):
        raise QuantizationError("save_quantized: the model has no quantized layers; run dsv3.quant.quantize first "
                                "(or save it with dsv3.save_pretrained)")
    save_pretrained(model, path, mtp_copies=False)


# ---------------------------------------------------------------------------------------- loading (checkpoint hook)
def loads_quantized(quant_config: dict | None, keep_fp8: bool) -> bool:
    """Whether dsv3.load_pretrained should build quantized layers for this config.json `quantization_config`."""
    if quant_config is not None and not isinstance(quant_config, dict):
        raise QuantizationError(f"quantization_config is {quant_config!r}; expected an object such as {FP8_CONFIG} "
                                "or dsv3's {\"quant_method\": \"dsv3\", \"scheme\": \"int4\", ...} (or none)")
    method = (quant_config or {}).get("quant_method")
    if method == "dsv3":
        return True
    if keep_fp8 and method != "fp8":
        raise QuantizationError(f"keep_fp8=True but config.json's quantization_config is {quant_config!r}; "
                                f"expected an FP8 checkpoint ({FP8_CONFIG})")
    return keep_fp8


_SUFFIX = {".weight_scale_inv": "fp8", ".weight_scale": "int8", ".qweight": "int4"}


def prepare_for_load(model: nn.Module, quant_config: dict, tensors: dict[str, tuple[torch.Size, torch.dtype]],
                     dtype: torch.dtype) -> None:
    """Swap the (meta-device) linears that the checkpoint stores quantized for empty quantized layers.

    tensors: model-side name -> (shape, dtype) of every tensor in the files. A layer is quantized when its scale
    tensor is there: `weight_scale_inv` (fp8), `weight_scale` (int8), `qweight` (int4).
    """
    if quant_config.get("quant_method") == "fp8" and quant_config.get("weight_block_size", [128, 128]) != [128, 128]:
        raise QuantizationError(f"FP8 weight_block_size {quant_config['weight_block_size']} not supported; "
                                "expected [128, 128]")
    for key, (shape, _) in tensors.items():
        scheme = next((s for suffix, s in _SUFFIX.items() if key.endswith(suffix)), None)
        if scheme is None:
            continue
        name = key.rsplit(".", 1)[0]
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise QuantizationError(f"{key}: no layer {name} in the model built from config.json") from None
        if not isinstance(linear, nn.Linear):
            raise QuantizationError(f"{key}: {name} is a {type(linear).__name__}, not a linear layer")
        bias = linear.bias
        if scheme == "int4":
            group_size = quant_config.get("group_size")
            if type(group_size) is not int or group_size not in GROUP_SIZES:
                raise QuantizationError(f"config.json: quantization_config's group_size is {group_size!r} (for "
                                        f"int4 tensor {key}); expected an integer, one of {GROUP_SIZES}")
            if f"{name}.scales" not in tensors:
                raise QuantizationError(f"{key}: no {name}.scales beside it (int4 layers store qweight, scales "
                                        "and zeros)")
            groups = tuple(tensors[f"{name}.scales"][0])
            if len(groups) != 2:
                raise QuantizationError(f"{name}.scales has shape {groups}; expected 2-D [out_features, groups]")
            if groups[1] * group_size < linear.in_features:
                raise QuantizationError(f"{name}: int4 tensors do not fit group_size {group_size} of "
                                        f"quantization_config for in_features {linear.in_features}")
            layer = Int4Linear(linear.in_features, linear.out_features, group_size, dtype, bias, "meta")
        else:
            layer = SCHEMES[scheme](linear.in_features, linear.out_features, dtype, bias, "meta")
        _set_module(model, name, layer)


def load_quantized(path: Path, config, dtype: torch.dtype | None, device) -> nn.Module:
    """Body of `dsv3.load_pretrained` for quantized checkpoints (dsv3 int8/int4, or FP8 with keep_fp8=True).

    Quantized tensors keep their stored dtypes; the other floating tensors become `dtype` (default: the embedding's
    as stored), router tensors float32, as the plain loader does. Layers compute in `dtype` (default: the
    embedding's dtype). Every tensor's dtype is checked against what its key needs (hub.check_dtype): int8 for an
    Int8Linear's weight, uint8 for an Int4Linear's qweight, float8_e4m3fn for an FP8Linear's, floats elsewhere.
    """
    n_layers = config.num_hidden_layers
    stored = stored_tensors(path)
    compute = compute_dtype(stored, dtype)
    with torch.device("meta"):
        model = Transformer(config)
    try:
        prepare_for_load(model, config.quantization_config,
                         {name: (t.shape, t.dtype) for key, t in stored.items()
                          if (name := to_model_key(key, n_layers)) is not None}, compute)
    except QuantizationError as e:
        raise CheckpointError(f"{path}: {e}") from None
    check_stored(path, stored, {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()},
                 n_layers, quantized=True)  # every key, shape and dtype, before anything is read
    quantized = set(quantized_layers(model))
    state: dict[str, torch.Tensor] = {}
    for key, tensor, _ in read_tensors(shard_files(path)):
        if (name := to_model_key(key, n_layers)) is None:
            continue
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf != "bias":
            target = tensor.dtype
        elif FP32_KEYS.match(name):
            target = torch.float32
        else:
            target = compute
        state[name] = tensor.to(device=device, dtype=target)
    model.load_state_dict(state, assign=True)
    model.rotary = RotaryEmbedding(config).to(device)
    stack_experts(model)
    return model.eval()
