"""The inference engine: continuous batching over one static latent cache, with a prefix cache, in its own thread.

    engine = Engine(model, tokenizer, EngineConfig(max_batch=8)).start()
    handle = engine.submit(Request(prompt_ids, SamplingParams(max_new_tokens=32), stop=("\\n",)))
    for delta in handle: print(delta.text, end="")      # or `async for` inside an event loop
    engine.shutdown()

Each step (see scheduler.py): drop cancelled requests; spend the step's prompt-token budget on prefill (first the
prompt left part-way by the last step, then newcomers, each after copying whatever prompt prefix the prefix cache
holds into its row; newcomers that fit run together in one right-padded forward, and a prompt that does not fit
what is left is prefilled in chunks over several steps); then decode one token for all running rows in one
batched forward with per-row positions (`start_pos` LongTensor[R]). Prefill uses the naive MLA form and decoding
the absorbed one (dsv3/attention.py), the split DeepSeek's inference code makes. Sampling is per row
(dsv3/sampling.py: each row its own temperature, top-p/k, penalties, seed); text and stop strings come from
dsv3/generation.py's StopStringStreamer, so a stop string is never streamed out.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from .. import fast
from ..generation import StopStringStreamer
from ..sampling import make_generator, sample, token_logprobs
from .prefix_cache import PrefixCache
from .request import ContextLengthError, Delta, Request, RequestHandle, TokenLogprob, Usage
from .scheduler import Scheduler, Sequence

log = logging.getLogger("dsv3.engine")


@dataclass(frozen=True)
class EngineConfig:
    """max_batch: cache rows = requests decoded together; max_seq_len: tokens per row (prompt + output);
    max_waiting: queued requests beyond which submit raises QueueFullError; max_prefill_tokens: prompt tokens
    prefilled per step (the token budget; longer prompts are prefilled in chunks of it over several steps);
    block_size / prefix_cache_bytes: prefix-cache block length and pool cap (0 disables the prefix cache);
    compile: run the batched decode step through torch.compile, as `generate(compile=True)` does (static shapes:
    attention over every one of the max_seq_len cache slots, masked; CUDA graphs on a GPU) for batches of up to
    compile_max_batch rows; larger batches run the eager step, the reference, which attends only up to the longest
    row. Behind `bench/serve.py` on CPU (bundled model, 1024 slots) the compiled step gave 1.9x the tokens/s at 1
    client, 1.2x at 8 and 0.83x at 32 (docs/results.md): the masked span grows with rows x max_seq_len.
    `Engine.warmup()` compiles it up front."""

    max_batch: int = 8
    max_seq_len: int = 2048
    max_waiting: int = 256
    max_prefill_tokens: int = 2048
    block_size: int = 16
    prefix_cache_bytes: int = 64 << 20
    compile: bool = False
    compile_max_batch: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.compile, bool):
            raise ValueError(f"EngineConfig.compile must be true or false, got {self.compile!r}")
        for name in ("max_batch", "max_seq_len", "max_waiting", "max_prefill_tokens", "block_size",
                     "compile_max_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1, got {value!r}")
        if self.prefix_cache_bytes < 0:
            raise ValueError(f"EngineConfig.prefix_cache_bytes must be >= 0, got {self.prefix_cache_bytes}")


class Engine:
    """Serves many requests on one model. Thread-safe: `submit` from any thread; steps run in the engine thread
    after `start()` (or call `step()` yourself without starting it)."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: EngineConfig | None = None) -> None:
        self.model = fast.arrange(model.eval())  # the storage order each weight's few-row products read fastest
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        c = self.config
        self.max_seq_len = min(c.max_seq_len, model.config.max_position_embeddings)
        self.vocab_size = model.config.vocab_size
        self.device = model.lm_head.weight.device
        self.cache = model.new_cache(c.max_batch, self.max_seq_len)
        self._step = fast.compiled_decode_step(self.device.type) if c.compile else None
        # the compiled step's cache for R running rows: rows 0..R-1, one view object per R, kept, so that a CUDA
        # graph captured for R rows finds its cache at the same address every step
        self._step_views = {rows: self.cache.rows(slice(0, rows)) for rows in range(1, self.compiled_rows + 1)} \
            if c.compile else {}
        if c.compile:
            fast.prepare(self.model)
            if self.device.type == "cuda":
                for view in self._step_views.values():
                    fast.mark_static_cache(view, guard=False)
        self.prefix = PrefixCache(self.cache, c.block_size, c.prefix_cache_bytes)
        # per-row token history for the penalties (dsv3/sampling.py layout): generated counts, prompt membership
        self.counts = torch.zeros(c.max_batch, self.vocab_size, dtype=torch.long, device=self.device)
        self.prompt_mask = torch.zeros(c.max_batch, self.vocab_size, dtype=torch.bool, device=self.device)
        self.scheduler = Scheduler(c.max_batch, c.max_waiting)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ public API
    def submit(self, request: Request) -> RequestHandle:
        """Queue a request; raises ContextLengthError / ValueError for bad input, QueueFullError when full."""
        ids = request.prompt_ids
        if not ids:
            raise ValueError("the prompt is empty: it needs at least one token")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        embeds = request.inputs_embeds
        if embeds is not None and tuple(embeds.shape) != (len(ids), self.model.config.hidden_size):
            raise ValueError(f"inputs_embeds must be [{len(ids)}, {self.model.config.hidden_size}] (one row per "
                             f"prompt token), got {list(embeds.shape)}")
        need = len(ids) + request.params.max_new_tokens
        if need > self.max_seq_len:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_seq_len} tokens. However, you requested {need} "
                f"tokens ({len(ids)} in the prompt, {request.params.max_new_tokens} for the completion). Please "
                "reduce the length of the prompt or the completion.")
        handle = RequestHandle(request)
        streamer = StopStringStreamer(self.tokenizer, request.stop)
        seq = Sequence(handle, list(ids), streamer, make_generator(request.params.seed, self.device))
        self.scheduler.add(seq)
        return handle

    @property
    def compiled_rows(self) -> int:
        """With `compile`, decode steps of up to this many rows run the compiled step."""
        return min(self.config.compile_max_batch, self.config.max_batch)

    def start(self) -> "Engine":
        """Run steps in a daemon thread until `shutdown()`."""
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
            self._thread.start()
        return self

    @torch.inference_mode()
    def warmup(self) -> None:
        """With `compile`, compile the decode step now rather than at the first requests (a minute or more per
        graph on a CPU): one dummy step at every batch size the compiled step serves, on free rows at position 0
        (which every sequence overwrites before reading it). Dynamo compiles only where its guards ask for a new
        graph (one row; two rows, after which the batch size is dynamic; a size where the MoE changes path; all
        rows, whose cache view is contiguous), the other sizes cost one step each; on a GPU each size also records
        its CUDA graph here. Call before serving (`dsv3 serve --compile` does)."""
        if not self.config.compile or self.num_running:
            return
        fast.prepare(self.model)  # builds what the graph reads as is (the MoE's weight stacks)
        for rows, view in self._step_views.items():
            # token 0 at position 0, as two tensors: the graph must not assume that they alias
            tokens, start = (torch.zeros(rows, dtype=torch.long, device=self.device) for _ in range(2))
            self._step(self.model, tokens, view, start)

    def shutdown(self) -> None:
        """Stop the thread; requests still queued or running end with finish_reason "abort"."""
        self._stopping.set()
        with self.scheduler.lock:
            self.scheduler.wakeup.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._end_all("abort")

    @property
    def num_running(self) -> int:
        """Requests holding a cache row: decoding, or part-way through their prompt."""
        return len(self.scheduler.running) + (self.scheduler.prefilling is not None)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled requests, prefill within the token budget, then decode one token for every running row."""
        for seq in self.scheduler.take_cancelled_waiting():
            self._retire(seq, "abort")
        for seq in self.scheduler.cancelled_in_rows():
            self._retire(seq, "abort")
        self._admit()
        if self.scheduler.running:
            self._decode()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self.scheduler.wait_for_work(timeout=0.05)
            if self._stopping.is_set() or not self.scheduler.has_work():
                continue
            try:
                self.step()
            except Exception as error:  # keep serving: fail the requests in flight, not the engine
                log.exception("engine step failed")
                self._end_all("error", f"the engine failed: {type(error).__name__}")

    def _admit(self) -> None:
        """Spend the step's prompt-token budget: continue the part-way prompt, then admit newcomers. Newcomers whose
        whole remaining prompt fits are prefilled together in one padded batch; the first one that does not fit
        starts a chunked prefill with what is left of the budget."""
        budget = self.config.max_prefill_tokens
        if self.scheduler.prefilling is not None:
            budget -= self._prefill_chunk(self.scheduler.prefilling, budget)
        group, longest, furthest = [], 0, 0
        while budget > 0 and (seq := self.scheduler.peek_waiting()) is not None:
            # keep at least the last prompt token to compute: its logits choose the first output token; prompt
            # logprobs need the logits of every position, which cached blocks do not carry
            limit = 0 if seq.request.prompt_logprobs is not None else len(seq.tokens) - 1
            blocks = [] if seq.request.inputs_embeds is not None else \
                self.prefix.match(seq.tokens, limit, seq.request.cache_salt)
            start = len(blocks) * self.prefix.block_size
            need = seq.n_prompt - start
            # padded rows run positions up to max(start) + max(need) - 1, which must stay inside the cache
            if need > budget or max(furthest, start) + max(longest, need) > self.max_seq_len:
                self.scheduler.start(seq)
                self._begin(seq, blocks)
                self._prefill_chunk(seq, budget)
                break
            self.scheduler.join(seq)
            self._begin(seq, blocks)
            group.append(seq)
            budget, longest, furthest = budget - need, max(longest, need), max(furthest, start)
        if group:
            self._prefill_group(group)

    def _begin(self, seq: Sequence, blocks) -> None:
        """Give a newly admitted sequence its cached prefix blocks and its penalty history."""
        row = self.cache.rows(seq.row)
        self.prefix.load(blocks, row)
        seq.held = {b.key: b for b in blocks}
        seq.n_computed = seq.cached_tokens = len(blocks) * self.prefix.block_size
        self.counts[seq.row].zero_()
        self.prompt_mask[seq.row].zero_()
        self.prompt_mask[seq.row, torch.tensor(seq.tokens, device=self.device)] = True

    def _prefill_group(self, group: list[Sequence]) -> None:
        """Prefill the rest of several prompts in consecutive rows with one forward: ids [k, T_max], right-padded,
        each row from its own start position. Padding writes latents past a row's prompt, where no query of that
        row looks (the mask only shows positions <= the query's) and decoding overwrites them."""
        starts = [s.n_computed for s in group]
        lengths = [s.n_prompt - s.n_computed for s in group]
        ids = torch.zeros(len(group), max(lengths), dtype=torch.long, device=self.device)
        for b, seq in enumerate(group):
            ids[b, :lengths[b]] = torch.tensor(seq.tokens[starts[b]:], device=self.device)
        first = group[0].row
        rows = self.cache.rows(slice(first, first + len(group)))
        T = ids.shape[1]
        # without prompt logprobs only each row's last prompt position needs logits: keep the last T - min + 1
        # positions, which hold every row's (the model's last layer then runs only those rows)
        keep = 0 if any(s.request.prompt_logprobs is not None for s in group) else T - min(lengths) + 1
        embeds = self._inputs_embeds(group, ids, starts, lengths)
        logits = self.model(None if embeds is not None else ids, rows, torch.tensor(starts, device=self.device),
                            attn_impl="naive", attend_length=max(starts) + T, logits_to_keep=keep,
                            inputs_embeds=embeds)  # [k, keep or T, V]
        prompt_lps = []
        for b, seq in enumerate(group):
            seq.n_computed = seq.n_prompt
            if seq.request.inputs_embeds is None:
                self.prefix.store(seq.tokens, rows.rows(b), seq.held, seq.request.cache_salt)
            wanted = seq.request.prompt_logprobs is not None
            lps = self._prompt_logprobs(seq, logits[b, :lengths[b]], starts[b], seq.n_prompt) if wanted else None
            prompt_lps.append([None] + lps if wanted else None)
        offset = T - logits.shape[1]  # position of logits[:, 0] in ids
        last = logits[torch.arange(len(group), device=self.device),
                      torch.tensor(lengths, device=self.device) - 1 - offset]
        self._sample(group, last, prompt_lps)

    def _prefill_chunk(self, seq: Sequence, budget: int) -> int:
        """Run up to `budget` more prompt tokens of the chunk-prefilled `seq` into its row; once its prompt is
        complete, choose its first token and let it join the running rows. Returns the number of tokens run."""
        start = seq.n_computed
        end = min(seq.n_prompt, start + budget)
        row = self.cache.rows(seq.row)
        ids = torch.tensor([seq.tokens[start:end]], device=self.device)
        keep = 0 if seq.request.prompt_logprobs is not None else 1  # else only the last position's logits are read
        embeds = self._inputs_embeds([seq], ids, [start], [end - start])
        logits = self.model(None if embeds is not None else ids, row, start, attn_impl="naive", logits_to_keep=keep,
                            inputs_embeds=embeds)[0]  # [T or 1, V]
        seq.n_computed = end
        if seq.request.inputs_embeds is None:
            self.prefix.store(seq.tokens[:end], row, seq.held, seq.request.cache_salt)
        if seq.request.prompt_logprobs is not None:
            seq.prompt_logprobs += self._prompt_logprobs(seq, logits, start, end)
        if end == seq.n_prompt:
            self.scheduler.promote(seq)
            prompt_lp = [None] + seq.prompt_logprobs if seq.request.prompt_logprobs is not None else None
            self._sample([seq], logits[-1:], [prompt_lp])
        return end - start

    def _inputs_embeds(self, seqs: list[Sequence], ids: torch.Tensor, starts: list[int],
                       lengths: list[int]) -> torch.Tensor | None:
        """The prefill's inputs [k, T, D] when a sequence brings its own (image prompts): the token embeddings of
        ids [k, T], each such row's span overwritten with its inputs_embeds[start:start + length]; else None."""
        if all(s.request.inputs_embeds is None for s in seqs):
            return None
        h = self.model.model.embed_tokens(ids)
        for b, seq in enumerate(seqs):
            if seq.request.inputs_embeds is not None:
                h[b, :lengths[b]] = seq.request.inputs_embeds[starts[b]:starts[b] + lengths[b]].to(h)
        return h

    def _decode(self) -> None:
        seqs = list(self.scheduler.running)
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)  # [R, 1]
        positions = [len(s.tokens) - 1 for s in seqs]
        rows, start = self.cache.rows(slice(0, len(seqs))), torch.tensor(positions, device=self.device)
        if self.config.compile and len(seqs) <= self.compiled_rows:  # static shapes: every slot, masked
            logits = self._step(self.model, ids[:, 0], self._step_views[len(seqs)], start)  # [R, V]
        else:
            # attend_length from the host's lengths: the model need not read the positions back from the device
            logits = self.model(ids, rows, start, attend_length=max(positions) + 1)[:, -1]  # [R, V]
        self._sample(seqs, logits)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, prompt_lps: list | None = None) -> None:
        """Choose one token per sequence from logits [B, V] and hand each sequence its delta (with its prompt
        logprobs, prompt_lps[b], on the first one)."""
        rows = torch.tensor([s.row for s in seqs], device=self.device)
        tokens = self._choose(seqs, rows, logits)  # [B], -1 where sampling failed
        safe = tokens.clamp(min=0)  # the failed rows leave below: their counts and logprobs are never read
        self.counts[rows, safe] += 1
        wanted = [s.request.logprobs for s in seqs if s.request.logprobs is not None]
        lp = token_logprobs(logits, safe, max(wanted)) if wanted else None
        for i, (seq, token) in enumerate(zip(seqs, tokens.tolist())):
            if token < 0:  # this request alone ends; its batch-mates go on
                self._retire(seq, "error", error="sampling failed for this request: its logits gave no "
                             "distribution to draw from (check its parameters)")
                continue
            k = seq.request.logprobs
            logprob = None if k is None else [_token_logprob(token, lp.chosen[i], lp.top_ids[i, :k],
                                                             lp.top_logprobs[i, :k])]
            self._advance(seq, token, logprob, prompt_lps[i] if prompt_lps else None)

    def _choose(self, seqs: list[Sequence], rows: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """One token per row of logits [B, V] -> tokens [B], -1 for the rows where sampling failed.

        Requests are validated before they get here, and `sample` answers -1 for a row without a distribution;
        should sampling still raise, each row is sampled alone so that only the requests at fault end."""
        params = [s.request.params for s in seqs]

        def draw(span: slice) -> torch.Tensor:  # the rows of a span: every row, or one
            history = {}
            if any(p.has_penalties for p in params[span]):
                history = dict(output_counts=self.counts[rows[span]], prompt_mask=self.prompt_mask[rows[span]])
            return sample(logits[span], params[span], [s.generator for s in seqs[span]], **history)

        try:
            return draw(slice(None))
        except Exception:
            pass  # find the rows at fault
        tokens = torch.full((len(seqs),), -1, dtype=torch.long, device=self.device)
        for i in range(len(seqs)):
            try:
                tokens[i] = draw(slice(i, i + 1))[0]
            except Exception as error:
                log.warning("sampling failed for request %s: %r", seqs[i].handle.id, error)
        return tokens

    def _prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, start: int, end: int) -> list[TokenLogprob]:
        """logits [T, V] of prompt positions start..end-1 -> logprobs of the prompt tokens they predict
        (positions start+1..end, the last one only if it is still in the prompt)."""
        targets = seq.tokens[start + 1:min(end + 1, seq.n_prompt)]
        if not targets:
            return []
        lp = token_logprobs(logits[:len(targets)], torch.tensor(targets, device=self.device),
                            seq.request.prompt_logprobs)
        return [_token_logprob(t, lp.chosen[i], lp.top_ids[i], lp.top_logprobs[i]) for i, t in enumerate(targets)]

    def _advance(self, seq: Sequence, token: int, logprob, prompt_lp) -> None:
        """Append a sampled token, release its text, and decide whether the sequence is done."""
        seq.tokens.append(token)
        params, reason, text = seq.request.params, None, ""
        if (token == self.tokenizer.eos_token_id and not seq.request.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
        else:
            text = seq.streamer.push(token)
            if seq.streamer.stopped:
                reason = "stop"
        if reason is None and (seq.n_generated >= params.max_new_tokens or len(seq.tokens) >= self.max_seq_len):
            reason = "length"
        if reason is not None and not seq.streamer.stopped:
            text += seq.streamer.flush()
        delta = Delta(text=text, token_ids=[token], logprobs=logprob, prompt_logprobs=prompt_lp)
        if reason is None:
            seq.handle.put(delta)
        else:
            self._retire(seq, reason, delta)

    # ------------------------------------------------------------------ leaving
    def _retire(self, seq: Sequence, reason: str, delta: Delta | None = None, error: str | None = None) -> None:
        """Finish a sequence: cache its blocks (finished normally), free its references and row, send the last delta."""
        if seq.row >= 0:
            if reason in ("stop", "length"):  # the output's blocks serve the next turn of a chat
                self.prefix.store(seq.tokens[:-1], self.cache.rows(seq.row), seq.held,
                                  seq.request.cache_salt)
            for moved, src in self.scheduler.finish(seq):
                # a prefilling sequence holds n_computed positions; a running one mid-step may already hold its
                # newest token, so copy that position too
                prefilling = moved is self.scheduler.prefilling
                length = moved.n_computed if prefilling else min(len(moved.tokens), self.max_seq_len)
                self._move_row(src, moved.row, length)
            seq.row = -1
        self.prefix.release(seq.held.values())
        seq.held = {}
        delta = delta or Delta()
        delta.finish_reason, delta.error = reason, error
        delta.usage = Usage(seq.n_prompt, seq.n_generated, seq.cached_tokens)
        seq.handle.put(delta)

    def _move_row(self, src: int, dst: int, length: int) -> None:
        self.cache.kv[:, dst, :length] = self.cache.kv[:, src, :length]
        self.cache.pe[:, dst, :length] = self.cache.pe[:, src, :length]
        if self.cache.ik is not None:  # DSA: the indexer keys [L, B, S, d_I]
            self.cache.ik[:, dst, :length] = self.cache.ik[:, src, :length]
        self.counts[dst] = self.counts[src]
        self.prompt_mask[dst] = self.prompt_mask[src]

    def _end_all(self, reason: str, error: str | None = None) -> None:
        for seq in self.scheduler.take_all():
            seq.row = -1  # the rows are all free now; nothing to move or cache
            self._retire(seq, reason, error=error)


def _token_logprob(token: int, chosen: torch.Tensor, top_ids: torch.Tensor, top_lps: torch.Tensor) -> TokenLogprob:
    return TokenLogprob(token, float(chosen), list(zip(top_ids.tolist(), top_lps.tolist())))
