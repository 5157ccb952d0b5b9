"""PEFT's LoRA adapter files, read and checked: adapter_config.json and adapter_model.safetensors.

What `dsv3.lora.load_adapter` reads before it touches a model: `read_adapter_config` (a LoRA config with valid
values, refusing every PEFT feature dsv3 does not implement), `read_adapter_weights` (a safetensors file with at
least one tensor), `read_base_layers` (the base's layer count that `save_adapter` records in the safetensors
header, which tells MTP keys from main-layer ones), and the checks on what the files hold without the model:
`check_factors` (each module has a finite float lora_A and lora_B matrix), `check_target_parameters`
(target_parameters dsv3 can read), `check_selected` (the config's own target_modules / target_parameters /
exclude_modules / layers_to_transform select every module that has tensors, as PEFT decides it), `pattern_value`
(rank_pattern / alpha_pattern lookup).
Errors are `AdapterError`, naming the file and the field or key. The file names, the key prefix and the linear
names an adapter may target live here too; `dsv3.lora` writes the same files (`save_adapter`) and maps them onto
the model. Facts: docs/eval-lora-quant.md §3.2.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

# Linear layers of the DeepSeek-V3 family by their HF names (attention; dense MLP, shared and routed experts).
LORA_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# safetensors header metadata key: the num_hidden_layers of the base the adapter was saved on (hub layers from it on
# are the MTP layers); PEFT writes only {"format": "pt"} and ignores other keys
BASE_LAYERS = "num_hidden_layers"


class AdapterError(ValueError):
    """An adapter that does not fit the model or uses a PEFT feature dsv3 does not implement; names the module/key."""


# PEFT settings that change what the adapter computes, or that need tensors other than lora_A / lora_B
_UNSUPPORTED = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D layout)", "lora_bias": "lora_bias",
                "modules_to_save": "modules_to_save", "layer_replication": "layer_replication",
                "alora_invocation_tokens": "activated LoRA (aLoRA)", "arrow_config": "Arrow routing",
                "use_qalora": "QA-LoRA", "use_bdlora": "BD-LoRA", "monteclora_config": "MonteCLoRA",
                "kasa_config": "KaSA", "trainable_token_indices": "trainable tokens"}
# the regexes PEFT builds from rank_pattern / alpha_pattern keys and from layers_pattern
_PATTERN_KEY = r"(.*\.)?({})$"
_LAYERS_PATTERN = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is a Python int


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _regex(template: str, v) -> bool:
    try:
        re.compile(template.format(v))
    except re.error:
        return False
    return True


def _patterns(v, value_ok) -> bool:
    return v is None or isinstance(v, dict) and all(_regex(_PATTERN_KEY, k) and value_ok(x) for k, x in v.items())


def _names(v, item_regex: str | None = None) -> bool:
    """null, a regex, or a list of names (each a regex too, given the template PEFT wraps it in)."""
    if v is None or isinstance(v, str) and _regex(item_regex or "{}", v):
        return True
    return isinstance(v, list) and all(isinstance(n, str) and (item_regex is None or _regex(item_regex, n)) for n in v)


# adapter_config.json fields that dsv3 reads: (valid?, what is expected); an absent field takes PEFT's default
_FIELDS = {
    "r": (lambda v: _int(v) and v > 0, "a positive integer"),
    "lora_alpha": (_number, "a finite number"),
    "lora_dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "rank_pattern": (lambda v: _patterns(v, lambda x: _int(x) and x > 0),
                     "an object mapping valid regexes to positive integers"),
    "alpha_pattern": (lambda v: _patterns(v, _number), "an object mapping valid regexes to finite numbers"),
    "target_modules": (_names, "null, a regex or a list of module names"),
    "exclude_modules": (_names, "null, a regex or a list of module names"),
    "target_parameters": (lambda v: v is None or isinstance(v, list) and all(isinstance(t, str) for t in v),
                          "null or a list of parameter names"),
    "layers_to_transform": (lambda v: v is None or _int(v) or isinstance(v, list) and all(_int(i) for i in v),
                            "null, a layer index or a list of layer indices"),
    "layers_pattern": (lambda v: _names(v, _LAYERS_PATTERN), "null, a regex or a list of regexes"),
}


def pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module path."""
    for key, value in (patterns or {}).items():
        if re.match(_PATTERN_KEY.format(key), name):
            return value
    return default


def read_adapter_config(directory: str | Path) -> dict:
    """adapter_config.json, checked: a LoRA adapter with valid values and no PEFT feature dsv3 does not implement."""
    path = Path(directory) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path}: no adapter_config.json (is {directory} a PEFT adapter directory?)") from None
    except OSError as e:
        raise AdapterError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise AdapterError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: a JSON {type(config).__name__}; expected an object of LoRA settings")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}; only 'LORA' adapters are supported")
    for key, what in _UNSUPPORTED.items():
        if config.get(key) not in (None, False, []):  # PEFT turns the *_config features on with any object, even {}
            raise AdapterError(f"{path}: {key}={config[key]!r}: {what} is not supported by dsv3.lora")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={config['bias']!r}; only 'none' is supported")
    for key, (valid, expected) in _FIELDS.items():
        if key in config and not valid(config[key]):
            raise AdapterError(f"{path}: {key}={config[key]!r}: expected {expected}")
    return config


