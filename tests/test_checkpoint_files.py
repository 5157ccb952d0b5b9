"""Checkpoint files that are not what they claim: saves over an earlier (sharded) save, malformed indexes, shards
outside the directory, duplicate keys, shards the index disagrees with, tensors of the wrong dtype, NaN or inf
values, bad quantization configs. Each gets a one-line CheckpointError naming the file and key, never a raw
torch/safetensors error or a silently wrong model."""

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
import dsv3.hub
from dsv3.checkpoint import CheckpointError, hub_state_dict
from dsv3.cli import main as cli_main
from dsv3.quant import QuantizationError, quantize, save_quantized

INDEX = "model.safetensors.index.json"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
NORM = "model.layers.0.input_layernorm.weight"
Q = "model.layers.0.self_attn.q_b_proj"
IDS = torch.tensor([[0, 5, 17, 300]])


def tiny_model(seed: int = 0) -> dsv3.Transformer:
    torch.manual_seed(seed)
    return dsv3.Transformer(dsv3.ModelConfig.tiny()).eval()


def write_sharded(path, tensors: dict, config: dsv3.ModelConfig, index=None) -> None:
    """tensors split over SHARDS with an index (or `index` as given, written as JSON)."""
    path.mkdir(parents=True, exist_ok=True)
    keys = sorted(tensors)
    parts = dict(zip(SHARDS, (keys[::2], keys[1::2])))
    for name, part in parts.items():
        save_file({k: tensors[k] for k in part}, path / name)
    if index is None:
        index = {"weight_map": {k: name for name, part in parts.items() for k in part}}
    (path / INDEX).write_text(json.dumps(index))
    config.to_json(path / "config.json")


def rewrite(path, edit, config_edit=None) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")
    if config_edit:
        config = json.loads((path / "config.json").read_text())
        config_edit(config)
        (path / "config.json").write_text(json.dumps(config))


def load_error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        dsv3.load_pretrained(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------- saving over a checkpoint
def test_save_over_a_sharded_checkpoint_replaces_it(tmp_path):
    old, new = tiny_model(0), tiny_model(1)
    write_sharded(tmp_path, hub_state_dict(old), old.config)
    for name in ("tokenizer.json", "trainer_state.json", "other.safetensors"):
        (tmp_path / name).write_text("{}")
    dsv3.save_pretrained(new, tmp_path)
    assert not (tmp_path / INDEX).exists() and not any((tmp_path / name).exists() for name in SHARDS)
    for name in ("tokenizer.json", "trainer_state.json", "other.safetensors"):  # not the earlier save's weights
        assert (tmp_path / name).read_text() == "{}"
    loaded = dsv3.load_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS), new(IDS))


def test_save_writes_the_weights_before_config_and_an_interrupted_save_keeps_the_old_checkpoint(tmp_path,
                                                                                               monkeypatch):
    old = tiny_model(0)
    write_sharded(tmp_path, hub_state_dict(old), old.config)
    config_before = (tmp_path / "config.json").read_text()
    written = []
    real = dsv3.hub.write_file

    def recording(target, write):
        written.append(target.name)
        real(target, write)
    monkeypatch.setattr(dsv3.hub, "write_file", recording)
    changed = tiny_model(1)
    changed.config = dataclasses.replace(changed.config, rms_norm_eps=1e-5)

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(dsv3.hub, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        dsv3.save_pretrained(changed, tmp_path)
    assert (tmp_path / "config.json").read_text() == config_before  # no new config over the old weights
    assert (tmp_path / INDEX).exists() and all((tmp_path / name).exists() for name in SHARDS)
    with torch.no_grad():
        assert torch.equal(dsv3.load_pretrained(tmp_path)(IDS), old(IDS))
    monkeypatch.undo()
    written.clear()
    monkeypatch.setattr(dsv3.hub, "write_file", recording)
    dsv3.save_pretrained(old, tmp_path)
    assert written == ["model.safetensors", "config.json"]


def test_save_onto_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("mine")
    for target in (tmp_path / "out", tmp_path / "out" / "sub"):
        with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'out'}: a file is there")):
            dsv3.save_pretrained(tiny_model(), target)
    assert (tmp_path / "out").read_text() == "mine"


