"""LoRA adapters on dsv3 linears, saved and loaded in PEFT's format (plain bases, or quantized ones: QLoRA).

h = W0 x + s · B A x, with W0 frozen, A: [r, in], B: [out, r], s = alpha / r (alpha / sqrt(r) with rsLoRA)
(Hu et al. 2021; rsLoRA: Kalajdzievski 2023). A starts as PEFT's default, kaiming-uniform with a = sqrt(5) (the
nn.Linear default), B starts at zero so the adapted model starts equal to the base. Facts:
docs/eval-lora-quant.md §3.

    model = apply_lora(model, r=16, alpha=32, target_modules=["q_b_proj", "kv_b_proj", "o_proj"])
    ...train the lora_A / lora_B parameters (the rest is frozen)...
    save_adapter(model, "out/adapter")          # adapter_config.json + adapter_model.safetensors (PEFT layout)
    load_adapter(other_model, "out/adapter")    # also reads adapters that PEFT made on transformers' DeepseekV3

On-disk keys are `base_model.model.<hub module path>.lora_A.weight` / `.lora_B.weight` (PEFT strips the adapter
name); MTP modules (`mtp.k.*` in memory) use their hub path `model.layers.{num_hidden_layers + k}.*`, and the
safetensors header records num_hidden_layers (`BASE_LAYERS`), so `load_adapter` tells them from the main layers of a
deeper base (an adapter that records none, as PEFT's, never adapts the MTP layer: see `_model_path`).

Layout for transformers 5 (what `PeftModel.from_pretrained` on DeepseekV3ForCausalLM expects; see
`adapter_tensors`): attention linears are PEFT `target_modules`; dense-MLP and shared-expert linears are
`target_parameters` `gate_proj.weight`, ... (stored exactly like module LoRA); routed experts, one nn.Linear per expert
in dsv3 as in the hub checkpoints, are fused into transformers 5's 3-D `mlp.experts.gate_up_proj` [E, 2I, D] /
`down_proj` [E, D, I] adapters (lora_A [E·r, in], expert e in rows e·r..e·r+r; lora_B [out, r·E], expert e in columns
e, e+E, ...; gate and up share one A, so gate_up gets rank r_gate + r_up and a block-diagonal B).
Why not target_modules `gate_proj`: PEFT (0.21) on transformers 5 rewrites those names to the fused experts only, so
the dense MLP and the shared experts would silently get no adapter. `load_adapter` reads all of these layouts,
plus the per-expert one (`mlp.experts.E.gate_proj.lora_A.weight`, PEFT on transformers 4), and splits fused
experts into exact per-expert adapters.

The files themselves are read and checked in `lora_format.py` (`read_adapter_config`, the safetensors file, the
config's target selection, `AdapterError`); this module maps them onto the model. `AdapterError`,
`read_adapter_config`, `LORA_TARGETS`, `ADAPTER_CONFIG` and `ADAPTER_WEIGHTS` are importable from here too.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .atomic import write_file
from .layers import linear_weight
from .lora_format import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_LAYERS, LORA_TARGETS, PEFT_PREFIX, AdapterError,
                          check_factors, check_selected, check_target_parameters, pattern_value,
                          read_adapter_config, read_adapter_weights, read_base_layers)


@dataclass
class LoraSettings:
    """What `apply_lora` was called with; written to adapter_config.json by `save_adapter`."""

    r: int
    alpha: float
    target_modules: list[str]
    dropout: float = 0.0
    use_rslora: bool = False


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT `tuners/lora/layer.py` update_layer)."""
    return alpha / (math.sqrt(r) if use_rslora else r)


def _in_out(base: nn.Module) -> tuple[int, int]:
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return base.in_features, base.out_features
    out_f, in_f = linear_weight(base).shape
    return in_f, out_f


