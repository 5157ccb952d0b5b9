"""Training loop: losses (LM, MTP, balance), aux-loss-free bias updates, schedule, checkpoints, resume, CLI."""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dsv3 import ModelConfig, Transformer
from dsv3 import data as data_mod
from dsv3 import train as train_mod
from dsv3 import train_state
from dsv3.moe import MoE
from dsv3.train import TrainConfig, compute_loss, lr_at, train, update_router_bias

torch.set_num_threads(1)
TOKENS = np.tile(np.arange(2, 34), 100)  # a repetitive corpus: 32 distinct tokens cycling


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.tiny(**{"vocab_size": 64, "num_nextn_predict_layers": 1, **overrides}))


def config(tmp_path: Path, **overrides) -> TrainConfig:
    base = dict(steps=6, seq_len=16, batch_size=4, lr=3e-3, warmup_steps=2, log_every=1, eval_every=0,
                save_every=0, out_dir=str(tmp_path / "run"))
    return TrainConfig(**{**base, **overrides})


def biases(model: Transformer) -> torch.Tensor:
    return torch.stack([m.gate.e_score_correction_bias.clone() for m in model.modules() if isinstance(m, MoE)])


def test_loss_falls_and_metrics_are_written(tmp_path):
    cfg = config(tmp_path, steps=8, eval_every=4, eval_batches=2)
    history = train(tiny_model(), cfg, TOKENS, TOKENS[:500], progress=False)
    losses = [r["lm_loss"] for r in history]
    assert losses[-1] < np.log(32) - 0.5 < losses[0]  # from above ln(vocab) to well below the unigram entropy
    assert [r["step"] for r in history] == list(range(1, 9))
    assert "eval_loss" in history[3] and "eval_loss" in history[7] and "eval_loss" not in history[4]
    assert history[7]["eval_loss"] < history[3]["eval_loss"]
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == list(range(1, 9))
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    for name in ("step", "loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s",
                 "maxvio", "maxvio/model.layers.1.mlp", "eval_loss"):
        assert name in header
    last = history[-1]
    assert set(last["load"]) == {"model.layers.1.mlp", "model.layers.2.mlp", "mtp.0.mlp"}
    assert sum(last["load"]["model.layers.1.mlp"]) == cfg.batch_size * cfg.seq_len * 2  # K = 2 experts per token


def test_bias_update_sign_on_constructed_load():
    model = tiny_model()
    moes = train_mod.moe_layers(model)
    name = "model.layers.1.mlp"
    load = torch.tensor([10.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 0.0])  # mean 4: expert 0 over, 1 and 7 under
    update_router_bias({name: load}, moes, 0.01)
    assert moes[name].gate.e_score_correction_bias.tolist() == pytest.approx([-0.01, 0.01, 0, 0, 0, 0, 0, 0.01])
    assert not moes["model.layers.2.mlp"].gate.e_score_correction_bias.any()  # no load given: untouched


def test_gamma_zero_keeps_biases_and_gamma_moves_them(tmp_path):
    off = tiny_model()
    train(off, config(tmp_path / "a", steps=3, bias_update_speed=0.0), TOKENS, progress=False)
    assert not biases(off).any()
    on = tiny_model()
    history = train(on, config(tmp_path / "b", steps=1, bias_update_speed=0.01), TOKENS, progress=False)
    moes = train_mod.moe_layers(on)
    for name, load in history[0]["load"].items():  # the step's load, summed over its batch
        load = torch.tensor(load)
        expected = 0.01 * torch.sign(load.mean() - load)
        assert torch.allclose(moes[name].gate.e_score_correction_bias, expected)
        assert history[0]["bias"][name] == pytest.approx(expected.tolist())


def test_micro_batches_accumulate_to_the_full_batch(tmp_path):
    full, split = tiny_model(), tiny_model()
    a = train(full, config(tmp_path / "a", steps=2), TOKENS, progress=False)
    b = train(split, config(tmp_path / "b", steps=2, micro_batch_size=2), TOKENS, progress=False)
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5) and ra["load"] == rb["load"]
    assert torch.equal(biases(full), biases(split))  # the bias update sees the load of the whole step


