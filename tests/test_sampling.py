"""dsv3.sampling: parameter validation, penalties against hand-computed logits, top_k/top_p masks, seeding."""

import math

import pytest
import torch

from dsv3.sampling import (SamplingParams, apply_penalties, count_tokens, make_generator, sample, token_logprobs,
                           top_k_top_p_mask)


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.01), ("top_k", -1),
    ("top_k", 2.5), ("presence_penalty", 2.5), ("frequency_penalty", -2.01), ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0), ("repetition_penalty", 1e-300), ("repetition_penalty", 1e3), ("min_p", -0.1),
    ("min_p", 1.5), ("min_p", float("inf")), ("max_new_tokens", 0), ("max_new_tokens", True), ("stop_token_ids", "abc"),
    ("stop_token_ids", (1, -2)), ("seed", 1.5), ("logit_bias", {"5": 1.0}),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_valid_params_are_normalised():
    p = SamplingParams(temperature=0.7, top_p=1.0, top_k=0, presence_penalty=-2, frequency_penalty=2,
                       stop_token_ids=[1, 2], seed=0)
    assert p.stop_token_ids == (1, 2) and not p.greedy and p.has_penalties
    assert SamplingParams().greedy and not SamplingParams().has_penalties


def test_penalties_match_hand_computed_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0, -0.5]] * 2)
    prompt_mask = torch.tensor([[False, True, False, False, False, False]] * 2)
    output_counts = torch.tensor([[2, 0, 0, 1, 0, 0]] * 2)
    params = [SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                             logit_bias={5: 1.5}),
              SamplingParams()]
    out = apply_penalties(logits, params, output_counts, prompt_mask)
    expected_row0 = [
        2.0 / 2 - 2 * 0.5 - 0.25,  # generated twice: CTRL divides the positive logit, then frequency + presence
        -1.0 * 2,  # only in the prompt: CTRL multiplies the negative logit; OpenAI's penalties skip prompt tokens
        0.5,  # never seen
        3.0 / 2 - 1 * 0.5 - 0.25,
        0.0,
        -0.5 + 1.5,  # logit_bias
    ]
    torch.testing.assert_close(out[0], torch.tensor(expected_row0))
    torch.testing.assert_close(out[1], logits[1])  # row 1 has neutral params
    torch.testing.assert_close(logits[0], torch.tensor([2.0, -1.0, 0.5, 3.0, 0.0, -0.5]))  # input untouched


def test_negative_penalties_encourage_repeats():
    logits = torch.zeros(1, 3)
    out = apply_penalties(logits, [SamplingParams(frequency_penalty=-1.0, presence_penalty=-0.5)],
                          torch.tensor([[0, 3, 0]]), None)
    torch.testing.assert_close(out, torch.tensor([[0.0, 3.5, 0.0]]))


def test_logit_bias_outside_vocab_is_rejected():
    with pytest.raises(ValueError, match="logit_bias"):
        apply_penalties(torch.zeros(1, 4), [SamplingParams(logit_bias={4: 1.0})], None, None)


def _kept(masked: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(torch.isfinite(row)).flatten().tolist() for row in masked]


def test_top_k_mask_keeps_k_highest_per_row():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]] * 3)
    masked = top_k_top_p_mask(logits, torch.tensor([2, 0, 1]), torch.ones(3))
    assert _kept(masked) == [[1, 3], [0, 1, 2, 3, 4], [1]]
    torch.testing.assert_close(masked[0, [1, 3]], logits[0, [1, 3]])


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(4, 4)
    masked = top_k_top_p_mask(logits, torch.zeros(4, dtype=torch.long), torch.tensor([0.4, 0.75, 0.9, 1.0]))
    assert _kept(masked) == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]


def test_top_p_applies_to_the_renormalised_top_k():
    # After top_k=2 the kept probabilities are 0.625 and 0.375, so p=0.6 keeps only the first token
    # (on the full distribution, 0.5 < 0.6 would also keep the second).
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert _kept(top_k_top_p_mask(logits, torch.tensor([2]), torch.tensor([0.6]))) == [[0]]


