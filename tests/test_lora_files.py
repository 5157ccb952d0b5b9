"""Bad adapter files (dsv3.lora.load_adapter): every one is refused with a one-line AdapterError naming the file and
the field or key, never a raw traceback or a silently wrong model.

Adapters are made with the library on ModelConfig.tiny() (layer 0 dense, layers 1-2 with 8 routed experts, one MTP
layer) and then broken one way each.
"""

import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv3
from dsv3.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterError, apply_lora, load_adapter, lora_modules, \
    save_adapter

O_PROJ = "base_model.model.model.layers.0.self_attn.o_proj"
EXPERTS = "base_model.model.model.layers.1.mlp.experts"
IDS = torch.randint(0, 1024, (1, 7), generator=torch.Generator().manual_seed(3))


def base(**config):
    torch.manual_seed(0)
    return dsv3.Transformer(dsv3.ModelConfig.tiny(**config)).eval()


def header(weights):
    with safe_open(str(weights), framework="pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Attention (target_modules), dense/shared MLP (target_parameters) and fused routed experts, B nonzero."""
    model = apply_lora(base(), 4, 8, ["q_b_proj", "o_proj", "down_proj"])
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.05)
    return save_adapter(model, tmp_path_factory.mktemp("good"))


def variant(tmp_path, good, config=None, raw=None, tensors=None, metadata=None):
    """A copy of `good` with the config edited (config(dict)), replaced (raw bytes), the tensors edited or the header
    metadata edited (metadata(dict); kept as save_adapter wrote it otherwise)."""
    d = tmp_path / "adapter"
    shutil.copytree(good, d)
    if raw is not None:
        (d / ADAPTER_CONFIG).write_bytes(raw)
    if config is not None:
        c = json.loads((d / ADAPTER_CONFIG).read_text())
        config(c)
        (d / ADAPTER_CONFIG).write_text(json.dumps(c))
    if tensors is not None or metadata is not None:
        t, meta = load_file(d / ADAPTER_WEIGHTS), header(d / ADAPTER_WEIGHTS)
        (tensors or (lambda _: None))(t)
        (metadata or (lambda _: None))(meta)
        save_file(t, d / ADAPTER_WEIGHTS, metadata=meta)
    return d


def refused(d, file, what, model=None):
    """load_adapter refuses with one line that starts with the file's path and names `what`."""
    with pytest.raises(AdapterError) as e:
        load_adapter(model or base(), d, merge=True)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{d / file}: ") and what in message, message


def setting(key, value):
    return lambda c: c.__setitem__(key, value)


def test_the_unbroken_adapter_loads(good):
    model = load_adapter(base(), good)
    assert len(lora_modules(model)) > 10 and torch.isfinite(model(IDS)).all()


BAD_VALUES = [("r", "4"), ("r", 4.0), ("r", 0), ("r", True), ("r", None), ("lora_alpha", "16"), ("lora_alpha", None),
              ("lora_alpha", True), ("use_rslora", "false"), ("use_rslora", 1), ("lora_dropout", "abc"),
              ("lora_dropout", 2.0), ("rank_pattern", [1]), ("rank_pattern", {"(": 4}), ("rank_pattern", {"o_proj": 0}),
              ("alpha_pattern", {"o_proj": "x"}), ("alpha_pattern", {"(?i)o_proj": 8}), ("target_modules", 5),
              ("target_modules", "("), ("exclude_modules", [1]), ("target_parameters", "down_proj"),
              ("layers_to_transform", "0"), ("layers_pattern", "["), ("layers_pattern", ["layers", "["])]


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=[f"{k}={v!r}" for k, v in BAD_VALUES])
def test_config_values_are_checked(tmp_path, good, key, value):
    refused(variant(tmp_path, good, config=setting(key, value)), ADAPTER_CONFIG, f"{key}={value!r}: expected")


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_alpha_is_refused(tmp_path, good, text):
    raw = re.sub(r'"lora_alpha": [^,]+', f'"lora_alpha": {text}', (good / ADAPTER_CONFIG).read_text()).encode()
    refused(variant(tmp_path, good, raw=raw), ADAPTER_CONFIG, "lora_alpha=")