def test_balance_loss_matches_hand_computation():
    torch.manual_seed(0)
    cfg = ModelConfig.tiny(vocab_size=64, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1)
    moe = MoE(cfg).train()
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    x = torch.randn(2, 5, cfg.hidden_size)  # B=2 sequences of T=5 tokens
    moe(x)
    E, K, T = 4, 2, 5
    expected = []
    for b in range(2):
        s = torch.sigmoid(x[b] @ moe.gate.weight.T)  # [T, E]
        chosen = torch.zeros(T, E).scatter_(1, s.topk(K, dim=-1).indices, 1.0)
        f = E / (K * T) * chosen.sum(0)  # eq. 18
        p = (s / s.sum(-1, keepdim=True)).mean(0)  # eqs. 19-20
        expected.append((f * p).sum())
    assert moe.last_balance_loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)


def test_alpha_and_lambda_enter_the_total_loss():
    model = tiny_model().train()
    batch = torch.from_numpy(TOKENS[:2 * 17].reshape(2, 17).astype(np.int64))
    total, parts = compute_loss(model, batch, TrainConfig(balance_loss_alpha=0.5, mtp_loss_weight=0.3))
    n_moe = 3  # two main MoE layers + the MTP layer's
    expected = parts["lm_loss"] + 0.3 * parts["mtp_loss"] + 0.5 * parts["balance_loss"] * n_moe
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    # MTP depth 0: the head on the main model's hidden states predicts token i + 2 (API: model.mtp_logits)
    logits, hidden = model(batch[:, :-1], return_hidden=True)
    mtp = model.mtp_logits(hidden[:, :-1], batch[:, :-1])
    assert parts["mtp_loss"].item() == pytest.approx(
        F.cross_entropy(mtp.flatten(0, 1), batch[:, 2:].flatten()).item(), rel=1e-6)

    total, parts = compute_loss(model, batch, TrainConfig(balance_loss_alpha=0.0, mtp_loss_weight=0.0))
    assert "mtp_loss" not in parts and total.item() == pytest.approx(parts["lm_loss"].item(), rel=1e-6)
    total.backward()
    assert all(p.grad is None for p in model.mtp.parameters())  # λ = 0: the MTP module is not even run
    assert all(p.grad is not None for p in model.model.parameters() if p.ndim > 1)


def test_lr_schedule():
    cfg = TrainConfig(steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)


def test_deterministic_and_resume_equals_uninterrupted(tmp_path):
    straight = train(tiny_model(), config(tmp_path / "a", save_every=3), TOKENS, progress=False)
    cfg = config(tmp_path / "c", save_every=3)
    first = train(tiny_model(), cfg, TOKENS, stop_at=3, progress=False)
    assert [r["loss"] for r in first] == [r["loss"] for r in straight[:3]]  # same seed, same curve, bit for bit
    resumed = train(tiny_model(seed=123), cfg, TOKENS, resume=True, progress=False)  # weights come from disk
    assert [r["step"] for r in first + resumed] == list(range(1, 7))
    for a, b in zip(straight[3:], resumed):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and a["maxvio"] == b["maxvio"]
    rows = (tmp_path / "c" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == list(range(1, 7))  # no duplicated steps after resume
    with pytest.raises(ValueError, match="batch_size"):
        train(tiny_model(), config(tmp_path / "c", batch_size=2), TOKENS, resume=True, progress=False)


def test_rng_states_round_trip():
    state = train_state.rng_state()
    draws = (torch.rand(3), np.random.rand(3), random.random())
    train_state.set_rng_state(json.loads(json.dumps(state)))
    assert torch.equal(torch.rand(3), draws[0]) and np.array_equal(np.random.rand(3), draws[1])
    assert random.random() == draws[2]


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    cfg = config(tmp_path, steps=2, save_every=1, keep_checkpoints=0)
    model = tiny_model()
    train(model, cfg, TOKENS, stop_at=1, progress=False)
    run = Path(cfg.out_dir)
    assert [p.name for p in train_state.checkpoints(run)] == ["checkpoint-000001"]
    before = (run / "checkpoint-000001" / "model.safetensors").read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(model, cfg, TOKENS, resume=True, progress=False)
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["checkpoint-000001"]  # no partial, no temp dir
    assert (run / "checkpoint-000001" / "model.safetensors").read_bytes() == before


def test_train_config_json_rejects_unknown_keys(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"steps": 5, "learning_rate": 1e-3}))
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_json(path)
    path.write_text(json.dumps({"steps": "5"}))
    with pytest.raises(ValueError, match="steps"):
        TrainConfig.from_json(path)
    path.write_text(json.dumps({"steps": 5, "betas": [0.9, 0.99]}))
    assert TrainConfig.from_json(path).betas == (0.9, 0.99)


