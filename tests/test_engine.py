"""The inference engine: batching, prefix cache, LRU eviction, cancellation, sampling options, logprobs."""

from __future__ import annotations

import pytest
import torch

from dsv3.engine import ContextLengthError, Engine, EngineConfig, QueueFullError, Request, Result
from dsv3.generation import generate
from dsv3.sampling import SamplingParams
from dsv3.tokenizer import Tokenizer

from server_utils import BUNDLED, COMPILE_SIZED, run_engine as run, tiny_model


@pytest.fixture(scope="module")
def model():
    """float64, so that batched, lone and prefix-cached computations (which round differently) cannot flip a greedy
    choice between near-equal logits of a random model."""
    torch.set_num_threads(1)
    return tiny_model().double()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_pretrained(BUNDLED)


def prompts(tokenizer, n: int) -> list[list[int]]:
    return [tokenizer.encode(f"prompt number {i}: " + "the cat sat on the mat " * (i % 3 + 1)) for i in range(n)]


def greedy(max_new: int = 8) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new)


def test_batched_decode_equals_single_request_greedy(model, tokenizer):
    ps = prompts(tokenizer, 6)
    lengths = [9, 3, 6, 12, 4, 8]  # rows leave at different steps, so later rows move into freed ones
    engine = Engine(model, tokenizer, EngineConfig(max_batch=4, max_seq_len=128, prefix_cache_bytes=0))
    alone = [run(engine, [Request(p, greedy(n), ignore_eos=True)])[0] for p, n in zip(ps, lengths)]
    together = run(engine, [Request(p, greedy(n), ignore_eos=True) for p, n in zip(ps, lengths)])  # 4 rows
    for p, n, a, b in zip(ps, lengths, alone, together):
        reference = generate(model, torch.tensor([p]), n)[0, len(p):].tolist()
        assert a.token_ids == reference
        assert b.token_ids == reference
        assert b.finish_reason == "length" and b.usage.completion_tokens == n
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_compiled_decode_step_gives_the_eager_engine_tokens(tokenizer):
    """EngineConfig(compile=True): the static decode step through torch.compile, warmed up (before any request)
    at 1 and 2 rows, then serving 1-3 rows while rows join, leave and move and a prompt is prefilled in chunks:
    the eager tokens, steps of up to compile_max_batch rows through the compiled step, no graph break, and no
    compilation after the warm-up. On the smallest model that still routes as V3 does: two graphs to compile."""
    model = tiny_model(**COMPILE_SIZED).double()
    config = dict(max_batch=3, max_seq_len=128, max_prefill_tokens=16, prefix_cache_bytes=0)
    ps, lengths = prompts(tokenizer, 5), [7, 2, 9, 4, 6]

    def requests():
        return [Request(p, greedy(n), ignore_eos=True) for p, n in zip(ps, lengths)]

    eager = run(Engine(model, tokenizer, EngineConfig(**config)), requests())
    engine = Engine(model, tokenizer, EngineConfig(**config, compile=True, compile_max_batch=2))
    torch._dynamo.utils.counters.clear()
    batches, views, step = [], set(), engine._step

    def recording(model_, ids, rows, start):
        batches.append(len(ids))
        views.add((len(ids), id(rows)))
        return step(model_, ids, rows, start)

    engine._step = recording
    engine.warmup()
    assert batches == [1, 2]  # a step at every size the compiled step serves
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs > 0
    batches.clear()
    compiled = run(engine, requests())
    assert [r.token_ids for r in compiled] == [r.token_ids for r in eager]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # warm-up compiled all it needed
    assert sorted(set(batches)) == [1, 2]  # 3-row steps ran eager
    # each batch size gets the same cache view object at every step (a CUDA graph keeps its inputs' addresses)
    assert views == {(r, id(engine._step_views[r])) for r in (1, 2)}
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    with pytest.raises(ValueError, match="EngineConfig.compile must be true or false"):
        EngineConfig(compile="yes")
    # a limit above max_batch changes nothing
    assert Engine(model, tokenizer, EngineConfig(**config, compile=True, compile_max_batch=9)).compiled_rows == 3
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="EngineConfig.compile_max_batch must be an integer >= 1"):
            EngineConfig(compile_max_batch=bad)


