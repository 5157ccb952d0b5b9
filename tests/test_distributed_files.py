"""The tensor-parallel loader (dsv3/distributed/checkpoint.py, forced with parallel=True at world size 1: the code
every rank runs) against the single-process one on checkpoint files that are not what they claim: each refuses
the same files with the same one-line CheckpointError naming the file and key, and converts mixed float dtypes
the same way."""

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3.checkpoint import CheckpointError, hub_state_dict
from dsv3.quant import quantize, save_quantized

from test_checkpoint_files import IDS, INDEX, NORM, Q, SHARDS, tiny_model
from test_checkpoint_files import write_sharded as write_tensors_sharded

O_PROJ = "model.layers.0.self_attn.o_proj.weight"


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def rewrite(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def write_sharded(path, model, index=None) -> None:
    write_tensors_sharded(path, hub_state_dict(model), model.config, index)


def same_error(path, expected: str, **kwargs) -> str:
    """The CheckpointError of both loaders (one line, the same words), checked to contain `expected` (a regex)."""
    messages = []
    for parallel in (False, True):
        with pytest.raises(CheckpointError) as info:
            dsv3.load_pretrained(path, parallel=parallel, **kwargs)
        messages.append(str(info.value))
    single, parallel = messages
    assert parallel == single and "\n" not in single
    assert re.search(expected, single), single
    return single


@pytest.fixture
def saved(tmp_path):
    dsv3.save_pretrained(tiny_model(), tmp_path, dtype=torch.bfloat16)
    return tmp_path


@pytest.fixture
def fp8(tmp_path):
    save_quantized(quantize(tiny_model(), "fp8"), tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------- the files
def test_truncated_file_is_named(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[:len(data) // 2])
    message = same_error(saved, "truncated or corrupt safetensors file")
    assert message.startswith(f"{saved / 'model.safetensors'}: ")


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd"])
def test_index_naming_a_file_outside_the_directory_is_refused(tmp_path, name):
    model = tiny_model()
    save_file(hub_state_dict(model), tmp_path / "outside.safetensors")  # what `..` would reach
    write_sharded(tmp_path / "ckpt", model, index={"weight_map": {"lm_head.weight": name}})
    message = same_error(tmp_path / "ckpt", "expected the plain name of a file")
    assert message.startswith(str(tmp_path / "ckpt" / INDEX))


def test_key_in_two_shards_is_refused_naming_both(tmp_path):
    write_sharded(tmp_path, tiny_model())
    first, second = load_file(tmp_path / SHARDS[0]), load_file(tmp_path / SHARDS[1])
    key = sorted(second)[0]
    save_file({**first, key: torch.zeros_like(second[key])}, tmp_path / SHARDS[0])
    message = same_error(tmp_path, re.escape(f"{key} is stored twice"))
    assert str(tmp_path / SHARDS[0]) in message and str(tmp_path / SHARDS[1]) in message


def test_unexpected_key_is_refused(saved):
    rewrite(saved, lambda t: t.update({"model.layers.0.self_attn.extra.weight": torch.zeros(2)}))
    same_error(saved, r"does not match config.json \(unexpected keys: model.layers.0.self_attn.extra.weight\)")


# ------------------------------------------------------------------------------------------------ tensor dtypes
@pytest.mark.parametrize("key, dtype", [(O_PROJ, torch.int32), (NORM, torch.bool),
                                        ("model.layers.1.mlp.gate.weight", torch.int8),
                                        (Q + ".weight", torch.float8_e5m2)])
def test_tensor_of_a_wrong_dtype_is_refused(saved, key, dtype):
    rewrite(saved, lambda t: t.update({key: (t[key] * 100).to(dtype)}))
    assert same_error(saved, "expected a floating-point dtype", dtype=torch.float32) == (
        f"{saved / 'model.safetensors'}: {key} has dtype {str(dtype)[6:]}, expected a floating-point dtype "
        "(bfloat16, float16 or float32)")


def test_mixed_float_dtypes_load_as_one(saved):
    rewrite(saved, lambda t: t.update({NORM: t[NORM].float(), O_PROJ: t[O_PROJ].half()}))
    for dtype in (None, torch.float32):
        single = dsv3.load_pretrained(saved, dtype=dtype, parallel=False)
        parallel = dsv3.load_pretrained(saved, dtype=dtype, parallel=True)
        want = {n: t.dtype for n, t in single.state_dict().items()}
        assert {n: t.dtype for n, t in parallel.state_dict().items()} == want
        assert set(want.values()) == {dtype or torch.bfloat16, torch.float32}
        with torch.no_grad():
            assert torch.equal(parallel(IDS), single(IDS))


def test_quantized_tensor_of_a_wrong_dtype_is_refused(tmp_path):
    save_quantized(quantize(tiny_model(), "int8"), tmp_path)
    rewrite(tmp_path, lambda t: t.update({Q + ".weight": t[Q + ".weight"].float()}))
    assert same_error(tmp_path, "expected int8") == (f"{tmp_path / 'model.safetensors'}: {Q}.weight has dtype "
                                                      "float32, expected int8")


# -------------------------------------------------------------------------------------------------------- FP8
def test_fp8_weight_without_its_scale_is_refused(fp8):
    rewrite(fp8, lambda t: t.pop(Q + ".weight_scale_inv"))
    assert same_error(fp8, "beside it") == (f"{fp8 / 'model.safetensors'}: FP8 weight {Q}.weight has no "
                                            f"{Q}.weight_scale_inv beside it")
    assert same_error(fp8, "expected a floating-point dtype", keep_fp8=True).startswith(
        f"{fp8 / 'model.safetensors'}: {Q}.weight has dtype float8_e4m3fn")


def test_fp8_scale_without_its_weight_is_refused(fp8):
    rewrite(fp8, lambda t: t.update({Q + ".weight": t[Q + ".weight"].to(torch.bfloat16)}))
    same_error(fp8, re.escape(f"{Q}.weight_scale_inv has no FP8 weight beside it"))


def test_fp8_scale_of_a_wrong_shape_is_refused(fp8):
    rewrite(fp8, lambda t: t.update({Q + ".weight_scale_inv": torch.ones(3, 3)}))
    assert same_error(fp8, r"expected \(1, 1\)").startswith(f"{fp8 / 'model.safetensors'}: {Q}.weight_scale_inv")


def test_fp8_dequantises_to_the_embedding_dtype(fp8):
    rewrite(fp8, lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"].float()}))
    single, parallel = (dsv3.load_pretrained(fp8, parallel=p) for p in (False, True))
    assert parallel.state_dict()[Q + ".weight"].dtype == single.state_dict()[Q + ".weight"].dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(parallel(IDS), single(IDS))