def test_dataset_rows_are_tokenized_as_documents(tmp_path):
    from dsv3.tokenizer import Tokenizer

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "a gloss"}\n{"body": ""}\n{"body": "another one"}\n')
    tok = Tokenizer.from_pretrained(train_mod._BUNDLED)
    docs = list(data_mod.dataset_documents(str(rows), text_column="body", cache_dir=tmp_path / "hf"))
    assert docs == ["a gloss", "another one"]
    stream = data_mod.tokenize(docs, tok)
    expected = tok.encode("a gloss") + [tok.eos_token_id] + tok.encode("another one") + [tok.eos_token_id]
    assert stream.dtype == np.uint16 and stream.tolist() == expected and expected[0] == tok.bos_token_id
    with pytest.raises(ValueError, match="no column 'text'"):
        list(data_mod.dataset_documents(str(rows), cache_dir=tmp_path / "hf"))


def test_cli_trains_from_text_and_caches_tokens(tmp_path, monkeypatch, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"word {i % 7} means thing {i % 5}" for i in range(300)))
    model_cfg = tmp_path / "config.json"
    ModelConfig.tiny(vocab_size=8192, num_nextn_predict_layers=1).to_json(model_cfg)
    out = tmp_path / "out"
    args = ["--config", str(model_cfg), "--data", str(text), "--out", str(out), "--steps", "2", "--seq-len", "16",
            "--batch-size", "2", "--eval-fraction", "0.1", "--eval-every", "2", "--eval-batches", "1",
            "--no-bias-balance", "--no-progress"]
    parser = argparse.ArgumentParser()
    train_mod.add_cli(parser.add_subparsers())
    assert parser.parse_args(["train", *args]).func is train_mod.run  # what `dsv3 train` dispatches to
    assert train_mod.main(args) == 0
    final = out / "checkpoint-000002"
    assert {"config.json", "model.safetensors", "optimizer.pt", "trainer_state.json", "tokenizer.json"} <= {
        p.name for p in final.iterdir()}
    assert json.loads((out / "train_config.json").read_text())["bias_update_speed"] == 0.0
    assert "eval loss" in capsys.readouterr().out

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(data_mod, "tokenize", no_tokenizing)
    assert train_mod.main([*args, "--steps", "3", "--resume"]) == 0
    assert train_state.checkpoints(out)[-1].name == "checkpoint-000003"


# ----------------------------------------------------------------------------------------------- refusals
def test_a_fresh_run_refuses_a_directory_holding_an_earlier_run(tmp_path):
    """Without resume, an earlier run's checkpoints and metrics are never overwritten or deleted by retention."""
    cfg = config(tmp_path, steps=2, keep_checkpoints=1)
    train(tiny_model(), cfg, TOKENS, progress=False)
    run = Path(cfg.out_dir)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(FileExistsError, match=r"run already holds an earlier run's checkpoints \(checkpoint-000002\)"
                                              r": pass resume=True to continue it, or choose a new directory"):
        train(tiny_model(), config(tmp_path, steps=1, keep_checkpoints=1), TOKENS, progress=False)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    for name in run.iterdir():  # metrics of a run that saved no checkpoint are kept too
        if name.name != "metrics.jsonl":
            shutil.rmtree(name) if name.is_dir() else name.unlink()
    with pytest.raises(FileExistsError, match="metrics.jsonl .*no checkpoint to resume from"):
        train(tiny_model(), cfg, TOKENS, progress=False)
    (run / "metrics.jsonl").write_text("")  # interrupted before its first step: nothing to keep
    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty directory is fine
    assert train(tiny_model(), config(tmp_path, steps=1), TOKENS, progress=False)
    assert train(tiny_model(), TrainConfig(**{**config(tmp_path, steps=1).to_dict(), "out_dir": str(empty)}),
                 TOKENS, progress=False)


