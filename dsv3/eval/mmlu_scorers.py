"""The two MMLU backends: an in-process dsv3 model and an OpenAI-compatible server (`/v1/completions`, or
`/v1/chat/completions` for generative scoring of chat-only APIs).

Both answer, for a chunk of one subject's questions, either
- `loglikelihoods(prefix, contexts)` -> [N, 4]: log p(" A" | ctx) ... log p(" D" | ctx), or
- `generate(prefix, contexts, max_tokens)` -> N strings (greedy), for generative scoring.
Every context starts with `prefix` (the subject header + exemplars), which the in-process model computes once
per subject and keeps while the following chunks share it.

Tokenisation follows lm-eval's `TemplateLM._encode_pair` (lm_eval/api/model.py): trailing context whitespace moves
into the continuation, then `ctx_enc = encode(ctx)`, `whole = encode(ctx + cont)`, `cont_enc = whole[len(ctx_enc):]`,
and the model reads `(ctx_enc + cont_enc)[:-1]`, left-truncated to `max_length` tokens like HFLM. So " A" is scored
as the token(s) the tokenizer produces for it after "Answer:", never a standalone "A" (docs/eval-lora-quant.md §1.5).
The server backend applies the same rule with the server's tokenizer: it sends `ctx` and `ctx + cont` and takes
the continuation as the tokens past the context's length.
"""

from __future__ import annotations

import warnings
from urllib.parse import urlparse

import torch

from .mmlu_data import LETTERS

CONTINUATIONS = tuple(f" {letter}" for letter in LETTERS)