class LoRALinear(nn.Module):
    """y = base(x) + s · B(A(dropout(x))). base: nn.Linear or a quantized linear with `effective_weight()`.

    lora_A: [r, in], lora_B: [out, r], kept in float32 whatever the base dtype (PEFT's autocast_adapter_dtype does
    the same for bf16/fp16 bases): the input is cast to float32 for the low-rank path and the sum back to the base
    output's dtype.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False) -> None:
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer (got {r!r})")
        self.base_layer = base
        self.in_features, self.out_features = _in_out(base)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        device = next(iter(base.parameters()), torch.empty(0)).device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT init_lora_weights=True
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def quantized(self) -> bool:
        return not isinstance(self.base_layer, nn.Linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        y = self.base_layer(x)
        if self.merged:
            return y
        lora = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return (y + lora * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s · B A: [out, in] in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def effective_weight(self) -> torch.Tensor:
        """W0 + s·BA: [out, in] in the base's dtype (absorbed MLA folds kv_b_proj through this)."""
        w = linear_weight(self.base_layer)
        return w if self.merged else (w.float() + self.delta_weight()).to(w.dtype)

    @torch.no_grad()
    def merge(self, dequantize: bool = False) -> None:
        """Fold s·BA into the base weight (in float32, then cast), so the forward costs what the base costs.

        A quantized base is refused: re-quantising W0 + s·BA rounds the update away (QLoRA paper §; PEFT warns the
        same). With dequantize=True the base is replaced by a dense nn.Linear holding effective_weight() first.
        """
        if self.merged:
            return
        if self.quantized:
            if not dequantize:
                raise AdapterError(f"cannot merge LoRA into a quantized {type(self.base_layer).__name__}: "
                                   "re-quantising would round the update away; call merge(dequantize=True) to replace the base "
                                   "with a dense nn.Linear first, or keep the adapter unmerged")
            w = linear_weight(self.base_layer)
            dense = nn.Linear(self.in_features, self.out_features, bias=False, device=w.device, dtype=w.dtype)
            dense.weight.copy_(w)
            dense.weight.requires_grad_(False)
            self.base_layer = dense
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract s·BA again (as PEFT: exact up to one float rounding of the weight's dtype)."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"


def _is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (hasattr(module, "effective_weight") and not isinstance(module, LoRALinear))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in the model by its dsv3 module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, new)


