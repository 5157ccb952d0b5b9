"""Tensor and expert parallelism (dsv3/distributed/, docs/distributed.md) against the single-device model, in W
gloo processes forked from this one (tests/distributed_worker.py holds the jobs; the models are built here once
and inherited, so a world size costs its checks, not W imports and loads)."""

import json
import re
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import dsv3
from dsv3.distributed import init, parallelize, rank, shards, world_size

import distributed_worker as worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, job: str, payload, tmp_path) -> dict:
    """Run worker job `job` in `world` forked ranks; rank 0's JSON result."""
    out = tmp_path / f"{job}-{world}.json"
    mp.start_processes(worker.run, args=(world, free_port(), job, payload, str(out)), nprocs=world,
                       start_method="fork")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def models():
    return worker.prepared_models()


def test_world_size_one_is_the_plain_path(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = dsv3.Transformer(dsv3.ModelConfig.tiny())
    assert (init(), rank(), world_size()) == (1, 0, 1)
    assert parallelize(model) is model and type(model.lm_head) is torch.nn.Linear


def test_what_is_not_split_is_refused_in_one_line(monkeypatch):
    """A bad backend; keep_fp8 on a checkpoint that is not FP8 under a process group (as in one process); LoRA."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="backend: expected 'nccl' or 'gloo', got 'mpi'"):
        init("mpi")
    with pytest.raises(dsv3.quant.QuantizationError, match="keep_fp8=True but config.json's quantization_config"):
        dsv3.load_pretrained(dsv3.bundled_model_path(), keep_fp8=True, parallel=True)
    from dsv3.lora import apply_lora
    model = apply_lora(dsv3.Transformer(dsv3.ModelConfig.tiny()), 2, 4, ["o_proj"])
    with pytest.raises(ValueError, match=r"LoRALinear cannot be split across ranks: .* \(merge LoRA adapters first\)"):
        parallelize(model, 0, 2)


def test_a_slice_that_cuts_a_quantized_group_or_block_is_refused():
    """int4 groups of 32 along the input: the shared expert's down_proj (32 inputs) would give each of 2 ranks 16;
    fp8's 128-row blocks: the tiny model's 64-wide MLP; both refused before anything changed."""
    model = dsv3.quantize(dsv3.Transformer(dsv3.ModelConfig.tiny()), "int4", group_size=32)
    with pytest.raises(ValueError, match=r"int4 group_size 32 does not divide the row-parallel input slice 16 of "
                                         r"model\.layers\.1\.mlp\.shared_experts\.down_proj"):
        parallelize(model, 0, 2)
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    model = dsv3.quantize(dsv3.Transformer(dsv3.ModelConfig.tiny(hidden_size=128)), "fp8")
    with pytest.raises(ValueError, match=r"fp8 block 128 does not divide the column-parallel output slice 48 of "
                                         r"model\.layers\.0\.self_attn\.q_b_proj"):
        parallelize(model, 0, 2)


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_quantized_parallel_layers_sum_to_the_quantized_ones(scheme):
    """Each format's column- and row-parallel slices (W=2, 4; no process group, combined by hand) give the
    quantized layer's output: the rows with their scales, the columns in whole groups / 128-blocks."""
    from dsv3.distributed.quantized import parallel_quantized
    from dsv3.quant import SCHEMES
    torch.manual_seed(0)
    layer = SCHEMES[scheme].from_linear(torch.nn.Linear(512, 512, bias=True), group_size=64)
    x = torch.randn(3, 512)
    with torch.no_grad():
        want = layer(x)
        for world in (2, 4):
            cols = torch.cat([parallel_quantized(layer, 0, r, world, "l", "f")(x) for r in range(world)], -1)
            rows = sum(parallel_quantized(layer, 1, r, world, "l", "f")(x.chunk(world, -1)[r])
                       for r in range(world))
            torch.testing.assert_close(cols, want, rtol=0, atol=0)
            torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_models_equal_single_device(world, models, tmp_path):
    """Every prepared model at one world size at least (CI time): W=2 all but the int8 one, W=4 all but the
    V2-Lite-shaped and int4 ones. The quantized models' parallel layers run their own CPU kernels."""
    chosen = {k: v for k, v in models.items() if k not in (("int8",) if world == 2 else ("v2-lite", "int4"))}
    results = spawn(world, "models", chosen, tmp_path)
    assert set(results) == set(chosen)
    for name, r in results.items():
        for key in ("logits_naive", "logits_absorb", "mtp", "cached"):
            assert r[key] < 1e-5, (name, key, r[key])
        assert r["greedy_equal"] and r["greedy_tokens"] == models[name][2], name
        assert r["held_bytes"] <= r["bound_bytes"] < r["full_bytes"], (name, r)


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_layers_sum_to_the_plain_ones(world):
    """Without a process group the collectives are the identity, so the W ranks' shares of each layer, run in
    this one process and combined by hand (summed; the column pieces concatenated), must give the plain output."""
    torch.manual_seed(0)
    config = dsv3.ModelConfig.tiny(n_routed_experts=8, attention_bias=True)
    linear, emb = torch.nn.Linear(16, 8), torch.nn.Embedding(12, 6)
    moe = dsv3.Transformer(config).model.layers[1].mlp.eval()
    x, ids, h = torch.randn(3, 16), torch.randint(0, 12, (2, 5)), torch.randn(2, 5, config.hidden_size)
    from dsv3.distributed import ColumnParallelLinear, ExpertParallelMoE, RowParallelLinear, VocabParallelEmbedding
    import copy
    with torch.no_grad():
        cols = torch.cat([ColumnParallelLinear.from_linear(linear, r, world, "f")(x) for r in range(world)], -1)
        rows = sum(RowParallelLinear.from_linear(linear, r, world, "f")(x.chunk(world, -1)[r]) for r in range(world))
        embs = sum(VocabParallelEmbedding.from_embedding(emb, r, world, "vocab_size")(ids) for r in range(world))
        moes = sum(ExpertParallelMoE.from_moe(copy.deepcopy(moe), r, world)(h) for r in range(world))
        torch.testing.assert_close(cols, linear(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rows, linear(x), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(embs, emb(ids), rtol=0, atol=0)
        torch.testing.assert_close(moes, moe(h), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_expert_parallelism_moves_whole_quantized_experts(scheme):
    """W=2 ranks' shares of a quantized MoE (no process group, summed by hand) give its output on the stacked
    gather and grouped paths; each rank's experts hold their own bytes, not views of all experts' stacks."""
    import copy
    from dsv3.distributed import ExpertParallelMoE
    from dsv3.quant.experts import QuantizedExpertStacks
    torch.manual_seed(0)
    model = dsv3.quantize(dsv3.Transformer(dsv3.ModelConfig.tiny(moe_intermediate_size=64)).eval(), scheme,
                          group_size=32)
    moe, h = model.model.layers[1].mlp, torch.randn(2, 5, 64)
    moe.stacks = QuantizedExpertStacks(cpu=True)
    with torch.no_grad():
        for path in ("gather", "grouped"):
            moe.path = path
            want = moe(h)  # builds the stacks: the experts' buffers are views of them now
            shares = [ExpertParallelMoE.from_moe(copy.deepcopy(moe), r, 2) for r in range(2)]
            for buffer in shares[1].experts[0].down_proj.buffers():
                assert buffer.untyped_storage().nbytes() == buffer.nbytes
            torch.testing.assert_close(sum(share(h) for share in shares), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change, field", [
    ({}, "num_attention_heads=4 is not divisible by the world size 3"),
    ({"num_attention_heads": 6, "vocab_size": 1000}, "vocab_size=1000 is not divisible by the world size 3"),
    ({"num_attention_heads": 6, "vocab_size": 999, "intermediate_size": 99, "moe_intermediate_size": 33},
     "n_routed_experts=8 is not divisible by the world size 3"),
])
def test_indivisible_sizes_name_the_field(change, field):
    model = dsv3.Transformer(dsv3.ModelConfig.tiny(**change))
    with pytest.raises(ValueError, match=field):
        parallelize(model, 0, 3)


def write_checkpoints(tmp_path) -> tuple[dsv3.Transformer, dict]:
    """A tiny model (dense width 384: its W=2 halves split inside FP8's 128-wide blocks) saved as a two-file
    sharded checkpoint and as an FP8 one; name -> directory."""
    from safetensors.torch import save_file
    from test_checkpoint import quantize_fp8_blocks
    torch.manual_seed(0)
    model = dsv3.Transformer(dsv3.ModelConfig.tiny(intermediate_size=384)).eval()
    tensors = dsv3.checkpoint.hub_state_dict(model)
    plain, fp8 = tmp_path / "plain", tmp_path / "fp8"
    for path in (plain, fp8):
        path.mkdir()
    keys = sorted(tensors)
    files = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in files.items():
        save_file({k: tensors[k] for k in part}, plain / name)
    (plain / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, part in files.items() for k in part}}))
    model.config.to_json(plain / "config.json")
    for key in [k for k in tensors if k.endswith("proj.weight") and "eh_proj" not in k]:
        tensors[key], tensors[key + "_scale_inv"] = quantize_fp8_blocks(tensors[key].float())
    save_file(tensors, fp8 / "model.safetensors")
    config = model.config.to_hf()
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (fp8 / "config.json").write_text(json.dumps(config))
    return model, {"plain": plain, "fp8": fp8}