def _split_space(context: str, continuation: str) -> tuple[str, str]:
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ModelScorer:
    """In-process scoring with a dsv3 `Transformer` and `Tokenizer`.

    Per subject the longest token prefix shared by every request (header + exemplars, up to where tokenisation of
    the question starts) runs once into a batch-1 latent cache; its latents are copied into every row of a batch
    cache, and each batch then runs only the question tokens from `start_pos = p`. Rows whose input must be
    left-truncated (longer than max_length) share no prefix and run in their own batches from position 0. Only the
    positions that are scored go through the LM head.
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int | None = None,
                 chat: bool = False) -> None:
        self.model, self.tokenizer, self.batch_size, self.chat = model, tokenizer, batch_size, chat
        self.max_length = max_length or model.config.max_position_embeddings
        self.device = model.lm_head.weight.device
        self._prefix: tuple[tuple[int, ...], object] = ((), None)  # last prefix's tokens and batch-1 cache

    def _encode_pair(self, context: str, continuation: str, encoded: dict) -> tuple[list[int], list[int]]:
        """encoded: memo of context encodings (the four letters share one context)."""
        context, continuation = _split_space(context, continuation)
        if context not in encoded:
            encoded[context] = self.tokenizer.encode(context)
        ctx = encoded[context]
        return ctx, self.tokenizer.encode(context + continuation)[len(ctx):]

    @torch.no_grad()
    def loglikelihoods(self, prefix: str, contexts: list[str]) -> list[list[float]]:
        # rows: unique model inputs; requests[(q, c)] = (row, continuation ids)
        rows: dict[tuple[int, ...], int] = {}
        requests, truncated, encoded = {}, set(), {}
        for q, context in enumerate(contexts):
            for c, cont in enumerate(CONTINUATIONS):
                ctx_enc, cont_enc = self._encode_pair(context, cont, encoded)
                if not cont_enc:
                    raise ValueError(f"continuation {cont!r} tokenised to nothing after context ...{context[-40:]!r}")
                whole = ctx_enc + cont_enc
                inp = tuple(whole[-(self.max_length + 1):][:-1])
                requests[q, c] = (rows.setdefault(inp, len(rows)), cont_enc)
                if len(whole) > self.max_length + 1:
                    truncated.add(rows[inp])
        inputs = list(rows)
        scored = [[] for _ in inputs]  # positions whose logits are needed, per row: first one scored
        for (q, c), (r, cont) in requests.items():
            scored[r].append(len(inputs[r]) - len(cont))
        first_scored = [min(s) for s in scored]
        token_lp = self._run(self.tokenizer.encode(prefix), inputs, first_scored, truncated)
        out = [[0.0] * len(LETTERS) for _ in contexts]
        for (q, c), (r, cont) in requests.items():
            lp = token_lp[r]  # [L_r - first_r, V] log-probs for positions first_r .. L_r - 1
            start = len(inputs[r]) - len(cont) - first_scored[r]
            out[q][c] = float(sum(lp[start + i, t] for i, t in enumerate(cont)))
        return out

    def _run(self, prefix_ids: list[int], inputs: list[tuple[int, ...]], first: list[int],
             truncated: set[int]) -> list[torch.Tensor]:
        """Log-softmax at positions first[r]..len-1 of each input row (fp32 [n_r, V] tensors)."""
        if truncated:
            warnings.warn(f"{len(truncated)} MMLU inputs exceed max_length={self.max_length} tokens and are "
                          f"left-truncated (as lm-eval does)")
        full = [r for r in range(len(inputs)) if r not in truncated]
        # shared prefix length p: common to all full rows, and leaving every scored position to be computed
        p = min([_common_prefix(prefix_ids, inputs[r]) for r in full] + [first[r] for r in full], default=0)
        out: list[torch.Tensor | None] = [None] * len(inputs)
        cut = sorted(truncated)  # all exactly max_length long: batched without padding, no cache, from position 0
        for i in range(0, len(cut), self.batch_size):
            batch = cut[i:i + self.batch_size]
            for r, lp in zip(batch, self._batch([inputs[r] for r in batch], [first[r] for r in batch], 0, None)):
                out[r] = lp
        if not full:
            return out
        longest = max(len(inputs[r]) for r in full)
        cache = self.model.new_cache(min(self.batch_size, len(full)), longest)
        if p:
            prefix_cache = self._prefix_cache(inputs[full[0]][:p])
            cache.kv[:, :, :p] = prefix_cache.kv[:, :, :p]
            cache.pe[:, :, :p] = prefix_cache.pe[:, :, :p]
            if cache.ik is not None:  # DSA: the indexer keys [L, B, S, d_I]
                cache.ik[:, :, :p] = prefix_cache.ik[:, :, :p]
        order = sorted(full, key=lambda r: -len(inputs[r]))  # similar lengths together: little padding
        for i in range(0, len(order), self.batch_size):
            batch = order[i:i + self.batch_size]
            results = self._batch([inputs[r] for r in batch], [first[r] for r in batch], p,
                                  cache.rows(slice(0, len(batch))))
            for r, lp in zip(batch, results):
                out[r] = lp
        return out

    def _prefix_cache(self, tokens: tuple[int, ...]):
        """Latents of `tokens` in a batch-1 cache, reused while calls share it (run_mmlu sends a subject in chunks)."""
        held, cache = self._prefix
        if held[:len(tokens)] != tokens:
            cache = self.model.new_cache(1, len(tokens))
            self.model.hidden_states(torch.tensor([tokens], device=self.device), cache, 0)
            self._prefix = (tokens, cache)
        return cache

    def _batch(self, inputs, first, p: int, cache) -> list[torch.Tensor]:
        """Run inputs[b][p:] (right-padded) from start_pos p; log-probs at positions first[b]..len-1."""
        width = max(len(x) for x in inputs) - p
        ids = torch.zeros(len(inputs), width, dtype=torch.long)
        for b, x in enumerate(inputs):
            ids[b, :len(x) - p] = torch.tensor(x[p:])
        hidden = self.model.hidden_states(ids.to(self.device), cache, p)  # [B, width, D]
        out = []
        for b, x in enumerate(inputs):
            logits = self.model.lm_head(hidden[b, first[b] - p:len(x) - p])
            out.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        return out

    @torch.no_grad()
    def generate(self, prefix: str, contexts: list[str], max_tokens: int = 8) -> list[str]:
        """Greedy answer to each context, cut at the first newline (lm-eval mmlu_generative: until "\\n").

        chat: the context goes in as one user message through the tokenizer's chat template.
        """
        from ..generation import generate

        texts = []
        for context in contexts:  # one at a time: the answers are a few tokens, the prompt dominates
            if self.chat:
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": context}],
                                                         add_generation_prompt=True)
            else:
                ids = self.tokenizer.encode(context)
            ids = torch.tensor([ids[-(self.max_length - max_tokens):]], device=self.device)
            out = generate(self.model, ids, max_tokens, stop_token_ids=[self.tokenizer.eos_token_id])
            new = [t for t in out[0, ids.shape[1]:].tolist() if t != self.tokenizer.eos_token_id]
            texts.append(self.tokenizer.decode(new, skip_special_tokens=True).split("\n")[0])
        return texts


class ServerError(RuntimeError):
    """The OpenAI-compatible server was unreachable or answered something unusable."""


class APIScorer:
    """Scoring through an OpenAI-compatible server's legacy `/v1/completions` endpoint.

    Log-likelihood: `echo=True, logprobs=1, max_tokens=0` returns one log-prob per prompt token
    (`choices[i].logprobs.token_logprobs`, the first may be null). Generative: `max_tokens`, `temperature=0`,
    `stop=["\\n"]`, reading `choices[i].text`. api_base is the OpenAI base URL, e.g. http://localhost:8000/v1
    (a bare host:port gets /v1 appended).
    """

    def __init__(self, api_base: str, model: str = "dsv3", api_key: str | None = None, batch_size: int = 16,
                 timeout: float = 600.0, chat: bool = False) -> None:
        import httpx  # optional dependency (dsv3[server])

        base = api_base.rstrip("/")
        if urlparse(base).path in ("", "/"):
            base += "/v1"
        self.url = base + ("/chat/completions" if chat else "/completions")
        self.model, self.batch_size, self.chat = model, batch_size, chat
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=timeout)
        self._httpx = httpx

    def _post(self, payload: dict) -> list[dict]:
        try:
            response = self._client.post(self.url, json={"model": self.model, **payload})
        except self._httpx.TransportError as e:
            raise ServerError(f"cannot reach {self.url}: {e.__class__.__name__}: {e}. Is the server running "
                              f"(e.g. `dsv3 serve`), and is --api-base its OpenAI base URL (http://HOST:PORT/v1)?") from None
        if response.status_code != 200:
            raise ServerError(f"{self.url} answered HTTP {response.status_code}: {response.text[:300]}")
        try:
            choices = sorted(response.json()["choices"], key=lambda c: c.get("index", 0))
        except (ValueError, KeyError, TypeError) as e:
            raise ServerError(f"{self.url}: response is not a completions object with 'choices' ({e})") from None
        sent = len(payload.get("prompt", [None]))
        if len(choices) != sent:
            raise ServerError(f"{self.url}: sent {sent} prompts, got {len(choices)} choices")
        return choices

    def _echo_logprobs(self, prompts: list[str]) -> list[list[float]]:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = prompts[i:i + self.batch_size]
            for choice in self._post({"prompt": chunk, "echo": True, "logprobs": 1, "max_tokens": 0,
                                      "temperature": 0}):
                lps = (choice.get("logprobs") or {}).get("token_logprobs")
                if not isinstance(lps, list):
                    raise ServerError(f"{self.url}: choice has no logprobs.token_logprobs; the server must support "
                                      f"echo=True with logprobs (or use --generative)")
                out.append(lps)
        return out

    def loglikelihoods(self, prefix: str, contexts: list[str]) -> list[list[float]]:
        if self.chat:
            raise ServerError("chat endpoints give no prompt log-probs: use --generative with --chat")
        pairs = [_split_space(ctx, cont) for ctx in contexts for cont in CONTINUATIONS]
        unique_ctx = list(dict.fromkeys(ctx for ctx, _ in pairs))
        lps = self._echo_logprobs(unique_ctx + [ctx + cont for ctx, cont in pairs])
        ctx_len = {ctx: len(lp) for ctx, lp in zip(unique_ctx, lps)}
        whole = lps[len(unique_ctx):]
        scores = []
        for (ctx, _), lp in zip(pairs, whole):
            cont_lp = lp[ctx_len[ctx]:]
            if not cont_lp or any(x is None for x in cont_lp):
                raise ServerError(f"{self.url}: no log-probs for the continuation after context ...{ctx[-40:]!r}")
            scores.append(float(sum(cont_lp)))
        return [scores[i:i + len(LETTERS)] for i in range(0, len(scores), len(LETTERS))]

    def generate(self, prefix: str, contexts: list[str], max_tokens: int = 8) -> list[str]:
        """Greedy answers: batched prompts on /completions, one user message per request on /chat/completions."""
        if self.chat:
            return [(self._post({"messages": [{"role": "user", "content": c}], "max_tokens": max_tokens,
                                 "temperature": 0})[0].get("message") or {}).get("content") or "" for c in contexts]
        out = []
        for i in range(0, len(contexts), self.batch_size):
            chunk = contexts[i:i + self.batch_size]
            out += [c.get("text", "") for c in self._post({"prompt": chunk, "max_tokens": max_tokens,
                                                           "temperature": 0, "stop": ["\n"]})]
        return out