def test_prefix_cache_hit_gives_identical_output_and_reports_cached_tokens(model, tokenizer):
    engine = Engine(model, tokenizer, EngineConfig(max_batch=2, max_seq_len=256, block_size=16))
    prompt = tokenizer.encode("a long shared system prompt " * 8)  # > 3 blocks
    first, = run(engine, [Request(prompt, greedy(), ignore_eos=True)])
    second, = run(engine, [Request(prompt, greedy(), ignore_eos=True)])
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens == (len(prompt) - 1) // 16 * 16 > 0  # the last token is always computed
    assert second.token_ids == first.token_ids
    # a different continuation of the same prefix hits its blocks too
    third, = run(engine, [Request(prompt[:40] + tokenizer.encode("other", add_special_tokens=False), greedy(),
                                  ignore_eos=True)])
    assert third.usage.cached_tokens == 32
    # the first turn's output is cached as well: the next turn of a chat reuses prompt + answer
    follow_up = prompt + first.token_ids + tokenizer.encode(" and more", add_special_tokens=False)
    fourth, = run(engine, [Request(follow_up, greedy(), ignore_eos=True)])
    assert fourth.usage.cached_tokens == (len(prompt) + len(first.token_ids) - 1) // 16 * 16
    assert engine.prefix.referenced_blocks == 0


def test_prefix_cache_salts_keep_tenants_apart(model, tokenizer):
    engine = Engine(model, tokenizer, EngineConfig(max_batch=2, max_seq_len=128, block_size=16))
    prompt = tokenizer.encode("a system prompt only tenant a has sent " * 3)  # > 2 blocks

    def cached(salt):
        return run(engine, [Request(prompt, greedy(1), cache_salt=salt)])[0].usage.cached_tokens

    assert cached("a") == 0 and cached("a") == (len(prompt) - 1) // 16 * 16 > 0
    assert cached("b") == 0 and cached(None) == 0  # another salt, or none, sees nothing of tenant a's
    assert cached(None) > 0 and engine.prefix.referenced_blocks == 0


def test_prefix_cache_lru_eviction_under_the_byte_cap(model, tokenizer):
    probe = Engine(model, tokenizer, EngineConfig(max_batch=1, max_seq_len=64, block_size=8))
    cap = 4 * probe.prefix.bytes_per_block
    engine = Engine(model, tokenizer, EngineConfig(max_batch=1, max_seq_len=64, block_size=8,
                                                   prefix_cache_bytes=cap + 1))
    assert engine.prefix.num_blocks == 4
    a, b, c = (tokenizer.encode(f"{w} " * 20)[:17] for w in ("apple", "banana", "cherry"))  # 2 full blocks each
    run(engine, [Request(a, greedy(1))])
    run(engine, [Request(b, greedy(1))])
    assert engine.prefix.used_blocks == 4 and engine.prefix.evictions == 0
    run(engine, [Request(a, greedy(1))])  # touch a: b is now least recently used
    run(engine, [Request(c, greedy(1))])  # needs 2 blocks: evicts b's
    assert engine.prefix.used_bytes <= cap and engine.prefix.evictions == 2
    assert run(engine, [Request(a, greedy(1))])[0].usage.cached_tokens == 16
    assert run(engine, [Request(c, greedy(1))])[0].usage.cached_tokens == 16
    assert run(engine, [Request(b, greedy(1))])[0].usage.cached_tokens == 0


def test_cancelled_request_leaves_at_the_next_step_and_frees_its_row(model, tokenizer):
    engine = Engine(model, tokenizer, EngineConfig(max_batch=4, max_seq_len=128, block_size=8))
    ps = prompts(tokenizer, 3)
    handles = [engine.submit(Request(p, greedy(50), ignore_eos=True)) for p in ps]
    engine.step()
    engine.step()
    assert engine.num_running == 3 and engine.prefix.referenced_blocks > 0
    handles[1].cancel()
    engine.step()
    assert engine.num_running == 2
    handles[0].cancel()
    handles[2].cancel()
    engine.step()
    assert engine.num_running == 0 and engine.prefix.referenced_blocks == 0
    results = [Result.of(h) for h in handles]
    assert [r.finish_reason for r in results] == ["abort"] * 3
    # the survivors moved rows when row 1 left: their outputs still match a lone run
    assert 2 <= results[2].usage.completion_tokens < 50


