"""Decode steps of static shape over the slot cache, replayed as CUDA graphs.

An eager decode step of a 9B model is bound by Python and kernel launches (~65 ms, whatever the batch), not
by the GPU. A CUDA graph records the step's kernels once and replays them with one launch. A graph replays
fixed addresses and fixed shapes, so every input of a step lives in a buffer allocated once here, and the
live batch is padded to a bucket of fixed shape:

- rows: slot rows 0..B-1, with B the smallest batch bucket above the highest slot in use (logits row r is
  slot r's; idle rows decode a padding token into the scratch column, attending to column 0);
- keys read: columns 0..L-1 of those slots, with L the smallest length bucket above the longest row. Reading
  the whole slot every step would read gigabytes of zeros when slots are sized from the GPU's free memory,
  so lengths are bucketed too (powers of two from ``SHORTEST_READ``, then the slot length).

Every (B, L) pair is one graph, captured at start-up, largest first, into one shared memory pool (vLLM's
CUDAGraphRunner and SGLang's cuda_graph_runner do the same): a step copies the token ids, positions and
write columns into the buffers in one host-to-device copy, and replays. The attention mask is computed from
the positions inside the graph; the model receives it as a 4-D mask, so transformers builds none (its mask
code would branch on data). The KV cache's layers read the buffers bound here (``SlotKVCache.bind``).

Without CUDA (or with ``--cuda-graphs eager``) the same fixed-shape steps run eagerly: that is how the CPU
tests check this path token for token, and how an operator tells a capture problem from a cache problem.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import Counter

import torch

from .kv_slots import SlotKVCache

log = logging.getLogger(__name__)

SHORTEST_READ = 256  # the smallest length bucket: below it the extra columns cost less than another graph


def default_batch_sizes(max_rows: int) -> tuple[int, ...]:
    """1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, ... (steps of half the last power of two) up to ``max_rows``;
    ``max_rows`` itself is always one, so every batch fits a bucket."""
    sizes, size = [], 1
    while size < max_rows:
        sizes.append(size)
        power = 1 << (size.bit_length() - 1)
        size = size * 2 if size < 16 else size + power // 2
    return tuple(sizes) + (max_rows,)


def length_buckets(max_len: int) -> tuple[int, ...]:
    """SHORTEST_READ, twice that, ... below ``max_len``, then ``max_len`` (the whole slot)."""
    lengths, length = [], SHORTEST_READ
    while length < max_len:
        lengths.append(length)
        length *= 2
    return tuple(lengths) + (max_len,)


class StaticDecodeRunner:
    """One decode step over the slot cache in a fixed shape per (batch bucket, length bucket)."""

    def __init__(self, model, cache: SlotKVCache, pad_id: int, batch_sizes: tuple[int, ...] = ()) -> None:
        self._model = model
        self._cache = cache
        self.device = cache.device
        wanted = batch_sizes or default_batch_sizes(cache.slots)
        self.batch_sizes = tuple(sorted({b for b in wanted if b < cache.slots} | {cache.slots}))
        self.lengths = length_buckets(cache.max_len)
        rows = cache.slots
        self._pad_id = pad_id
        # the step's inputs, one row each: token ids, positions, write columns (the scratch column for idle
        # rows); filled on the host, copied to the device in one copy
        pinned = self.device.type == "cuda"
        self._host = torch.empty((3, rows), dtype=torch.long, pin_memory=pinned)
        self._inputs = torch.empty((3, rows), dtype=torch.long, device=self.device)
        self._rows = torch.arange(rows, device=self.device)[:, None]
        self._columns = torch.arange(cache.max_len, device=self.device)
        self._copied = torch.cuda.Event() if pinned else None  # the host buffer may be refilled after this
        self._host[0], self._host[1], self._host[2] = pad_id, 0, cache.scratch  # idle rows, for capture
        self._inputs.copy_(self._host)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._logits: torch.Tensor | None = None  # [slots, vocab]: every graph writes its logits here
        # what ran, for tests and the log: steps per (rows, length), and how many of them were graph replays
        self.steps: Counter[tuple[int, int]] = Counter()
        self.replays = 0
        self.capture_seconds: float | None = None

    @property
    def graphs(self) -> int:
        return len(self._graphs)

    def shape(self, highest_slot: int, longest: int) -> tuple[int, int]:
        """The (rows, length) bucket of a step whose highest slot and longest row (tokens) are these."""
        rows = next(b for b in self.batch_sizes if b > highest_slot)
        length = next(n for n in self.lengths if n >= longest)
        return rows, length

    def _forward(self, rows: int, length: int) -> torch.Tensor:
        """The step itself, on the buffers only: what a graph records. Returns logits [rows, vocab]."""
        ids = self._inputs[0, :rows, None]
        positions = self._inputs[1, :rows, None]
        mask = (self._columns[None, :length] <= positions)[:, None, None, :]  # [rows, 1, 1, length]
        self._cache.bind(self._rows[:rows], self._inputs[2, :rows, None], slice(0, rows), length)
        out = self._model(input_ids=ids, attention_mask=mask, position_ids=positions,
                          past_key_values=self._cache.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def capture(self) -> None:
        """Record one CUDA graph per (rows, length) bucket, largest first, into one memory pool.

        Each shape runs once eagerly on the capture stream first, so lazy initialisation (cuBLAS workspaces,
        kernel selection) happens outside the recording. The inputs are idle rows throughout: warm-up writes
        go to the scratch column only. Raises whatever capture raises; the caller decides to run eagerly."""
        if self.device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, not {self.device}")
        started = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        torch.cuda.synchronize(self.device)
        # every capture starts with a gc.collect(): with the heap frozen, each takes microseconds, not a scan of
        # the whole process per graph (SGLang freezes it too)
        gc.collect()
        gc.freeze()
        try:
            self._capture_all(pool, stream)
        finally:
            gc.unfreeze()
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.monotonic() - started

    def _capture_all(self, pool, stream: torch.cuda.Stream) -> None:
        with torch.inference_mode():
            for rows in reversed(self.batch_sizes):
                for length in reversed(self.lengths):
                    stream.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(stream):
                        logits = self._forward(rows, length)
                    torch.cuda.current_stream(self.device).wait_stream(stream)
                    if self._logits is None:  # one output buffer for all graphs: the pool keeps no logits each
                        self._logits = logits.new_empty((self._cache.slots, logits.shape[-1]))
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        self._logits[:rows].copy_(self._forward(rows, length))
                    self._graphs[rows, length] = graph

    def discard_graphs(self) -> None:
        self._graphs.clear()
        self._logits = None

    def decode(self, last_tokens: dict[int, int], positions: dict[int, int]) -> torch.Tensor:
        """One token per slot in ``last_tokens``, at ``positions[slot]``; returns logits [rows, vocab] whose row
        r is slot r's. With graphs the tensor is the graphs' output buffer: read it before the next step."""
        rows, length = self.shape(max(last_tokens), max(positions.values()) + 1)
        slots = self._cache.slots
        ids, pos, cols = [self._pad_id] * slots, [0] * slots, [self._cache.scratch] * slots  # idle rows
        for slot, token in last_tokens.items():
            ids[slot] = token
            pos[slot] = cols[slot] = positions[slot]
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read the host buffer
        self._host.copy_(torch.tensor([ids, pos, cols], dtype=torch.long))
        self._inputs.copy_(self._host, non_blocking=True)  # the whole buffer: a few KB, one contiguous copy
        if self._copied is not None:
            self._copied.record()
        self.steps[rows, length] += 1
        graph = self._graphs.get((rows, length))
        if graph is None:
            return self._forward(rows, length)
        graph.replay()
        self.replays += 1
        return self._logits[:rows]
