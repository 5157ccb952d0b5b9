"""Choosing the next token from logits, one row per sequence, each row with its own sampling parameters.

A decoding step turns the model's last-position logits [B, V] into one token per row:

1. penalties (over each row's token history):
   - repetition penalty, as in CTRL (Keskar et al. 2019, §4.1) and transformers' RepetitionPenaltyLogitsProcessor:
     for every token in the prompt or generated so far, a positive logit is divided by r and a negative one
     multiplied by r (r > 1 discourages repeats, r < 1 encourages them);
   - frequency and presence penalties as OpenAI defines them, over the *generated* tokens only:
     logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty, c[j] = times j was generated;
   (this order — repetition first, then frequency/presence — is vLLM's `apply_penalties`);
2. logit_bias (OpenAI's per-token additive bias);
3. temperature 0 -> greedy argmax; otherwise divide by the temperature, keep the top_k highest logits
   (0 = off), then the smallest set of tokens whose probability reaches top_p (nucleus sampling, Holtzman et al.
   2020), then drop tokens less likely than min_p times the most likely one (min-p sampling, Nguyen et al. 2024;
   0 = off), renormalise and draw.

Rows draw from their own `torch.Generator`, so a seeded row gives the same tokens whatever else is in the batch.
The token history is kept by the caller as two [B, V] tensors (the layout of vLLM's sampler): `prompt_mask`
(bool, token occurs in the prompt) and `output_counts` (long, times each token was generated); `count_tokens`
builds either from ids. An engine that batches requests with different parameters stacks their rows and passes
one `SamplingParams` per row::

    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.9, seed=7)]
    generators = [make_generator(p.seed, logits.device) for p in params]
    tokens = sample(logits, params, generators, output_counts=counts, prompt_mask=prompt_mask)  # [B]
    lp = token_logprobs(logits, tokens, top_n=5)  # the server's `logprobs` / `top_logprobs`
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX = 0.01, 100.0


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is decoded. Defaults are greedy decoding with no penalties (as `dsv3.generate`).

    temperature: >= 0; 0 means greedy (argmax), and then top_k/top_p/seed have no effect.
    top_p: in (0, 1]; 1 keeps every token. top_k: >= 0; 0 keeps every token (a k beyond the vocabulary too).
    min_p: in [0, 1]; 0 keeps every token.
    presence_penalty, frequency_penalty: in [-2, 2] (OpenAI's range), over generated tokens.
    repetition_penalty: in [REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX]; 1 is off. Over prompt and generated
    tokens (CTRL). Beyond that range the penalty already bans (or forces) every seen token, and ever smaller values
    divide logits into float32 infinities that no distribution can be drawn from.
    logit_bias: {token id: bias} added to the logits (OpenAI allows -100..100).
    max_new_tokens: >= 1. stop_token_ids: generation of a row ends after it emits one of these.
    seed: an int seeds the row's own generator (same seed, same tokens); None uses torch's global RNG.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> None:
            raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            bad("max_new_tokens", "an integer >= 1")
        if not _is_number(self.temperature) or self.temperature < 0:
            bad("temperature", "a finite number >= 0 (0 = greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "an integer >= 0 (0 = off)")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "a number in [0, 1] (0 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                bad(name, "a number in [-2, 2]")
        if not _is_number(self.repetition_penalty) or not (
                REPETITION_PENALTY_MIN <= self.repetition_penalty <= REPETITION_PENALTY_MAX):
            bad("repetition_penalty", f"a number in [{REPETITION_PENALTY_MIN:g}, {REPETITION_PENALTY_MAX:g}] (1 = off)")
        if not isinstance(self.logit_bias, Mapping) or not all(
            _is_int(k) and k >= 0 and _is_number(v) for k, v in self.logit_bias.items()
        ):
            bad("logit_bias", "a mapping from token ids (integers >= 0) to finite numbers")
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, Sequence) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            bad("stop_token_ids", "a sequence of token ids (integers >= 0)")
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "an integer or None")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", dict(self.logit_bias))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with `seed` on `device`, or None (torch's global RNG) when seed is None."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def count_tokens(ids: torch.Tensor | Sequence[Sequence[int]], vocab_size: int,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Token counts [B, V] (long) of ids [B, T] or a list of B id lists (which may differ in length).

    `count_tokens(prompt, V) > 0` is the `prompt_mask` of `sample`; counts of the generated tokens are its
    `output_counts` (add one per step with `counts[rows, tokens] += 1`).
    """
    rows = [torch.as_tensor(r, dtype=torch.long).flatten() for r in ids]
    counts = torch.zeros(len(rows), vocab_size, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        if r.numel() and (int(r.min()) < 0 or int(r.max()) >= vocab_size):
            raise ValueError(f"count_tokens: row {b} has a token id outside [0, {vocab_size})")
        counts[b].index_add_(0, r.to(counts.device), torch.ones_like(r, device=counts.device))
    return counts


def _row_values(params: Sequence[SamplingParams], name: str, like: torch.Tensor) -> torch.Tensor:
    """[B, 1] float tensor of one parameter over the rows, on `like`'s device."""
    return torch.tensor([float(getattr(p, name)) for p in params], dtype=like.dtype, device=like.device)[:, None]


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams], output_counts: torch.Tensor | None,
                    prompt_mask: torch.Tensor | None) -> torch.Tensor:
    """Repetition, frequency and presence penalties, then logit_bias. logits: [B, V] -> new [B, V] tensor.

    output_counts: [B, V] times each token was generated (None: nothing generated yet);
    prompt_mask: [B, V] bool, token occurs in the prompt (None: no prompt history).
    """
    logits = logits.clone()
    if any(p.has_penalties for p in params):
        counts = torch.zeros_like(logits, dtype=torch.long) if output_counts is None else output_counts
        generated = counts > 0
        seen = generated if prompt_mask is None else generated | prompt_mask
        r = _row_values(params, "repetition_penalty", logits)
        penalised = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen, penalised, logits)
        logits -= counts.to(logits.dtype) * _row_values(params, "frequency_penalty", logits)
        logits -= generated.to(logits.dtype) * _row_values(params, "presence_penalty", logits)
    for b, p in enumerate(params):
        for token, bias in p.logit_bias.items():
            if token >= logits.shape[-1]:
                raise ValueError(f"logit_bias: token id {token} is outside the vocabulary [0, {logits.shape[-1]})")
            logits[b, token] += bias
    return logits


