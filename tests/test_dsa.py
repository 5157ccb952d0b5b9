"""DeepSeek Sparse Attention (dsv3/dsa.py): gathered top-k MLA vs the dense-masked reference, exactness at
k >= context, prefill vs decoding, the sliding window, V3.2 checkpoints (transformers' DeepseekV32), training."""

import json

import pytest
import torch

import dsv3
from dsv3 import dsa
from dsv3.checkpoint import load_pretrained, save_pretrained
from dsv3.train import TrainConfig, compute_loss


def dsa_model(topk=5, heads=4, seed=0, **kw):
    torch.manual_seed(seed)
    config = dsv3.ModelConfig.tiny(index_n_heads=heads, index_head_dim=16, index_topk=topk, **kw)
    model = dsv3.Transformer(config).eval()
    for m in model.modules():  # non-trivial LayerNorm parameters, so a wrong norm would show
        if isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.normal_(m.weight, 1.0, 0.1)
            torch.nn.init.normal_(m.bias, 0.0, 0.1)
    return model


@torch.no_grad()
def test_logits_to_keep_with_the_indexer_equals_a_full_forward():
    """The last layer's indexer scores all queries, so MLA attends for every position and keeps the last rows."""
    model = dsa_model(topk=4)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    full = model(ids)
    for k in (1, 5):
        torch.testing.assert_close(model(ids, logits_to_keep=k), full[:, -k:])


@torch.no_grad()
def test_gathered_equals_masked_reference(monkeypatch):
    monkeypatch.setattr(dsa, "BLOCK", 8)  # several query blocks, each with its own causal reach
    model = dsa_model(topk=6)
    ids = torch.randint(0, model.config.vocab_size, (2, 30))
    sparse = model(ids)
    dsa.set_mode(model, "masked")
    masked = model(ids)
    dsa.set_mode(model, "dense")
    dense = model(ids)
    dsa.set_mode(model, "blocked")  # dense MLA, query-blocked (the long-context dense baseline)
    torch.testing.assert_close(model(ids), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse, masked, rtol=1e-5, atol=1e-5)
    assert (sparse - dense).abs().max() > 1e-2  # k = 6 of up to 30 tokens really drops something