def test_cli_quantize_refuses_a_non_empty_output(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "optimizer.pt").write_bytes(b"state")
    (out / "trainer_state.json").write_text("{}")
    with pytest.raises(SystemExit, match=re.escape(f"--output {out}: not empty (holds optimizer.pt, "
                                                   "trainer_state.json)")):
        cli_main(["quantize", "--model", "dsv3/bundled", "--scheme", "int8", "--output", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["optimizer.pt", "trainer_state.json"]


# ------------------------------------------------------------------------------------------ malformed indexes
@pytest.mark.parametrize("index, expected", [
    ([1], "not a safetensors index"),
    ({"weight_map": [1]}, "not a safetensors index"),
    ({"weight_map": {"lm_head.weight": 5}}, r"weight_map\['lm_head.weight'\] is 5; expected a shard file name"),
    ({"weight_map": {"lm_head.weight": "/etc/passwd"}}, "expected the plain name of a file"),
    ({"weight_map": {"lm_head.weight": "../outside.safetensors"}}, "expected the plain name of a file"),
    ({"weight_map": {"lm_head.weight": "."}}, "expected the plain name of a file"),
])
def test_malformed_index_is_refused_naming_it(tmp_path, index, expected):
    model = tiny_model()
    save_file(hub_state_dict(model), tmp_path / "outside.safetensors")  # what a `..` name would reach
    write_sharded(tmp_path / "ckpt", hub_state_dict(model), model.config, index=index)
    message = load_error(tmp_path / "ckpt")
    assert message.startswith(str(tmp_path / "ckpt" / INDEX)) and re.search(expected, message)


@pytest.mark.parametrize("sharded", [False, True])
def test_weights_file_that_is_a_directory_is_named(tmp_path, sharded):
    model = tiny_model()
    if sharded:
        write_sharded(tmp_path, hub_state_dict(model), model.config)
        (tmp_path / SHARDS[1]).unlink()
        (tmp_path / SHARDS[1]).mkdir()
    else:
        model.config.to_json(tmp_path / "config.json")
        (tmp_path / "model.safetensors").mkdir()
    bad = tmp_path / (SHARDS[1] if sharded else "model.safetensors")
    assert load_error(tmp_path).startswith(f"{bad}: a directory")


@pytest.mark.parametrize("parallel", [False, True])  # the tensor-parallel loader reads the same headers
@pytest.mark.parametrize("moved", [False, True])
def test_shard_holding_a_key_its_index_does_not_list_there_is_refused(tmp_path, monkeypatch, parallel, moved):
    """A stale index: a shard holds a tensor the index does not list (moved: lists under the other shard)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = tiny_model()
    write_sharded(tmp_path, hub_state_dict(model), model.config)
    index = json.loads((tmp_path / INDEX).read_text())
    first, second = load_file(tmp_path / SHARDS[0]), load_file(tmp_path / SHARDS[1])
    key = sorted(second)[0]
    if moved:  # the shards still hold every tensor once: only the index's word for where it lives is wrong
        save_file({**first, key: second.pop(key)}, tmp_path / SHARDS[0])
        save_file(second, tmp_path / SHARDS[1])
    else:
        del index["weight_map"][key]
    (tmp_path / INDEX).write_text(json.dumps(index))
    shard = SHARDS[0] if moved else SHARDS[1]
    where = f"lists under {SHARDS[1]}" if moved else "does not list"
    assert load_error(tmp_path, parallel=parallel) == (
        f"{tmp_path / shard}: holds {key}, which {INDEX} {where}; the index and its shards disagree (expected each "
        "shard to hold only the keys the index lists under it)")


def test_key_in_two_shards_is_refused_naming_both(tmp_path):
    model = tiny_model()
    tensors = hub_state_dict(model)
    write_sharded(tmp_path, tensors, model.config)
    first = load_file(tmp_path / SHARDS[0])
    key = sorted(load_file(tmp_path / SHARDS[1]))[0]
    save_file({**first, key: torch.zeros_like(tensors[key])}, tmp_path / SHARDS[0])
    message = load_error(tmp_path)
    assert key in message and str(tmp_path / SHARDS[0]) in message and str(tmp_path / SHARDS[1]) in message


# ------------------------------------------------------------------------------------------------ tensor dtypes
@pytest.fixture
def saved(tmp_path):
    dsv3.save_pretrained(tiny_model(), tmp_path, dtype=torch.bfloat16)
    return tmp_path


@pytest.mark.parametrize("key, dtype, load_dtype", [
    (NORM, torch.int32, None),
    (NORM, torch.bool, None),
    ("model.embed_tokens.weight", torch.int64, torch.bfloat16),
    ("model.layers.1.mlp.gate.weight", torch.int8, None),
    (Q + ".weight", torch.float8_e5m2, None),
])
def test_tensor_of_a_wrong_dtype_is_refused(saved, key, dtype, load_dtype):
    rewrite(saved, lambda t: t.update({key: t[key].to(dtype)}))
    assert load_error(saved, dtype=load_dtype) == (f"{saved / 'model.safetensors'}: {key} has dtype "
                                                   f"{str(dtype)[6:]}, expected a floating-point dtype "
                                                   "(bfloat16, float16 or float32)")


def test_a_float_tensor_of_another_dtype_is_converted(saved):
    rewrite(saved, lambda t: t.update({NORM: t[NORM].float(), Q + ".weight": t[Q + ".weight"].half()}))
    model = dsv3.load_pretrained(saved)
    assert {p.dtype for n, p in model.state_dict().items() if ".mlp.gate." not in n} == {torch.bfloat16}
    with torch.no_grad():
        assert model(IDS).isfinite().all()


def fp8_checkpoint(path):
    save_quantized(quantize(tiny_model(), "fp8"), path)
    return path


def test_fp8_scale_shape_error_names_file_and_key(tmp_path):
    path = fp8_checkpoint(tmp_path)
    rewrite(path, lambda t: t.update({Q + ".weight_scale_inv": torch.ones(3, 3)}))
    message = load_error(path)
    assert message.startswith(f"{path / 'model.safetensors'}: {Q}.weight_scale_inv") and "expected (1, 1)" in message


def test_keep_fp8_missing_scale_is_refused(tmp_path):
    path = fp8_checkpoint(tmp_path)
    rewrite(path, lambda t: t.pop(Q + ".weight_scale_inv"))
    assert load_error(path, keep_fp8=True).startswith(
        f"{path / 'model.safetensors'}: {Q}.weight has dtype float8_e4m3fn, expected a floating-point dtype")
    assert f"{Q}.weight has no {Q}.weight_scale_inv beside it" in load_error(path)


def test_keep_fp8_plain_weight_beside_a_scale_is_refused(tmp_path):
    path = fp8_checkpoint(tmp_path)
    rewrite(path, lambda t: t.update({Q + ".weight": t[Q + ".weight"].to(torch.bfloat16)}))
    assert load_error(path, keep_fp8=True) == (f"{path / 'model.safetensors'}: {Q}.weight has dtype bfloat16, "
                                               "expected float8_e4m3fn")
    assert f"{Q}.weight_scale_inv has no FP8 weight beside it" in load_error(path)


# ---------------------------------------------------------------------------------------------- non-finite values
def set_values(tensor: torch.Tensor, values) -> torch.Tensor:
    """`tensor` with its first len(values) elements replaced (a copy; FP8 tensors set as their bytes)."""
    out = tensor.clone()
    flat = out.view(torch.uint8).view(-1) if out.dtype == torch.float8_e4m3fn else out.view(-1)
    flat[:len(values)] = torch.tensor(values, dtype=flat.dtype)
    return out


def non_finite(file, key, count: int) -> str:
    return f"{file}: {key} holds {count} non-finite values (NaN or inf); expected finite values"


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("key, values", [
    (NORM, [NAN]),
    (Q + ".weight", [INF, 1.0, -INF, NAN]),
    ("model.layers.1.mlp.gate.weight", [NAN, NAN]),  # float32, the router's
    ("model.layers.3.eh_proj.weight", [-INF]),  # the MTP layer's
])
def test_non_finite_values_are_refused_naming_file_and_key(saved, key, values):
    rewrite(saved, lambda t: t.update({key: set_values(t[key], values)}))
    count = sum(v != v or abs(v) == INF for v in values)
    assert load_error(saved) == non_finite(saved / "model.safetensors", key, count)


def test_non_finite_values_in_a_shard_are_refused_naming_the_shard(tmp_path):
    model = tiny_model()
    tensors = hub_state_dict(model)
    tensors[NORM] = set_values(tensors[NORM], [NAN, 0.0, INF])
    write_sharded(tmp_path, tensors, model.config)
    shard = next(name for name in SHARDS if NORM in load_file(tmp_path / name))
    assert load_error(tmp_path) == non_finite(tmp_path / shard, NORM, 2)


@pytest.mark.parametrize("keep_fp8", [False, True])  # dequantised by load_pretrained, kept by load_quantized
@pytest.mark.parametrize("key, values, count", [
    (".weight", [0x7F], 1), (".weight", [0xFF, 0x7E, 0xFE, 0x7F], 2),  # e4m3fn's NaN codes; 0x7E = 448 is finite
    (".weight_scale_inv", [INF], 1),
])
def test_fp8_non_finite_values_are_refused(tmp_path, keep_fp8, key, values, count):
    path = fp8_checkpoint(tmp_path)
    rewrite(path, lambda t: t.update({Q + key: set_values(t[Q + key], values)}))
    assert load_error(path, keep_fp8=keep_fp8) == non_finite(path / "model.safetensors", Q + key, count)


@pytest.mark.parametrize("scheme, key", [("int8", ".weight_scale"), ("int4", ".scales"), ("int4", ".zeros")])
def test_quantized_non_finite_scales_are_refused(tmp_path, scheme, key):
    save_quantized(quantize(tiny_model(), scheme, group_size=32, pad=True), tmp_path)
    rewrite(tmp_path, lambda t: t.update({Q + key: set_values(t[Q + key], [NAN])}))
    assert load_error(tmp_path) == non_finite(tmp_path / "model.safetensors", Q + key, 1)


@pytest.mark.parametrize("scheme, key", [("int8", ".weight"), ("int4", ".qweight")])
def test_packed_weights_with_the_fp8_nan_bytes_load(tmp_path, scheme, key):
    """e4m3fn's NaN bytes 0x7F and 0xFF are ordinary values here: int8 127 and -1, int4 nibble pairs (15, 7) and
    (15, 15)."""
    save_quantized(quantize(tiny_model(), scheme, group_size=32, pad=True), tmp_path)
    values = [0x7F, -1] if scheme == "int8" else [0x7F, 0xFF]
    rewrite(tmp_path, lambda t: t.update({Q + key: set_values(t[Q + key], values)}))
    with torch.no_grad():
        assert dsv3.load_pretrained(tmp_path)(IDS).isfinite().all()


@pytest.mark.parametrize("scheme, key, make, expected", [
    ("int8", ".weight", lambda t: t.float(), "float32, expected int8"),
    ("int8", ".weight_scale", lambda t: t.to(torch.int32), "int32, expected a floating-point dtype"),
    ("int4", ".qweight", lambda t: t.float(), "float32, expected uint8"),
    ("int4", ".qweight", lambda t: t.view(torch.int8), "int8, expected uint8"),
    ("int4", ".scales", lambda t: t.to(torch.int32), "int32, expected a floating-point dtype"),
    ("int4", ".zeros", lambda t: t.to(torch.int32), "int32, expected a floating-point dtype"),
])
def test_quantized_tensor_of_a_wrong_dtype_is_refused(tmp_path, scheme, key, make, expected):
    save_quantized(quantize(tiny_model(), scheme, group_size=32, pad=True), tmp_path)
    rewrite(tmp_path, lambda t: t.update({Q + key: make(t[Q + key])}))
    assert load_error(tmp_path) == f"{tmp_path / 'model.safetensors'}: {Q}{key} has dtype {expected}" + (
        " (bfloat16, float16 or float32)" if "floating" in expected else "")


@pytest.fixture
def int4(tmp_path):
    save_quantized(quantize(tiny_model(), "int4", group_size=32, pad=True), tmp_path)
    return tmp_path


@pytest.mark.parametrize("group_size", ["32", None, 100, True])
def test_int4_group_size_of_a_wrong_type_is_named(int4, group_size):
    rewrite(int4, lambda t: None, lambda c: c["quantization_config"].update(group_size=group_size))
    assert f"quantization_config's group_size is {group_size!r}" in load_error(int4)


def test_int4_one_dimensional_scales_are_named(int4):
    rewrite(int4, lambda t: t.update({Q + ".scales": t[Q + ".scales"][:, 0].contiguous()}))
    assert f"{Q}.scales has shape (96,); expected 2-D" in load_error(int4)


@pytest.mark.parametrize("value", ["fp8", [1]])
def test_quantization_config_that_is_not_an_object_is_named(saved, value):
    from dsv3.quant.apply import loads_quantized
    for keep_fp8 in (False, True):
        with pytest.raises(QuantizationError, match=re.escape(f"quantization_config is {value!r}; expected an "
                                                              "object")):
            loads_quantized(value, keep_fp8)
    rewrite(saved, lambda t: None, lambda c: c.update(quantization_config=value))
    with pytest.raises(ValueError, match=re.escape(str(saved / "config.json")) + ".*quantization_config"):
        dsv3.load_pretrained(saved, keep_fp8=True)
