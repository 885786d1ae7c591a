"""A KV cache of fixed shape: one preallocated slot per running sequence, written in place by index.

Per layer, keys and values live in ``[slots, kv_heads, max_len + 1, head_dim]`` tensors allocated once.
A sequence owns the slot the scheduler gave it from admission to its end; its token at position p sits
in column p of its slot. Nothing is copied when sequences join or leave: a prefill writes the prompt
into the group's slots, a decode step writes one column per row, and attention reads the slots through
a boolean mask that marks each row's valid positions. The last column is a scratch column that padding
tokens and idle rows write to and nobody reads.

The model is unchanged: it receives a ``transformers.Cache`` whose layers are ``SlotLayer``; the engine
tells the cache, before each forward pass, where this step's tokens go (``write_rows``/``write_cols``)
and which slots attention reads (``read_rows``, ``read_len``), and passes the 4-D mask itself (transformers
uses a 4-D mask as given).

An eager decode step (``decode``) runs over slot rows 0..n-1 (n: one past the highest slot in use, the
scheduler hands out the lowest free slot first) and reads up to the longest row (in steps of 64), so a
decode step's shapes repeat. The CUDA-graph decode (decode_runner.py) pads both to fixed buckets and binds
its own preallocated buffers (``bind``), so every replay of a graph reads and writes the same tensors.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class SlotLayer(DynamicLayer):
    def __init__(self, owner: "SlotKVCache", keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.owner = owner
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        o = self.owner
        # [slots, max_len+1, heads, dim] views: one index_put writes every (row, position) of this step
        self.keys.transpose(1, 2)[o.write_rows, o.write_cols] = key_states.transpose(1, 2)
        self.values.transpose(1, 2)[o.write_rows, o.write_cols] = value_states.transpose(1, 2)
        if not o.reads_cache:  # a prefill from position 0 attends to its own tokens only
            return key_states, value_states
        rows = slice(o.read_start, o.read_stop)
        return self.keys[rows, :, : o.read_len], self.values[rows, :, : o.read_len]

    def get_seq_length(self) -> int:
        return self.owner.read_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.read_len, 0


class SlotKVCache:
    def __init__(self, num_layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.slots, self.max_len = slots, max_len
        self.scratch = max_len  # the column nobody reads
        self.device = torch.device(device)
        shape = (slots, kv_heads, max_len + 1, head_dim)
        self.layers = [SlotLayer(self, torch.zeros(shape, dtype=dtype, device=device),
                                 torch.zeros(shape, dtype=dtype, device=device)) for _ in range(num_layers)]
        self.cache = Cache(layers=self.layers)
        # set before every forward pass
        self.write_rows = self.write_cols = torch.zeros((0, 0), dtype=torch.long)
        # the slots read: rows read_start..read_stop-1, columns :read_len. Plain ints, not a slice object kept
        # here: torch.compile traces them as symbolic sizes (decode_runner.py), but a stored slice would pin
        # them to one batch size
        self.reads_cache = False
        self.read_start = self.read_stop = self.read_len = 0

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Memory one token of one slot takes, keys and values over all layers."""
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers)

    def bind(self, rows: torch.Tensor, cols: torch.Tensor, read_rows: tuple[int, int] | None, read_len: int) -> None:
        """Where the next forward pass writes (token j of row i to slot ``rows[i, j]``, column ``cols[i, j]``)
        and what it reads (slots ``read_rows[0]`` up to ``read_rows[1]``, columns ``:read_len``; None: only this
        step's tokens)."""
        self.write_rows = rows.to(self.device, non_blocking=True)
        self.write_cols = cols.to(self.device, non_blocking=True)
        self.reads_cache = read_rows is not None
        self.read_start, self.read_stop = read_rows or (0, 0)
        self.read_len = read_len

    # ------------------------------------------------------------------ one step's inputs
    def prefill(self, prompts: list[list[int]], slots: list[int], pad_id: int):
        """A group of whole prompts, left-padded to one width: (input_ids, 4-D mask, position_ids).

        The last input column is every row's last prompt token, so the model's last logits are the ones to
        sample. Row i's real tokens go to columns 0..n_i-1 of slot ``slots[i]``; its padding to the scratch column.
        """
        width = max(len(p) for p in prompts)
        lengths = torch.tensor([len(p) for p in prompts])
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        col = torch.arange(width)
        positions = col[None, :] - (width - lengths)[:, None]  # [G, T]: <0 for padding
        real = positions >= 0
        # key j is visible to query i: causal, and a real token of the same row
        mask = (col[None, :] <= col[:, None])[None, None] & real[:, None, None, :]
        mask = mask | ~real[:, None, :, None]  # padding queries see everything (their output is discarded)
        cols = torch.where(real, positions, torch.full_like(positions, self.scratch))
        rows = torch.tensor(slots, dtype=torch.long)[:, None].expand(-1, width)
        self.bind(rows, cols, None, width)
        return input_ids, mask, positions.clamp(min=0)

    def prefill_chunk(self, prompt: list[int], slot: int, start: int, end: int):
        """The next chunk of one long prompt: attends to the chunks before it in its slot."""
        input_ids = torch.tensor([prompt[start:end]], dtype=torch.long)
        positions = torch.arange(start, end)[None, :]
        mask = (torch.arange(end)[None, :] <= positions[0][:, None])[None, None]  # [1, 1, T, end]
        self.bind(torch.full((1, end - start), slot, dtype=torch.long), positions, (slot, slot + 1), end)
        return input_ids, mask, positions

    def decode(self, last_tokens: dict[int, int], positions: dict[int, int], pad_id: int):
        """One token per slot in ``last_tokens`` at ``positions[slot]``; idle rows up to the highest slot are
        padding (written to the scratch column, attending to column 0). Returns (input_ids, mask,
        position_ids, rows); logits row r belongs to slot r. Reads only as far as the longest row, in steps
        of 64 so shapes repeat."""
        rows = max(last_tokens) + 1
        input_ids = torch.full((rows, 1), pad_id, dtype=torch.long)
        pos = torch.zeros(rows, dtype=torch.long)
        cols = torch.full((rows,), self.scratch, dtype=torch.long)
        for slot, token in last_tokens.items():
            input_ids[slot, 0] = token
            pos[slot] = cols[slot] = positions[slot]
        read_len = min(self.max_len, (int(pos.max()) // 64 + 1) * 64)
        mask = torch.arange(read_len)[None, :] <= pos[:, None]  # [rows, read_len]: idle rows see column 0
        self.bind(torch.arange(rows)[:, None], cols[:, None], (0, rows), read_len)
        return input_ids, mask[:, None, None, :], pos[:, None], rows
