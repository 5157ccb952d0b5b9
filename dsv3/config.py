"""Model configuration: one dataclass with DeepSeek-V3's fields, read from and written to HF `config.json`.

Field names are the Hugging Face names (`hidden_size`, `kv_lora_rank`, ...), so a hub `config.json` maps onto
`ModelConfig` one to one. Both the hub's original RoPE form (`rope_theta` + `rope_scaling`) and the transformers 5
form (`rope_parameters`) are accepted; internally we keep `rope_theta` and a normalised `rope_scaling` dict.
Facts: docs/architecture.md §1 (fields, V3 values) and §4 (YaRN).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# Keys that transformers (or the hub's remote code) writes into config.json and that carry no architecture:
# accepted and dropped by `from_hf`. Anything else unknown is an error, so a typo never silently changes a model.
_IGNORED_HF_KEYS = frozenset({
    "architectures", "auto_map", "transformers_version", "_name_or_path", "name_or_path", "torch_dtype", "dtype",
    "use_cache", "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "pretraining_tp", "initializer_range",
    "output_router_logits", "router_aux_loss_coef", "aux_loss_alpha", "seq_aux", "ep_size", "qk_head_dim",
    "head_dim", "num_key_value_heads", "attention_dropout", "mlp_bias", "tie_word_embeddings", "pad_token_id",
    "bos_token_id", "eos_token_id", "tokenizer_class", "num_mtp_layers", "model_type", "rope_scaling",
    "rope_parameters", "rope_theta", "quantization_config", "moe_layer_freq", "_attn_implementation",
    "attn_implementation", "max_window_layers", "sliding_window", "use_sliding_window", "partial_rotary_factor",
})

# Lower bounds (value, inclusive) of the numeric fields whose range is not the default: ints are sizes (>= 1),
# floats scales or epsilons (> 0). Zero is meaningful for these counts and for the init std.
_LOWER_BOUNDS: dict[str, tuple[float, bool]] = {
    "n_routed_experts": (0, True), "n_shared_experts": (0, True), "first_k_dense_replace": (0, True),
    "num_nextn_predict_layers": (0, True), "initializer_range": (0, True),
    "bos_token_id": (0, True), "eos_token_id": (0, True), "pad_token_id": (0, True),  # and < vocab_size
    "rope_theta": (1, False),  # YaRN divides by log(rope_theta); <= 1 would not decay the frequencies either
}

# rope_scaling's entries: kind and lower bound (None: any finite number). rope.py takes log(orig / beta).
_ROPE_KEYS: dict[str, tuple[type, tuple[float, bool] | None]] = {
    "rope_type": (str, None), "factor": (float, (0, False)), "original_max_position_embeddings": (int, (1, True)),
    "beta_fast": (float, (0, False)), "beta_slow": (float, (0, False)), "mscale": (float, None),
    "mscale_all_dim": (float, None), "attention_factor": (float, None), "truncate": (bool, None),
}


@dataclass(kw_only=True)
class ModelConfig:
    """DeepSeek-V3-family architecture (V3, V2, V2-Lite, Moonlight, Kimi K2 share it).

    Defaults are the tiny preset's shape family; use `ModelConfig.v3()` for the real 671B model.
    """

    model_type: Literal["deepseek_v3", "deepseek_v2"] = "deepseek_v3"
    vocab_size: int = 1024
    hidden_size: int = 64
    intermediate_size: int = 128  # dense SwiGLU width (layers < first_k_dense_replace)
    moe_intermediate_size: int = 32  # width of each routed and each shared expert
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    # MLA (paper §2.1.1): q_lora_rank None -> plain q_proj (V2-Lite, Moonlight)
    q_lora_rank: int | None = 32
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    # DeepSeekMoE (paper §2.1.2)
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 2
    topk_group: int = 1
    first_k_dense_replace: int = 1
    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
    topk_method: Literal["noaux_tc", "greedy", "group_limited_greedy"] = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # multi-token prediction (paper §2.2): number of MTP modules stored after the main layers
    num_nextn_predict_layers: int = 0
    # norms, positions
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # normalised YaRN dict ("rope_type": "yarn", ...), or None
    rope_interleave: bool = True  # checkpoints store rope dims as interleaved pairs (official layout)
    attention_bias: bool = False
    hidden_act: Literal["silu"] = "silu"
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # FP8 block format etc., passed through unchanged (docs/architecture.md §6)
    quantization_config: dict[str, Any] | None = None
    # DeepSeek Sparse Attention (V3.2-Exp, §8; dsv3/dsa.py): lightning-indexer heads, head dim, tokens kept per
    # query. index_topk None = dense MLA (no indexer weights); config.json model_type is then deepseek_v32.
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def uses_dsa(self) -> bool:
        """True when every attention layer carries a lightning indexer (DeepSeek Sparse Attention)."""
        return self.index_topk is not None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers 0..first_k_dense_replace-1 use a dense MLP, the rest DeepSeekMoE."""
        return self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale² under YaRN with `mscale_all_dim` (HF and official code, §2)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            m = yarn_get_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"ModelConfig.{name}: {why} (got {getattr(self, name)!r})")

        # Every field against its annotation first, so the checks below (and the model) only see sane values.
        for name, hint in typing.get_type_hints(type(self)).items():
            value, kinds = getattr(self, name), typing.get_args(hint) or (hint,)
            if value is None and type(None) in kinds:
                continue
            if typing.get_origin(hint) is Literal:
                if value not in kinds:
                    bad(name, f"must be one of {', '.join(map(repr, kinds))}")
            else:
                kind = typing.get_origin(kinds[0]) or kinds[0]  # dict[str, Any] -> dict
                _check(name, value, kind, _LOWER_BOUNDS.get(name, {int: (1, True), float: (0, False)}.get(kind)),
                       nullable=type(None) in kinds)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name) is not None and getattr(self, name) >= self.vocab_size:
                bad(name, f"must be a token id below vocab_size={self.vocab_size}")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "must be even (RoPE rotates pairs of dimensions)")
        if self.n_routed_experts:
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                bad("num_experts_per_tok", f"must be in 1..n_routed_experts={self.n_routed_experts}")
            if self.n_group <= 0 or self.n_routed_experts % self.n_group:
                bad("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
            if not 0 < self.topk_group <= self.n_group:
                bad("topk_group", f"must be in 1..n_group={self.n_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
                bad("n_group", "noaux_tc scores a group by its top-2 experts, so groups need >= 2 experts")
            if self.topk_group * per_group < self.num_experts_per_tok:
                bad("topk_group", "the kept groups hold fewer experts than num_experts_per_tok")
        dsa = ("index_n_heads", "index_head_dim", "index_topk")
        if any(getattr(self, n) is not None for n in dsa):
            for name in dsa:
                if getattr(self, name) is None:
                    bad(name, "must be set when DeepSeek Sparse Attention is on (all three or none)")
            if self.q_lora_rank is None:
                bad("q_lora_rank", "DSA's indexer reads MLA's query latent, so it needs q-LoRA (q_lora_rank set)")
            if self.index_head_dim < self.qk_rope_head_dim:
                bad("index_head_dim", f"must be >= qk_rope_head_dim={self.qk_rope_head_dim} (its rope slice)")
        if self.rope_scaling is not None:
            unknown = set(self.rope_scaling) - set(_ROPE_KEYS)
            if unknown:
                bad("rope_scaling", f"unknown keys {sorted(unknown)}; expected some of {sorted(_ROPE_KEYS)}")
            if self.rope_scaling.get("rope_type") != "yarn":
                bad("rope_scaling", "only rope_type 'yarn' is used by DeepSeek models")
            for key in ("factor", "original_max_position_embeddings"):  # rope.py needs both
                if self.rope_scaling.get(key) is None:
                    bad("rope_scaling", f"yarn needs '{key}'")
            for key, value in self.rope_scaling.items():
                if value is not None:  # the other entries are optional; rope.py defaults them
                    _check(f"rope_scaling.{key}", value, *_ROPE_KEYS[key])

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, **overrides: Any) -> "ModelConfig":
        """A V3-shaped model (q-LoRA, 2 groups, sigmoid + bias, shared expert, MTP) that runs in ms on CPU."""
        return cls(**{"num_nextn_predict_layers": 1, **overrides})

    @classmethod
    def v3(cls, **overrides: Any) -> "ModelConfig":
        """DeepSeek-V3 / R1 (671B total, ~37B activated); values of the hub config.json (§1)."""
        base = dict(
            vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
            num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
            num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3, routed_scaling_factor=2.5,
            num_nextn_predict_layers=1, max_position_embeddings=163840,
            rope_scaling=dict(rope_type="yarn", factor=40.0, beta_fast=32, beta_slow=1, mscale=1.0,
                              mscale_all_dim=1.0, original_max_position_embeddings=4096),
        )
        return cls(**{**base, **overrides})

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, config: dict[str, Any] | str | Path) -> "ModelConfig":
        """Read a HF `config.json` (dict, file, or a directory holding one) of model_type deepseek_v3/deepseek_v2."""
        source = "config"
        if not isinstance(config, dict):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            source, config = str(path), _read_json_object(path)
        hf = dict(config)
        model_type = hf.get("model_type")
        if model_type == "deepseek_v32":
            # V3.2-Exp = V3 + a lightning indexer per layer; transformers' DeepseekV32Config defaults apply.
            model_type = "deepseek_v3"
            for key, default in (("index_n_heads", 64), ("index_head_dim", 128), ("index_topk", 2048)):
                hf.setdefault(key, default)
        elif model_type not in ("deepseek_v3", "deepseek_v2"):
            raise ValueError(f"{source}: unsupported model_type {model_type!r}; expected 'deepseek_v3', "
                             "'deepseek_v32' or 'deepseek_v2'")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in hf if k not in names and k not in _IGNORED_HF_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown config fields {unknown}; not part of the {model_type} architecture")
        kwargs = {k: v for k, v in hf.items() if k in names}
        kwargs["model_type"] = model_type
        if model_type == "deepseek_v2":
            # V2 has no sigmoid router or correction bias; its HF config omits these fields.
            kwargs.setdefault("scoring_func", "softmax")
            kwargs.setdefault("topk_method", "greedy")
            kwargs.setdefault("norm_topk_prob", False)
            kwargs.setdefault("routed_scaling_factor", 1.0)
        for key in ("n_group", "topk_group"):  # V2-Lite writes null: one group, all kept
            if kwargs.get(key) is None:
                kwargs[key] = 1
        if hf.get("moe_layer_freq", 1) != 1:
            raise ValueError(f"{source}: moe_layer_freq={hf['moe_layer_freq']} is not supported (every DeepSeek "
                             "checkpoint uses 1: all layers from first_k_dense_replace on are MoE)")
        if "num_mtp_layers" in hf and "num_nextn_predict_layers" not in hf:
            kwargs["num_nextn_predict_layers"] = hf["num_mtp_layers"]
        # Some configs list several ids; the first is the canonical one, the others must be valid ids too.
        id_lists = {k: kwargs[k] for k in ("bos_token_id", "eos_token_id") if isinstance(kwargs.get(k), list)}
        try:
            for key, ids in id_lists.items():
                if not ids:
                    raise ValueError(f"ModelConfig.{key}: must be a token id or a non-empty list of them (got [])")
                kwargs[key] = ids[0]
            kwargs["rope_theta"], kwargs["rope_scaling"] = _rope_from_hf(hf)
            config = cls(**kwargs)
            for key, ids in id_lists.items():
                for other in ids[1:]:
                    dataclasses.replace(config, **{key: other})  # validates `other` like the first id
            return config
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """HF config.json in the hub's original form (rope_theta + rope_scaling), which transformers 4 and 5 read."""
        out: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"],
        }
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "rope_scaling":
                if value is not None:
                    value = {"type": value["rope_type"], **{k: v for k, v in value.items() if k != "rope_type"}}
            elif f.name == "quantization_config" and value is None:
                continue
            out[f.name] = value
        out["num_key_value_heads"] = self.num_attention_heads
        out["moe_layer_freq"] = 1
        if self.uses_dsa:
            out["architectures"], out["model_type"] = ["DeepseekV32ForCausalLM"], "deepseek_v32"
        else:
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                del out[name]
        return out

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf(), indent=2) + "\n")


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature √t = 0.1·m·ln(s) + 1 (paper-V3 §4.3), 1 when not extending."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _read_json_object(path: Path) -> dict[str, Any]:
    """A config file's JSON object; a one-line error naming the file for anything else."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no config.json here") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, expected a JSON file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: must hold a JSON object (got {type(config).__name__})")
    return config


def _check(name: str, value: Any, kind: type, bound: tuple[float, bool] | None = None, nullable: bool = False) -> None:
    """Raise ValueError unless `value` is a `kind` (int, float, bool, str or dict) within `bound` (low, inclusive).
    Bools are not numbers here and floats must be finite: JSON's true or NaN in a size or a scale, or "768" for an
    int, would otherwise pass on to a silently wrong model or a raw error deep inside torch."""
    if kind in (int, float):
        number = isinstance(value, int if kind is int else (int, float)) and not isinstance(value, bool)
        ok = number and (not isinstance(value, float) or math.isfinite(value))
        what = "an integer" if kind is int else "a finite number"
        if bound is not None:
            low, inclusive = bound
            ok = ok and (value >= low if inclusive else value > low)
            what += f" {'>=' if inclusive else '>'} {low}"
    else:
        ok, what = isinstance(value, kind), {bool: "true or false", str: "a string", dict: "an object"}[kind]
    if not ok:
        raise ValueError(f"ModelConfig.{name}: must be {what}{' or null' if nullable else ''} (got {value!r})")


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Normalise both RoPE spellings to (rope_theta, rope_scaling or None); ModelConfig.validate checks the values."""
    params = hf.get("rope_parameters")
    legacy = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"rope_parameters must be an object, got {type(params).__name__}")
    if params:
        theta = params.get("rope_theta", theta)
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta",)}
    elif legacy is not None:
        if not isinstance(legacy, dict):
            raise ValueError(f"rope_scaling must be an object or null, got {type(legacy).__name__}")
        scaling = dict(legacy)
        theta = scaling.pop("rope_theta", theta)  # transformers 5 also writes the base into the dict
    else:
        scaling = {}
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    theta = 10000.0 if theta is None else theta
    if rope_type == "default":
        return theta, None
    if rope_type != "yarn":
        raise ValueError(f"rope type {rope_type!r} is not supported; DeepSeek models use 'yarn' or none")
    scaling = {"rope_type": "yarn", **scaling}
    max_positions = hf.get("max_position_embeddings", ModelConfig.max_position_embeddings)
    if scaling.get("factor") is None:
        # transformers 5 falls back to max_position_embeddings / original_max_position_embeddings
        orig = scaling.get("original_max_position_embeddings")
        if orig is None:
            raise ValueError("yarn rope scaling needs 'factor' or 'original_max_position_embeddings'")
        _check("max_position_embeddings", max_positions, int, (1, True))  # both checked before dividing
        _check("rope_scaling.original_max_position_embeddings", orig, int, (1, True))
        scaling["factor"] = max_positions / orig
    scaling.setdefault("original_max_position_embeddings", max_positions)
    return theta, scaling
