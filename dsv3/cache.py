"""The latent KV cache of MLA: per token and layer only the normalised latent c_kv and the shared rope key.

Paper-V2 §2.1.2 / Table 1: MLA caches (d_c + d_rope) elements per token per layer — 576 for V3 — instead of
2·n_h·d_h = 32768 for standard multi-head attention. The buffers are preallocated (static), so decoding never
reallocates, and each batch row is an independent sequence: row b holds its tokens at positions 0..len_b-1.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    """Static latent cache. kv: [L, B, S, kv_lora_rank], pe: [L, B, S, qk_rope_head_dim].

    With DeepSeek Sparse Attention (config.index_topk set) also `ik`: [L, B, S, index_head_dim], the lightning
    indexer's one shared key per token (dsv3/dsa.py); otherwise `ik` is None.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int, *, num_layers: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        if batch_size <= 0 or max_seq_len <= 0:
            raise ValueError(f"KVCache: batch_size and max_seq_len must be positive, got {batch_size}, {max_seq_len}")
        layers = config.num_hidden_layers if num_layers is None else num_layers
        self.max_seq_len = max_seq_len
        self.kv = torch.zeros(layers, batch_size, max_seq_len, config.kv_lora_rank, dtype=dtype, device=device)
        self.pe = torch.zeros(layers, batch_size, max_seq_len, config.qk_rope_head_dim, dtype=dtype, device=device)
        self.ik = (torch.zeros(layers, batch_size, max_seq_len, config.index_head_dim, dtype=dtype, device=device)
                   if config.uses_dsa else None)
        self._make_index_ids()

    @classmethod
    def _from_views(cls, kv: torch.Tensor, pe: torch.Tensor, max_seq_len: int,
                    ik: torch.Tensor | None = None) -> "KVCache":
        cache = cls.__new__(cls)
        cache.kv, cache.pe, cache.max_seq_len, cache.ik = kv, pe, max_seq_len, ik
        cache._make_index_ids()
        return cache

    def _make_index_ids(self) -> None:
        """The layer ids [L] and batch rows [B, 1] `_index` picks from, made once rather than at every write (three
        fewer ops per layer and step: ~2% of an eager CPU decode step on the bundled model)."""
        layers, batch = self.kv.shape[:2]
        self.layer_ids = torch.arange(layers, device=self.kv.device)
        self.row_ids = torch.arange(batch, device=self.kv.device)[:, None]

    @property
    def batch_size(self) -> int:
        return self.kv.shape[1]

    def rows(self, index: slice | int) -> "KVCache":
        """A cache over some batch rows that shares storage with this one (writes go through)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return KVCache._from_views(self.kv[:, index], self.pe[:, index], self.max_seq_len,
                                   None if self.ik is None else self.ik[:, index])

    def bytes_per_token(self) -> int:
        """(kv_lora_rank + qk_rope_head_dim [+ index_head_dim with DSA]) × layers × element size."""
        layers, _, _, d_c = self.kv.shape
        d_i = 0 if self.ik is None else self.ik.shape[-1]
        return (d_c + self.pe.shape[-1] + d_i) * layers * self.kv.element_size()

    def update(self, layer: int, positions: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
               length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write kv: [B, T, d_c], pe: [B, T, d_r] at positions: [B, T]; return the first `length` slots of the layer.

        `length` is max(positions) + 1, passed in by the caller so that no device-to-host sync is needed here.
        """
        if length > self.max_seq_len:
            raise ValueError(f"KVCache: position {length - 1} is beyond max_seq_len={self.max_seq_len}")
        index = self._index(layer, positions)
        self.kv.index_put_(index, kv.to(self.kv.dtype))
        self.pe.index_put_(index, pe.to(self.pe.dtype))
        return self.kv[layer, :, :length], self.pe[layer, :, :length]

    def _index(self, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(layer, row, position) index tensors for writing [B, T] entries into an [L, B, S, d] buffer; they
        broadcast to [B, T].

        One index_put_ on the whole buffer, not on its layer view `buf[layer]`: torch.compile turns a write into
        a view of a graph input into a copy of the entire buffer, every layer and step (~6 MB per decode step on
        the bundled model); a write into the input itself is done in place."""
        return self.layer_ids[layer], self.row_ids[:positions.shape[0]], positions

    def update_index(self, layer: int, positions: torch.Tensor, k: torch.Tensor, length: int) -> torch.Tensor:
        """Write the indexer keys k: [B, T, index_head_dim] at positions: [B, T]; return the first `length` slots."""
        if self.ik is None:
            raise ValueError("KVCache.update_index: this cache has no indexer keys (config.index_topk is None)")
        self.ik.index_put_(self._index(layer, positions), k.to(self.ik.dtype))
        return self.ik[layer, :, :length]
