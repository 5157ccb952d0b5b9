"""Weight quantization (dsv3.quant): error bounds, packed sizes, fused kernels against the reference path,
whole-model logits, routed experts, errors that name the layer, checkpoints that round-trip, keep_fp8 loading.

GPU kernels (int4/int8 on CUDA, FP8 `scaled_mm` on sm90) are tested in tests/test_quant_gpu.py.
"""

import copy
import json

import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import dsv3
from dsv3.checkpoint import dequantize_fp8, hub_state_dict
from dsv3.cli import main as cli_main
from dsv3.moe import MoE
from dsv3.quant import (FP8Linear, Int4Linear, Int8Linear, QuantizationError, QuantizedLinear, quantize, quantize_fp8,
                        quantize_int4, quantized_layers, save_quantized, skipped)
from dsv3.quant.fp8 import FP8_BLOCK, FP8_ROW_MULTIPLE, padded_rows, quantize_activations
from dsv3.quant.int4 import kernel_width, pack_nibbles, unpack_nibbles
from quant_utils import e4m3_bound, linear, rel
from server_utils import COMPILE_SIZED


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return dsv3.Transformer(dsv3.ModelConfig.tiny()).eval()


IDS = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------- formats
def test_int8_error_is_within_half_a_step_per_channel():
    lin = linear(96, 256)
    q = Int8Linear.from_linear(lin)
    w = lin.weight.detach()
    assert q.weight.dtype == torch.int8 and q.weight_scale.shape == (96,)
    err = (q.dequantize(torch.float32) - w).abs()
    assert (err <= q.weight_scale[:, None] / 2 + 1e-7).all()  # round to nearest on a grid of step `scale`
    assert rel(q.dequantize(torch.float32), w) < 0.01  # ~0.7% for Gaussian rows (docs/eval-lora-quant.md §4.2)
    assert q.weight.abs().max() == 127


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_int4_error_is_within_half_a_step_per_group(group_size):
    w = torch.randn(32, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    q, scale, zero = quantize_int4(w, group_size)
    assert q.max() <= 15 and scale.dtype == zero.dtype == torch.bfloat16 and scale.shape == (32, 512 // group_size)
    deq = ((q.float().view(32, -1, group_size) - 8) * scale.float()[..., None] + zero.float()[..., None]).flatten(1)
    step = scale.float().repeat_interleave(group_size, 1)
    assert ((deq - w).abs() <= 0.51 * step).all()  # half a step, plus the bf16 rounding of scale and zero
    # uniform grid: rms error = step/sqrt(12), step = range/15, a Gaussian group's range ~4σ (g32) to ~5.7σ (g256)
    bound = {32: 0.085, 64: 0.10, 128: 0.115, 256: 0.13}[group_size]
    assert rel(deq, w) < bound
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)


def test_fp8_matches_deepseeks_block_format():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    q, scale_inv = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.dtype == torch.float32 and scale_inv.shape == (3, 2)
    assert torch.allclose(scale_inv[0, 0], w[:128, :128].abs().max() / 448)
    assert rel(dequantize_fp8(q, scale_inv, torch.float32), w) < 0.04  # 3 mantissa bits


@pytest.mark.parametrize("cls, kwargs, limit", [(Int8Linear, {}, 0.51), (Int4Linear, {"group_size": 128}, 0.28),
                                                (Int4Linear, {"group_size": 32}, 0.32), (FP8Linear, {}, 0.51)])
def test_state_dict_holds_only_packed_bytes(cls, kwargs, limit):
    lin = linear(512, 1024, torch.bfloat16)
    q = cls.from_linear(lin, **kwargs)
    state = q.state_dict()
    assert all(t.element_size() <= 2 for t in state.values() if t.numel() > 4096)  # no dense bf16 copy
    stored = sum(t.numel() * t.element_size() for t in state.values())
    assert stored == q.nbytes() and stored / (512 * 1024 * 2) <= limit


def test_model_to_dtype_keeps_packed_formats(tiny):
    model = quantize(copy.deepcopy(tiny), "fp8").to(torch.bfloat16)
    layer = model.model.layers[0].self_attn.o_proj
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale_inv.dtype == torch.float32
    assert layer.dtype == torch.bfloat16 and layer.effective_weight().dtype == torch.bfloat16
    with torch.no_grad():
        assert model(IDS).dtype == torch.bfloat16


@pytest.mark.parametrize("cls, kwargs", [(Int8Linear, {}), (Int4Linear, {"group_size": 32}), (FP8Linear, {})])
def test_effective_weight_is_kept_until_the_packed_tensors_change(cls, kwargs):
    """Absorbed MLA reads kv_b_proj's dense weight every layer, every token: made once, then the same tensor, and made
    again after a reload, an in-place change of the packed tensors, or a new compute dtype."""
    q = cls.from_linear(linear(64, 128, torch.bfloat16), **kwargs)
    first = q.effective_weight()
    assert torch.equal(first, q.dequantize(torch.bfloat16)) and q.effective_weight() is first
    other = cls.from_linear(linear(64, 128, torch.bfloat16, seed=1), **kwargs)
    q.load_state_dict(other.state_dict())
    assert torch.equal(q.effective_weight(), other.dequantize(torch.bfloat16))
    packed = next(t for t in q._buffers.values() if t is not None and t.dtype != torch.bfloat16)
    before = q.effective_weight()
    packed.view(torch.uint8)[0, 0] ^= 0x11  # a different code, changed in place
    after = q.effective_weight()
    assert after is not before and torch.equal(after, q.dequantize(torch.bfloat16)) and not torch.equal(after, before)
    assert q.to(torch.float32).effective_weight().dtype == torch.float32


def test_gradients_reach_the_input_through_the_reference_path():
    for q in (Int8Linear.from_linear(linear(32, 64)), Int4Linear.from_linear(linear(32, 64), group_size=32)):
        x = torch.randn(2, 64, requires_grad=True)
        q(x).sum().backward()  # the fused CPU ops have no derivative: "auto" must not pick them here
        assert torch.allclose(x.grad, q.dequantize(torch.float32).sum(0).expand(2, -1), atol=1e-5)


# ---------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_cpu_kernel_matches_reference(dtype):
    q = Int8Linear.from_linear(linear(48, 96, dtype))
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(0)).to(dtype)
    ref = q.forward_reference(x)
    q.impl = "kernel"
    assert rel(q(x), ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_int8_cpu_kernel_takes_misaligned_weights_and_inputs():
    """A weight at an arbitrary file offset (as safetensors reads it) or an input that is a view into a larger
    tensor: torch's AVX-512 int8 kernel crashed the process on such pointers from 4 rows up (int8.CPU_ALIGN).
    Placement copies the weight to an aligned one; the forward copies the input."""
    dense = Int8Linear.from_linear(linear(48, 96, torch.bfloat16))
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    storage = torch.zeros(state["weight"].numel() + 8, dtype=torch.int8)
    state["weight"] = storage[8:].view_as(state["weight"]).copy_(state["weight"])  # 8 bytes past an aligned start
    q = Int8Linear(96, 48, torch.bfloat16)
    q.load_state_dict(state, assign=True)
    assert q.weight.data_ptr() % 64 == 0 and torch.equal(q.weight, dense.weight)
    rows = torch.randn(5 * 96 + 4, generator=torch.Generator().manual_seed(0)).bfloat16()
    x = rows[4:].view(5, 96)  # 8 bytes past an aligned start
    assert x.data_ptr() % 64 and rel(q.forward_kernel(x), q.forward_reference(x)) < 1e-2


@pytest.mark.parametrize("group_size, in_dim", [(32, 96), (64, 256), (128, 200), (128, 64), (256, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_cpu_kernel_matches_reference(group_size, in_dim, dtype, monkeypatch):
    lin = linear(80, in_dim, dtype)  # 80 rows: one full 64-row block of the AVX512 layout and a partial one
    q = Int4Linear.from_linear(lin, group_size=group_size)  # in_dim 200 is padded to 256 for g128
    assert q.layout == "cpu" and q.scales is None  # repacked when placed: no second copy of the weights
    x = torch.randn(3, 50, in_dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    ref = q.forward_reference(x)
    q.impl = "kernel"
    assert rel(q(x), ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    q.impl, q.dense_above_rows = "auto", 100  # 150 rows > 100: dequantised once from the CPU layout, one matmul
    assert torch.equal(q(x), q.forward_dense(x)) and torch.equal(q(x[0, :20]), q.forward_kernel(x[0, :20]))
    assert rel(q(x), ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    # a large weight is dequantised in slabs of whole layout blocks (here one block each: the full block, then the
    # partial one): the same products, by smaller matmuls
    monkeypatch.setattr(dsv3.quant.int4, "CPU_SLAB_ELEMENTS", 1)
    assert rel(q.forward_dense(x), q(x)) < (1e-6 if dtype == torch.float32 else 1e-2)
    # the state dict (and so every checkpoint) sees the portable layout, exactly, and dequantize leaves the layout
    fresh = Int4Linear.from_linear(lin, group_size=group_size)
    fresh._unpack_kernel()
    portable = fresh.state_dict()
    assert all(torch.equal(portable[k], v) for k, v in q.state_dict().items()) and q.nbytes() == fresh.nbytes()
    assert torch.equal(q.dequantize(torch.float32), fresh.dequantize(torch.float32)) and q.layout == "cpu"


@pytest.mark.parametrize("out_dim, in_dim", [(256, 384), (200, 72)])  # whole 128-blocks; partial ones only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_cpu_path_matches_reference(out_dim, in_dim, dtype):
    """On a CPU FP8Linear's kernel is the bit-moving dequantisation + a float32 matmul: the reference's function up to
    the reference's own rounding of the weight to bf16, at any number of rows."""
    q = FP8Linear.from_linear(linear(out_dim, in_dim, dtype))
    assert q.kernel_ready and q.row_scales.shape == (out_dim, -(-in_dim // FP8_BLOCK)) and q.slab_rows >= out_dim
    exact = q.dequantize(torch.float32)
    x = torch.randn(70, in_dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    for m in (1, 3, 70):
        y = q(x[:m])
        path = q.forward_dense if m > q.dense_above_rows else q.forward_kernel  # dense: AVX-512 bf16, many rows
        assert y.dtype == dtype and torch.equal(y, path(x[:m]))
        assert rel(y, x[:m].float() @ exact.t()) < (1e-6 if dtype == torch.float32 else 4e-3)  # bf16 output
        assert rel(y, q.forward_reference(x[:m])) < (1e-6 if dtype == torch.float32 else 8e-3)
    # the dense path (the weight dequantised to x's dtype, the reference's bits) wherever it is forced, in slabs too
    q.dense_above_rows, ref = 0, q.forward_reference(x)
    for q.slab_rows in (q.slab_rows, 7):
        assert rel(q(x), ref) < (1e-6 if dtype == torch.float32 else 8e-3)
    q.slab_rows = q.out_features
    # a large weight is read in slabs of rows (here 7 rows, not dividing out_dim): the same products, summed in
    # another order by the smaller matmuls
    whole = q.forward_slabs(x.float())
    q.slab_rows = 7
    assert rel(q.forward_slabs(x.float()), whole) < 1e-6  # as the float32 kernel against the exact product above
    nan_weight = q.weight.view(torch.uint8).clone()
    nan_weight[0, 0] = 0x7F
    q.load_state_dict({"weight": nan_weight.view(torch.float8_e4m3fn), "weight_scale_inv": q.weight_scale_inv})
    assert not q.kernel_ready and q(x[:1])[0, 0].isnan()  # a NaN code: the reference path, which carries it


def test_fp8_cpu_path_compiles_to_the_eager_output():
    """The bit-moving read inside an inductor graph (as generate(compile=True) and the engine's compiled step take
    it): the same output as eager at 1 and 3 rows."""
    q = FP8Linear.from_linear(linear(256, 200, torch.bfloat16))
    compiled = torch.compile(q)
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        for m in (1, 3):
            assert torch.equal(compiled(x[:m]), q(x[:m]))


def test_fp8_activation_padding_has_the_layout_cublas_wants():
    """cuBLAS's blockwise fp8 GEMM rejects M = 1 (scale_a strides) and M = 2, 6 (no algorithm), runs M = 16, 32,
    128 (H200): every M is padded to a multiple of 16 with zero rows and scale_a is column-major at the padded M."""
    x = torch.randn(256, 384, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 384)
    for m in range(1, 257):
        xq, scale_a = quantize_activations(x[:m])
        m_pad = padded_rows(m)
        assert m_pad % FP8_ROW_MULTIPLE == 0 and 0 <= m_pad - m < FP8_ROW_MULTIPLE
        assert xq.shape == (m_pad, 384) and xq.dtype == torch.float8_e4m3fn and xq.is_contiguous()
        assert scale_a.shape == (m_pad, 3) and scale_a.stride() == (1, m_pad) and scale_a.dtype == torch.float32
        assert not xq[m:].float().any()  # the padding rows are zeros
    deq = xq[:256].float() * scale_a.repeat_interleave(FP8_BLOCK, dim=1)
    bound = 2.0 ** -4 * x.abs() + 2.0 ** -10 * scale_a.repeat_interleave(FP8_BLOCK, dim=1)
    assert ((deq - x).abs() <= bound).all()


def emulated_scaled_mm(xq, wq_t, scale_a, _a_kind, scale_b, _b_kind, output_dtype):
    """F.scaled_mm with BlockWise1x128 x BlockWise128x128 scales in plain torch: e4m3 products summed per
    128-wide K block in float32, scaled by the token's tile scale and the weight block's scale, then summed."""
    m, k = xq.shape
    n, kb = wq_t.shape[1], k // FP8_BLOCK
    xb = xq.float().view(m, kb, FP8_BLOCK)
    wb = wq_t.t().float().view(n, kb, FP8_BLOCK)
    partial = torch.einsum("mbk,nbk->mnb", xb, wb)  # [M, N, K/128]
    s_w = scale_b[:kb].t().repeat_interleave(FP8_BLOCK, dim=0)[:n]  # [N, K/128] from [K/128 padded, N/128]
    return (partial * scale_a[:, None, :] * s_w[None]).sum(-1).to(output_dtype)


def test_fp8_kernel_math_matches_reference_within_e4m3_rounding(monkeypatch):
    """FP8Linear's CUDA GEMM logic (padding, scale layouts, slicing) with scaled_mm emulated on CPU."""
    q = FP8Linear.from_linear(linear(256, 640, torch.bfloat16))  # K/128 = 5: scale_b rows padded to 8
    q._prepare_scaled_mm()
    assert q.scale_b.shape == (8, 2) and q.scale_b.stride() == (1, 8)
    monkeypatch.setattr(torch.nn.functional, "scaled_mm", emulated_scaled_mm)
    x = (torch.randn(37, 640, generator=torch.Generator().manual_seed(0)) * 2).to(torch.bfloat16)
    w = q.dequantize(torch.float32)
    for m in (1, 2, 3, 6, 16, 17, 37):
        y = q.forward_scaled_mm(x[:m])
        _, scale_a = quantize_activations(x[:m])
        ref = x[:m].float() @ w.t()
        assert y.shape == (m, 256) and y.dtype == torch.bfloat16
        assert ((y.float() - ref).abs() <= e4m3_bound(x[:m].float(), scale_a, w)).all()


# ---------------------------------------------------------------------------------------------- whole model
@pytest.mark.parametrize("scheme, kwargs, bound", [
    ("int8", {}, 0.05),  # per-channel 8-bit: ~0.7% weight error per layer
    ("fp8", {}, 0.10),  # 3 mantissa bits: ~3% per weight
    ("int4", {"group_size": 32}, 0.25),  # 16 levels per group: ~6% per weight, compounding over layers and routing
])
def test_quantized_tiny_model_logits_stay_close(tiny, scheme, kwargs, bound):
    with torch.no_grad():
        ref = tiny(IDS)
        model = quantize(copy.deepcopy(tiny), scheme, **kwargs)
        out = model(IDS)
        assert rel(out, ref) < bound
        # absorbed MLA folds kv_b_proj through effective_weight(): decoding one token agrees with the naive form
        cache = model.new_cache(2, 16)
        model(IDS[:, :-1], cache)
        step = model(IDS[:, -1:], cache, IDS.shape[1] - 1, attn_impl="absorb")
        assert rel(step[:, -1], model(IDS, attn_impl="naive")[:, -1]) < 1e-4


def test_every_projection_is_quantized_including_routed_experts(tiny):
    model = quantize(copy.deepcopy(tiny), "int8")
    names = set(quantized_layers(model))
    linears = [n for n, m in tiny.named_modules() if isinstance(m, nn.Linear)]
    assert names == {n for n in linears if n != "lm_head"}
    moe = model.model.layers[1].mlp
    assert all(isinstance(getattr(e, p), Int8Linear) for e in moe.experts for p in ("gate_proj", "up_proj",
                                                                                     "down_proj"))
    assert isinstance(moe.shared_experts.down_proj, Int8Linear) and isinstance(model.mtp[0].eh_proj, Int8Linear)
    assert type(moe.gate) is type(tiny.model.layers[1].mlp.gate) and moe.gate.weight.dtype == torch.float32
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)


def test_skip_matches_name_parts():
    assert skipped("model.embed_tokens", ["embed"]) and skipped("lm_head", ["lm_head"])
    assert skipped("model.layers.1.mlp.gate", ["gate"])
    assert not skipped("model.layers.1.mlp.experts.0.gate_proj", ["gate"])
    assert skipped("model.layers.1.mlp.experts.0.gate_proj", ["gate_proj"])
    assert skipped("model.layers.0.self_attn.o_proj", ["layers.0."])


def test_errors_name_the_layer(tiny):
    model = copy.deepcopy(tiny)
    with pytest.raises(QuantizationError, match=r"q_b_proj \(in_features 32\).*pad=True"):
        quantize(model, "int4", group_size=64)
    assert not quantized_layers(model)  # checked before anything changed
    with pytest.raises(QuantizationError, match=r"unknown quantization scheme 'int3'.*'fp8', 'int4', 'int8'"):
        quantize(model, "int3")
    with pytest.raises(QuantizationError, match=r"group_size 48 not supported"):
        quantize(model, "int4", group_size=48)
    padded = quantize(model, "int4", group_size=64, pad=True)
    with pytest.raises(QuantizationError, match=r"already quantized \(model.layers.0.self_attn.q_a_proj is int4\)"):
        quantize(padded, "int8")
    q_b = padded.model.layers[0].self_attn.q_b_proj
    # one stored group of 64 over 32 columns and 32 zeros; the kernel runs the 32 columns in one group of 32
    assert q_b.padded_in == 64 and q_b.state_dict()["scales"].shape == (q_b.out_features, 1)
    assert (q_b.kernel_in, q_b.kernel_group) == (32, 32) and q_b.qweight.numel() == q_b.out_features * 32 // 2


@pytest.mark.parametrize("scheme, kwargs", [("int8", {}), ("int4", {"group_size": 32, "pad": True}), ("fp8", {})])
def test_compiled_decode_gives_the_eager_tokens(scheme, kwargs):
    """generate(compile=True) through quantized layers (CPU kernels in the graph, the routed experts without a
    host read; fp8's from their stacks, gathered) gives the eager tokens. The slowest test here (~30-70 s each,
    cold: CPU prefill and decode both compile), on the smallest model that still routes as V3 does."""
    torch.manual_seed(0)
    config = dsv3.ModelConfig.tiny(**COMPILE_SIZED)
    model = quantize(dsv3.Transformer(config).eval(), scheme, **kwargs)
    for layer in model.modules():  # the fused kernel at every row count, whatever this CPU's crossover for fp32
        if isinstance(layer, QuantizedLinear) and layer.kernel_ready:
            layer.dense_above_rows = sys.maxsize
    prompt = torch.randint(3, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    eager = dsv3.generate(model, prompt, 6)
    assert torch.equal(dsv3.generate(model, prompt, 6, compile=True), eager)


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("scheme, kwargs", [("int8", {}), ("int4", {"group_size": 64, "pad": True}), ("fp8", {})])
def test_quantized_checkpoint_round_trips(tiny, tmp_path, scheme, kwargs):
    model = quantize(copy.deepcopy(tiny), scheme, **kwargs)
    with torch.no_grad():
        expected = model(IDS)  # int4 now holds the CPU kernel layout; saving must still write the portable one
    save_quantized(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    if scheme == "fp8":
        assert config == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                          "weight_block_size": [128, 128]}
    else:
        assert config["quant_method"] == "dsv3" and config["scheme"] == scheme
    loaded = dsv3.load_pretrained(tmp_path, keep_fp8=scheme == "fp8")
    assert set(quantized_layers(loaded)) == set(quantized_layers(model))
    with torch.no_grad():
        assert torch.equal(loaded(IDS), expected)


def test_keep_fp8_keeps_deepseek_fp8_checkpoint_in_fp8(tiny, tmp_path):
    tensors = hub_state_dict(tiny)
    for key in list(tensors):  # DeepSeek's release: projections in e4m3, head/embedding/router/eh_proj in bf16
        keep = any(s in key for s in ("embed_tokens", "lm_head", "shared_head.head", "mlp.gate.", "eh_proj"))
        if key.endswith("proj.weight") and not keep:
            tensors[key], tensors[key + "_scale_inv"] = quantize_fp8(tensors[key])
    save_file(tensors, tmp_path / "model.safetensors")
    tiny.config.to_json(tmp_path / "config.json")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))

    kept = dsv3.load_pretrained(tmp_path, keep_fp8=True)
    dense = dsv3.load_pretrained(tmp_path, dtype=torch.float32)  # the upcasting path
    experts = kept.model.layers[2].mlp.experts
    assert isinstance(experts[3].up_proj, FP8Linear) and experts[3].up_proj.weight.dtype == torch.float8_e4m3fn
    assert isinstance(kept.mtp[0].eh_proj, nn.Linear) and kept.lm_head.weight.dtype == torch.float32
    fp8_bytes = sum(m.weight.numel() for m in quantized_layers(kept).values())
    assert fp8_bytes == sum(t.numel() for k, t in tensors.items() if t.dtype == torch.float8_e4m3fn)
    for moe in (*dense.modules(), *kept.modules()):  # one expert dispatch for both (fast paths round differently)
        if isinstance(moe, MoE):
            moe.path = "loop"
    with torch.no_grad():
        assert torch.equal(kept(IDS), dense(IDS))


@pytest.mark.parametrize("scheme, kwargs", [("int8", {}), ("int4", {"group_size": 32}), ("fp8", {})])
def test_quantizing_weights_stored_by_columns_packs_them_by_rows(scheme, kwargs):
    """After a CPU decode (`dsv3.generate` stores long-output float32 weights by columns, dsv3.fast.arrange) a model
    quantizes to the same packed tensors, laid out for the kernels, and computes what it would have."""
    torch.manual_seed(0)
    model = dsv3.Transformer(dsv3.ModelConfig.tiny(intermediate_size=512)).eval()  # gate/up: 512 x 64
    arranged = dsv3.fast.arrange(copy.deepcopy(model))
    assert dsv3.fast.layout.by_columns(arranged.model.layers[0].mlp.gate_proj.weight)
    rows, columns = quantize(model, scheme, **kwargs), quantize(arranged, scheme, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(rows.state_dict().values(), columns.state_dict().values()))
    assert all(t.is_contiguous() for m in columns.modules() if isinstance(m, QuantizedLinear) for t in m.buffers())
    with torch.no_grad():
        assert torch.equal(columns(IDS), rows(IDS))


def test_keep_fp8_refuses_a_checkpoint_without_fp8(tiny, tmp_path):
    dsv3.save_pretrained(tiny, tmp_path)
    with pytest.raises(QuantizationError, match="keep_fp8=True but config.json's quantization_config is None"):
        dsv3.load_pretrained(tmp_path, keep_fp8=True)


def test_cli_quantize(tiny, tmp_path, capsys):
    dsv3.save_pretrained(tiny, tmp_path / "src")
    (tmp_path / "src" / "tokenizer.json").write_text("{}")
    assert cli_main(["quantize", "--model", str(tmp_path / "src"), "--scheme", "int4", "--group-size", "32",
                     "--output", str(tmp_path / "out")]) == 0
    assert "int4: 105 layers quantized" in capsys.readouterr().out
    assert (tmp_path / "out" / "tokenizer.json").exists()
    with pytest.raises(SystemExit, match=r"dsv3 quantize: int4 group_size 128 does not divide .*q_a_proj"):
        cli_main(["quantize", "--model", str(tmp_path / "src"), "--scheme", "int4", "--no-pad",
                  "--output", str(tmp_path / "o2")])
    loaded = dsv3.load_pretrained(tmp_path / "out")
    assert isinstance(loaded.model.layers[1].mlp.experts[7].down_proj, Int4Linear)
    assert loaded.model.layers[1].mlp.experts[7].down_proj.group_size == 32


def test_serve_quantize_flag(tmp_path):
    from argparse import Namespace
    from pathlib import Path

    from fastapi.testclient import TestClient

    from dsv3.server.cli import build_app, resolve_options

    torch.manual_seed(0)
    dsv3.save_pretrained(dsv3.Transformer(dsv3.ModelConfig.tiny(vocab_size=8192)), tmp_path)  # bundled tokenizer's
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((Path(dsv3.__file__).parent / "bundled" / name).read_bytes())
    app = build_app(resolve_options(Namespace(model=str(tmp_path), served_model_name="tiny", quantize="int4")))
    model = app.state.dsv3.engine.model
    assert isinstance(model.model.layers[2].mlp.experts[5].up_proj, Int4Linear)
    with TestClient(app, base_url="http://localhost") as client:  # a loopback Host (--allowed-hosts default)
        reply = client.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 3})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 3


def test_int4_kernel_width_pads_to_32_columns_not_to_a_group():
    """The kernels run K columns in groups of g (K % g == 0, g divides the stored group): no more padding than 32
    needs, the stored group size where it divides the width."""
    assert kernel_width(7168, 128) == (7168, 128) and kernel_width(256, 32) == (256, 32)
    assert kernel_width(96, 128) == (96, 32) and kernel_width(64, 128) == (64, 64)
    assert kernel_width(200, 128) == (224, 32) and kernel_width(100, 256) == (128, 128)
    q = Int4Linear.from_linear(torch.nn.Linear(96, 64, bias=False), group_size=128)
    x = torch.randn(5, 96)
    torch.testing.assert_close(q.forward_kernel(x), q.forward_reference(x), rtol=1e-5, atol=1e-5)
    assert q.qweight.numel() == 64 * 96 // 2  # the kernel layout holds 96 columns, not 128


@pytest.mark.parametrize("group_size, in_dim", [(32, 256), (128, 64), (128, 200)])
def test_int4_kernel_layout_unpacks_through_the_kernel_where_no_inverse_is_known(group_size, in_dim, monkeypatch):
    """Without a known inverse of the kernel layout (CUDA's tiles always; a CPU whose block size is not in
    CPU_BLOCKS), the portable tensors come back by running the kernel on rows of the identity: exactly, padded widths
    included, and the layer keeps its kernel but no dense path."""
    lin = linear(48, in_dim, torch.float32)
    fresh = Int4Linear.from_linear(lin, group_size=group_size)
    fresh._unpack_kernel()  # through the known inverse
    monkeypatch.setattr(dsv3.quant.int4, "CPU_BLOCKS", ())
    q = Int4Linear.from_linear(lin, group_size=group_size)
    assert q.layout == "cpu" and q.cpu_block is None and q.dense_above_rows == sys.maxsize
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in q.state_dict().items())
    x = torch.randn(4, in_dim)
    assert rel(q(x), fresh.forward_reference(x)) < 1e-5


def test_int4_portable_layout_is_row_major_after_the_cpu_kernel_layout():
    """A CPU-placed int4 layer unpacks from the kernel layout (a transpose) into contiguous nibbles: `.cuda()` packs
    them with aten._convert_weight_to_int4pack, which refuses strided input (seen on an H200)."""
    lin = torch.nn.Linear(256, 64, bias=False)
    q = Int4Linear.from_linear(lin, group_size=32)
    q._unpack_kernel()
    assert q.layout == "plain" and q.qweight.is_contiguous()


def test_int4_stores_no_padded_columns_and_loads_old_padded_files_too():
    """A 96-wide layer in groups of 128 stores qweight [out, 48], not [out, 64]; both forms load to the same layer."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 32, bias=False)
    q = Int4Linear.from_linear(lin, group_size=128)
    state = q.state_dict()
    assert state["qweight"].shape == (32, 48)
    assert q.nbytes() == sum(t.numel() * t.element_size() for t in state.values())
    x = torch.randn(3, 96)
    for stored in (state, {**state, "qweight": F.pad(state["qweight"], (0, 16), value=0x88)}):
        fresh = Int4Linear(96, 32, group_size=128, dtype=torch.float32)
        fresh.load_state_dict(stored)
        torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)


def test_dense_above_rows_takes_the_most_specific_measured_crossover(monkeypatch):
    """The crossover is chosen when a layer is placed: by CPU kernel level and compute dtype where measured."""
    from dsv3.quant import base

    table = {"cpu": 64, "cpu/avx2": 8, "cpu/avx2/float32": 0, "cuda": 16}
    cpu = torch.device("cpu")
    monkeypatch.setattr(base, "cpu_capability", lambda: "avx2")
    assert base.placement_entry(table, cpu, torch.float32) == 0
    assert base.placement_entry(table, cpu, torch.bfloat16) == 8
    assert base.placement_entry(table, torch.device("cuda"), torch.bfloat16) == 16
    assert base.placement_entry(table, torch.device("meta"), torch.bfloat16) == sys.maxsize
    monkeypatch.setattr(base, "cpu_capability", lambda: "avx512")
    assert base.placement_entry(table, cpu, torch.float32) == 64
    q = Int8Linear.from_linear(linear(16, 32, torch.float32))  # placed under the patched level
    assert q.dense_above_rows == Int8Linear.DENSE_ABOVE_ROWS["cpu"]
    # int4's dense path costs ~as much as dequantising 32768 weights on top of the weight's own: small layers
    # switch later (128 rows for a large layer, 384 for 64x256, 149 for 768x256)
    sizes = [(64, 256), (768, 256), (2048, 2048)]
    layers = [Int4Linear.from_linear(linear(*size, torch.bfloat16), group_size=32) for size in sizes]
    assert [q.dense_above_rows for q in layers] == [384, 149, 129]
    assert Int4Linear.from_linear(linear(64, 256, torch.float32), group_size=32).dense_above_rows == 128