def freeze_base(model: nn.Module) -> None:
    """requires_grad only on lora_A / lora_B; the router bias is a buffer and never trained here."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("lora_A") or name.endswith("lora_B"))


def apply_lora(model: nn.Module, r: int, alpha: float, target_modules, dropout: float = 0.0,
               use_rslora: bool = False, *, include_mtp: bool = True) -> nn.Module:
    """Wrap every linear whose last name is in target_modules (e.g. "kv_b_proj", "gate_proj") in a LoRALinear.

    Names are the HF leaf names (`LORA_TARGETS`), matched in the main layers, shared and routed experts and the MTP
    layers; "all-linear" means all of LORA_TARGETS (PEFT's shorthand, which also leaves out the output head).
    Bases may be nn.Linear or quantized linears (QLoRA). Freezes everything but the LoRA factors. Returns the model.
    include_mtp=False leaves the MTP layers alone (a fine-tune without the MTP loss would never train them).
    """
    targets = list(LORA_TARGETS) if target_modules == "all-linear" else [target_modules] \
        if isinstance(target_modules, str) else list(target_modules)
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown:
        raise ValueError(f"target_modules: {unknown} are not linear layers of this model family; "
                         f"expected some of {list(LORA_TARGETS)}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1) (got {dropout})")
    found: set[str] = set()
    for name, module in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if leaf in targets and _is_linear_like(module) and (include_mtp or not name.startswith("mtp.")):
            _replace(model, name, LoRALinear(module, r, alpha, dropout, use_rslora))
            found.add(leaf)
    missing = sorted(set(targets) - found) if target_modules != "all-linear" else [] if found else targets
    if missing:
        raise ValueError(f"target_modules: no {missing} in this model (e.g. q_proj exists only when q_lora_rank is "
                         "null, q_a_proj/q_b_proj only when it is set)")
    freeze_base(model)
    model.lora_settings = LoraSettings(r, alpha, sorted(found), dropout, use_rslora)
    return model


@contextmanager
def quantized_reference_forward(model: nn.Module):
    """QLoRA training: inside, quantized layers dequantise and matmul (`impl="reference"`), whose backward exists;
    the fused int4 kernels (torch._weight_int4pack_mm) have no derivative, and the gradient for earlier adapters
    must pass through every later layer. Each layer's previous `impl` is restored on exit."""
    layers = [m for m in model.modules() if hasattr(m, "forward_reference") and hasattr(m, "impl")]
    saved = [m.impl for m in layers]
    for m in layers:
        m.impl = "reference"
    try:
        yield model
    finally:
        for m, impl in zip(layers, saved):
            m.impl = impl


def merge_lora(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Merge every adapter into its base weight (see LoRALinear.merge)."""
    for m in lora_modules(model).values():
        m.merge(dequantize)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for m in lora_modules(model).values():
        m.unmerge()
    return model


def merge_and_unload(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Merge, then put the bare base layers back: a plain dsv3 model that `save_pretrained` writes as usual."""
    for name, m in lora_modules(model).items():
        m.merge(dequantize)
        _replace(model, name, m.base_layer)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_settings"):
        del model.lora_settings
    return model


def _hub_path(name: str, n_layers: int) -> str:
    m = re.match(r"mtp\.(\d+)\.(.*)", name)
    return f"model.layers.{n_layers + int(m.group(1))}.{m.group(2)}" if m else name


def _model_path(path: str, n_layers: int, base_layers: int | None, where: str) -> str:
    """Hub path -> dsv3's. `model.layers.L` with L >= the adapter's recorded base layer count is MTP module
    `mtp.{L - base}`. A main layer the model lacks is refused, and so is every L >= n_layers when the adapter records
    no count: PEFT's never adapt the MTP layer (transformers' DeepseekV3 has none), so that key is a deeper base's."""
    m = re.match(r"model\.layers\.(\d+)\.(.*)", path)
    if m is None:
        return path
    layer = int(m.group(1))
    if base_layers is not None and layer >= base_layers:
        return f"mtp.{layer - base_layers}.{m.group(2)}"
    if layer >= n_layers:
        base = f"the adapter's base had {base_layers}" if base_layers is not None else \
            f"the adapter records no base {BASE_LAYERS}, so it adapts no MTP layer"
        raise AdapterError(f"{where}: {PEFT_PREFIX}{path}.lora_A.weight targets layer {layer}, but the model has "
                           f"{n_layers} layers (0-{n_layers - 1}; {base}): was the adapter trained on another base "
                           "model?")
    return path


_ROUTED = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)")
_ATTENTION = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


def _fuse_experts(experts: nn.ModuleList, adapted: dict[int, dict[str, LoRALinear]], kind: str, scaling: float):
    """Per-expert adapters -> PEFT's ParamWrapper tensors for one fused parameter of transformers 5's experts.

    kind "gate_up_proj": expert e's delta [2I, D] is [s_g B_g A_g; s_u B_u A_u] = s · B_e A_e with
    A_e = [A_g; A_u] (rank r_g + r_u) and B_e = blockdiag(B_g s_g/s, B_u s_u/s) (PEFT's own v4 -> v5 conversion,
    `PeftConcatenate`, fuses the same way). kind "down_proj": A_e = A, B_e = B s_e/s. Experts without an adapter
    and ranks below the largest get zero rows/columns. Returns lora_A [E·R, in], lora_B [out, R·E] (expert e in
    columns e, e+E, ...: peft ParamWrapper.get_delta_weight) and R.
    """
    leaves = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
    blocks = []
    for e, expert in enumerate(experts):
        As, Bs = [], []
        for leaf in leaves:
            m = adapted.get(e, {}).get(leaf)
            in_f, out_f = _in_out(getattr(expert, leaf))
            if m is None:
                As.append(torch.zeros(0, in_f)), Bs.append(torch.zeros(out_f, 0))
            else:
                As.append(m.lora_A.detach().float()), Bs.append(m.lora_B.detach().float() * (m.scaling / scaling))
        blocks.append((torch.cat(As), torch.block_diag(*Bs)))
    R = max(A.shape[0] for A, _ in blocks)
    A = torch.cat([F.pad(a, (0, 0, 0, R - a.shape[0])) for a, _ in blocks])  # [E·R, in]
    B = torch.stack([F.pad(b, (0, R - b.shape[1])) for _, b in blocks], dim=-1).flatten(1)  # [out, R, E] -> [out, R·E]
    return A, B, R


def adapter_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter under PEFT's keys for transformers 5's DeepseekV3, and the adapter_config fields that go with it.

    Attention linears are PEFT `target_modules`. Dense-MLP and shared-expert linears are PEFT `target_parameters`
    `gate_proj.weight`, ...: PEFT on transformers 5 rewrites target_modules `gate_proj`/`up_proj`/`down_proj` to the
    fused experts and would drop them, while a 2-D ParamWrapper is stored exactly like module LoRA. Routed experts
    are fused (`_fuse_experts`) into `mlp.experts.lora_*` (down_proj, the outer ParamWrapper) and
    `mlp.experts.base_layer.lora_*` (gate_up_proj, inner: PEFT wraps an experts module's parameters in their
    declaration order, gate_up_proj first); alone, either sits at `mlp.experts.lora_*`.
    """
    settings: LoraSettings = model.lora_settings
    n_layers = model.config.num_hidden_layers
    default_scaling = lora_scaling(settings.r, settings.alpha, settings.use_rslora)
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    modules, parameters = set(), set()
    routed: dict[str, dict[int, dict[str, LoRALinear]]] = {}
    for name, m in lora_modules(model).items():
        fused = _ROUTED.fullmatch(name)
        if fused:
            routed.setdefault(fused.group(1), {}).setdefault(int(fused.group(2)), {})[fused.group(3)] = m
            continue
        path, leaf = _hub_path(name, n_layers), name.rpartition(".")[2]
        (modules.add(leaf) if leaf in _ATTENTION else parameters.add(f"{leaf}.weight"))
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = m.lora_A.detach().contiguous().clone()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = m.lora_B.detach().contiguous().clone()
        if m.r != settings.r:
            rank_pattern[re.escape(path)] = m.r
        if m.alpha != settings.alpha:
            alpha_pattern[re.escape(path)] = m.alpha
    for container, adapted in routed.items():
        experts = model.get_submodule(container)
        path = _hub_path(container, n_layers)
        kinds = [k for k, leaves in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",)))
                 if any(leaf in a for a in adapted.values() for leaf in leaves)]
        for kind in kinds:
            A, B, R = _fuse_experts(experts, adapted, kind, default_scaling)
            wrapper = path + (".base_layer" if kind == "gate_up_proj" and len(kinds) == 2 else "")
            tensors[f"{PEFT_PREFIX}{wrapper}.lora_A.weight"] = A.contiguous()
            tensors[f"{PEFT_PREFIX}{wrapper}.lora_B.weight"] = B.contiguous()
            parameters.add(f"mlp.experts.{kind}")
            if R != settings.r:  # keep s = alpha/r (or alpha/sqrt(r)) equal to the default scaling
                rank_pattern[re.escape(f"{path}.{kind}")] = R
                alpha_pattern[re.escape(f"{path}.{kind}")] = default_scaling * (math.sqrt(R) if settings.use_rslora
                                                                                else R)
    fields = {"target_modules": sorted(modules), "target_parameters": sorted(parameters) or None,
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    return tensors, fields


def save_adapter(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` that `PeftModel.from_pretrained` loads onto
    transformers 5's DeepseekV3ForCausalLM (layout: `adapter_tensors`), and `load_adapter` reads back.

    lora_dropout is written as 0 when target_parameters are used (PEFT's ParamWrapper refuses dropout; it only
    matters in training). Each file is written under a temporary name and renamed. Returns the directory.
    """
    settings: LoraSettings | None = getattr(model, "lora_settings", None)
    if settings is None or not lora_modules(model):
        raise AdapterError("the model has no LoRA adapters: call apply_lora or load_adapter first")
    if any(m.merged for m in lora_modules(model).values()):
        raise AdapterError("adapters are merged into the base weights: unmerge_lora(model) before saving")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, fields = adapter_tensors(model)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": settings.r, "lora_alpha": settings.alpha,
        "lora_dropout": 0.0 if fields["target_parameters"] else settings.dropout, "exclude_modules": None,
        "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "use_rslora": settings.use_rslora,
        "use_dora": False, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "lora_bias": False, **fields,
    }
    write_file(directory / ADAPTER_CONFIG, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    metadata = {"format": "pt", BASE_LAYERS: str(model.config.num_hidden_layers)}  # tells MTP keys: _model_path
    write_file(directory / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata=metadata))
    return directory


