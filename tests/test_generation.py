"""dsv3.generation: cached decoding against full recomputation and transformers, stop tokens, seeding, stop strings."""

from pathlib import Path

import pytest
import torch

from dsv3 import ModelConfig, Transformer
from dsv3.generation import StopStringStreamer, generate, stream_generate, stream_text
from dsv3.tokenizer import Tokenizer

BUNDLED = Path(__file__).resolve().parents[1] / "dsv3" / "bundled"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.tiny()).eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(2, 1024, (2, 5), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def reference_greedy(model, input_ids, steps, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0):
    """Plain loop: the whole sequence through the model at every step, penalties written out token by token."""
    ids = input_ids.clone()
    T = ids.shape[1]
    for _ in range(steps):
        logits = model(ids)[:, -1].clone()
        for b in range(ids.shape[0]):
            for token in set(ids[b].tolist()):
                value = logits[b, token]
                logits[b, token] = value / repetition_penalty if value > 0 else value * repetition_penalty
            generated = ids[b, T:].tolist()
            for token in set(generated):
                logits[b, token] -= generated.count(token) * frequency_penalty + presence_penalty
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def test_greedy_through_cache_equals_full_recomputation(model, prompt):
    out = generate(model, prompt, 12)
    assert out.shape == (2, 17) and out.dtype == torch.long
    assert torch.equal(out, reference_greedy(model, prompt, 12))


def test_greedy_with_penalties_equals_hand_written_reference(model, prompt):
    kwargs = dict(repetition_penalty=1.7, frequency_penalty=0.8, presence_penalty=0.4)
    out = generate(model, prompt, 10, **kwargs)
    assert torch.equal(out, reference_greedy(model, prompt, 10, **kwargs))
    assert not torch.equal(out, generate(model, prompt, 10))  # the penalties changed something


def test_stop_token_finishes_one_row_and_pads_it(model, prompt):
    free = generate(model, prompt, 10)
    stop = int(free[0, 5 + 3])  # row 0's 4th new token
    assert stop not in free[1, 5:].tolist()
    first = free[0, 5:].tolist().index(stop)  # the first time row 0 emits it
    out = generate(model, prompt, 10, stop_token_ids=[stop])
    assert out.shape == free.shape
    assert torch.equal(out[0, :5 + first + 1], free[0, :5 + first + 1])
    assert (out[0, 5 + first:] == stop).all()  # padded with the stop token it hit
    assert torch.equal(out[1], free[1])  # the other row is unaffected
    padded = generate(model, prompt, 10, stop_token_ids=[stop], pad_token_id=0)
    assert (padded[0, 5 + first + 1:] == 0).all() and padded[0, 5 + first] == stop


def test_generation_ends_when_every_row_has_stopped(model, prompt):
    free = generate(model, prompt[:1], 10)
    stop = int(free[0, 7])
    n = free[0, 5:].tolist().index(stop) + 1
    out = generate(model, prompt[:1], 10, stop_token_ids=(stop, 1))
    assert torch.equal(out, free[:, :5 + n])


def test_stream_generate_yields_the_steps_of_generate(model, prompt):
    stop = int(generate(model, prompt, 4)[1, -1])
    steps = list(stream_generate(model, prompt, 8, stop_token_ids=[stop]))
    out = generate(model, prompt, 8, stop_token_ids=[stop])
    assert torch.equal(torch.stack([s.tokens for s in steps], dim=1), out[:, 5:])
    assert steps[3].finished.tolist()[1] and steps[3].active.tolist()[1]  # row 1 emits its stop token here
    assert not steps[4].active.tolist()[1] and steps[4].finished.tolist()[1]
    assert all(s.active[0] for s in steps)


def test_seeded_sampling_is_reproducible(model, prompt):
    kwargs = dict(temperature=1.0, top_p=0.95, top_k=50, seed=123)
    a = generate(model, prompt, 10, **kwargs)
    assert torch.equal(a, generate(model, prompt, 10, **kwargs))
    assert torch.equal(a[:1], generate(model, prompt[:1], 10, **kwargs))  # row 0 alone: same seed, same tokens
    assert not torch.equal(a, generate(model, prompt, 10, **{**kwargs, "seed": 124}))
    assert not torch.equal(a, generate(model, prompt, 10))  # not greedy


@pytest.mark.parametrize("kwargs, name", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-3), "top_k"), (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=5000), "max_new_tokens"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(stop_token_ids=1), "stop_token_ids"), (dict(seed="x"), "seed"), (dict(pad_token_id=-1), "pad_token_id"),
    (dict(input_ids=torch.zeros(1, 3)), "input_ids"), (dict(input_ids=torch.zeros(3, dtype=torch.long)), "input_ids"),
    (dict(input_ids=torch.full((1, 3), 1024)), "input_ids"),
])
def test_invalid_arguments_raise_naming_them(model, prompt, kwargs, name):
    args = {"input_ids": prompt, "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        generate(model, **args)
    with pytest.raises(ValueError, match=name):
        stream_generate(model, **args)  # checked before the first step is asked for


def test_greedy_matches_transformers_generate(model, prompt, tmp_path):
    transformers = pytest.importorskip("transformers")
    from dsv3.checkpoint import save_pretrained

    save_pretrained(model, tmp_path)
    transformers.logging.set_verbosity_error()  # the MTP layer is unexpected to transformers; it drops it
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    mask = torch.ones_like(prompt)
    free = hf.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=10, eos_token_id=None)
    assert torch.equal(generate(model, prompt, 10), free)
    stop = int(free[0, 8])  # make row 0 stop early: both pad the finished row with it
    ours = generate(model, prompt, 10, stop_token_ids=[stop])
    theirs = hf.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=10, eos_token_id=stop,
                         pad_token_id=stop)
    assert torch.equal(ours, theirs)
    ours = generate(model, prompt, 10, repetition_penalty=1.5)
    theirs = hf.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=10, eos_token_id=None,
                         repetition_penalty=1.5)
    assert torch.equal(ours, theirs)