def write_nan_checkpoint(model: dsv3.Transformer, path) -> str:
    """model saved with one NaN in the last row of the dense gate projection: a row that only the last rank reads."""
    tensors = dsv3.checkpoint.hub_state_dict(model)
    tensors["model.layers.0.mlp.gate_proj.weight"][-1, 0] = float("nan")
    path.mkdir()
    from safetensors.torch import save_file
    save_file(tensors, path / "model.safetensors")
    model.config.to_json(path / "config.json")
    return str(path)


def write_quantized_checkpoints(tmp_path) -> dict:
    """A tiny model whose W=2 slices hold whole 128-blocks (FP8) and 64-groups (int4), saved by dsv3.quant as
    fp8 (DeepSeek's layout and choice of layers: eh_proj stays high precision), int8 and int4 (with attention
    biases: the row-parallel o_proj adds its bias once): name -> (directory, keep_fp8)."""
    config = dsv3.ModelConfig.tiny(hidden_size=128, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
                                   q_lora_rank=128, kv_lora_rank=128, intermediate_size=512,
                                   moe_intermediate_size=256, attention_bias=True)
    out = {}
    for scheme in ("fp8", "int8", "int4"):
        torch.manual_seed(0)
        skip = (*dsv3.quant.DEFAULT_SKIP, "eh_proj") if scheme == "fp8" else dsv3.quant.DEFAULT_SKIP  # as DeepSeek's
        model = dsv3.quantize(dsv3.Transformer(config).eval(), scheme, group_size=64, skip=skip)
        dsv3.quant.save_quantized(model, tmp_path / f"quantized-{scheme}")
        out["fp8_kept" if scheme == "fp8" else scheme] = (str(tmp_path / f"quantized-{scheme}"), scheme == "fp8")
    return out