def test_queue_full_and_context_length(model, tokenizer):
    engine = Engine(model, tokenizer, EngineConfig(max_batch=1, max_seq_len=32, max_waiting=2))
    engine.submit(Request([1, 2, 3], greedy()))
    engine.submit(Request([1, 2, 3], greedy()))
    with pytest.raises(QueueFullError):
        engine.submit(Request([1, 2, 3], greedy()))
    with pytest.raises(ContextLengthError, match="maximum context length is 32"):
        engine.submit(Request(list(range(30)), greedy(8)))
    with pytest.raises(ValueError, match="vocabulary|\\[0, 8192\\)"):
        engine.submit(Request([9999], greedy()))


def test_stop_strings_seeds_and_stop_token_ids(model, tokenizer):
    engine = Engine(model, tokenizer, EngineConfig(max_batch=4, max_seq_len=128))
    prompt = tokenizer.encode("once upon a time")
    full, = run(engine, [Request(prompt, greedy(12), ignore_eos=True)])
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    cut, = run(engine, [Request(prompt, greedy(12), stop=(stop,), ignore_eos=True)])
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    by_id, = run(engine, [Request(prompt, SamplingParams(max_new_tokens=12, stop_token_ids=(full.token_ids[3],)),
                                  ignore_eos=True)])
    assert by_id.token_ids == full.token_ids[:4] and by_id.finish_reason == "stop"
    hot = SamplingParams(max_new_tokens=10, temperature=1.5, seed=7)
    x, y, z = run(engine, [Request(prompt, hot), Request(prompt, hot),
                           Request(prompt, SamplingParams(max_new_tokens=10, temperature=1.5, seed=8))])
    assert x.token_ids == y.token_ids != z.token_ids
    penalised, = run(engine, [Request(prompt, SamplingParams(max_new_tokens=12, frequency_penalty=2.0,
                                                             repetition_penalty=1.5), ignore_eos=True)])
    assert len(penalised.token_ids) == 12


def test_logprobs_and_prompt_logprobs_match_a_full_forward(model, tokenizer):
    engine = Engine(model, tokenizer, EngineConfig(max_batch=2, max_seq_len=128))
    prompt = tokenizer.encode("the quick brown fox")
    r, = run(engine, [Request(prompt, greedy(3), logprobs=2, prompt_logprobs=1, ignore_eos=True)])
    ids = torch.tensor([prompt + r.token_ids])
    with torch.no_grad():
        logp = model(ids)[0].float().log_softmax(-1)  # [T, V]
    expected = logp[:-1].gather(-1, ids[0, 1:, None])[:, 0]
    got = [lp.logprob for lp in r.prompt_logprobs[1:]] + [lp.logprob for lp in r.logprobs]
    assert r.prompt_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(got), expected, atol=1e-4, rtol=1e-4)
    assert all(lp.top[0][0] == lp.token_id and len(lp.top) == 2 for lp in r.logprobs)  # greedy: chosen = top 1


def test_long_prompts_are_prefilled_in_chunks_of_the_token_budget(model, tokenizer):
    engine = Engine(model, tokenizer, EngineConfig(max_batch=4, max_seq_len=128, max_prefill_tokens=20,
                                                   prefix_cache_bytes=0))
    short = tokenizer.encode("red " * 20)[:15]
    long = tokenizer.encode("a much longer prompt about rivers " * 10)[:48]
    a = engine.submit(Request(short, greedy(30), ignore_eos=True))
    b = engine.submit(Request(long, greedy(6), prompt_logprobs=0, ignore_eos=True))
    computed = []
    for _ in range(4):
        engine.step()
        seq = engine.scheduler.prefilling
        computed.append(seq.n_computed if seq else None)
    assert computed == [5, 25, 45, None]  # 15 of a, then 5 + 20 + 20 + 3 of b; a decoded meanwhile
    assert engine.num_running == 2
    while engine.scheduler.has_work():
        engine.step()
    ra, rb = Result.of(a), Result.of(b)
    assert ra.token_ids == generate(model, torch.tensor([short]), 30)[0, 15:].tolist()
    assert rb.token_ids == generate(model, torch.tensor([long]), 6)[0, 48:].tolist()
    with torch.no_grad():
        logp = model(torch.tensor([long]))[0].float().log_softmax(-1)
    expected = logp[:-1].gather(-1, torch.tensor(long[1:])[:, None])[:, 0]
    assert rb.prompt_logprobs[0] is None and len(rb.prompt_logprobs) == 48
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in rb.prompt_logprobs[1:]]), expected)


