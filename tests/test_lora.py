"""LoRA (dsv3.lora): PEFT interop in both directions, init, scaling, merge, freezing, QLoRA, refusals.

Interop runs against peft on transformers' DeepseekV3ForCausalLM (transformers 5: routed experts are fused 3-D
parameters, adapted through PEFT target_parameters), float32, same logits within 1e-5 relative error.
"""

import copy
import importlib.util
import json
import math

import pytest
import torch

import dsv3
from dsv3.lora import (AdapterError, LoRALinear, apply_lora, load_adapter, lora_modules, merge_and_unload,
                       merge_lora, quantized_reference_forward, save_adapter, unmerge_lora)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ATTN = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
IDS = torch.randint(0, 320, (2, 13), generator=torch.Generator().manual_seed(3))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny V3 (q-LoRA, dense layer, 8 routed + 1 shared expert, MTP layer) saved in hub layout."""
    torch.manual_seed(0)
    model = dsv3.Transformer(dsv3.ModelConfig.tiny(vocab_size=320)).eval()
    path = tmp_path_factory.mktemp("ckpt")
    dsv3.save_pretrained(model, path)
    return path


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


@pytest.mark.parametrize("style", ["target_parameters", "v4_names"])
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_with_same_logits(checkpoint, tmp_path, style, rslora):
    if style == "target_parameters":  # dense/shared MLP as 2-D parameters, routed experts as fused 3-D ones
        cfg = dict(target_modules=ATTN, target_parameters=["gate_proj.weight", "up_proj.weight", "down_proj.weight",
                                                           "mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    else:  # transformers-4 names: PEFT rewrites them to the fused experts (rank 2r for gate_up_proj)
        cfg = dict(target_modules=["kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(5)
    peft_model = peft.get_peft_model(hf_model(checkpoint), peft.LoraConfig(
        r=4, lora_alpha=8, use_rslora=rslora, init_lora_weights=False, **cfg)).eval()
    peft_model.save_pretrained(tmp_path)
    ours = load_adapter(dsv3.load_pretrained(checkpoint, dtype=torch.float32), tmp_path)
    with torch.no_grad():
        expected = peft_model(IDS).logits
        assert rel_err(ours(IDS), expected) < 1e-5
    assert {n.rpartition(".")[2] for n in lora_modules(ours)} >= {"kv_b_proj", "o_proj"}


@pytest.mark.parametrize("targets,rslora", [("all-linear", False), (ATTN + ["down_proj"], True)])
def test_dsv3_adapter_loads_in_peft_with_same_logits(checkpoint, tmp_path, targets, rslora):
    ours = apply_lora(dsv3.load_pretrained(checkpoint, dtype=torch.float32), 4, 8, targets, use_rslora=rslora)
    randomize_b(ours)
    save_adapter(ours, tmp_path, base_model_name_or_path=str(checkpoint))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["use_rslora"] is rslora and config["bias"] == "none" and config["task_type"] == "CAUSAL_LM"
    peft_model = peft.PeftModel.from_pretrained(hf_model(checkpoint), tmp_path).eval()
    with torch.no_grad():
        assert rel_err(ours(IDS), peft_model(IDS).logits) < 1e-5
    # and back into dsv3, MTP layer included
    again = load_adapter(dsv3.load_pretrained(checkpoint, dtype=torch.float32), tmp_path)
    with torch.no_grad():
        assert rel_err(again(IDS), ours(IDS)) < 1e-6
        h = ours.hidden_states(IDS)[:, :-1]
        assert rel_err(again.mtp_logits(h, IDS), ours.mtp_logits(h, IDS)) < 1e-6
    merged = load_adapter(dsv3.load_pretrained(checkpoint, dtype=torch.float32), tmp_path, merge=True)
    assert not lora_modules(merged)  # folded into the weights: plain nn.Linear again
    with torch.no_grad():
        assert rel_err(merged(IDS), ours(IDS)) < 1e-6


def test_init_scaling_and_frozen_base(checkpoint):
    base = dsv3.load_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        expected = base(IDS)
    model = apply_lora(copy.deepcopy(base), 8, 16, "all-linear", use_rslora=True)
    mods = lora_modules(model)
    # attention, dense MLP, shared and routed experts, MTP layer
    assert "model.layers.1.mlp.experts.7.down_proj" in mods and "mtp.0.self_attn.kv_b_proj" in mods
    assert "model.layers.0.mlp.gate_proj" in mods and "model.layers.2.mlp.shared_experts.up_proj" in mods
    m = mods["model.layers.1.self_attn.q_b_proj"]
    assert m.scaling == pytest.approx(16 / math.sqrt(8))
    assert torch.all(m.lora_B == 0) and m.lora_A.abs().max() <= 1 / math.sqrt(m.in_features)  # kaiming a=sqrt(5)
    assert m.lora_A.std() > 0.5 / math.sqrt(3 * m.in_features)
    assert apply_lora(copy.deepcopy(base), 8, 16, ["o_proj"]).model.layers[0].self_attn.o_proj.scaling == 2.0
    no_mtp = lora_modules(apply_lora(copy.deepcopy(base), 8, 16, ["o_proj"], include_mtp=False))
    assert len(no_mtp) == base.config.num_hidden_layers and not any(n.startswith("mtp.") for n in no_mtp)
    with torch.no_grad():
        assert rel_err(model(IDS), expected) < 1e-6  # B = 0: starts as the base model (MoE may pick another path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    randomize_b(model)
    model(IDS).square().mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert mods["model.layers.0.self_attn.o_proj"].lora_A.grad.abs().sum() > 0


def test_merge_unmerge_and_absorbed_attention(checkpoint):
    model = apply_lora(dsv3.load_pretrained(checkpoint, dtype=torch.float32), 4, 8, "all-linear")
    randomize_b(model)
    w0 = {n: m.base_layer.weight.clone() for n, m in lora_modules(model).items()}
    with torch.no_grad():
        unmerged = model(IDS)
        # absorbed MLA reads kv_b_proj through effective_weight(): same next-token logits as the naive path
        cache = model.new_cache(2, 16)
        model(IDS[:, :-1], cache)
        step = model(IDS[:, -1:], cache, IDS.shape[1] - 1, attn_impl="absorb")
        assert rel_err(step, unmerged[:, -1:]) < 1e-5
        merge_lora(model)
        assert rel_err(model(IDS), unmerged) < 1e-6
        unmerge_lora(model)
        assert rel_err(model(IDS), unmerged) < 1e-6
    for n, m in lora_modules(model).items():
        assert (m.base_layer.weight - w0[n]).abs().max() < 1e-6
    plain = merge_and_unload(model)
    assert not lora_modules(plain) and isinstance(plain.model.layers[0].self_attn.o_proj, torch.nn.Linear)
    with torch.no_grad():
        assert rel_err(plain(IDS), unmerged) < 1e-6


def test_shape_mismatch_names_the_module(checkpoint, tmp_path):
    other = dsv3.Transformer(dsv3.ModelConfig.tiny(vocab_size=320, kv_lora_rank=16))
    apply_lora(other, 4, 8, ["kv_b_proj"])
    save_adapter(other, tmp_path)
    with pytest.raises(AdapterError, match=r"model\.layers\.0\.self_attn\.kv_b_proj"):
        load_adapter(dsv3.load_pretrained(checkpoint), tmp_path)


def test_bad_targets_and_configs(checkpoint, tmp_path):
    model = dsv3.load_pretrained(checkpoint)
    with pytest.raises(ValueError, match="q_proj"):
        apply_lora(model, 4, 8, ["q_proj"])  # this model has q_a_proj / q_b_proj
    with pytest.raises(ValueError, match="lm_head"):
        apply_lora(model, 4, 8, ["lm_head"])
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        load_adapter(model, tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("dsv3.quant") is None, reason="dsv3/quant.py (issue 6) not there yet")
def test_qlora_on_int4_base(checkpoint):
    from dsv3 import quant
    base = dsv3.load_pretrained(checkpoint, dtype=torch.float32)
    qmodel = quant.quantize(copy.deepcopy(base), "int4", group_size=32)
    model = apply_lora(qmodel, 4, 8, "all-linear")
    m = lora_modules(model)["model.layers.0.self_attn.kv_b_proj"]
    assert isinstance(m, LoRALinear) and m.quantized
    randomize_b(model)
    with quantized_reference_forward(model):
        model(IDS).square().mean().backward()
    assert m.lora_A.grad.abs().sum() > 0
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.endswith(("lora_A", "lora_B")))
    with pytest.raises(AdapterError, match="quantized"):
        m.merge()
    with torch.no_grad():
        before = model(IDS)
        merge_lora(model, dequantize=True)
        assert rel_err(model(IDS), before) < 1e-5


@pytest.mark.skipif(importlib.util.find_spec("dsv3.quant") is None, reason="dsv3/quant.py (issue 6) not there yet")
def test_qlora_bf16_backward_through_int4_kernels(checkpoint):
    """bf16 int4 layers use fused kernels without a backward: training runs them in reference mode."""
    from dsv3 import quant
    model = quant.quantize(dsv3.load_pretrained(checkpoint, dtype=torch.bfloat16), "int4", group_size=32)
    apply_lora(model, 4, 8, ["q_b_proj", "kv_b_proj", "down_proj"])
    randomize_b(model)
    with quantized_reference_forward(model):
        model(IDS).float().square().mean().backward()
    assert {m.impl for m in quant.quantized_layers(model).values()} == {"auto"}
    # every adapter the forward used gets a gradient (MTP: not in this forward; a routed expert may get no token)
    used = {n: m for n, m in lora_modules(model).items() if not n.startswith("mtp.") and ".experts." not in n}
    assert all(m.lora_A.grad is not None and m.lora_A.grad.abs().sum() > 0 for m in used.values())
    assert any(m.lora_A.grad is not None for n, m in lora_modules(model).items() if ".experts." in n)


def test_serve_adapter_flag(tmp_path):
    """`dsv3 serve --adapter DIR`: the served model computes what the LoRA model computes; a misfit is refused."""
    from argparse import Namespace
    from pathlib import Path

    from dsv3.server.cli import build_app, resolve_options

    torch.manual_seed(0)
    base = dsv3.Transformer(dsv3.ModelConfig.tiny(vocab_size=8192)).eval()  # the bundled tokenizer's vocabulary
    dsv3.save_pretrained(base, tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "model" / name).write_bytes((Path(dsv3.__file__).parent / "bundled" / name).read_bytes())
    apply_lora(base, 4, 8, ATTN)
    randomize_b(base)
    save_adapter(base, tmp_path / "adapter")
    app = build_app(resolve_options(Namespace(model=str(tmp_path / "model"), adapter=str(tmp_path / "adapter"))))
    served = app.state.dsv3.engine.model
    with torch.no_grad():
        assert rel_err(served(IDS), base(IDS)) < 1e-5
    other = dsv3.Transformer(dsv3.ModelConfig.tiny(vocab_size=8192, kv_lora_rank=16))
    save_adapter(apply_lora(other, 4, 8, ["kv_b_proj"]), tmp_path / "misfit")
    with pytest.raises(SystemExit, match="kv_b_proj"):
        build_app(resolve_options(Namespace(model=str(tmp_path / "model"), adapter=str(tmp_path / "misfit"))))


# ---------------------------------------------------------------------------------------------- trainer
from dsv3.lora_train import DataError, LoRATrainer, read_examples  # noqa: E402

BUNDLED = dsv3.Tokenizer.from_pretrained(__import__("pathlib").Path(dsv3.__file__).parent / "bundled")


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_loss_masks_cover_assistant_and_completion_tokens_only(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Define: dog"},
            {"role": "assistant", "content": "Definition of dog (noun): a canid."},
            {"role": "user", "content": "And cat?"}, {"role": "assistant", "content": "A felid."}]
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": chat}, {"prompt": "Q: 2+2?", "completion": " 4"}])
    chat_ex, pc_ex = read_examples(data, BUNDLED, max_length=512)
    targets = [t for t in chat_ex.labels if t != -100]
    assert BUNDLED.decode(targets) == ("Definition of dog (noun): a canid." + BUNDLED.eos_token
                                       + "A felid." + BUNDLED.eos_token)
    assert BUNDLED.decode([t for t in pc_ex.labels if t != -100]) == " 4" + BUNDLED.eos_token
    assert pc_ex.ids[0] == BUNDLED.bos_token_id and pc_ex.labels[0] == -100


@pytest.mark.parametrize("line,why", [("{not json", "not valid JSON"), ('{"text": "x"}', "expected an object"),
                                      ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant"),
                                      ('{"prompt": "a", "completion": 3}', "must be strings")])
def test_malformed_line_is_reported_with_its_number(tmp_path, line, why):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, "", line])
    with pytest.raises(DataError, match=rf"d\.jsonl:3: .*{why}"):
        read_examples(data, BUNDLED, 64)


def test_trainer_learns_checkpoints_and_resumes(tmp_path):
    torch.manual_seed(0)
    base = dsv3.Transformer(dsv3.ModelConfig.tiny(vocab_size=8192, hidden_size=32, num_hidden_layers=2))
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": f"Define: w{i}"},
                                                            {"role": "assistant", "content": f"Definition {i}."}]}
                                              for i in range(12)])
    kw = dict(rank=4, alpha=8, lr=1e-2, max_length=64, tokenizer=BUNDLED, progress=False, eval_fraction=0.25)
    full = LoRATrainer(copy.deepcopy(base), data, output_dir=tmp_path / "full", **kw)
    assert len(full.eval_examples) == 3 and len(full.train_examples) == 9
    history = full.train(epochs=3, batch_size=4)
    epochs = [r for r in history if "eval_loss" in r]
    assert len(epochs) == 3 and epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert [p.name for p in full.checkpoints()] == ["checkpoint-epoch002", "checkpoint-epoch003"]
    assert not list((tmp_path / "full").glob(".*tmp*"))  # temporary directories renamed or removed
    # a fresh run into the same directory would replace the adapter and lose its checkpoints to retention
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "full").rglob("*")}
    again = LoRATrainer(copy.deepcopy(base), data, output_dir=tmp_path / "full", **kw)
    with pytest.raises(FileExistsError, match=r"full already holds an earlier run's checkpoints \(checkpoint-epoch002, "
                                              r"checkpoint-epoch003\): pass resume=True to continue it"):
        again.train(epochs=1, batch_size=4)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "full").rglob("*")} == before
    # 2 epochs, then resume to 3: the same adapter as 3 in one go
    part = LoRATrainer(copy.deepcopy(base), data, output_dir=tmp_path / "part", **kw)
    part.train(epochs=2, batch_size=4)
    resumed = LoRATrainer(copy.deepcopy(base), data, output_dir=tmp_path / "part", **kw)
    assert resumed.train(epochs=3, batch_size=4, resume=True)[-1] == epochs[-1]
    a, b = lora_modules(full.model), lora_modules(resumed.model)
    assert all(torch.allclose(a[n].lora_B, b[n].lora_B, atol=1e-6) for n in a)
    reloaded = load_adapter(copy.deepcopy(base), tmp_path / "part")  # the final adapter, PEFT format
    ids = torch.tensor([full.train_examples[0].ids])
    with torch.no_grad():
        assert rel_err(reloaded(ids), resumed.model(ids)) < 1e-5


def test_text_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"}) + "\n"
    path.write_bytes((good * 3).encode() + '{"prompt": "caf\xe9", "completion": "b"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"d\.jsonl:4: not UTF-8 text \(byte 0xe9\)"):
        read_examples(path, BUNDLED, 64)


@pytest.mark.parametrize("option,value,why", [
    ("lr", math.inf, "lr: expected a finite number >= 0, got inf"),
    ("alpha", math.nan, "alpha: expected a finite number >= 0, got nan"),
    ("weight_decay", -1.0, "weight_decay: expected a finite number >= 0"),
    ("eval_fraction", math.nan, r"eval_fraction: expected a number in \[0, 1\)")])
def test_trainer_refuses_non_finite_hyperparameters(tmp_path, option, value, why):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(ValueError, match=why):
        LoRATrainer(dsv3.Transformer(dsv3.ModelConfig.tiny(vocab_size=8192)), data, tokenizer=BUNDLED,
                    output_dir=tmp_path / "out", **{option: value})


@pytest.mark.parametrize("flags,why", [(["--lr", "inf"], "--lr: expected a finite number >= 0, got inf"),
                                       (["--alpha", "nan"], "--alpha: expected a finite number >= 0, got nan"),
                                       (["--dropout", "nan"], r"--dropout: expected a number in \[0, 1\), got nan"),
                                       (["--eval-fraction", "inf"], r"--eval-fraction: expected a number in \[0, 1\)")])
def test_finetune_cli_refuses_non_finite_values(tmp_path, flags, why):
    from dsv3.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(SystemExit, match=f"^dsv3 finetune: {why}"):
        main(["finetune", "--data", str(data), "--output", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("earlier", ["checkpoint-epoch003/trainer_state.json", "adapter_model.safetensors"])
def test_finetune_cli_refuses_an_earlier_run_without_resume(tmp_path, earlier):
    from dsv3.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    out = tmp_path / "out"
    (out / earlier).parent.mkdir(parents=True, exist_ok=True)
    (out / earlier).write_text("{}")
    with pytest.raises(SystemExit, match=rf"^dsv3 finetune: --output {out} already holds an earlier run's .*"
                                         "(--resume|choose a new directory)"):
        main(["finetune", "--data", str(data), "--output", str(out), "--no-progress"])
    assert [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()] == [earlier]
