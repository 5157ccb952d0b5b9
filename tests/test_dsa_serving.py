"""Serving DeepSeek Sparse Attention models: every copy of cache contents (prefix-cache blocks, engine row moves,
the MMLU scorer's shared prefix) carries the indexer keys too, so cached runs select the same top-k tokens as a
plain forward. Also `dsv3 train --dsa-stage warmup|sparse [--index-topk K]` end to end."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import dsv3
import dsv3.cli
from dsv3.engine import Engine, EngineConfig, Request
from dsv3.eval.mmlu_data import load_mmlu, prompt, subject_prefix
from dsv3.eval.mmlu_scorers import ModelScorer
from dsv3.generation import generate
from dsv3.sampling import SamplingParams
from dsv3.speculative import speculative_generate
from dsv3.tokenizer import Tokenizer
from dsv3.train_state import checkpoints

from server_utils import BUNDLED, run_engine as run, tiny_model

TOPK = 4  # far fewer than the prompts' tokens: which keys the indexer picks decides the output


@pytest.fixture(scope="module")
def model():
    """float64 (as in test_engine.py), so that batched and cached computations, which round differently, cannot
    flip a greedy choice or a top-k pick."""
    return tiny_model(index_n_heads=4, index_head_dim=16, index_topk=TOPK).double()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(BUNDLED)


def reference(model, ids: list[int], n: int) -> list[int]:
    return generate(model, torch.tensor([ids]), n)[0, len(ids):].tolist()


def test_prefix_cache_hits_carry_the_indexer_keys(model, tokenizer):
    engine = Engine(model, tokenizer, EngineConfig(max_batch=1, max_seq_len=128, block_size=8))
    shared = tokenizer.encode("a long shared system prompt about owls and their nests " * 4)[:48]
    other = shared[:40] + tokenizer.encode(" and then something else", add_special_tokens=False)
    # a different prompt between the hits overwrites the row: a hit is right only if the blocks bring its keys
    filler = tokenizer.encode("an unrelated text on the tides of the northern sea " * 4)[:56]
    order = [shared, filler, shared, filler, other]
    results = [run(engine, [Request(p, SamplingParams(max_new_tokens=8), ignore_eos=True)])[0] for p in order]
    assert [r.usage.cached_tokens for r in results] == [0, 0, 40, 48, 40]
    for p, r in zip(order, results):
        assert r.token_ids == reference(model, p, 8)


def test_moved_rows_carry_the_indexer_keys(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer, EngineConfig(max_batch=3, max_seq_len=96, prefix_cache_bytes=0))
    moves = []
    move = engine._move_row
    monkeypatch.setattr(engine, "_move_row", lambda src, dst, n: moves.append((src, dst)) or move(src, dst, n))
    ps = [tokenizer.encode(f"note {i}: " + "the river runs under the old stone bridge " * 6)[:30 + 5 * i]
          for i in range(3)]
    lengths = [2, 3, 12]  # the first two leave early: the third moves from row 2 to row 0 while decoding
    results = run(engine, [Request(p, SamplingParams(max_new_tokens=n), ignore_eos=True)
                           for p, n in zip(ps, lengths)])
    assert moves
    for p, n, r in zip(ps, lengths, results):
        assert r.token_ids == reference(model, p, n)


def test_mmlu_scorer_prefix_sharing_carries_the_indexer_keys(model, tokenizer, monkeypatch):
    data = load_mmlu(None, "validation", subjects=["anatomy"], limit=4)
    shots = data.exemplars["anatomy"][:2]
    contexts = [prompt(q, shots) for q in data.questions["anatomy"]]
    starts = []
    forward = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda ids, cache, pos: starts.append(pos) or forward(ids, cache, pos))
    got = ModelScorer(model, tokenizer, batch_size=3).loglikelihoods(subject_prefix("anatomy", shots), contexts)
    monkeypatch.undo()
    assert max(starts) > 100  # the questions ran after a shared prefix copied into their cache rows
    want = []
    with torch.no_grad():
        for c in contexts:  # a plain forward: no cache, no batching
            ids = tokenizer.encode(c)
            lp = torch.log_softmax(model(torch.tensor([ids]))[0, -1], -1)
            want.append([float(lp[tokenizer.encode(c + f" {x}")[len(ids)]]) for x in "ABCD"])
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)


def test_speculative_decoding_drafts_through_an_mtp_cache_with_indexer_keys(model):
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        _, hidden = model(ids, return_hidden=True)
        full = model.mtp_logits(hidden[:, :-1], ids)
        cache = dsv3.KVCache(model.config, 1, 32, num_layers=1, dtype=torch.float64)  # speculative.py's MTP cache
        parts = [model.mtp_logits(hidden[:, :16], ids[:, :17], 0, cache, 0)]
        parts += [model.mtp_logits(hidden[:, i:i + 1], ids[:, i:i + 2], 0, cache, i) for i in range(16, 23)]
    assert cache.ik is not None
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)
    assert torch.equal(speculative_generate(model, ids, 8), generate(model, ids, 8))


# ---------------------------------------------------------------------------------------------- dsv3 train CLI
def test_cli_dsa_warmup_trains_only_the_indexers_and_sparse_trains_the_model(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"word {i % 7} means thing {i % 5}" for i in range(200)))
    dense = tmp_path / "dense"
    torch.manual_seed(0)
    dsv3.save_pretrained(dsv3.Transformer(dsv3.ModelConfig.tiny(vocab_size=8192)), dense)
    common = ["--data", str(text), "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--eval-fraction", "0",
              "--save-every", "1", "--no-progress"]
    warm, sparse = tmp_path / "warmup", tmp_path / "sparse"
    assert dsv3.cli.main(["train", "--model", str(dense), "--out", str(warm), "--dsa-stage", "warmup",
                          "--index-topk", "4", "--index-n-heads", "2", "--index-head-dim", "16", *common]) == 0
    first, last = checkpoints(warm)
    config = json.loads((last / "config.json").read_text())
    assert (config["index_topk"], config["index_n_heads"], config["index_head_dim"]) == (4, 2, 16)
    before, step1, step2 = (load_file(d / "model.safetensors") for d in (dense, first, last))
    indexer = {n for n in step2 if ".indexer." in n}
    assert indexer and set(step2) - indexer == set(before)
    for name in before:  # the main model (router biases too) stays byte-identical through the warm-up
        assert torch.equal(step1[name], before[name]) and torch.equal(step2[name], before[name]), name
    assert all(not torch.equal(step1[n], step2[n]) for n in indexer)  # while the indexers learn
    # the sparse stage starts from the warmed-up checkpoint (indexers in its config: no --index-topk)
    assert dsv3.cli.main(["train", "--model", str(last), "--out", str(sparse), "--dsa-stage", "sparse",
                          *common]) == 0
    final = checkpoints(sparse)[-1]
    assert json.loads((final / "config.json").read_text())["index_topk"] == 4
    after = load_file(final / "model.safetensors")
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.kv_b_proj.weight", "lm_head.weight"):
        assert not torch.equal(after[name], step2[name]), name


def test_cli_dsa_flags_are_checked(tmp_path, capsys):
    dense = tmp_path / "dense"
    torch.manual_seed(0)
    dsv3.save_pretrained(dsv3.Transformer(dsv3.ModelConfig.tiny(vocab_size=8192)), dense)
    (tmp_path / "unused.txt").write_text("never read: the flags fail first\n")
    base = ["train", "--model", str(dense), "--data", str(tmp_path / "unused.txt"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        dsv3.cli.main([*base, "--dsa-stage", "bogus"])
    assert exit_.value.code == 2 and "argument --dsa-stage: invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--dsa-stage sparse needs a model with indexers.*or --index-topk K"):
        dsv3.cli.main([*base, "--dsa-stage", "sparse"])
    with pytest.raises(SystemExit, match="--index-topk adds indexers to a dense model for --dsa-stage"):
        dsv3.cli.main([*base, "--index-topk", "4"])