def test_rows_move_correctly_while_a_prompt_is_part_way_through_prefill(model, tokenizer):
    engine = Engine(model, tokenizer, EngineConfig(max_batch=4, max_seq_len=128, max_prefill_tokens=16,
                                                   prefix_cache_bytes=0))
    quick = [tokenizer.encode(f"{w} is a colour") for w in ("red", "blue")]
    long = tokenizer.encode("the history of the river and its bridges " * 8)[:60]
    handles = [engine.submit(Request(p, greedy(n), ignore_eos=True)) for p, n in zip(quick, (2, 9))]
    handles.append(engine.submit(Request(long, greedy(5), ignore_eos=True)))
    while engine.scheduler.has_work():
        engine.step()  # the 2-token request leaves while the long prompt is in row 2: both later rows move
    results = [Result.of(h) for h in handles]
    for p, n, r in zip(quick + [long], (2, 9, 5), results):
        assert r.token_ids == generate(model, torch.tensor([p]), n)[0, len(p):].tolist()


def test_newcomers_prefill_together_from_different_cached_lengths(model, tokenizer):
    engine = Engine(model, tokenizer, EngineConfig(max_batch=4, max_seq_len=128, block_size=8))
    shared = tokenizer.encode("a long shared system prompt about owls " * 4)[:40]
    run(engine, [Request(shared, greedy(1))])  # caches 4 blocks of it
    prompts_ = [shared + tokenizer.encode(" first", add_special_tokens=False),  # 40 cached, a few to run
                tokenizer.encode("something else entirely"),  # nothing cached
                shared[:20]]  # 16 cached, 4 to run
    handles = [engine.submit(Request(p, greedy(5), ignore_eos=True)) for p in prompts_]
    handles.append(engine.submit(Request(shared[:30], greedy(5), prompt_logprobs=0, ignore_eos=True)))
    engine.step()  # all four fit the budget: one padded prefill forward, then one decode
    assert engine.num_running == 4 and engine.scheduler.prefilling is None
    while engine.scheduler.has_work():
        engine.step()
    results = [Result.of(h) for h in handles]
    assert [r.usage.cached_tokens for r in results] == [40, 0, 16, 0]  # prompt logprobs recompute everything
    for p, r in zip(prompts_ + [shared[:30]], results):
        assert r.token_ids == generate(model, torch.tensor([p]), 5)[0, len(p):].tolist()
    with torch.no_grad():
        logp = model(torch.tensor([shared[:30]]))[0].float().log_softmax(-1)
    expected = logp[:-1].gather(-1, torch.tensor(shared[1:30])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in results[3].prompt_logprobs[1:]]), expected)


def test_padded_prefill_without_prompt_logprobs_runs_the_last_layer_on_the_needed_rows(model, tokenizer):
    """Prompts of different lengths prefilled in one padded forward: only the positions from the shortest row's last
    token on reach the last layer's MoE, and each row's tokens equal its lone greedy decode."""
    engine = Engine(model, tokenizer, EngineConfig(max_batch=4, max_seq_len=128, prefix_cache_bytes=0))
    ps = [tokenizer.encode("a much longer prompt about owls and their habits"), tokenizer.encode("short one"),
          tokenizer.encode("a prompt of middling length")]
    seen = []
    hook = model.model.layers[-1].mlp.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        handles = [engine.submit(Request(p, greedy(4), ignore_eos=True)) for p in ps]
        engine.step()  # one padded prefill forward of all three, then one decode step
        while engine.scheduler.has_work():
            engine.step()
    finally:
        hook.remove()
    longest, shortest = max(map(len, ps)), min(map(len, ps))
    assert seen[0] == (3, longest - shortest + 1, model.config.hidden_size)
    for p, h in zip(ps, handles):
        assert Result.of(h).token_ids == generate(model, torch.tensor([p]), 4)[0, len(p):].tolist()
