"""Model core on random tiny configs: absorbed vs naive MLA, cached decoding vs full forward, MoE dispatch vs the
per-token reference, the latent cache's size, and the V3 preset's parameter counts."""

import pytest
import torch

import dsv3
from dsv3.moe import MoE


def tiny_model(**overrides) -> dsv3.Transformer:
    torch.manual_seed(0)
    model = dsv3.Transformer(dsv3.ModelConfig.tiny(**overrides)).eval()
    with torch.no_grad():  # a non-zero router bias, so that selection-only use of it is exercised
        for layer in model.model.layers:
            if isinstance(layer.mlp, MoE) and layer.mlp.gate.e_score_correction_bias is not None:
                layer.mlp.gate.e_score_correction_bias.normal_(std=0.1)
    return model


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_absorbed_equals_naive(q_lora_rank):
    model = tiny_model(q_lora_rank=q_lora_rank)
    ids = torch.randint(0, 1024, (3, 19))
    with torch.no_grad():
        naive, absorbed = model(ids, attn_impl="naive"), model(ids, attn_impl="absorb")
    torch.testing.assert_close(absorbed, naive, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["auto", "naive", "absorb"])
def test_cached_decoding_equals_full_forward(impl):
    model = tiny_model()
    ids = torch.randint(0, 1024, (2, 12))
    cache = model.new_cache(batch_size=2, max_seq_len=16)
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :5], cache, 0, attn_impl=impl)]
        steps += [model(ids[:, t:t + 1], cache, t, attn_impl=impl) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_per_row_positions_equal_separate_sequences():
    """Rows of one cache at different lengths decode in one batched step exactly as they would alone."""
    model = tiny_model()
    a, b = torch.randint(0, 1024, (1, 7)), torch.randint(0, 1024, (1, 4))
    cache = model.new_cache(batch_size=2, max_seq_len=16)
    with torch.no_grad():
        model(a[:, :-1], cache.rows(0), 0)
        model(b[:, :-1], cache.rows(1), 0)
        step = model(torch.cat([a[:, -1:], b[:, -1:]]), cache, torch.tensor([6, 3]))
        torch.testing.assert_close(step[0, -1], model(a)[0, -1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step[1, -1], model(b)[0, -1], rtol=1e-5, atol=1e-5)


def test_cache_bytes_per_token():
    config = dsv3.ModelConfig.tiny()
    for dtype in (torch.float32, torch.bfloat16):
        cache = dsv3.KVCache(config, batch_size=2, max_seq_len=8, dtype=dtype)
        expected = (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * dtype.itemsize
        assert cache.bytes_per_token() == expected
        assert cache.kv.numel() + cache.pe.numel() == expected // dtype.itemsize * 2 * 8


def test_cache_overflow_is_an_error():
    model = tiny_model()
    cache = model.new_cache(batch_size=1, max_seq_len=4)
    with pytest.raises(ValueError, match="max_seq_len=4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache, 0)


@pytest.mark.parametrize("overrides", [
    dict(),  # noaux_tc with groups
    dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False),
    dict(scoring_func="softmax", topk_method="group_limited_greedy", n_routed_experts=8, n_group=4, topk_group=2),
])
def test_grouped_dispatch_equals_per_token_reference(overrides):
    model = tiny_model(**overrides)
    moe = model.model.layers[-1].mlp
    x = torch.randn(23, model.config.hidden_size)
    with torch.no_grad():
        weights, indices, _ = moe.gate(x)
        expected = moe.routed_reference(x, weights, indices)
        for path in ("auto", "pairs", "gather", "loop"):  # auto: grouped matmuls for 23 tokens
            moe.path = path
            torch.testing.assert_close(moe.routed(x, weights, indices), expected)


@pytest.mark.parametrize("overrides", [
    dict(),  # noaux_tc with groups
    dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False),
    dict(scoring_func="softmax", topk_method="group_limited_greedy", n_routed_experts=8, n_group=4, topk_group=2),
])
def test_router_on_the_host_chooses_and_weighs_as_the_tensor_router(overrides):
    """Gate.route_on_host (decoding on a CPU) against Gate.forward: the same experts for every token, the same
    weights up to float32 rounding (with a non-zero correction bias: it selects, never weighs)."""
    gate = tiny_model(**overrides).model.layers[-1].mlp.gate
    x = torch.randn(200, gate.weight.shape[1], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        weights, indices, _ = gate(x)
        for n in (1, 3, 200):
            host_weights, experts = gate.route_on_host(x[:n])
            assert host_weights.dtype == torch.float32 and host_weights.shape == (n, gate.top_k)
            for t in range(n):
                order = indices[t].argsort()
                assert sorted(experts[t]) == indices[t, order].tolist()
                by_id = torch.tensor(experts[t]).argsort()
                torch.testing.assert_close(host_weights[t, by_id], weights[t, order], rtol=1e-6, atol=1e-7)


def test_moe_routes_a_few_cpu_tokens_on_the_host_only_when_decoding():
    """One or two tokens on a CPU with nothing to train: the router runs on the host before the pairs path, and the
    layer's output equals the per-token reference; with gradients on, in training, or for many tokens: the
    tensor router (training also records the load it needs)."""
    moe = tiny_model().model.layers[-1].mlp
    calls = []
    route = moe.gate.route_on_host
    moe.gate.route_on_host = lambda x: calls.append(x.shape[0]) or route(x)
    x = torch.randn(1, 2, moe.gate.weight.shape[1])
    with torch.inference_mode():
        weights, indices, _ = moe.gate(x[0])
        expected = moe.routed_reference(x[0], weights, indices)
        shared = moe.shared_experts(x[0])
        torch.testing.assert_close(moe(x)[0], expected + shared, rtol=1e-5, atol=1e-6)
        assert calls == [2]
        moe(torch.randn(1, 40, x.shape[-1]))  # 160 pairs: grouped
    assert calls == [2]
    moe(x)  # gradients on
    moe.train()
    moe(x)
    assert calls == [2] and moe.last_load is not None


def test_router_bias_selects_but_does_not_weight():
    """noaux_tc: a huge bias on expert 0 makes every token pick it, yet its weight is the unbiased affinity."""
    model = tiny_model(n_group=1, topk_group=1)
    gate = model.model.layers[-1].mlp.gate
    x = torch.randn(5, model.config.hidden_size)
    with torch.no_grad():
        gate.e_score_correction_bias.zero_()
        gate.e_score_correction_bias[0] = 100.0
        weights, indices, s = gate(x)
    assert (indices == 0).any(dim=1).all()
    unnormalised = s.gather(1, indices)
    expected = unnormalised / unnormalised.sum(-1, keepdim=True) * model.config.routed_scaling_factor
    torch.testing.assert_close(weights, expected)


def test_group_limited_routing_keeps_chosen_groups_only():
    model = tiny_model(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    gate = model.model.layers[-1].mlp.gate
    with torch.no_grad():
        _, indices, _ = gate(torch.randn(64, model.config.hidden_size))
    groups_used = (indices // 4).sort(dim=1).values
    assert all(len(set(row.tolist())) <= 2 for row in groups_used)


def test_mtp_head_runs_and_is_separate():
    model = tiny_model()
    ids = torch.randint(0, 1024, (2, 9))
    with torch.no_grad():
        logits, hidden = model(ids, return_hidden=True)
        mtp = model.mtp_logits(hidden[:, :-1], ids)
    assert logits.shape == (2, 9, 1024) and mtp.shape == (2, 8, 1024)
    assert not torch.allclose(mtp, logits[:, 1:])


def test_v3_preset_parameter_counts():
    """671B total and ~37B activated per token (DeepSeek-V3 README: 671B / 37B), built on the meta device."""
    with torch.device("meta"):
        model = dsv3.Transformer(dsv3.ModelConfig.v3())
    total, active = model.num_parameters(), model.num_parameters(activated=True)
    assert round(total / 1e9) == 671
    assert 36.5e9 < active < 38e9
    assert round(model.num_parameters(include_mtp=True) / 1e9, 1) == 682.6  # + the 11.5B MTP module


def test_logits_to_keep_gives_the_last_positions_only():
    torch.manual_seed(0)
    model = dsv3.Transformer(dsv3.ModelConfig.tiny()).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    full = model(ids)
    torch.testing.assert_close(model(ids, logits_to_keep=2), full[:, -2:])
    cache = model.new_cache(2, 6)
    torch.testing.assert_close(model(ids, cache, 0, logits_to_keep=1), full[:, -1:])
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=-1)


def test_logits_to_keep_runs_the_last_layer_for_the_kept_rows_only():
    """With logits_to_keep = k the last block queries, and runs its MLP/MoE on, only the last k positions; the logits
    and every cache entry equal those of a full forward (with a causal mask, and with per-row start positions)."""
    torch.manual_seed(0)
    model = dsv3.Transformer(dsv3.ModelConfig.tiny()).eval()
    T, seen = 7, []
    model.model.layers[-1].mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    ids = torch.randint(0, model.config.vocab_size, (2, T))
    with torch.no_grad():
        full = model(ids)
        for k in (1, 3, T, T + 2):
            torch.testing.assert_close(model(ids, logits_to_keep=k), full[:, -k:], rtol=1e-5, atol=1e-5)
        assert seen[1:] == [1, 3, T, T]
        kept, whole = model.new_cache(2, 16), model.new_cache(2, 16)
        model(ids[:, :3], kept, 0), model(ids[:, :3], whole, 0)
        starts = torch.tensor([3, 3])
        out = model(ids[:, 3:], kept, starts, logits_to_keep=1, attend_length=T)
        ref = model(ids[:, 3:], whole, starts, attend_length=T)
        torch.testing.assert_close(out, ref[:, -1:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, full[:, -1:], rtol=1e-5, atol=1e-5)
        assert torch.equal(kept.kv, whole.kv) and torch.equal(kept.pe, whole.pe)
        # return_hidden wants every position's state: nothing is cut
        logits, hidden = model(ids, logits_to_keep=1, return_hidden=True)
        assert hidden.shape[1] == T and seen[-1] == T


def test_attend_length_must_cover_the_new_tokens():
    torch.manual_seed(0)
    model = dsv3.Transformer(dsv3.ModelConfig.tiny()).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    cache = model.new_cache(1, 16)
    torch.testing.assert_close(model(ids, cache, 0, attend_length=16), model(ids))  # masked extra slots
    with pytest.raises(ValueError, match="attend_length=3"):
        model(ids, model.new_cache(1, 16), 0, attend_length=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_equals_the_fused_op(dtype):
    """RMSNorm's norm-and-addcmul form against F.rms_norm (`rms_norm_reference`: weight after the cast back, as
    transformers does), with a non-trivial weight and eps, a row of zeros (gradient w·rsqrt(eps), no NaN from
    ‖x‖ = 0), and a changed eps."""
    from dsv3.layers import RMSNorm, rms_norm_reference
    torch.manual_seed(0)
    norm = RMSNorm(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 96, dtype=dtype) * 4
    x[0, 0] = 0
    x.requires_grad_(True)
    ref = rms_norm_reference(x, norm.weight, 1e-5)
    y = norm(x)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 8e-3}  # bf16: 1 ulp
    torch.testing.assert_close(y, ref, **tol)
    (g,) = torch.autograd.grad(y.float().sum(), x)
    (g_ref,) = torch.autograd.grad(ref.float().sum(), x)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4 if dtype == torch.float32 else 8e-3)
    norm.eps = 0.5  # a changed eps reaches the forward
    torch.testing.assert_close(norm(x), rms_norm_reference(x, norm.weight, 0.5), **tol)
    with torch.device("meta"):  # built on meta (checkpoint loading): eps stays a CPU scalar the forward can use
        assert RMSNorm(8).eps_tensor.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_on_a_gpu_takes_its_cpu_scalar_eps(dtype):
    """On CUDA the norm's eps stays a CPU scalar tensor (module.cuda() does not move it), which addcmul accepts."""
    from dsv3.layers import RMSNorm
    norm = RMSNorm(256, eps=1e-5).cuda().to(dtype)
    x = torch.randn(4, 3, 256, device="cuda", dtype=dtype)
    ref = norm.weight * torch.nn.functional.rms_norm(x.float(), (256,), eps=1e-5).to(dtype)
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 8e-3}
    torch.testing.assert_close(norm(x), ref, **tol)
