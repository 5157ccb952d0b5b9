"""MTP speculative decoding returns exactly plain greedy decoding's tokens, whatever the drafts are."""

from pathlib import Path

import pytest
import torch

import dsv3
import dsv3.speculative
from dsv3 import ModelConfig, Transformer
from dsv3.speculative import speculative_generate


def _model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.tiny()).eval()


def _oracle(model, reference: torch.Tensor, wrong_every: int = 0):
    """A drafter that proposes the reference's token (or a wrong one every `wrong_every` drafts)."""
    calls = []

    def draft(model_, hidden, input_ids, mtp_cache, start_pos):
        target = start_pos + hidden.shape[1] + 1  # position the last row predicts
        token = int(reference[0, target]) if target < reference.shape[1] else 0
        calls.append(target)
        if wrong_every and len(calls) % wrong_every == 0:
            token = (token + 1) % model.config.vocab_size
        return torch.tensor([[token]])

    return draft


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_greedy_generate_with_the_real_mtp_head(seed):
    model = _model(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(seed))
    out, stats = speculative_generate(model, ids, 16, return_stats=True)
    assert torch.equal(out, dsv3.generate(model, ids, 16))
    assert stats.new_tokens == 16 and stats.forwards == 1 + stats.drafted


@pytest.mark.parametrize("wrong_every", [0, 3, 1])
def test_equals_greedy_generate_when_drafts_are_accepted_or_rejected(monkeypatch, wrong_every):
    model = _model(2)
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(2))
    reference = dsv3.generate(model, ids, 15)
    monkeypatch.setattr(dsv3.speculative, "_draft", _oracle(model, reference, wrong_every))
    out, stats = speculative_generate(model, ids, 15, return_stats=True)
    assert torch.equal(out, reference)
    if wrong_every == 0:  # every draft right: two tokens per forward
        assert stats.accepted == stats.drafted and stats.forwards <= 1 + 15 // 2
    if wrong_every == 1:
        assert stats.accepted == 0


def test_stops_at_a_stop_token_like_generate(monkeypatch):
    model = _model(3)
    ids = torch.randint(2, model.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(3))
    free = dsv3.generate(model, ids, 12)
    stop = int(free[0, 4 + 6])
    reference = dsv3.generate(model, ids, 12, stop_token_ids=[stop])
    monkeypatch.setattr(dsv3.speculative, "_draft", _oracle(model, free))
    assert torch.equal(speculative_generate(model, ids, 12, stop_token_ids=[stop]), reference)


def test_mtp_logits_through_its_cache_equal_the_full_recomputation():
    model = _model(4)
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        _, hidden = model(ids, return_hidden=True)
        full = model.mtp_logits(hidden[:, :-1], ids)
        cache = dsv3.KVCache(model.config, 1, 16, num_layers=1)
        parts = [model.mtp_logits(hidden[:, :5], ids[:, :6], 0, cache, 0)]
        parts += [model.mtp_logits(hidden[:, i:i + 1], ids[:, i:i + 2], 0, cache, i) for i in range(5, 8)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)


def test_rejects_batches_and_models_without_mtp():
    model = _model(5)
    with pytest.raises(ValueError, match="one sequence"):
        speculative_generate(model, torch.zeros(2, 3, dtype=torch.long), 4)
    model.mtp = torch.nn.ModuleList()
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        speculative_generate(model, torch.zeros(1, 3, dtype=torch.long), 4)


@pytest.mark.skipif(not (Path(dsv3.__file__).parent / "bundled" / "model.safetensors").exists(),
                    reason="bundled model not built")
def test_equals_greedy_generate_on_the_bundled_model():
    model = dsv3.load_pretrained(dsv3.bundled_model_path(), dtype=torch.float32).eval()
    tok = dsv3.Tokenizer.from_pretrained(dsv3.bundled_model_path())
    ids = torch.tensor([tok.encode("The history of the city begins")])
    out, stats = speculative_generate(model, ids, 24, return_stats=True)
    assert torch.equal(out, dsv3.generate(model, ids, 24))
    assert stats.accepted > 0