@torch.no_grad()
def test_topk_at_least_context_is_dense_mla():
    model = dsa_model(topk=16)
    dense = dsv3.Transformer(dsv3.ModelConfig.tiny()).eval()
    dense.load_state_dict(model.state_dict(), strict=False)  # same weights minus the indexers
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    torch.testing.assert_close(model(ids), dense(ids), rtol=1e-5, atol=1e-5)
    cache = model.new_cache(2, 16)
    steps = [model(ids[:, :9], cache, 0)] + [model(ids[:, t:t + 1], cache, t) for t in range(9, 16)]
    torch.testing.assert_close(torch.cat(steps, 1), dense(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["sparse", "window"])
@torch.no_grad()
def test_decoding_with_cache_matches_prefill(mode):
    model = dsa_model(topk=5)
    dsa.set_mode(model, mode)
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    cache = model.new_cache(2, 24)
    assert cache.ik.shape == (3, 2, 24, 16)
    steps = [model(ids[:, :11], cache, 0)] + [model(ids[:, t:t + 1], cache, t) for t in range(11, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), model(ids), rtol=1e-5, atol=1e-5)


def test_window_and_topk_selection():
    mask = torch.ones(1, 5, 5, dtype=torch.bool).tril()
    idx, valid = dsa.window_select(mask, 3)
    assert idx[0, 4].tolist() == [4, 3, 2] and valid[0, 4].all()
    assert valid[0, 1].tolist() == [True, True, False]
    scores = torch.tensor([[[0.0, 0.0, 2.0, 0.0, -1.0]]])
    idx, valid = dsa.topk_select(scores, torch.ones(1, 1, 5, dtype=torch.bool), 3)
    assert idx[0, 0].tolist() == [2, 3, 1]  # ties at 0 go to the later key; -1 is out
    idx, valid = dsa.topk_select(scores, torch.tensor([[[True, True, False, False, False]]]), 3)
    assert sorted(idx[0, 0][valid[0, 0]].tolist()) == [0, 1] and valid.sum() == 2


@torch.no_grad()
def test_v32_checkpoint_round_trip_and_transformers_parity(tmp_path):
    transformers = pytest.importorskip("transformers")
    # 16 indexer heads: exact ties (every ReLU 0) are rare, and transformers breaks ties its own way
    model = dsa_model(topk=5, heads=16, num_nextn_predict_layers=0)
    save_pretrained(model, tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    assert hf_config["model_type"] == "deepseek_v32" and hf_config["index_topk"] == 5
    assert "model.layers.1.self_attn.indexer.weights_proj.weight" in model.state_dict()
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    ours = model(ids)
    torch.testing.assert_close(load_pretrained(tmp_path)(ids), ours, rtol=0, atol=0)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float()
    torch.testing.assert_close(theirs(ids).logits, ours, rtol=1e-4, atol=1e-4)


def test_config_dsa_off_is_unchanged_and_validated():
    plain = dsv3.ModelConfig.tiny()
    assert not plain.uses_dsa and "index_topk" not in plain.to_hf()
    assert dsv3.KVCache(plain, 1, 4).ik is None
    assert "indexer" not in " ".join(dsv3.Transformer(plain).state_dict())
    v32 = dsv3.ModelConfig.from_hf({**plain.to_hf(), "model_type": "deepseek_v32"})  # transformers' defaults
    assert (v32.index_n_heads, v32.index_head_dim, v32.index_topk) == (64, 128, 2048)
    with pytest.raises(ValueError, match="q_lora_rank"):
        dsv3.ModelConfig.tiny(q_lora_rank=None, index_n_heads=2, index_head_dim=16, index_topk=4)
    with pytest.raises(ValueError, match="index_head_dim"):
        dsv3.ModelConfig.tiny(index_n_heads=2, index_topk=4)


def test_warmup_trains_only_the_indexers_and_sparse_keeps_them_off_the_lm_loss():
    model = dsa_model(topk=4).train()
    batch = torch.randint(0, model.config.vocab_size, (2, 17))
    dsa.configure_training(model, "warmup")
    loss, parts = compute_loss(model, batch, TrainConfig())
    assert parts["indexer_loss"] > 0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.requires_grad == (".indexer." in name), name
        assert (p.grad is not None) == (".indexer." in name), name
    model.zero_grad(set_to_none=True)
    dsa.configure_training(model, "sparse")
    assert all(p.requires_grad for p in model.parameters())
    for ind in dsa.indexers(model):
        ind.last_loss = None
    logits = model(batch[:, :-1])  # the LM loss alone: no gradient may reach an indexer
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("model.")}
    assert all(g is None for n, g in grads.items() if ".indexer." in n)  # top-k is not differentiable
    assert grads["model.layers.0.self_attn.kv_b_proj.weight"] is not None
    dsa.indexer_loss(model).backward()
    assert model.model.layers[0].self_attn.indexer.wq_b.weight.grad is not None
    assert model.model.layers[0].self_attn.kv_b_proj.weight.grad.abs().sum() > 0


# --- FP8 lightning indexer (V3.2-Exp inference: Hadamard rotation + block-scaled e4m3, dsa.set_indexer_precision)

def sylvester(n):
    """Sylvester's Hadamard matrix from its recursive definition, float64."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    h = sylvester(n // 2)
    return torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)


def random_index_inputs(seed, T=64, H=8, d=128, S=256):
    """q [1,T,H,d], k [1,S,d], w [1,T,H]; token norms vary (log-normal), so a per-token scale matters."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, T, H, d, generator=g) * (0.5 * torch.randn(1, T, H, 1, generator=g)).exp()
    k = torch.randn(1, S, d, generator=g) * (0.5 * torch.randn(1, S, 1, generator=g)).exp()
    return q, k, torch.randn(1, T, H, generator=g) * (H * d) ** -0.5


def test_hadamard_is_the_orthogonal_sylvester_transform():
    torch.manual_seed(0)
    for d in (1, 2, 16, 128):
        x = torch.randn(3, 5, d, dtype=torch.float64)
        torch.testing.assert_close(dsa.hadamard(x), x @ sylvester(d).T * d ** -0.5, rtol=0, atol=1e-12)
        torch.testing.assert_close(dsa.hadamard(dsa.hadamard(x)), x, rtol=0, atol=1e-12)  # H·H = d·I
    q, k, w = random_index_inputs(0, T=16, S=32)
    torch.testing.assert_close(dsa.index_scores(dsa.hadamard(q), w, dsa.hadamard(k)), dsa.index_scores(q, w, k),
                               rtol=0, atol=1e-5)  # rotating both sides leaves every q·k, so the scores, unchanged
    with pytest.raises(ValueError, match="index_head_dim=24"):
        dsa.hadamard(torch.zeros(2, 24))


def test_fp8_round_is_block_scaled_e4m3_and_scores_stay_within_its_error_bound():
    q, k, w = random_index_inputs(0)
    qh, kh = dsa.hadamard(q), dsa.hadamard(k)
    q8, k8 = dsa.fp8_round(qh), dsa.fp8_round(kh)

    def scale(x):  # one power-of-two scale per token (d = 128: one block): 2^ceil(log2(absmax / 448))
        return torch.exp2(torch.ceil(torch.log2(x.abs().amax(-1, keepdim=True) / 448)))

    def err_bound(x):  # round to nearest e4m3 (3 mantissa bits): half an ulp, 2^-4 relative for normals
        return torch.maximum(x.abs() * 2 ** -4, scale(x) * 2 ** -10)  # subnormals: half their spacing 2^-9·s

    for x, x8 in ((qh, q8), (kh, k8)):
        assert torch.equal((x8 / scale(x)).to(torch.float8_e4m3fn).float(), x8 / scale(x))  # on the e4m3 grid
        assert ((x8 - x).abs() <= err_bound(x)).all()
    x, g = qh.clone().requires_grad_(), torch.randn(qh.shape)
    (dsa.fp8_round(x) * g).sum().backward()
    assert torch.equal(x.grad, g)  # straight-through gradient
    # |q̃·k̃ - q·k| <= Σ_i |δq_i||k_i| + |q_i||δk_i| + |δq_i||δk_i| (per product: 2·2^-4 + 2^-8 relative for
    # normals); ReLU is 1-Lipschitz, so |Ĩ - I| <= Σ_h |w_h|·that; plus the fp32 dot's own rounding, d·2^-24·Σ|q̃ k̃|.
    eq, ek = err_bound(qh).double(), err_bound(kh).double()
    qa, ka = qh.abs().double(), kh.abs().double()
    dot_bound = (torch.einsum("bthd,bsd->bths", qa, ek) + torch.einsum("bthd,bsd->bths", eq, ka)
                 + torch.einsum("bthd,bsd->bths", eq, ek)
                 + 128 * 2 ** -24 * torch.einsum("bthd,bsd->bths", q8.abs().double(), k8.abs().double()))
    bound = torch.einsum("bths,bth->bts", dot_bound, w.abs().double())
    exact = torch.einsum("bths,bth->bts", torch.einsum("bthd,bsd->bths", q.double(), k.double()).relu(), w.double())
    fp8 = dsa.index_scores(q8, w, k8)
    assert ((fp8.double() - exact).abs() <= bound).all()  # measured: max |Ĩ - I| = 0.049·max |I|, median 3.7%


def test_fp8_topk_overlaps_the_exact_selection():
    mask = torch.ones(1, 64, 256, dtype=torch.bool)
    for seed in range(3):
        q, k, w = random_index_inputs(seed)
        exact, _ = dsa.topk_select(dsa.index_scores(q, w, k), mask, 32)
        fp8, _ = dsa.topk_select(dsa.index_scores(dsa.fp8_round(dsa.hadamard(q)), w,
                                                  dsa.fp8_round(dsa.hadamard(k))), mask, 32)
        chosen = torch.zeros(mask.shape).scatter_(-1, exact, 1) * torch.zeros(mask.shape).scatter_(-1, fp8, 1)
        # measured 0.966-0.971 over 10 seeds; e4m3 without its per-token scales multiplied back: 0.57-0.63
        assert chosen.sum() / exact.numel() > 0.9


@torch.no_grad()
def test_fp8_indexer_decoding_matches_prefill_and_bf16_restores_exact_logits():
    model = dsa_model(topk=5)
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    exact = model(ids)
    ind, c = model.model.layers[0].self_attn.indexer, model.config
    inputs = (torch.randn(1, 7, c.hidden_size), torch.randn(1, 7, c.q_lora_rank))
    angles = torch.randn(1, 7, c.qk_rope_head_dim // 2)
    q, k, w = ind(*inputs, angles.cos(), angles.sin())
    dsa.set_indexer_precision(model, "fp8")
    q8, k8, w8 = ind(*inputs, angles.cos(), angles.sin())  # rotated after RoPE, then rounded; w unchanged
    assert torch.equal(q8, dsa.fp8_round(dsa.hadamard(q))) and torch.equal(k8, dsa.fp8_round(dsa.hadamard(k)))
    assert torch.equal(w8, w)
    fp8 = model(ids)
    assert (fp8 - exact).abs().max() > 1e-3  # the FP8 scores change some selection
    cache = model.new_cache(2, 24)
    steps = [model(ids[:, :11], cache, 0)] + [model(ids[:, t:t + 1], cache, t) for t in range(11, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), fp8, rtol=1e-5, atol=1e-5)
    keys = cache.ik[:, :, :20]
    assert torch.equal(dsa.fp8_round(keys), keys)  # the cache holds the FP8-rounded keys
    dsa.set_indexer_precision(model, "bf16")
    torch.testing.assert_close(model(ids), exact, rtol=0, atol=0)
    model(ids[:, :11], cache, 0)
    assert not torch.equal(dsa.fp8_round(cache.ik[:, :, :11]), cache.ik[:, :, :11])  # exact keys are not


def test_set_indexer_precision_validates():
    model = dsa_model()
    with pytest.raises(ValueError, match="precision 'fp16'"):
        dsa.set_indexer_precision(model, "fp16")
    with pytest.raises(ValueError, match="index_head_dim=24"):
        dsa.set_indexer_precision(dsv3.Transformer(dsv3.ModelConfig.tiny(index_n_heads=2, index_head_dim=24,
                                                                          index_topk=4)), "fp8")
    with pytest.raises(ValueError, match="no lightning indexer"):
        dsa.set_indexer_precision(dsv3.Transformer(dsv3.ModelConfig.tiny()), "fp8")
