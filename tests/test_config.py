"""ModelConfig: both HF RoPE spellings, round trips, and clear errors on unknown or inconsistent fields."""

import json
import math
import re
from pathlib import Path

import pytest

from dsv3 import ModelConfig

BUNDLED = Path(__file__).parents[1] / "dsv3" / "bundled" / "config.json"

V3_HUB_ROPE = {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
               "original_max_position_embeddings": 4096}


def v3_hub_json() -> dict:
    """The fields of deepseek-ai/DeepSeek-V3's config.json (docs/architecture.md §1)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
        "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256,
        "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "first_k_dense_replace": 3, "moe_layer_freq": 1, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "rope_theta": 10000, "max_position_embeddings": 163840, "rope_scaling": dict(V3_HUB_ROPE),
        "num_nextn_predict_layers": 1, "aux_loss_alpha": 0.001, "seq_aux": True, "ep_size": 1,
        "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "attention_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "pretraining_tp": 1, "transformers_version": "4.46.3",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    }


def test_hub_v3_config_equals_preset():
    config = ModelConfig.from_hf(v3_hub_json())
    assert config == ModelConfig.v3(quantization_config=config.quantization_config)
    assert config.softmax_scale == pytest.approx(0.1352338, abs=1e-6)  # 192^-0.5 · mscale² (§2)


def test_transformers5_rope_parameters_form(tmp_path):
    hub = v3_hub_json()
    del hub["rope_theta"], hub["rope_scaling"]
    hub["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40, "beta_fast": 32,
                              "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                              "original_max_position_embeddings": 4096}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    assert ModelConfig.from_hf(tmp_path) == ModelConfig.from_hf(v3_hub_json())


def test_round_trip_through_to_hf():
    for config in (ModelConfig.v3(), ModelConfig.tiny(), ModelConfig.tiny(q_lora_rank=None, rope_scaling=None)):
        assert ModelConfig.from_hf(config.to_hf()) == config


def test_v2_lite_defaults():
    hub = {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
           "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16, "q_lora_rank": None,
           "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
           "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1,
           "first_k_dense_replace": 1, "topk_method": "greedy", "routed_scaling_factor": 1.0, "rope_theta": 10000,
           "max_position_embeddings": 163840,
           "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                            "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096}}
    config = ModelConfig.from_hf(hub)
    assert (config.scoring_func, config.norm_topk_prob, config.q_lora_rank) == ("softmax", False, None)
    assert config.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * 0.707 * 3.6888794541139363 + 1) ** 2)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "unsupported model_type 'llama'"),
    ({"hidden_sizee": 7168}, r"unknown config fields \['hidden_sizee'\]"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
    ({"n_group": 7}, "n_group: must divide n_routed_experts=256"),
    ({"topk_group": 9}, "topk_group"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim: must be even"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope type 'dynamic' is not supported"),
    ({"rope_scaling": {"type": "yarn", "factor": 4, "ramp": 1}}, r"unknown keys \['ramp'\]"),
    ({"moe_layer_freq": 2}, "moe_layer_freq=2 is not supported"),
    ({"scoring_func": "relu"}, "scoring_func"),
])
def test_bad_fields_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf({**v3_hub_json(), **change})


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)


def bundled_with_yarn() -> dict:
    """The bundled model's config.json plus a YaRN block, so the rope_scaling entries are checked as well."""
    return {**json.loads(BUNDLED.read_text()), "rope_scaling": {
        "type": "yarn", "factor": 4, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 256}}


def test_bundled_and_hub_shaped_configs_still_load(tmp_path):
    """Guard for the checks below: what real checkpoints ship keeps loading (token id lists, int rope_theta)."""
    assert ModelConfig.from_hf(BUNDLED.parent).pad_token_id == 2
    (tmp_path / "config.json").write_text(json.dumps({**bundled_with_yarn(), "eos_token_id": [1, 2]}))
    assert ModelConfig.from_hf(tmp_path).eos_token_id == 1
    assert ModelConfig.from_hf({**v3_hub_json(), "pad_token_id": None}).rope_theta == 10000


