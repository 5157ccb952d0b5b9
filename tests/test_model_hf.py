"""dsv3 against transformers' DeepseekV3/V2 models: same checkpoint, same logits (issue 2 acceptance).

transformers writes the checkpoint (random weights, non-default norm weights, non-zero router bias); dsv3 loads it
with `load_pretrained` and must produce float32 logits within 1e-5 relative error. Then the other direction:
dsv3's `save_pretrained` output loads in transformers' AutoModelForCausalLM with the same logits.
"""

import copy

import pytest
import torch

import dsv3

transformers = pytest.importorskip("transformers")

YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32, beta_slow=1,
            mscale=1.0, mscale_all_dim=1.0)

CONFIGS = {
    # V3 in miniature: q-LoRA, 4 groups of 4 experts (top-2 groups), YaRN, two dense layers, MTP layer on disk
    "v3_qlora_groups_yarn": dict(
        model_type="deepseek_v3", vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
        num_hidden_layers=4, first_k_dense_replace=2, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=16, n_shared_experts=1,
        num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
        scoring_func="sigmoid", topk_method="noaux_tc", max_position_embeddings=256, rope_scaling=YARN,
        num_nextn_predict_layers=1),
    # V2-Lite-like: no q-LoRA, softmax greedy routing, 2 shared experts, no normalisation
    "v2lite_greedy": dict(
        model_type="deepseek_v2", vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=3, n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        topk_method="greedy", max_position_embeddings=128),
    # V2 (236B-like): group-limited greedy (group max), YaRN with mscale != mscale_all_dim so cos/sin are scaled
    "v2_group_limited_yarn": dict(
        model_type="deepseek_v2", vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=40, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=12, n_shared_experts=2,
        num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=16.0, norm_topk_prob=False,
        topk_method="group_limited_greedy", max_position_embeddings=256,
        rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=0.707)),
    # Moonlight-like: V3 router (sigmoid + bias) without groups, no q-LoRA, rope_theta 50000
    "moonlight_like": dict(
        model_type="deepseek_v3", vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=3, n_group=1, topk_group=1, routed_scaling_factor=2.446, norm_topk_prob=True,
        scoring_func="sigmoid", topk_method="noaux_tc", rope_theta=50000.0, rms_norm_eps=1e-5,
        max_position_embeddings=128),
}


def hf_model(name: str):
    kwargs = copy.deepcopy(CONFIGS[name])  # transformers edits rope dicts in place
    model_type = kwargs.pop("model_type")
    kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]  # unused by MLA; HF's default (128) is not
    if model_type == "deepseek_v2":
        kwargs.pop("scoring_func", None)
        cfg = transformers.DeepseekV2Config(**kwargs)
        cls = transformers.DeepseekV2ForCausalLM
    else:
        kwargs.pop("scoring_func"), kwargs.pop("topk_method")
        cfg = transformers.DeepseekV3Config(**kwargs)
        cls = transformers.DeepseekV3ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # make norms and router bias non-trivial so that a wrong use of them shows
        for n, p in model.named_parameters():
            if n.endswith("layernorm.weight") or n.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    ref = hf_model(name)
    ref.save_pretrained(tmp_path)
    ours = dsv3.load_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 320, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        for impl in ("naive", "absorb"):
            assert rel_err(ours(ids, attn_impl=impl), expected) < 1e-5, impl


@pytest.mark.parametrize("name", ["v3_qlora_groups_yarn", "v2lite_greedy"])
def test_save_pretrained_loads_in_transformers(name, tmp_path):
    config = dsv3.ModelConfig.from_hf(copy.deepcopy(CONFIGS[name]))
    torch.manual_seed(0)
    ours = dsv3.Transformer(config).eval()
    with torch.no_grad():
        for layer in ours.model.layers:
            if hasattr(layer.mlp, "gate") and layer.mlp.gate.e_score_correction_bias is not None:
                layer.mlp.gate.e_score_correction_bias.normal_(std=0.1)
    dsv3.save_pretrained(ours, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (1, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_err(ours(ids), ref(ids).logits) < 1e-5
    reloaded = dsv3.load_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(ids), ours(ids))
    assert len(reloaded.mtp) == config.num_nextn_predict_layers
