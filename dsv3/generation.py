"""Autoregressive decoding through MLA's latent KV cache, and text streaming with stop strings.

`stream_generate` runs the prompt once through the model (prefill, which fills the cache at positions 0..T-1),
then feeds one token per step at `start_pos` = its position, so each step costs one token's compute against the
cached latents (paper-V2 §2.1.2; the absorbed attention path is used for these T = 1 steps). `generate` collects
the steps into one tensor. Tokens are chosen by `dsv3.sampling.sample`, per row.

Stop strings work on text, not ids, because a string can be split across tokens in many ways:
`StopStringStreamer` turns token ids into text with the tokenizer's incremental decoder and cuts the text at the
first stop string, holding back any tail that could still grow into one, so nothing after a stop is ever emitted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import replace
from typing import NamedTuple

import torch

from . import fast
from .sampling import SamplingParams, count_tokens, make_generator, sample


class GenerationStep(NamedTuple):
    """One decoding step for B rows.

    tokens: [B] the new token of each row; rows finished before this step get their pad token.
    active: [B] bool, True where tokens[b] was generated this step (the row was still running).
    finished: [B] bool, True where the row has emitted a stop token (at this step or before).
    """

    tokens: torch.Tensor
    active: torch.Tensor
    finished: torch.Tensor


def _check_input_ids(model: torch.nn.Module, input_ids: torch.Tensor) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError("input_ids must be a LongTensor of shape [B, T], got "
                         f"{type(input_ids).__name__} {getattr(input_ids, 'dtype', '')} "
                         f"{tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}")
    vocab = model.config.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(f"input_ids has token ids outside the model's vocabulary [0, {vocab})")


def stream_generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, top_k: int = 0, presence_penalty: float = 0.0,
                    frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
                    stop_token_ids: Sequence[int] = (), seed: int | None = None, *,
                    pad_token_id: int | None = None, sync_every: int = 1,
                    compile: bool = False, images=None) -> Iterator[GenerationStep]:
    """Yield one `GenerationStep` per decoding step, at most `max_new_tokens`, ending early once every row is
    finished. Arguments as in `generate`; they are checked here, before the first step is asked for.

    Whether every row has finished is read on the host only every `sync_every` steps (1: after each step), so
    with sync_every > 1 up to sync_every - 1 trailing steps may have no active row.
    """
    inputs_embeds = None
    if images is not None:  # a VisionLanguageModel: its LM decodes, the prefill runs on the image embeddings
        model, input_ids, inputs_embeds = _image_prefill(model, input_ids, images)
    _check_input_ids(model, input_ids)
    if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every must be an integer >= 1, got {sync_every!r}")
    if pad_token_id is not None and (isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int)
                                     or pad_token_id < 0):
        raise ValueError(f"pad_token_id must be a token id (integer >= 0) or None, got {pad_token_id!r}")
    B, T = input_ids.shape
    base = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                          presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                          repetition_penalty=repetition_penalty, stop_token_ids=stop_token_ids, seed=seed)
    params = [replace(base, seed=None if seed is None else seed + b) for b in range(B)]
    limit = model.config.max_position_embeddings
    if T + max_new_tokens > limit:
        raise ValueError(f"max_new_tokens={max_new_tokens} with a prompt of {T} tokens exceeds the model's "
                         f"max_position_embeddings={limit}")
    return _decode(model, input_ids, params, pad_token_id, sync_every, compile, inputs_embeds)


@torch.inference_mode()
def _image_prefill(model: torch.nn.Module, input_ids: torch.Tensor, images):
    """(VisionLanguageModel, ids with image placeholders, images) -> (its language model, the ids with each
    placeholder as the pad token (penalties see no image), inputs_embeds [B, T, D] for the prefill)."""
    if not hasattr(model, "vision_config"):
        raise ValueError("images= needs a vision-language model (dsv3.vision.load_vl); this one reads text only")
    ids = input_ids.to(model.language_model.lm_head.weight.device)
    embeds = model.embed(ids, model.pixels(images))
    text_ids = ids.masked_fill(ids == model.vision_config.image_token_id, model.language_model.config.pad_token_id
                               or 0)
    return model.language_model, text_ids, embeds


def _step(model: torch.nn.Module, tokens: torch.Tensor, cache, pos: int) -> torch.Tensor:
    """One decoding step: tokens [B] at position `pos` -> next-token logits [B, V] (absorbed MLA, T = 1)."""
    return model(tokens[:, None], cache, pos)[:, -1]


def _prefill(model: torch.nn.Module, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """The prompt's forward: input_ids [B, T] fill cache positions 0..T-1 -> the last position's logits [B, V]."""
    return model(input_ids, cache, 0, logits_to_keep=1)[:, -1]


def prefill_step(compile: bool = False, device_type: str = "cpu"):
    """`_prefill`, or on CPU with compile=True the same through torch.compile with dynamic shapes
    (`dsv3.fast.compiled_prefill`). On a GPU the prefill stays eager: its compiled form is measured only with
    static shapes (bench/decode.py's `torch.compile(model)` row)."""
    return fast.compiled_prefill(_prefill) if compile and device_type == "cpu" else _prefill


def decode_step(compile: bool = False, device_type: str = "cpu"):
    """`_step`, or `dsv3.fast.static_step` through torch.compile (`dsv3.fast.compiled_decode_step`). Eager `_step`
    is the reference; tests check that both give the same tokens."""
    return fast.compiled_decode_step(device_type) if compile else _step


@torch.inference_mode()
def _decode(model: torch.nn.Module, input_ids: torch.Tensor, params: list[SamplingParams],
            pad_token_id: int | None, sync_every: int = 1, compile: bool = False,
            inputs_embeds: torch.Tensor | None = None) -> Iterator[GenerationStep]:
    """Prefill, then one token per step through the cache. All rows share stop ids and max_new_tokens.
    Greedy steps read nothing back to the host except `finished.all()` every `sync_every` steps.
    inputs_embeds [B, T, D]: the prefill's inputs in place of input_ids' embeddings (an image prompt; eager)."""
    B, T = input_ids.shape
    max_new_tokens = params[0].max_new_tokens
    device = model.lm_head.weight.device
    input_ids = input_ids.to(device)
    vocab = model.config.vocab_size
    generators = [make_generator(p.seed, device) for p in params]
    stops = torch.tensor(params[0].stop_token_ids, dtype=torch.long, device=device)
    penalised = params[0].has_penalties
    sampled = any(p.temperature > 0 for p in params)  # only drawn rows can fail (`sample` marks them -1)
    prompt_mask = count_tokens(input_ids, vocab, device) > 0 if penalised else None
    output_counts = torch.zeros(B, vocab, dtype=torch.long, device=device) if penalised else None
    rows = torch.arange(B, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    pad = torch.zeros(B, dtype=torch.long, device=device)  # per row: the stop token it hit, or pad_token_id

    step_fn = decode_step(compile, device.type)
    fast.arrange(model)  # the storage order each weight's few-row products read fastest
    if compile:
        fast.prepare(model)
    # a compiled step sees the cache length as a shape: round it up so that nearby lengths share one graph
    length = T + max_new_tokens - 1
    cache = model.new_cache(B, -(-length // 256) * 256 if compile else length)
    if compile and device.type == "cuda":
        fast.mark_static_cache(cache)
    if inputs_embeds is None:
        logits = prefill_step(compile, device.type)(model, input_ids, cache)  # positions 0..T-1
    else:
        logits = model(None, cache, 0, logits_to_keep=1, inputs_embeds=inputs_embeds)[:, -1]
    for step in range(max_new_tokens):
        active = ~finished
        tokens = sample(logits, params, generators, output_counts=output_counts, prompt_mask=prompt_mask)
        if sampled and bool((tokens < 0).any()):  # one host sync per sampled step; greedy steps need none
            raise ValueError(f"sampling failed at step {step}: the logits hold NaN or infinities, so there is no "
                             "distribution to draw from (check the model's weights and the penalties)")
        tokens = torch.where(active, tokens, pad)
        if penalised:
            output_counts[rows, tokens] += active.long()  # no boolean indexing: it would sync
        hit = active & torch.isin(tokens, stops)
        pad = torch.where(hit, tokens if pad_token_id is None else torch.full_like(tokens, pad_token_id), pad)
        finished = finished | hit
        yield GenerationStep(tokens, active, finished)
        if step == max_new_tokens - 1 or ((step + 1) % sync_every == 0 and bool(finished.all())):
            return
        pos = T + step  # the position of `tokens`
        if not compile:
            logits = step_fn(model, tokens, cache, pos)
            continue
        # after the first compiled step, every step passes the same model, cache and shapes: skip dynamo's guards
        with fast.unguarded() if step else nullcontext():
            logits = step_fn(model, tokens, cache, torch.full((B,), pos, device=device))


def generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             repetition_penalty: float = 1.0, stop_token_ids: Sequence[int] = (), seed: int | None = None, *,
             pad_token_id: int | None = None, sync_every: int = 16, compile: bool = False,
             images=None) -> torch.Tensor:
    """Continue each row of input_ids [B, T]; return LongTensor [B, T + N] (prompt included), N <= max_new_tokens.

    images: with a VisionLanguageModel (dsv3.vision), the images of the image placeholders in input_ids, in
    reading order (Pillow images or pixels [N, 3, S, S]); the prompt is prefilled on their embeddings.

    temperature 0 is greedy; otherwise tokens are sampled with top_k / top_p and the penalties of
    `dsv3.sampling.SamplingParams` (OpenAI's presence/frequency penalties over generated tokens, CTRL's
    repetition penalty over prompt + generated tokens). `seed` makes sampling reproducible: row b draws from its
    own generator seeded with seed + b, so a row's tokens do not depend on the rest of the batch.

    A row is finished once it emits a token of stop_token_ids; its later positions are filled with the stop token
    it emitted (or `pad_token_id` when given), and decoding ends early (N < max_new_tokens) once all rows are
    finished. All rows share the prompt length T (no left padding). Runs under torch.inference_mode; put the model
    in eval mode first. Invalid arguments raise ValueError naming the argument.

    Speed: the loop reads the device only every `sync_every` steps (to see whether all rows have stopped) and
    once at the end (steps after the last active one are dropped, so the result does not depend on it);
    `compile=True` runs the decode step, and on CPU the prefill, through torch.compile (eager is the reference).
    """
    steps = list(stream_generate(
        model, input_ids, max_new_tokens, temperature, top_p, top_k, presence_penalty, frequency_penalty,
        repetition_penalty, stop_token_ids, seed, pad_token_id=pad_token_id, sync_every=sync_every,
        compile=compile, images=images))
    tokens = torch.stack([s.tokens for s in steps], dim=1)  # [B, N]
    if sync_every > 1:  # drop trailing steps in which no row was active (at least the first step is)
        ran = torch.stack([s.active.any() for s in steps])
        tokens = tokens[:, :int(ran.nonzero().max()) + 1]
    return torch.cat([input_ids.to(tokens.device), tokens], dim=1)


class StopStringStreamer:
    """Token ids in, text out, cut before the first stop string.

    `push(token_id)` returns the text that is now safe to show: the tokenizer's incremental decoder never
    returns half a UTF-8 character, and the longest tail of the pending text that is a prefix of some stop
    string is held back until the next tokens show whether the stop string completes. Once a stop string
    appears, `stopped` is True, `stop_string` names it, the text before it has been returned and nothing else
    ever is (the stop string itself is not returned, as in OpenAI's API). `flush()` returns what is held back
    when generation ends without a stop string.

    tokenizer: anything with `incremental_decoder(skip_special_tokens=...)` returning an object with
    `push(id) -> str` and `flush() -> str` (dsv3.tokenizer.Tokenizer).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), *, skip_special_tokens: bool = True) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
        self.stop = tuple(stop)
        self._decoder = tokenizer.incremental_decoder(skip_special_tokens=skip_special_tokens)
        self._pending = ""
        self.stopped = False
        self.stop_string: str | None = None

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it releases (often empty while text is held back)."""
        if self.stopped:
            return ""
        return self._release(self._decoder.push(int(token_id)), final=False)

    def flush(self) -> str:
        """End of generation: return the remaining text (cut at a stop string if one completes in it)."""
        if self.stopped:
            return ""
        return self._release(self._decoder.flush(), final=True)

    def _release(self, text: str, final: bool) -> str:
        self._pending += text
        cut = [(self._pending.find(s), s) for s in self.stop if s in self._pending]
        if cut:
            index, self.stop_string = min(cut)
            self.stopped = True
            out, self._pending = self._pending[:index], ""
            return out
        hold = 0 if final else self._held_back_length()
        out, self._pending = self._pending[:len(self._pending) - hold], self._pending[len(self._pending) - hold:]
        return out

    def _held_back_length(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of some stop string."""
        longest = min(len(self._pending), max((len(s) - 1 for s in self.stop), default=0))
        for n in range(longest, 0, -1):
            if any(s.startswith(self._pending[-n:]) for s in self.stop):
                return n
        return 0


def stream_text(model: torch.nn.Module, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int, *,
                stop: Sequence[str] = (), stop_token_ids: Sequence[int] | None = None,
                **sampling) -> Iterator[str]:
    """Generate from one prompt (a list of token ids) and yield text pieces as they come, cut at `stop` strings.

    stop_token_ids defaults to the tokenizer's eos; stop tokens end generation and are not shown. `sampling`
    takes the keyword arguments of `generate` (temperature, top_p, top_k, penalties, seed).
    """
    if stop_token_ids is None:
        stop_token_ids = (tokenizer.eos_token_id,)
    streamer = StopStringStreamer(tokenizer, stop)
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    steps = stream_generate(model, input_ids, max_new_tokens, stop_token_ids=stop_token_ids, **sampling)
    for step in steps:
        if bool(step.finished[0]):
            break
        text = streamer.push(int(step.tokens[0]))
        if text:
            yield text
        if streamer.stopped:
            steps.close()
            return
    text = streamer.flush()
    if text:
        yield text
