"""Prefix cache: latent KV blocks of token prefixes shared between requests, found by hash-chained block ids.

A prompt is cut into blocks of `block_size` tokens. Block i is named by hash((name of block i-1, its tokens)), so a
name stands for the whole prefix up to the end of that block: two prompts share block i only if they agree on every
token before it (vLLM's automatic prefix caching, docs/design/prefix_caching.md; nano-vllm engine/block_manager.py,
which also checks the tokens on a hit, as done here to make hash collisions harmless).

A salt (vLLM's `cache_salt`) starts the chain: prompts with different salts never share a block, so the server
salts with the caller's key id and one tenant cannot learn, from `cached_tokens`, what another one sent.

The engine's cache is static, one row per running request (dsv3.KVCache), so blocks cannot be shared in place as in
a paged cache. Instead a block's latents (c_kv and k_pe of every layer, with DSA also the indexer keys;
`bytes_per_token` each) are copied out of the row into a preallocated pool, and copied back into the row of a later
request whose prompt starts the same way: that request then prefills only the rest. Copying
block_size·bytes_per_token bytes is far cheaper than recomputing the block through every layer.

A running request holds a reference on the blocks it matched or stored; blocks nobody holds sit in an LRU list and
are overwritten, least recently used first, when the pool (sized by a byte cap) is full.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..cache import KVCache


@dataclass(eq=False)
class Block:
    """One cached block: its slot in the pool, its chained hash, its tokens and salt, and how many requests hold
    it."""

    slot: int
    key: int
    tokens: tuple[int, ...]
    salt: str | None = None
    refs: int = 0


def block_keys(tokens: list[int], block_size: int, salt: str | None = None) -> list[tuple[int, tuple[int, ...]]]:
    """(chained hash, tokens) of every full block; the hash of block i covers the salt and
    tokens[: (i + 1) · block_size]."""
    keys, parent = [], 0 if salt is None else hash(("salt", salt))
    for start in range(0, len(tokens) - block_size + 1, block_size):
        chunk = tuple(tokens[start:start + block_size])
        parent = hash((parent, chunk))
        keys.append((parent, chunk))
    return keys


class PrefixCache:
    """A pool of latent KV blocks for `cache`'s model, at most `max_bytes` big (0 disables caching).

    kv: [L, N, block_size, d_c], pe: [L, N, block_size, d_r] and, for a DSA model, the indexer keys
    ik: [L, N, block_size, d_I] (else None), on the cache's device and in its dtype.
    Token counters for metrics: `queried_tokens` (prompt tokens looked up), `hit_tokens` (found).
    """

    def __init__(self, cache: KVCache, block_size: int = 16, max_bytes: int = 64 << 20) -> None:
        if block_size < 1:
            raise ValueError(f"PrefixCache: block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.bytes_per_block = block_size * cache.bytes_per_token()
        self.num_blocks = max(0, max_bytes) // self.bytes_per_block
        L, _, _, d_c = cache.kv.shape
        like = dict(dtype=cache.kv.dtype, device=cache.kv.device)
        self.kv = torch.zeros(L, self.num_blocks, block_size, d_c, **like)
        self.pe = torch.zeros(L, self.num_blocks, block_size, cache.pe.shape[-1], **like)
        self.ik = (None if cache.ik is None
                   else torch.zeros(L, self.num_blocks, block_size, cache.ik.shape[-1], **like))
        self._blocks: dict[int, Block] = {}
        self._idle: OrderedDict[int, Block] = OrderedDict()  # refs == 0, least recently used first
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self.queried_tokens = self.hit_tokens = self.evictions = 0

    # ------------------------------------------------------------------ lookup
    def match(self, tokens: list[int], max_tokens: int, salt: str | None = None) -> list[Block]:
        """The cached blocks stored with `salt` that cover the longest prefix of tokens[:max_tokens], each now
        referenced once more."""
        self.queried_tokens += len(tokens)
        found = []
        for key, chunk in block_keys(tokens[:max_tokens], self.block_size, salt):
            block = self._blocks.get(key)
            if block is None or block.tokens != chunk or block.salt != salt:
                break
            found.append(block)
        for block in found:
            self._acquire(block)
        self.hit_tokens += len(found) * self.block_size
        return found

    def load(self, blocks: list[Block], row: KVCache) -> None:
        """Copy `blocks` into positions 0..len(blocks)·block_size-1 of a one-row cache view."""
        if not blocks:
            return
        n = len(blocks) * self.block_size
        slots = torch.tensor([b.slot for b in blocks], device=self.kv.device)
        row.kv[:, 0, :n] = self.kv[:, slots].flatten(1, 2)
        row.pe[:, 0, :n] = self.pe[:, slots].flatten(1, 2)
        if self.ik is not None:
            row.ik[:, 0, :n] = self.ik[:, slots].flatten(1, 2)

    # ------------------------------------------------------------------ insertion
    def store(self, tokens: list[int], row: KVCache, held: dict[int, Block], salt: str | None = None) -> None:
        """Save every full block of `tokens` (whose latents are in the one-row view `row` at positions 0..) that is
        not cached yet under `salt`, and reference each block in `held` (key -> block, the request's holdings)
        once."""
        for i, (key, chunk) in enumerate(block_keys(tokens, self.block_size, salt)):
            if key in held:
                continue
            block = self._blocks.get(key)
            if block is not None and (block.tokens != chunk or block.salt != salt):
                return  # a hash collision: leave the resident block alone
            if block is None:
                block = self._allocate(key, chunk, salt)
                if block is None:
                    return  # every block is held by a running request; nothing more fits
                span = slice(i * self.block_size, (i + 1) * self.block_size)
                self.kv[:, block.slot] = row.kv[:, 0, span]
                self.pe[:, block.slot] = row.pe[:, 0, span]
                if self.ik is not None:
                    self.ik[:, block.slot] = row.ik[:, 0, span]
            self._acquire(block)
            held[key] = block

    def release(self, blocks) -> None:
        """Drop one reference from each block; unreferenced blocks become evictable (most recently used last)."""
        for block in blocks:
            block.refs -= 1
            if block.refs == 0 and self._blocks.get(block.key) is block:
                self._idle[block.key] = block

    # ------------------------------------------------------------------ accounting
    @property
    def used_blocks(self) -> int:
        return len(self._blocks)

    @property
    def used_bytes(self) -> int:
        return len(self._blocks) * self.bytes_per_block

    @property
    def referenced_blocks(self) -> int:
        """Blocks some running request holds (0 when the engine is idle)."""
        return sum(1 for b in self._blocks.values() if b.refs > 0)

    def _acquire(self, block: Block) -> None:
        block.refs += 1
        self._idle.pop(block.key, None)

    def _allocate(self, key: int, chunk: tuple[int, ...], salt: str | None) -> Block | None:
        if self._free:
            slot = self._free.pop()
        elif self._idle:
            _, victim = self._idle.popitem(last=False)
            del self._blocks[victim.key]
            self.evictions += 1
            slot = victim.slot
        else:
            return None
        block = self._blocks[key] = Block(slot, key, chunk, salt)
        return block