class FakeTokenizer:
    """One string per token id; its incremental decoder returns each token's string as it comes."""

    eos_token_id = 0

    def __init__(self, pieces):
        self.pieces = pieces

    def incremental_decoder(self, skip_special_tokens=False):
        pieces = self.pieces

        class Decoder:
            def push(self, token_id):
                return pieces[token_id]

            def flush(self):
                return ""

        return Decoder()


def stream(pieces, stop, ids=None):
    streamer = StopStringStreamer(FakeTokenizer(pieces), stop)
    outputs = [streamer.push(i) for i in (ids if ids is not None else range(len(pieces)))]
    return outputs, streamer.flush(), streamer


def test_stop_string_split_across_tokens_is_cut_and_held_back():
    outputs, tail, streamer = stream(["Hello", " wor", "ld<", "|e", "nd|>", " after"], ["<|end|>"])
    assert outputs == ["Hello", " wor", "ld", "", "", ""]  # "<" and "<|e" are held back, never shown
    assert tail == "" and streamer.stopped and streamer.stop_string == "<|end|>"


def test_partial_stop_string_is_released_when_it_does_not_complete():
    outputs, tail, streamer = stream(["a<|", "x", "b<"], ["<|end|>"])
    assert outputs == ["a", "<|x", "b"] and tail == "<" and not streamer.stopped


def test_stop_string_inside_one_token_and_the_earliest_of_several_wins():
    outputs, _, streamer = stream(["abSTOPcdEND"], ["END", "STOP"])
    assert outputs == ["ab"] and streamer.stop_string == "STOP"
    outputs, tail, _ = stream(["x", "STOP", "y"], "STOP")  # a single string is accepted too
    assert outputs == ["x", "", ""] and tail == ""


def test_stop_string_completed_at_flush():
    class Flushing(FakeTokenizer):
        def incremental_decoder(self, skip_special_tokens=False):
            class Decoder:
                def push(self, token_id):
                    return "ab\n"

                def flush(self):
                    return "\nrest"

            return Decoder()

    streamer = StopStringStreamer(Flushing([]), ["\n\n"])
    assert streamer.push(0) == "ab"
    assert streamer.flush() == "" and streamer.stopped


def test_stop_strings_must_be_non_empty():
    with pytest.raises(ValueError, match="stop"):
        StopStringStreamer(FakeTokenizer([]), ["ok", ""])


def test_stop_string_with_the_bundled_tokenizer():
    tok = Tokenizer.from_pretrained(BUNDLED)
    ids = tok.encode("a word of English. STOP then more words", add_special_tokens=False)
    streamer = StopStringStreamer(tok, ["STOP"])
    text = "".join(streamer.push(i) for i in ids) + streamer.flush()
    assert text == "a word of English. " and streamer.stopped


def test_stream_text_yields_the_decoded_generation_cut_at_stop_strings():
    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(BUNDLED)
    model = Transformer(ModelConfig.tiny(vocab_size=tok.vocab_size)).eval()
    prompt = tok.encode("The meaning of")
    out = generate(model, torch.tensor([prompt]), 12, stop_token_ids=[tok.eos_token_id])[0, len(prompt):].tolist()
    if tok.eos_token_id in out:
        out = out[:out.index(tok.eos_token_id)]
    full = tok.decode(out, skip_special_tokens=True)
    assert "".join(stream_text(model, tok, prompt, 12)) == full
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = "".join(stream_text(model, tok, prompt, 12, stop=[stop]))
    assert cut == full[:full.index(stop)]


def test_sampling_from_nan_logits_is_a_clear_error():
    """`sample` marks a row it cannot draw for with -1; generate says so instead of feeding -1 to the embedding."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny()).eval()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="sampling failed at step 0: the logits hold NaN"):
        generate(model, torch.tensor([[1, 2, 3]]), 4, temperature=0.8, seed=0)
