"""The latent KV cache of MLA: per token and layer only the normalised latent c_kv and the shared rope key.

Paper-V2 §2.1.2 / Table 1: MLA caches (d_c + d_rope) elements per token per layer — 576 for V3 — instead of
2·n_h·d_h = 32768 for standard multi-head attention. The buffers are preallocated (static), so decoding never
reallocates, and each batch row is an independent sequence: row b holds its tokens at positions 0..len_b-1.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    """Static latent cache. kv: [L, B, S, kv_lora_rank], pe: [L, B, S, qk_rope_head_dim]."""

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int, *, num_layers: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        if batch_size <= 0 or max_seq_len <= 0:
            raise ValueError(f"KVCache: batch_size and max_seq_len must be positive, got {batch_size}, {max_seq_len}")
        layers = config.num_hidden_layers if num_layers is None else num_layers
        self.max_seq_len = max_seq_len
        self.kv = torch.zeros(layers, batch_size, max_seq_len, config.kv_lora_rank, dtype=dtype, device=device)
        self.pe = torch.zeros(layers, batch_size, max_seq_len, config.qk_rope_head_dim, dtype=dtype, device=device)

    @classmethod
    def _from_views(cls, kv: torch.Tensor, pe: torch.Tensor, max_seq_len: int) -> "KVCache":
        cache = cls.__new__(cls)
        cache.kv, cache.pe, cache.max_seq_len = kv, pe, max_seq_len
        return cache

    @property
    def batch_size(self) -> int:
        return self.kv.shape[1]

    def rows(self, index: slice | int) -> "KVCache":
        """A cache over some batch rows that shares storage with this one (writes go through)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return KVCache._from_views(self.kv[:, index], self.pe[:, index], self.max_seq_len)

    def bytes_per_token(self) -> int:
        """(kv_lora_rank + qk_rope_head_dim) × layers × element size."""
        layers, _, _, d_c = self.kv.shape
        return (d_c + self.pe.shape[-1]) * layers * self.kv.element_size()

    def update(self, layer: int, positions: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor,
               length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write kv: [B, T, d_c], pe: [B, T, d_r] at positions: [B, T]; return the first `length` slots of the layer.

        `length` is max(positions) + 1, passed in by the caller so that no device-to-host sync is needed here.
        """
        if length > self.max_seq_len:
            raise ValueError(f"KVCache: position {length - 1} is beyond max_seq_len={self.max_seq_len}")
        rows = torch.arange(kv.shape[0], device=kv.device)[:, None]
        self.kv[layer][rows, positions] = kv.to(self.kv.dtype)
        self.pe[layer][rows, positions] = pe.to(self.pe.dtype)
        return self.kv[layer, :, :length], self.pe[layer, :, :length]