def test_greedy_rows_take_the_argmax_after_penalties():
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    counts = torch.tensor([[0, 1, 0], [0, 0, 0]])
    params = [SamplingParams(presence_penalty=2.0), SamplingParams(presence_penalty=2.0)]
    assert sample(logits, params, output_counts=counts).tolist() == [2, 1]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 1000)
    params = [SamplingParams(temperature=1.0, seed=11), SamplingParams(), SamplingParams(temperature=0.8, seed=12)]

    def draws(rows, n=20):
        generators = [make_generator(params[b].seed) for b in rows]
        return torch.stack([sample(logits[rows], [params[b] for b in rows], generators) for _ in range(n)])

    together = draws([0, 1, 2])
    assert torch.equal(together, draws([0, 1, 2]))
    assert torch.equal(together[:, 0], draws([0])[:, 0])  # row 0 alone draws the same tokens
    assert torch.equal(together[:, 2], draws([2])[:, 0])
    assert (together[:, 1] == logits[1].argmax()).all()
    assert not torch.equal(together[:, 0], together[:, 2])  # different seeds, different streams


def test_sampling_stays_inside_the_top_k_top_p_set():
    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    params = [SamplingParams(temperature=1.5, top_k=3, seed=1), SamplingParams(temperature=1.0, top_p=0.3, seed=2)]
    allowed = _kept(top_k_top_p_mask(logits / torch.tensor([[1.5], [1.0]]), torch.tensor([3, 0]),
                                     torch.tensor([1.0, 0.3])))
    generators = [make_generator(p.seed) for p in params]
    seen = [set(), set()]
    for _ in range(200):
        for b, t in enumerate(sample(logits, params, generators).tolist()):
            seen[b].add(t)
    assert seen[0] == set(allowed[0]) and len(allowed[0]) == 3  # 200 draws from 3 tokens hit all of them
    assert seen[1] <= set(allowed[1])


def test_sample_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="2 SamplingParams for 1 rows"):
        sample(torch.zeros(1, 4), [SamplingParams(), SamplingParams()])


def test_token_logprobs():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    lp = token_logprobs(logits, torch.tensor([1, 0]), top_n=2)
    expected = logits.log_softmax(-1)
    torch.testing.assert_close(lp.chosen, torch.stack([expected[0, 1], expected[1, 0]]))
    assert lp.top_ids[0].tolist() == [2, 1] and lp.top_ids[1, 0] == 0
    torch.testing.assert_close(lp.top_logprobs[0], expected[0, [2, 1]])
    assert math.isclose(lp.top_logprobs.exp()[1].sum().item() + expected[1, 2].exp().item(), 1.0, rel_tol=1e-5)


def test_count_tokens_of_ragged_rows():
    counts = count_tokens([[1, 1, 3], [0]], vocab_size=4)
    assert counts.tolist() == [[0, 2, 0, 1], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match=r"row 1 .*\[0, 4\)"):
        count_tokens([[1], [4]], vocab_size=4)


def test_min_p_keeps_tokens_at_least_min_p_times_the_most_likely():
    logits = torch.tensor([[0.0, math.log(0.5), math.log(0.09), math.log(0.2)]])  # probabilities 1 : .5 : .09 : .2
    params = [SamplingParams(temperature=1.0, min_p=0.1, seed=s) for s in range(200)]
    drawn = {int(sample(logits, [p], [make_generator(p.seed)])[0]) for p in params}
    assert drawn == {0, 1, 3}  # 0.09 < 0.1 x 1 is dropped


def test_top_k_beyond_the_vocabulary_keeps_every_token():
    logits = torch.randn(2, 5)
    big, off = SamplingParams(temperature=1.0, top_k=10**20, seed=1), SamplingParams(temperature=1.0, seed=1)
    assert sample(logits, [big, big], [make_generator(1), make_generator(2)]).tolist() == sample(
        logits, [off, off], [make_generator(1), make_generator(2)]).tolist()


def test_rows_without_a_distribution_get_minus_one_and_the_others_are_drawn():
    logits = torch.zeros(3, 4)
    logits[1, 2] = float("nan")
    logits[2, 0] = 5.0
    params = [SamplingParams(temperature=1.0, seed=0), SamplingParams(temperature=1.0), SamplingParams()]
    tokens = sample(logits, params, [make_generator(0), None, None])
    assert tokens[1] == -1 and tokens[2] == 0 and 0 <= tokens[0] < 4