@pytest.mark.parametrize("raw,what", [(b'\xff\xfe{"peft_type": "LORA"}', "not UTF-8"), (b"[1, 2]", "a JSON list"),
                                      (b'"LORA"', "a JSON str")])
def test_config_must_be_a_utf8_json_object(tmp_path, good, raw, what):
    refused(variant(tmp_path, good, raw=raw), ADAPTER_CONFIG, what)


def test_config_that_is_a_directory(tmp_path, good):
    d = variant(tmp_path, good)
    (d / ADAPTER_CONFIG).unlink()
    (d / ADAPTER_CONFIG).mkdir()
    refused(d, ADAPTER_CONFIG, "cannot read")


UNSUPPORTED = [("alora_invocation_tokens", [5, 6]), ("arrow_config", {"top_k": 2}), ("use_qalora", True),
               ("use_bdlora", {"target_modules_bd_a": ["o_proj"]}), ("monteclora_config", {"n": 2}),
               ("kasa_config", {}), ("trainable_token_indices", [0, 1])]


@pytest.mark.parametrize("key,value", UNSUPPORTED, ids=[k for k, _ in UNSUPPORTED])
def test_peft_features_that_change_the_forward_are_refused(tmp_path, good, key, value):
    refused(variant(tmp_path, good, config=setting(key, value)), ADAPTER_CONFIG, f"{key}=")