@pytest.mark.parametrize("field,value", [("lr", float("inf")), ("lr", float("nan")), ("grad_clip", float("nan")),
                                         ("min_lr", -1.0), ("weight_decay", float("inf")),
                                         ("mtp_loss_weight", float("nan")), ("balance_loss_alpha", float("inf")),
                                         ("bias_update_speed", float("nan"))])
def test_float_fields_must_be_finite(tmp_path, field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be a finite number >= 0, got {value}"):
        config(tmp_path, **{field: value})


@pytest.mark.parametrize("betas", [(float("nan"), 0.95), (0.9, 2.0), (0.9, 1.0), (-0.1, 0.9)])
def test_betas_must_be_in_adamws_range(tmp_path, betas):
    with pytest.raises(ValueError, match=r"TrainConfig\.betas must be two numbers in \[0, 1\)"):
        config(tmp_path, betas=betas)


def test_train_refuses_stop_at_below_one_and_seq_len_past_the_model(tmp_path):
    for stop_at in (0, -1):
        with pytest.raises(ValueError, match=f"stop_at: expected >= 1, got {stop_at}"):
            train(tiny_model(), config(tmp_path), TOKENS, stop_at=stop_at, progress=False)
    with pytest.raises(ValueError, match="seq_len 17 exceeds the model's max_position_embeddings 16"):
        train(tiny_model(max_position_embeddings=16), config(tmp_path, seq_len=17), TOKENS, progress=False)
    assert not (tmp_path / "run").exists()


def test_text_that_is_not_utf8_names_the_file_and_line(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("one\ntwo\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt:3: not UTF-8 text \(byte 0xe9\)"):
        list(data_mod.read_documents([latin1]))
    with pytest.raises(ValueError, match=r"latin1\.txt:3: not UTF-8 text"):
        TrainConfig.from_json(latin1)


@pytest.mark.parametrize("text,why", [("[1, 2]", "expected a JSON object of TrainConfig fields, got list"),
                                      ('{"lr": 1e-3,\n', r"train\.json:2: not valid JSON"),
                                      ('{"lr": NaN}', r"train\.json: TrainConfig\.lr must be a finite number")])
def test_train_config_json_errors_name_the_file(tmp_path, text, why):
    path = tmp_path / "train.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=why):
        TrainConfig.from_json(path)


@pytest.fixture
def cli_files(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"word {i % 7} means thing {i % 5}" for i in range(300)))
    model_cfg = tmp_path / "config.json"
    ModelConfig.tiny(vocab_size=8192, num_nextn_predict_layers=0, max_position_embeddings=32).to_json(model_cfg)
    return ["--config", str(model_cfg), "--data", str(text), "--out", str(tmp_path / "out"), "--steps", "1",
            "--seq-len", "16", "--batch-size", "2", "--no-progress"]


@pytest.mark.parametrize("flags,why", [
    (["--lr", "inf"], "TrainConfig.lr must be a finite number >= 0, got inf"),
    (["--grad-clip", "nan"], "TrainConfig.grad_clip must be a finite number >= 0, got nan"),
    (["--betas", "nan", "2"], r"TrainConfig.betas must be two numbers in \[0, 1\), got \[nan, 2.0\]"),
    (["--eval-fraction", "nan"], r"--eval-fraction: expected a number in \[0, 1\) \(0: none\), got nan"),
    (["--eval-fraction", "-0.5"], r"--eval-fraction: expected a number in \[0, 1\) \(0: none\), got -0.5"),
    (["--stop-at", "-1"], "--stop-at: expected >= 1, got -1"),
    (["--stop-at", "0"], "--stop-at: expected >= 1, got 0"),
    (["--seq-len", "33"], "--seq-len 33 exceeds the model's max_position_embeddings 32"),
    (["--resume"], "--resume: no checkpoint-.* in .*out"),
])
def test_cli_refuses_bad_values_up_front(cli_files, flags, why, tmp_path):
    with pytest.raises(SystemExit, match=f"^dsv3 train: {why}"):
        train_mod.main([*cli_files, *flags])
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_cli_names_a_data_or_train_config_file_that_is_not_utf8(cli_files, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("one\ncaf\xe9\n".encode("latin-1"))
    data_at = cli_files.index("--data") + 1
    with pytest.raises(SystemExit, match=r"^dsv3 train: .*latin1\.txt:2: not UTF-8 text \(byte 0xe9\)"):
        train_mod.main([*cli_files[:data_at], str(latin1), *cli_files[data_at + 1:]])
    with pytest.raises(SystemExit, match=r"^dsv3 train: .*latin1\.txt:2: not UTF-8 text"):
        train_mod.main([*cli_files, "--train-config", str(latin1)])


def test_cli_refuses_to_train_over_an_earlier_run(cli_files, tmp_path):
    out = tmp_path / "out"
    assert train_mod.main(cli_files) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(SystemExit, match=rf"^dsv3 train: --out {out} already holds an earlier run's checkpoints "
                                         r"\(checkpoint-000001\): pass --resume to continue it, or choose a new"):
        train_mod.main([*cli_files, "--steps", "2"])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert train_mod.main([*cli_files, "--steps", "2", "--resume"]) == 0
    assert [p.name for p in train_state.checkpoints(out)] == ["checkpoint-000001", "checkpoint-000002"]


# ----------------------------------------------------------------------------------------------- dsv3 train-vl
@pytest.mark.parametrize("flags,why", [
    (["--steps", "4", "--stage0-steps", "10", "--stage1-steps", "2"],
     r"--stage0-steps 10, --stage1-steps 2, --steps 4: expected 0 <= --stage0-steps <= --stage1-steps <= --steps"),
    (["--steps", "4", "--stage0-steps", "2", "--stage1-steps", "5"], "--stage1-steps 5, --steps 4: expected"),
    (["--steps", "4", "--stage0-steps", "-1", "--stage1-steps", "2"], "--stage0-steps -1, .*: expected"),
    (["--lr", "nan"], "--lr: expected a finite number >= 0, got nan"),
    (["--lora-lr", "inf"], "--lora-lr: expected a finite number >= 0, got inf"),
    (["--until", "0"], "--until: expected >= 1, got 0"),
])
def test_train_vl_refuses_bad_values(tmp_path, flags, why):
    from dsv3.cli import main

    with pytest.raises(SystemExit, match=why):
        main(["train-vl", "--output", str(tmp_path / "vl"), "--steps", "6", "--stage0-steps", "2",
              "--stage1-steps", "4", *flags])
    assert not (tmp_path / "vl").exists()


def test_train_vl_refuses_an_earlier_run_and_a_resume_drops_the_records_past_its_checkpoint(tmp_path):
    from dsv3.cli import main

    out = tmp_path / "vl"
    flags = ["train-vl", "--output", str(out), "--steps", "3", "--stage0-steps", "3", "--stage1-steps", "3",
             "--stage0-batch-size", "2", "--conv-stem", "16", "--lora-rank", "0", "--eval-every", "100",
             "--eval-size", "2", "--save-every", "2"]
    out.mkdir()  # an existing empty directory is fine
    assert main(flags) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match=rf"^dsv3 train-vl: --output {out} already holds an earlier run's "
                                         r"checkpoints \(checkpoint-2, checkpoint-3\): pass --resume"):
        main(flags)
    assert (out / "metrics.jsonl").read_text() == metrics
    shutil.rmtree(out / "checkpoint-3")  # as if it stopped after logging step 3, before saving it
    assert main([*flags, "--resume"]) == 0
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
