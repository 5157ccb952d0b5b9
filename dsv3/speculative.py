"""Greedy speculative decoding with the model's own MTP module as the drafter (paper-V3 §5.4.3).

The MTP module (paper-V3 §2.2) reads the main model's final hidden state h_i and the embedding of token i+1 and
predicts token i+2. After a step has fixed token n (= `a`, the main model's greedy choice), the MTP module at
position n-1 has already drafted token n+1 (= `d`). One main-model forward over [a, d] at positions n, n+1 then
gives the greedy token after a (logits at n) and the one after d (logits at n+1):

- if the first equals d, the draft is accepted and the step yields two tokens: d and the token after it;
- otherwise it yields one token (the main model's choice); the latent written at n+1 for d is stale and is
  overwritten by the next step, because attention only sees slots at positions <= the query's.

Either way every emitted token is the main model's greedy choice given the emitted prefix, so the output equals
plain greedy `dsv3.generate` (up to float rounding between a 2-token and a 1-token forward). The MTP module keeps
its own one-layer latent cache, fed with the accepted (hidden, next token) pairs. The V3 report measures 85-90%
acceptance of the second token and 1.8x tokens/s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .cache import KVCache


@dataclass
class SpeculativeStats:
    """drafted: draft tokens checked; accepted: those the main model agreed with; forwards: main-model calls
    (prefill included); new_tokens: tokens returned."""

    drafted: int = 0
    accepted: int = 0
    forwards: int = 0
    new_tokens: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)


def _draft(model, hidden, input_ids, mtp_cache, start_pos) -> torch.Tensor:
    """The MTP module's greedy token after the last position: [1, 1]. All positions go through the module (its
    cache needs their latents); only the last one goes through the output head."""
    x = model.mtp_hidden(hidden, input_ids, 0, mtp_cache, start_pos)[:, -1:]
    return model.lm_head(model.mtp[0].shared_head.norm(x))[:, -1].argmax(-1, keepdim=True)


@torch.inference_mode()
def speculative_generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *,
                         stop_token_ids: Sequence[int] = (), return_stats: bool = False):
    """Greedy continuation of input_ids [1, T] -> LongTensor [1, T + N], N <= max_new_tokens (ends at the first
    stop token, which is included, as in `generate`). With return_stats, returns (ids, SpeculativeStats).

    Needs a model with an MTP module (config.num_nextn_predict_layers >= 1) and batch size 1.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a LongTensor [1, T], got {getattr(input_ids, 'shape', input_ids)!r}")
    if input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"speculative_generate decodes one sequence: input_ids must be [1, T>0], "
                         f"got {tuple(input_ids.shape)}")
    if len(model.mtp) == 0:
        raise ValueError("speculative_generate needs an MTP module: config.num_nextn_predict_layers is 0")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    T = input_ids.shape[1]
    if T + max_new_tokens + 1 > model.config.max_position_embeddings:
        raise ValueError(f"max_new_tokens={max_new_tokens} with a prompt of {T} tokens exceeds the model's "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    device = model.lm_head.weight.device
    ids = input_ids.to(device)
    stops = set(int(s) for s in stop_token_ids)
    stats = SpeculativeStats()
    size = T + max_new_tokens + 1
    cache = model.new_cache(1, size)
    mtp_cache = KVCache(model.config, 1, size, num_layers=1, dtype=cache.kv.dtype, device=device)

    logits, hidden = model(ids, cache, 0, return_hidden=True)  # prefill: positions 0..T-1
    stats.forwards += 1
    a = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1] token T
    # MTP over positions 0..T-1: (h_i, token i+1) -> token i+2; the last one drafts token T+1
    draft = _draft(model, hidden, torch.cat((ids, a), dim=1), mtp_cache, 0)
    out = [int(a)]
    n = T  # position of `a`
    while len(out) < max_new_tokens and out[-1] not in stops:
        pair = torch.cat((a, draft), dim=1)  # [1, 2] at positions n, n+1
        logits, hidden = model(pair, cache, n, attn_impl="absorb", return_hidden=True)
        stats.forwards += 1
        greedy = logits[0].argmax(-1)  # [2]: the tokens after a and after the draft
        stats.drafted += 1
        if int(greedy[0]) == int(draft):  # accepted: tokens n+1 (= draft) and n+2 are fixed
            stats.accepted += 1
            a = greedy[1:].view(1, 1)
            out += [int(draft), int(a)]
            mtp_in, mtp_hidden = torch.cat((pair, a), dim=1), hidden  # (h_n, d), (h_{n+1}, a)
            n += 2
        else:  # rejected: token n+1 is the main model's choice
            a = greedy[:1].view(1, 1)
            out.append(int(a))
            mtp_in, mtp_hidden = torch.cat((pair[:, :1], a), dim=1), hidden[:, :1]  # (h_n, a)
            n += 1
        draft = _draft(model, mtp_hidden, mtp_in, mtp_cache, n - mtp_hidden.shape[1])
    if stops and any(t in stops for t in out):
        out = out[:next(i for i, t in enumerate(out) if t in stops) + 1]
    out = out[:max_new_tokens]
    stats.new_tokens = len(out)
    result = torch.cat((ids, torch.tensor([out], dtype=torch.long, device=device)), dim=1)
    return (result, stats) if return_stats else result
