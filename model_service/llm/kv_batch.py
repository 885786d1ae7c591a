"""The key/value cache of a running batch, as one left-padded tensor per layer.

transformers' DynamicCache concatenates the whole cache every step (O(length) copies per token) and
has no way to add or drop sequences in the middle of generation. Continuous batching needs both, so
this module keeps each layer's keys and values in a buffer that grows by doubling, with the batch
left-padded to a common length and a 2-D attention mask marking the padding. Sequences leave with
an index select; a freshly prefilled group joins by padding whichever side is shorter.

The model itself is unchanged: it receives a ``transformers.Cache`` whose layers are ``PaddedLayer``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PaddedLayer(DynamicLayer):
    """One layer's keys/values, [batch, kv_heads, capacity, head_dim], valid up to ``length``."""

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _reserve(self, needed: int, like: torch.Tensor) -> None:
        capacity = 0 if self._k is None else self._k.shape[2]
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity, 64)
        b, h, _, d = like.shape
        k = like.new_empty((b, h, new_capacity, d))
        v = like.new_empty((b, h, new_capacity, d))
        if self._k is not None and self.length:
            k[:, :, : self.length] = self._k[:, :, : self.length]
            v[:, :, : self.length] = self._v[:, :, : self.length]
        self._k, self._v = k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        self._reserve(self.length + n, key_states)
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        self.length += n
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    # --- batch surgery -------------------------------------------------------------------------
    def select(self, indices: torch.Tensor, drop_left: int) -> None:
        """Keep rows ``indices`` and drop ``drop_left`` leading (all-padding) positions."""
        if self._k is None:
            return
        indices = indices.to(self._k.device)
        self._k = self._k[indices, :, drop_left : self.length].contiguous()
        self._v = self._v[indices, :, drop_left : self.length].contiguous()
        self.length -= drop_left
        self.keys = self._k
        self.values = self._v

    def absorb(self, other: "PaddedLayer") -> None:
        """Append ``other``'s rows below ours, left-padding the shorter of the two."""
        if other._k is None:
            return
        if self._k is None or self._k.shape[0] == 0:
            self._k, self._v, self.length = other._k, other._v, other.length
            self.dtype, self.device, self.is_initialized = other.dtype, other.device, True
        else:
            length = max(self.length, other.length)
            b1, b2 = self._k.shape[0], other._k.shape[0]
            h, d = self._k.shape[1], self._k.shape[3]
            k = self._k.new_zeros((b1 + b2, h, max(length, 64), d))
            v = self._v.new_zeros((b1 + b2, h, max(length, 64), d))
            k[:b1, :, length - self.length : length] = self._k[:, :, : self.length]
            v[:b1, :, length - self.length : length] = self._v[:, :, : self.length]
            k[b1:, :, length - other.length : length] = other._k[:, :, : other.length]
            v[b1:, :, length - other.length : length] = other._v[:, :, : other.length]
            self._k, self._v, self.length = k, v, length
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]


class PaddedKVBatch:
    """A batch's cache (passed to the model as ``past_key_values``) and its padding mask."""

    def __init__(self, num_layers: int, batch_size: int = 0) -> None:
        self.layers = [PaddedLayer() for _ in range(num_layers)]
        self.cache = Cache(layers=self.layers)
        self.mask = torch.zeros((batch_size, 0), dtype=torch.long)  # [batch, length]: 1 real token, 0 padding

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def mask_for_step(self, new_tokens: int) -> torch.Tensor:
        """The attention mask covering the cache plus ``new_tokens`` real tokens per row."""
        ones = torch.ones((self.batch_size, new_tokens), dtype=torch.long)
        self.mask = torch.cat([self.mask, ones], dim=1)
        return self.mask

    def select(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (in that order); trim columns that became padding in every row."""
        index = torch.tensor(keep, dtype=torch.long)
        mask = self.mask[index]
        real = mask.any(dim=0)
        drop_left = int(real.long().argmax()) if bool(real.any()) else mask.shape[1]
        for layer in self.layers:
            layer.select(index, drop_left)
        self.mask = mask[:, drop_left:].contiguous()

    def absorb(self, other: "PaddedKVBatch") -> None:
        """Add ``other``'s sequences after ours (``other`` is consumed)."""
        length = max(self.length, other.length)
        pad_self = torch.zeros((self.batch_size, length - self.length), dtype=torch.long)
        pad_other = torch.zeros((other.batch_size, length - other.length), dtype=torch.long)
        for mine, theirs in zip(self.layers, other.layers):
            mine.absorb(theirs)
        self.mask = torch.cat(
            [torch.cat([pad_self, self.mask], dim=1), torch.cat([pad_other, other.mask], dim=1)], dim=0
        )