def top_k_top_p_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every logit outside the row's top_k (0 = off), then outside its nucleus top_p.

    logits: [B, V] (already divided by the temperature); top_k: [B] long; top_p: [B] float.
    The nucleus is the smallest set of highest-probability tokens whose mass (after the top_k cut, renormalised,
    as transformers and vLLM do) reaches top_p; the most likely token is always kept.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, logits.shape[-1])[:, None]
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    sorted_logits = sorted_logits.masked_fill((mass_before >= top_p[:, None]) & (rank > 0), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None] | None = None, *,
           output_counts: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row: logits [B, V] -> LongTensor [B]; -1 for a sampled row whose logits (after penalties and
    temperature) hold NaN or infinities, so there is nothing to draw from.

    params[b] and generators[b] (None or a list of B; see `make_generator`) belong to row b; output_counts and
    prompt_mask are the [B, V] token history the penalties need (see `apply_penalties`). Work is done in float32.
    """
    if logits.dim() != 2:
        raise ValueError(f"sample: logits must be [B, V], got shape {tuple(logits.shape)}")
    B = logits.shape[0]
    if len(params) != B:
        raise ValueError(f"sample: got {len(params)} SamplingParams for {B} rows")
    if generators is not None and len(generators) != B:
        raise ValueError(f"sample: got {len(generators)} generators for {B} rows")
    logits = apply_penalties(logits.float(), params, output_counts, prompt_mask)
    tokens = logits.argmax(dim=-1)
    sampled = [b for b, p in enumerate(params) if not p.greedy]
    if not sampled:
        return tokens
    rows = torch.tensor(sampled, device=logits.device)
    chosen = [params[b] for b in sampled]
    scaled = logits[rows] / _row_values(chosen, "temperature", logits)
    if any(p.top_k > 0 or p.top_p < 1 for p in chosen):
        V = logits.shape[-1]
        top_k = torch.tensor([min(p.top_k, V) for p in chosen], device=logits.device)
        scaled = top_k_top_p_mask(scaled, top_k, _row_values(chosen, "top_p", logits)[:, 0])
    probs = scaled.softmax(dim=-1)
    # NaN or infinite logits leave a row no distribution: it draws from a placeholder and gets -1, without a host
    # sync (multinomial would raise, and on a GPU fail with a device-side assert that ends every request there)
    broken = ~torch.isfinite(probs).all(dim=-1, keepdim=True)  # [S, 1]
    probs = torch.where(broken, 1.0, probs)
    if any(p.min_p > 0 for p in chosen):  # multinomial renormalises what is left
        floor = _row_values(chosen, "min_p", logits) * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < floor, 0.0)
    for i, b in enumerate(sampled):
        generator = None if generators is None else generators[b]
        tokens[b] = torch.multinomial(probs[i], 1, generator=generator)[0]
    tokens[rows] = torch.where(broken[:, 0], -1, tokens[rows])
    return tokens


class Logprobs(NamedTuple):
    """chosen: [B] log-probability of each row's token; top_logprobs, top_ids: [B, n] the n most likely."""

    chosen: torch.Tensor
    top_logprobs: torch.Tensor
    top_ids: torch.Tensor


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: int = 0) -> Logprobs:
    """Log-probabilities of `tokens` [B] under logits [B, V], and the top_n alternatives (OpenAI's logprobs).

    Pass the model's raw logits to report the model's distribution (vLLM's default), or logits after
    `apply_penalties` to report the adjusted one.
    """
    if not _is_int(top_n) or top_n < 0:
        raise ValueError(f"top_n must be an integer >= 0, got {top_n!r}")
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(-1, tokens.view(-1, 1).to(logp.device))[:, 0]
    top = logp.topk(min(top_n, logp.shape[-1]), dim=-1)
    return Logprobs(chosen, top.values, top.indices)