# ---------------------------------------------------------------------------------------------- loading
def _fused_expert_factors(name: str, A: torch.Tensor, B: torch.Tensor, n_experts: int):
    """PEFT target_parameters layout -> per-expert (A_e [R, in], B_e [out, R]) (peft ParamWrapper.get_delta_weight)."""
    if A.shape[0] % n_experts or B.shape[1] != A.shape[0]:
        raise AdapterError(f"{name}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not split over "
                           f"{n_experts} experts")
    R = A.shape[0] // n_experts
    return [(A[e * R:(e + 1) * R], B[:, e::n_experts]) for e in range(n_experts)]


def _fused_pairs(model: nn.Module, path: str, container: str, target: str, A: torch.Tensor, B: torch.Tensor,
                 config: dict, where: str) -> dict:
    """Transformers 5 fused experts, adapted through PEFT target_parameters, split into per-expert pairs.

    PEFT nests one ParamWrapper per targeted parameter (`experts.lora_A`, `experts.base_layer.lora_A`) in an order
    that depends on how target_parameters was written, so the shapes tell which is which: gate_up_proj maps
    D -> 2I, down_proj maps I -> D (2I = D and I = D cannot both hold). target: the container's dsv3 path.
    """
    try:
        experts = model.get_submodule(target)
    except AttributeError:
        raise AdapterError(f"{where}: {path}: fused routed-expert tensors, but this model's "
                           f"{target} does not exist (a dense layer?)") from None
    inter, hidden = _in_out(experts[0].gate_proj)[1], _in_out(experts[0].gate_proj)[0]
    if A.shape[1] == hidden and B.shape[0] == 2 * inter:
        param = "gate_up_proj"
    elif A.shape[1] == inter and B.shape[0] == hidden:
        param = "down_proj"
    else:
        raise AdapterError(f"{where}: {path}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} fit neither "
                           f"the experts' gate_up_proj ({hidden} -> {2 * inter}) nor down_proj ({inter} -> {hidden})")
    check_selected(config, container, param, where)
    label, pattern_name = f"{path} ({param})", f"{container}.{param}"
    pairs = {}
    for e, (Ae, Be) in enumerate(_fused_expert_factors(path, A, B, len(experts))):
        base = f"{target}.{e}"
        if param == "gate_up_proj":  # rows [gate; up], one A for both: exact as two adapters sharing A
            pairs[f"{base}.gate_proj"] = (Ae.clone(), Be[:inter].clone(), label, pattern_name)
            pairs[f"{base}.up_proj"] = (Ae.clone(), Be[inter:].clone(), label, pattern_name)
        else:
            pairs[f"{base}.down_proj"] = (Ae.clone(), Be.clone(), label, pattern_name)
    return pairs