def test_truncated_junk_or_directory_weights(tmp_path, good):
    d = variant(tmp_path, good)
    data = (d / ADAPTER_WEIGHTS).read_bytes()
    (d / ADAPTER_WEIGHTS).write_bytes(data[:len(data) // 2])
    refused(d, ADAPTER_WEIGHTS, "truncated or corrupt safetensors file")
    (d / ADAPTER_WEIGHTS).write_bytes(b"\0" * 7)
    refused(d, ADAPTER_WEIGHTS, "truncated or corrupt safetensors file")
    (d / ADAPTER_WEIGHTS).unlink()
    (d / ADAPTER_WEIGHTS).mkdir()
    refused(d, ADAPTER_WEIGHTS, "a directory")


def test_weights_without_tensors_are_refused(tmp_path, good):
    d = variant(tmp_path, good)
    save_file({}, d / ADAPTER_WEIGHTS)
    refused(d, ADAPTER_WEIGHTS, "no tensors")


BAD_TENSORS = {
    "0-d": lambda t: t.__setitem__(f"{O_PROJ}.lora_A.weight", torch.tensor(1.0)),
    "0-d fused": lambda t: t.__setitem__(f"{EXPERTS}.lora_A.weight", torch.tensor(1.0)),
    "int32": lambda t: t.__setitem__(f"{O_PROJ}.lora_A.weight", (t[f"{O_PROJ}.lora_A.weight"] * 100).int()),
    "bool": lambda t: t.__setitem__(f"{O_PROJ}.lora_B.weight", t[f"{O_PROJ}.lora_B.weight"] > 0),
    "nan": lambda t: t[f"{O_PROJ}.lora_A.weight"].view(-1)[0].fill_(float("nan")),
    "inf": lambda t: t[f"{EXPERTS}.lora_B.weight"].view(-1)[0].fill_(float("inf")),
}


@pytest.mark.parametrize("case", BAD_TENSORS)
def test_lora_tensors_must_be_finite_float_matrices(tmp_path, good, case):
    refused(variant(tmp_path, good, tensors=BAD_TENSORS[case]), ADAPTER_WEIGHTS, ".lora_")


def test_fused_experts_on_a_dense_layer(tmp_path, good):
    def move(t):
        for ab in ("lora_A", "lora_B"):
            t[f"base_model.model.model.layers.0.mlp.experts.{ab}.weight"] = t[f"{EXPERTS}.{ab}.weight"].clone()
    refused(variant(tmp_path, good, tensors=move), ADAPTER_WEIGHTS, "model.layers.0.mlp.experts")


CONTRADICTIONS = {  # config edit, the module whose tensors it leaves out
    "exclude_modules": (setting("exclude_modules", ["o_proj"]), "model.layers.0.self_attn.o_proj"),
    "target_modules list": (setting("target_modules", ["o_proj"]), "q_b_proj"),
    "target_modules regex": (setting("target_modules", r".*\.q_b_proj"), "o_proj"),
    "layers_to_transform": (setting("layers_to_transform", [0, 1]), "model.layers.2.self_attn"),
    "layers_pattern": (lambda c: c.update(layers_to_transform=0, layers_pattern="nothing"), "model.layers.0.self_attn"),
    "target_parameters": (setting("target_parameters", ["mlp.experts.down_proj"]), "mlp.down_proj has LoRA"),
}


@pytest.mark.parametrize("case", CONTRADICTIONS)
def test_tensors_the_config_does_not_target_are_refused(tmp_path, good, case):
    edit, module = CONTRADICTIONS[case]
    refused(variant(tmp_path, good, config=edit), ADAPTER_WEIGHTS, module)


def test_an_untargeted_output_head_is_refused(tmp_path, good):
    def add_head(t):
        t["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
        t["base_model.model.lm_head.lora_B.weight"] = torch.zeros(1024, 4)
    refused(variant(tmp_path, good, tensors=add_head), ADAPTER_WEIGHTS, "lm_head")


@pytest.mark.parametrize("targets", ["all-linear", r".*\.(q_b_proj|o_proj)", ["self_attn.o_proj", "q_b_proj"]])
def test_configs_that_select_every_tensor_load(tmp_path, good, targets):
    reference = load_adapter(base(), good)(IDS)
    d = variant(tmp_path, good, config=lambda c: c.update(target_modules=targets, layers_to_transform=[0, 1, 2, 3]))
    torch.testing.assert_close(load_adapter(base(), d)(IDS), reference)


# MTP: the hub names the MTP layer model.layers.{num_hidden_layers}; save_adapter records num_hidden_layers in the
# safetensors header, so a key is an MTP key only by the adapter's own base, never by the model it is loaded on.
def test_the_mtp_layer_round_trips_through_the_header(good):
    assert header(good / ADAPTER_WEIGHTS) == {"format": "pt", "num_hidden_layers": "3"}
    assert "base_model.model.model.layers.3.self_attn.o_proj.lora_A.weight" in load_file(good / ADAPTER_WEIGHTS)
    assert "mtp.0.self_attn.o_proj" in lora_modules(load_adapter(base(), good))


def test_the_mtp_key_stays_on_the_mtp_layer_of_a_deeper_model(good):
    mods = lora_modules(load_adapter(base(num_hidden_layers=4), good))
    assert "mtp.0.self_attn.o_proj" in mods and "model.layers.3.self_attn.o_proj" not in mods


@pytest.fixture(scope="module")
def deeper(tmp_path_factory):
    """An adapter saved on a 4-layer base without the MTP layer (as `dsv3 finetune` saves): layers.3 is a main layer."""
    model = apply_lora(base(num_hidden_layers=4), 4, 8, ["o_proj"], include_mtp=False)
    return save_adapter(model, tmp_path_factory.mktemp("deeper"))


def test_a_deeper_bases_layer_is_refused_not_put_on_the_mtp_layer(tmp_path, deeper):
    key = "base_model.model.model.layers.3.self_attn.o_proj.lora_A.weight"
    refused(deeper, ADAPTER_WEIGHTS, f"{key} targets layer 3, but the model has 3 layers (0-2; the adapter's base "
                                     "had 4): was the adapter trained on another base model?")
    # PEFT records no layer count (transformers' DeepseekV3 has no MTP layer): layer 3 cannot be an MTP key either
    peft_like = variant(tmp_path, deeper, metadata=lambda m: m.pop("num_hidden_layers"))
    refused(peft_like, ADAPTER_WEIGHTS, f"{key} targets layer 3, but the model has 3 layers (0-2; the adapter "
                                        "records no base num_hidden_layers, so it adapts no MTP layer)")
    assert "model.layers.3.self_attn.o_proj" in lora_modules(load_adapter(base(num_hidden_layers=4), peft_like))


def test_a_bad_layer_count_in_the_header_is_refused(tmp_path, good):
    d = variant(tmp_path, good, metadata=lambda m: m.update(num_hidden_layers="three"))
    refused(d, ADAPTER_WEIGHTS, "header metadata num_hidden_layers='three': expected a layer count")