def test_sliced_loading_and_gathered_saving(tmp_path):
    """Plain, FP8 (dequantised) and quantized checkpoints (FP8 kept, int8, int4) at W=2: each rank reads its slices
    only; the quantized ones stay quantized, in their parallel classes, and FP8's bytes per rank are plan()'s. A
    non-finite value in one rank's slice stops every rank."""
    model, paths = write_checkpoints(tmp_path)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    load, quantized = {}, {}
    with torch.no_grad():
        for name, path in paths.items():
            load[name] = (str(path), dsv3.load_pretrained(path, dtype=torch.float32)(ids))
        for name, (path, keep) in write_quantized_checkpoints(tmp_path).items():
            quantized[name] = (path, keep, dsv3.load_pretrained(path, dtype=torch.float32, keep_fp8=keep)(ids))
    saved = tmp_path / "saved"
    nan = write_nan_checkpoint(model, tmp_path / "nan")
    results = spawn(2, "checkpoint", {"load": load, "quantized": quantized, "ids": ids, "save": str(saved),
                                      "nan": nan}, tmp_path)
    # a NaN in rank 1's slice only: both ranks raise (neither waits for the other at a collective), rank 0 naming
    # rank 1 and its message
    own = (f"{nan}/model.safetensors: model.layers.0.mlp.gate_proj.weight holds 1 non-finite values (NaN or inf); "
           "expected finite values")
    assert results["nan_errors"] == [f"rank 1 could not read its part of the checkpoint: {own}", own]
    for name in quantized:
        assert results[f"{name}_logits"] < 1e-5, (name, results[f"{name}_logits"])
        scheme = {"fp8_kept": "FP8", "int8": "Int8", "int4": "Int4"}[name]
        assert {f"ColumnParallel{scheme}Linear", f"RowParallel{scheme}Linear"} <= set(results[f"{name}_classes"])
    assert results["fp8_kept_bf16_bytes_held"] == results["fp8_kept_bytes_plan"], results
    for name, (path, keep, _) in quantized.items():  # rank 0 gathered the packed slices back into the same file
        one = dsv3.load_pretrained(path, dtype=torch.float32, keep_fp8=keep).state_dict()
        full = sum(t.numel() * t.element_size() for t in one.values())
        assert results[f"{name}_bytes_read"] == results[f"{name}_bytes_held"] < 0.7 * full, (name, results, full)
        again = dsv3.load_pretrained(f"{path}-saved", dtype=torch.float32, keep_fp8=keep).state_dict()
        assert one.keys() == again.keys() and all(torch.equal(one[k], again[k]) for k in one), name
    assert results["console_line"] == "read on rank 0 EOF" and results["console_seeds_equal"]
    full = sum(t.numel() * 4 for t in model.state_dict().values())
    for name in paths:
        assert results[f"{name}_logits"] < 1e-5, (name, results)
        assert results[f"{name}_bytes_read"] == results[f"{name}_bytes_held"] < 0.7 * full, (name, results, full)
    again = dsv3.load_pretrained(saved, dtype=torch.float32)
    for key, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], tensor), key