def _adapter_pairs(model: nn.Module, tensors: dict[str, torch.Tensor], config: dict, where: str,
                   base_layers: int | None = None):
    """{dsv3 module path: (A [r, in], B [out, r], label for errors, module name for rank/alpha patterns)}.

    Fused routed experts (PEFT target_parameters) are split per expert. base_layers: `read_base_layers`.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_[AB])\.weight", key)
        if m is None:
            raise AdapterError(f"{where}: unexpected key {key!r}; expected "
                               f"'{PEFT_PREFIX}<module path>.lora_A.weight' / '.lora_B.weight'")
        groups.setdefault(m.group(1), {})[m.group(2)] = t
    pairs = {}
    check_target_parameters(config, where)
    for path, ab in groups.items():
        check_factors(path, ab, where)
        A, B = ab["lora_A"], ab["lora_B"]
        target = _model_path(path, model.config.num_hidden_layers, base_layers, where)
        fused = re.fullmatch(r"(.*\.mlp\.experts)((?:\.base_layer)*)", path)
        if fused:
            container = target.removesuffix(fused.group(2))
            pairs.update(_fused_pairs(model, path, fused.group(1), container, A, B, config, where))
        else:
            check_selected(config, path, None, where)
            pairs[target] = (A, B, path, path)
    return pairs


def _plan(model: nn.Module, pairs: dict, config: dict, r_default: int, alpha_default: float, where: str) -> list:
    """Check every pair against the model and the config's ranks; [(name, module, base, A, B, r, alpha)]."""
    plans = []
    for name, (A, B, key, pattern_name) in pairs.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(f"{where}: adapter module {key} ({name}) does not exist in this model") from None
        base = module.base_layer if isinstance(module, LoRALinear) else module
        if not _is_linear_like(base):
            raise AdapterError(f"{where}: {key} is a {type(base).__name__}, not a linear layer")
        in_f, out_f = _in_out(base)
        r = A.shape[0]
        if A.shape[1] != in_f or B.shape != (out_f, r):
            raise AdapterError(f"{where}: {key}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit the "
                               f"model's {name} ({out_f} x {in_f}); expected lora_A [r, {in_f}], lora_B [{out_f}, r]")
        r_cfg = pattern_value(config.get("rank_pattern"), pattern_name, r_default)
        if r_cfg != r:
            raise AdapterError(f"{where}: {key}: tensors have rank {r} but adapter_config says r={r_cfg!r}")
        alpha = pattern_value(config.get("alpha_pattern"), pattern_name, alpha_default)
        plans.append((name, module, base, A, B, r, alpha))
    return plans