def read_adapter_weights(weights: Path) -> dict[str, torch.Tensor]:
    if not weights.exists():
        raise AdapterError(f"{weights}: missing (adapter_model.bin pickles are not loaded; re-save with safetensors)")
    if weights.is_dir():
        raise AdapterError(f"{weights}: a directory; expected a safetensors file")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights}: truncated or corrupt safetensors file ({e})") from None
    if not tensors:  # would load as a silent no-op
        raise AdapterError(f"{weights}: holds no tensors (zero LoRA pairs)")
    return tensors


def read_base_layers(weights: Path) -> int | None:
    """The base's num_hidden_layers recorded in an adapter's safetensors header (`save_adapter` writes it), or None
    (PEFT's adapters and other tools' record none). Call after read_adapter_weights: the file is known to be valid."""
    with safe_open(str(weights), framework="pt") as f:
        value = (f.metadata() or {}).get(BASE_LAYERS)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):
        raise AdapterError(f"{weights}: header metadata {BASE_LAYERS}={value!r}: expected a layer count (digits)")
    return int(value)


def check_target_parameters(config: dict, where: str) -> None:
    """PEFT target_parameters that dsv3 reads: fused expert stacks, or `<linear>.weight` (stored like module LoRA)."""
    def ok(t: str) -> bool:
        parts = t.split(".")
        return parts[-1] in ("gate_up_proj", "down_proj") or (parts[-1] == "weight" and len(parts) > 1
                                                             and parts[-2] in LORA_TARGETS)
    bad = [t for t in (config.get("target_parameters") or []) if not ok(t)]
    if bad:
        raise AdapterError(f"{where}: target_parameters {bad}: only the routed experts' gate_up_proj / down_proj "
                           "and linear weights (e.g. 'mlp.gate_proj.weight') are supported")


def _names_match(names, path: str) -> bool:
    """PEFT target_modules / exclude_modules: a string is a full-match regex, a list names the path's last parts."""
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path == n or path.endswith(f".{n}") for n in names or [])


def _layer_index(config: dict, path: str) -> int | None:
    """The layer index PEFT reads for layers_to_transform: the first numbered part, or the one after layers_pattern."""
    patterns = config.get("layers_pattern") or None
    if patterns is None:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        patterns = [patterns] if isinstance(patterns, str) else patterns
        m = next((m for m in (re.match(_LAYERS_PATTERN.format(p), path) for p in patterns) if m), None)
    return int(m["idx"]) if m else None


def _peft_selects(config: dict, path: str, param: str | None) -> bool:
    """Whether PEFT adapts hub module `path` (param: a fused experts parameter) under this config, as peft's
    tuners_utils `check_target_module_exists` (target_modules, exclude_modules, layers_to_transform) and
    `_inject_parameters` (target_parameters match the end of `<module>.<parameter>`; exclude_modules does not apply).
    """
    key = f"{path}.{param or 'weight'}"
    if any(key == t or key.endswith(f".{t}") for t in config.get("target_parameters") or []):
        return True
    targets, layers = config.get("target_modules"), config.get("layers_to_transform")
    if param or targets is None or _names_match(config.get("exclude_modules"), path):
        return False
    if isinstance(targets, str):  # "all-linear" leaves out the output head
        return path != "lm_head" if targets == "all-linear" else re.fullmatch(targets, path) is not None
    if not _names_match(targets, path):
        return False
    if layers is None or layers == []:
        return True
    return _layer_index(config, path) in (layers if isinstance(layers, list) else [layers])


def check_selected(config: dict, path: str, param: str | None, where: str) -> None:
    """Refuse tensors for a module the adapter's own config leaves out (a config naming no targets states nothing)."""
    if (config.get("target_modules") is not None or config.get("target_parameters")) \
            and not _peft_selects(config, path, param):
        raise AdapterError(f"{where}: {path}{f' ({param})' if param else ''} has LoRA tensors, but {ADAPTER_CONFIG}'s "
                           "target_modules / target_parameters / exclude_modules / layers_to_transform leave it out "
                           "(PEFT would not adapt it)")


def check_factors(path: str, ab: dict[str, torch.Tensor], where: str) -> None:
    if set(ab) != {"lora_A", "lora_B"}:
        raise AdapterError(f"{where}: {path} has {sorted(ab)} but needs both lora_A and lora_B")
    for name, t in ab.items():
        key = f"{PEFT_PREFIX}{path}.{name}.weight"
        if t.ndim != 2:
            raise AdapterError(f"{where}: {key}: shape {tuple(t.shape)}; expected a matrix")
        if not t.is_floating_point():
            raise AdapterError(f"{where}: {key}: dtype {t.dtype}; expected a floating-point dtype")
        if not torch.isfinite(t).all():
            raise AdapterError(f"{where}: {key}: holds NaN or infinite values")