def test_data_parallel_training_matches_one_process(tmp_path):
    """2 ranks at half the per-rank batch follow one process's 20-step fp32 loss curve and router biases; the
    checkpoint rank 0 wrote at step 10 resumes in one process onto the same curve."""
    import numpy as np
    import shutil
    from dsv3.train import TrainConfig, train
    tokens = np.tile(np.arange(2, 34), 100)

    def model():
        torch.manual_seed(0)
        return dsv3.Transformer(dsv3.ModelConfig.tiny(vocab_size=64, num_nextn_predict_layers=1))

    def config(out, **kw):
        return TrainConfig(**{**dict(steps=20, seq_len=16, batch_size=8, lr=3e-3, warmup_steps=2, log_every=1,
                                     eval_every=0, save_every=10, keep_checkpoints=0, out_dir=str(out)), **kw})

    single = train(model(), config(tmp_path / "one"), tokens, progress=False)
    two = spawn(2, "train", {"model": model(), "config": config(tmp_path / "two"), "tokens": tokens}, tmp_path)
    assert [r["step"] for r in two] == list(range(1, 21))
    for a, b in zip(single, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])
        assert a["bias"] == b["bias"] and a["load"] == b["load"], a["step"]
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "two" / "checkpoint-000010", resumed_dir / "checkpoint-000010")
    resumed = train(model(), config(resumed_dir), tokens, resume=True, progress=False)
    for a, b in zip(single[10:], resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]) and a["bias"] == b["bias"], a["step"]