def rope(**entries) -> dict:
    return {"rope_scaling": {**bundled_with_yarn()["rope_scaling"], **entries}}


@pytest.mark.parametrize("change, field", [
    # wrong types that used to fail deep inside torch or compare str with int
    ({"intermediate_size": "768"}, "intermediate_size"), ({"n_group": 4.0}, "n_group"),
    ({"first_k_dense_replace": "2"}, "first_k_dense_replace"), ({"num_experts_per_tok": "4"}, "num_experts_per_tok"),
    ({"n_routed_experts": "16"}, "n_routed_experts"), ({"num_nextn_predict_layers": "1"}, "num_nextn_predict_layers"),
    ({"routed_scaling_factor": "x"}, "routed_scaling_factor"), ({"rope_theta": "abc"}, "rope_theta"),
    (rope(factor="4"), "rope_scaling.factor"), (rope(beta_fast="x"), "rope_scaling.beta_fast"),
    ({"bos_token_id": []}, "bos_token_id"),
    # out of range
    ({"intermediate_size": -5}, "intermediate_size"), ({"n_shared_experts": -1}, "n_shared_experts"),
    ({"first_k_dense_replace": -1}, "first_k_dense_replace"),
    ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers"),
    ({"pad_token_id": -5}, "pad_token_id"), ({"eos_token_id": 99999}, "eos_token_id"),
    ({"eos_token_id": [1, 99999]}, "eos_token_id"), ({"rms_norm_eps": 0}, "rms_norm_eps"),
    (rope(original_max_position_embeddings=0), "rope_scaling.original_max_position_embeddings"),
    (rope(factor=-4), "rope_scaling.factor"), (rope(beta_slow=-1), "rope_scaling.beta_slow"),
    # silently accepted before: truthy strings, bools as ints, NaN
    ({"norm_topk_prob": "false"}, "norm_topk_prob"), ({"rope_interleave": "false"}, "rope_interleave"),
    ({"q_lora_rank": True}, "q_lora_rank"), ({"eos_token_id": "x"}, "eos_token_id"),
    ({"rms_norm_eps": math.nan}, "rms_norm_eps"), ({"routed_scaling_factor": math.nan}, "routed_scaling_factor"),
    ({"rope_theta": math.nan}, "rope_theta"), (rope(factor=math.nan), "rope_scaling.factor"),
    (rope(mscale="1"), "rope_scaling.mscale"),
])
def test_bad_values_name_file_and_field(tmp_path, change, field):
    (tmp_path / "config.json").write_text(json.dumps({**bundled_with_yarn(), **change}))  # NaN is written as NaN
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'config.json'))}: ModelConfig\.{field}: "
                                         r"must be .* \(got .*\)$"):
        ModelConfig.from_hf(tmp_path)


def test_yarn_factor_falls_back_to_the_default_context():
    hub = {**bundled_with_yarn(), "rope_scaling": {"type": "yarn", "original_max_position_embeddings": 256}}
    del hub["max_position_embeddings"]  # ModelConfig's default (4096) applies, as transformers' does
    assert ModelConfig.from_hf(hub).rope_scaling["factor"] == 4096 / 256


@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", "must hold a JSON object (got list)"), (b'"x"', "must hold a JSON object (got str)"),
    (b"null", "must hold a JSON object"), (b'{"vocab_size": "\xff"}', "not UTF-8 text (byte 16"),
])
def test_unreadable_config_file_is_named(tmp_path, content, message):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'}: {message}")):
        ModelConfig.from_hf(tmp_path)


def test_config_json_directory_is_named(tmp_path):
    (tmp_path / "config.json").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'}: is a directory")):
        ModelConfig.from_hf(tmp_path)