def load_adapter(model: nn.Module, directory: str | Path, *, merge: bool = False) -> nn.Module:
    """Read a PEFT LoRA adapter (saved by `save_adapter` or by PEFT on transformers' DeepseekV3ForCausalLM).

    Wraps the adapter's modules in LoRALinear (reusing wrappers already there), copies A and B, and freezes the
    base. Per-module rank and alpha come from the tensors and from rank_pattern / alpha_pattern. Refuses, naming the
    file and the field or key, a config with invalid values or unsupported PEFT features, and any adapter whose
    tensors are not finite float matrices, whose module is not in the model, or whose shapes do not fit it.
    merge=True (inference: `dsv3 serve --adapter`, `dsv3 eval mmlu --adapter`) then folds the adapter into float
    base weights and removes the wrappers, so the model runs at the base model's speed; adapters on quantized bases
    stay unmerged (merging would re-quantise them away).
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    rslora, dropout = config.get("use_rslora", False), config.get("lora_dropout", 0.0)
    # check everything before touching the model
    tensors = read_adapter_weights(weights)
    pairs = _adapter_pairs(model, tensors, config, str(weights), read_base_layers(weights))
    plans = _plan(model, pairs, config, r_default, alpha_default, str(weights))
    for name, module, base, A, B, r, alpha in plans:
        if isinstance(module, LoRALinear) and module.r == r and not module.merged:  # keep its dropout, parameters
            wrapper = module
            wrapper.alpha, wrapper.use_rslora, wrapper.scaling = alpha, rslora, lora_scaling(r, alpha, rslora)
        else:
            wrapper = LoRALinear(base, r, alpha, dropout, rslora)
            _replace(model, name, wrapper)
        with torch.no_grad():
            wrapper.lora_A.copy_(A)
            wrapper.lora_B.copy_(B)
    freeze_base(model)
    leaves = sorted({n.rpartition(".")[2] for n in lora_modules(model)})
    previous = getattr(model, "lora_settings", None)
    model.lora_settings = LoraSettings(r_default, alpha_default, leaves,
                                       previous.dropout if previous else dropout, rslora)
    if merge:
        for name, m in lora_modules(model).items():
            if not m.quantized:
                m.merge()
                _replace(model, name, m.base_layer)
        if not lora_modules(model):
            del model.lora_settings
    return model