def test_data_parallel_finetuning_matches_one_process(tmp_path):
    """dsv3 finetune's trainer: 2 ranks (each half of every batch of 4) give one process's losses; rank 0 wrote
    the adapter."""
    from dsv3.lora_train import LoRATrainer
    torch.manual_seed(0)
    base = dsv3.Transformer(dsv3.ModelConfig.tiny(vocab_size=8192, hidden_size=32, num_hidden_layers=2))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Define w{i}:", "completion": f" definition {i}" * (1 + i % 3)})
                            + "\n" for i in range(10)))
    options = dict(rank=4, alpha=8, lr=1e-2, max_length=64, progress=False, eval_fraction=0.2,
                   tokenizer=dsv3.Tokenizer.from_pretrained(dsv3.bundled_model_path()))
    import copy
    single = LoRATrainer(copy.deepcopy(base), data, output_dir=tmp_path / "one", **options).train(2, 4)
    two = spawn(2, "finetune", {"model": base, "data": str(data),
                                "options": {**options, "output_dir": str(tmp_path / "two")}}, tmp_path)
    assert [r["step"] for r in single] == [r["step"] for r in two]
    for a, b in zip(single, two):
        for key in ("loss", "train_loss", "eval_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (a, b)
    assert (tmp_path / "two" / "adapter_model.safetensors").is_file()


V2_LITE_HUB = {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
               "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
               "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
               "v_head_dim": 128, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
               "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "topk_method": "greedy",
               "routed_scaling_factor": 1.0, "max_position_embeddings": 163840}  # deepseek-ai/DeepSeek-V2-Lite


def doc_rows():
    """The runs docs/distributed.md tabulates."""
    from dsv3.distributed import plan
    v3, lite = dsv3.ModelConfig.v3(), dsv3.ModelConfig.from_hf(V2_LITE_HUB)
    rows = [("V3, FP8 weights, 8x H200", plan(v3, 8, torch.float8_e4m3fn)),
            ("V3, FP8 weights, 16x H100", plan(v3, 16, torch.float8_e4m3fn)),
            ("V3, bf16 (FP8 dequantised), 8x H200", plan(v3, 8, torch.bfloat16)),
            ("V3, bf16 (FP8 dequantised), 16x H100", plan(v3, 16, torch.bfloat16))]
    return rows + [(f"V2-Lite, bf16, {w} GPU{'s' * (w > 1)}", plan(lite, w, torch.bfloat16)) for w in (1, 2, 4)]


def test_docs_table_is_plans_output():
    from dsv3.distributed.plan import markdown_table
    table = markdown_table(doc_rows())
    doc = (Path(__file__).resolve().parents[1] / "docs" / "distributed.md").read_text()
    assert table in doc, "docs/distributed.md's table differs from plan(); it should read:\n" + table


@pytest.mark.parametrize("config", [
    dsv3.ModelConfig.tiny(),
    dsv3.ModelConfig.tiny(index_n_heads=4, index_head_dim=16, index_topk=6, attention_bias=True),
    dsv3.ModelConfig.tiny(q_lora_rank=None, topk_method="greedy", scoring_func="softmax", n_group=1, topk_group=1,
                          n_shared_experts=2, first_k_dense_replace=2)], ids=["v3", "dsa-bias", "v2-lite"])
@pytest.mark.parametrize("world", [2, 4])
def test_plan_counts_what_parallelize_holds(config, world):
    """plan()'s split and replicated bytes are those of a parallelized (meta) model, fp32 and bf16 (the router
    stays fp32: its bytes are the same in both)."""
    from dsv3.distributed import plan
    from dsv3.hub import FP32_KEYS
    with torch.device("meta"):
        model = parallelize(dsv3.Transformer(config), 0, world)
    state = model.state_dict()
    for dtype in (torch.float32, torch.bfloat16):
        size = torch.empty((), dtype=dtype).element_size()
        held = {True: 0, False: 0}
        for name, s in shards(model).items():
            held[s.replicated] += state[name].numel() * (4 if FP32_KEYS.match(name) else size)
        p = plan(config, world, dtype)
        assert (p.sharded_bytes, p.replicated_bytes) == (held[False], held[True]), dtype
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by the world size 8"):
        plan(config, 8)



PROMPTS = [f"Question {i}: what is" for i in range(8)]


def sdk_answers(base_url: str) -> list[str]:
    """The texts of 8 concurrent greedy completions through the openai SDK."""
    import concurrent.futures

    import openai
    from server_utils import KEY

    client = openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=60)
    name = client.models.list().data[0].id
    ask = lambda p: client.completions.create(model=name, prompt=p, max_tokens=12, temperature=0).choices[0].text
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(ask, PROMPTS))


