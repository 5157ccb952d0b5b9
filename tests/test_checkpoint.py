"""Checkpoint loading: FP8 block-scaled weights, sharded indexes, MTP layer mapping, and errors that name the fault."""

import json

import pytest
import torch
from safetensors.torch import save_file

import dsv3
from dsv3.checkpoint import CheckpointError, dequantize_fp8, hub_state_dict
from dsv3.hub import dequantize_fp8_reference, e4m3_nan_codes, e4m3_to_half_scaled

FP8_MAX = 448.0  # largest float8_e4m3fn


def quantize_fp8_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's weight format: e4m3 values and one float32 scale per 128x128 block (amax / 448)."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    padded = torch.zeros(rows * block, cols * block)
    padded[:w.shape[0], :w.shape[1]] = w
    blocks = padded.view(rows, block, cols, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX  # [rows, cols]
    q = (blocks / scale[:, None, :, None]).view_as(padded)[:w.shape[0], :w.shape[1]]
    return q.to(torch.float8_e4m3fn), scale


def test_dequantize_non_aligned_blocks():
    w = torch.randn(300, 200)
    q, scale = quantize_fp8_blocks(w)
    assert scale.shape == (3, 2)
    deq = dequantize_fp8(q, scale, torch.float32)
    expected = q.float() * scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    assert torch.equal(deq, expected)
    assert (deq - w).norm() / w.norm() < 0.04  # e4m3 keeps 3 mantissa bits: ~2-3% rms error
    with pytest.raises(CheckpointError, match=r"expected \(3, 2\)"):
        dequantize_fp8(q, scale[:2], torch.float32)


@pytest.mark.parametrize("flush_denormal", [False, True])
def test_e4m3_bit_read_is_torchs_cast_for_every_code(flush_denormal):
    """The CPU fast read (bits moved into a float16) against torch's float8 cast, all 256 codes: subnormals included,
    also with flush-to-zero on (a float32 target would lose them there); the NaN codes are the ones it flags."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    nan = codes.float().isnan()
    if flush_denormal and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        fast = e4m3_to_half_scaled(codes).float() * 2.0 ** 8
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(fast[~nan], codes.float()[~nan]) and nan.sum() == 2
    assert e4m3_nan_codes(codes) and not e4m3_nan_codes(codes[~nan])
    assert e4m3_nan_codes(codes[0x7F:0x80]) and e4m3_nan_codes(codes[0xFF:])


def test_fp8_dequantisation_falls_back_to_the_definition_where_the_bit_read_cannot_go():
    q, scale = quantize_fp8_blocks(torch.randn(130, 260))
    for weight, scale_inv in ((q, scale * 2.0 ** 127),  # scales · 2^8 would overflow float32
                              (q.view(torch.uint8).index_fill(1, torch.tensor([5]), 0xFF).view(q.dtype), scale)):
        expected = dequantize_fp8_reference(weight, scale_inv, torch.float32)
        torch.testing.assert_close(dequantize_fp8(weight, scale_inv, torch.float32), expected, rtol=0, atol=0,
                                   equal_nan=True)
    assert expected[:, 5].isnan().all()  # the NaN codes read as NaN


def tiny_model() -> dsv3.Transformer:
    torch.manual_seed(0)
    return dsv3.Transformer(dsv3.ModelConfig.tiny()).eval()


def test_fp8_checkpoint_is_dequantised_on_load(tmp_path):
    model = tiny_model()
    tensors = hub_state_dict(model)
    dequantised = {}
    for key in list(tensors):
        skip = any(s in key for s in ("embed_tokens", "lm_head", "shared_head.head", "mlp.gate.", "eh_proj"))
        if key.endswith("proj.weight") and not skip:
            q, scale = quantize_fp8_blocks(tensors[key].float())
            tensors[key], tensors[key + "_scale_inv"] = q, scale
            dequantised[key] = q.float() * scale[0, 0]  # tiny weights are a single block
    assert any(".mlp.experts." in k for k in dequantised) and any("model.layers.3." in k for k in dequantised)
    save_file(tensors, tmp_path / "model.safetensors")
    model.config.to_json(tmp_path / "config.json")
    config = model.config.to_hf()
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = dsv3.load_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.config.quantization_config is None  # dequantised: saving it again writes plain weights
    state = hub_state_dict(loaded)
    for key, expected in dequantised.items():
        assert torch.equal(state[key], expected), key


def test_sharded_checkpoint_with_mtp_layer(tmp_path):
    model = tiny_model()
    tensors = hub_state_dict(model)
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: tensors[k] for k in part}, tmp_path / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model.config.to_json(tmp_path / "config.json")
    loaded = dsv3.load_pretrained(tmp_path)
    assert "model.layers.3.eh_proj.weight" in tensors  # the MTP layer is stored after the 3 main layers
    assert torch.equal(loaded.mtp[0].eh_proj.weight, model.mtp[0].eh_proj.weight)
    ids = torch.randint(0, 1024, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


@pytest.fixture
def saved(tmp_path):
    dsv3.save_pretrained(tiny_model(), tmp_path)
    return tmp_path


def rewrite(path, edit):
    from safetensors.torch import load_file
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_key_is_named(saved):
    rewrite(saved, lambda t: t.pop("model.layers.1.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: model\.layers\.1\.self_attn\.kv_b_proj\.weight"):
        dsv3.load_pretrained(saved)


def test_unexpected_key_is_named(saved):
    rewrite(saved, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: model\.layers\.0\.mlp\.extra\.weight"):
        dsv3.load_pretrained(saved)


def test_shape_mismatch_names_key_and_shapes(saved):
    rewrite(saved, lambda t: t.update({"lm_head.weight": torch.zeros(10, 64)}))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight has shape \(10, 64\), expected \(1024, 64\)"):
        dsv3.load_pretrained(saved)


def test_truncated_file(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        dsv3.load_pretrained(saved)


def test_unsupported_model_type(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    with pytest.raises(ValueError, match="unsupported model_type 'qwen2'"):
        dsv3.load_pretrained(saved)


def test_pickles_are_refused(tmp_path):
    dsv3.ModelConfig.tiny().to_json(tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
        dsv3.load_pretrained(tmp_path)


def test_bf16_save_keeps_router_in_fp32(tmp_path):
    dsv3.save_pretrained(tiny_model(), tmp_path, dtype=torch.bfloat16)
    loaded = dsv3.load_pretrained(tmp_path)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    gate = loaded.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