@pytest.fixture(scope="module")
def single_process_answers() -> list[str]:
    from server_utils import ServerThread, server_options
    from dsv3.server.cli import build_app

    single = ServerThread(build_app(server_options(dsv3.bundled_model_path())))
    try:
        return sdk_answers(single.base_url)
    finally:
        single.stop()


def wait_until_serving(port: int, procs) -> None:
    """Poll /v1/models until the server answers (90 s at most); fail at once if a process has exited."""
    import time

    import openai
    from server_utils import KEY

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=5)
    deadline = time.monotonic() + 90
    while True:
        assert all(p.poll() is None for p in procs), [p.stderr.read()[-2000:] for p in procs if p.poll() is not None]
        try:
            client.models.list()
            return
        except openai.APIConnectionError:
            assert time.monotonic() < deadline, "the 2-rank server did not start in 90 s"
            time.sleep(0.5)


def serve_env(tmp_path) -> dict:
    import os

    from server_utils import KEY

    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1",
            "DSV3_API_KEY": KEY}


def test_two_rank_server_answers_as_one_process_and_dies_with_a_rank(tmp_path, single_process_answers):
    """`dsv3 serve` as 2 ranks (the environment torchrun sets, so that rank 1 can be killed alone, as on another
    node): 8 concurrent openai-SDK requests get one process's texts; killing rank 1 makes rank 0 exit 1 with a
    message in < 30 s."""
    import subprocess
    import sys
    import time

    port, master = free_port(), free_port()
    env = {**serve_env(tmp_path), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master), "WORLD_SIZE": "2"}
    command = [sys.executable, "-m", "dsv3", "serve", "--port", str(port), "--device", "cpu"]
    ranks = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        wait_until_serving(port, ranks)
        assert sdk_answers(f"http://127.0.0.1:{port}/v1") == single_process_answers
        ranks[1].kill()
        killed = time.monotonic()
        assert ranks[0].wait(timeout=30) == 1 and time.monotonic() - killed < 30
        assert "rank 0 stops" in ranks[0].stderr.read()
    finally:
        for r in ranks:
            if r.poll() is None:
                r.kill()
                r.wait()


def _child_with_rank(parent: int, rank_: int) -> int:
    """The pid of a child process of `parent` whose environment says RANK=rank_ (a torchrun worker)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank_}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"no torchrun worker with RANK={rank_}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc")
def test_torchrun_serve_answers_as_one_process_and_goes_down_with_a_rank(tmp_path, single_process_answers):
    """README's command itself, `torchrun --nproc-per-node 2 -m dsv3 serve`: the same 8 texts as one process; when
    rank 1 is killed, torchrun takes the job down and exits non-zero within 30 s, naming the failed rank."""
    import os
    import signal
    import subprocess
    import sys
    import time

    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "dsv3", "serve", "--port", str(port), "--device", "cpu"]
    job = subprocess.Popen(command, env=serve_env(tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_until_serving(port, [job])
        assert sdk_answers(f"http://127.0.0.1:{port}/v1") == single_process_answers
        os.kill(_child_with_rank(job.pid, 1), signal.SIGKILL)
        killed = time.monotonic()
        assert job.wait(timeout=30) != 0 and time.monotonic() - killed < 30
        summary = job.stderr.read()  # torchrun's failure summary names the rank and how it ended
        assert re.search(r"\brank\s*:\s*1\b", summary) and "SIGKILL" in summary, summary[-1500:]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
