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

With ``--torch-compile`` the step is compiled by torch.compile (inductor) before capture, and the graphs record
the compiled kernels (SGLang's --enable-torch-compile does the same). A graph of the eager step replays every
small kernel of every layer (a GLM-4-9B layer is ~74 of them); the compiled one fuses the norms, rotary
embeddings and activations. The row count and read length reach the compiled step only as tensor sizes,
marked dynamic, so there are two compiles whatever the buckets: one for a single row (torch specialises
sizes of 1) and one for 2 rows and more.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import Counter

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

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


def _compile_counts() -> tuple[int, int]:
    """(graphs compiled, graphs found in the kernel cache) so far in this process, from torch.compile's counters
    (a cache hit skips inductor's code generation and kernel builds: most of a cold compile)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], counters["aot_autograd"]["autograd_cache_hit"]


def grouped_decode_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' sdpa attention, except that a step of one query token per row also attends to grouped KV
    heads as they are when compiled. transformers does that only uncompiled: traced by torch.compile it copies
    the keys and values once per query head (repeat_kv), which made the compiled step 2-3.5x slower than the
    eager one at 32 rows on the CPU, and would read GLM-4's 2 KV heads 16 times over on a GPU."""
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or any(kwargs.get(k) is not None for k in ("position_bias", "softcap")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, _, dim = query.shape
    # the query heads of each KV head as that head's "query positions": [rows, kv_heads, groups, dim]; the mask
    # [rows, 1, 1, length] applies to all of them
    grouped = query.reshape(rows, heads // groups, groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


GROUPED_DECODE_SDPA = "model_service_grouped_decode_sdpa"
AttentionInterface.register(GROUPED_DECODE_SDPA, grouped_decode_sdpa)


class StaticDecodeRunner:
    """One decode step over the slot cache in a fixed shape per (batch bucket, length bucket)."""

    def __init__(self, model, cache: SlotKVCache, pad_id: int, batch_sizes: tuple[int, ...] = (),
                 compile: bool = False) -> None:
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
        self.compile_seconds: float | None = None
        self.compiled_graphs = self.compile_cache_hits = 0  # graphs the compile made, and found in the cache
        self._compiled = torch.compile(self._step) if compile else None
        if compile and getattr(model.config, "_attn_implementation", None) == "sdpa":
            model.set_attn_implementation(GROUPED_DECODE_SDPA)  # the same sdpa, without repeat_kv when compiled

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

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
        inputs = (self._inputs[0, :rows, None], self._inputs[1, :rows, None], self._inputs[2, :rows, None],
                  self._rows[:rows], self._columns[:length])
        if self._compiled is None:
            return self._step(*inputs)
        # one compiled step for every row count from 2 (a size of 1 is always specialised) and every read length.
        # "maybe": where the compiler must specialise a size after all, it compiles again rather than fail
        for tensor in inputs[:4] if rows > 1 else ():
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        torch._dynamo.maybe_mark_dynamic(inputs[4], 0)
        return self._compiled(*inputs)

    def _step(self, ids: torch.Tensor, positions: torch.Tensor, write_cols: torch.Tensor, rows: torch.Tensor,
              columns: torch.Tensor) -> torch.Tensor:
        """One token for each of ``rows`` slots, keys read over ``columns``; the batch and the read length are
        these tensors' sizes, never Python ints, so a compiled step serves every bucket."""
        mask = (columns[None, :] <= positions)[:, None, None, :]  # [rows, 1, 1, length]
        self._cache.bind(rows, write_cols, (0, rows.shape[0]), columns.shape[0])
        out = self._model(input_ids=ids, attention_mask=mask, position_ids=positions,
                          past_key_values=self._cache.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def compile(self) -> None:
        """Compile the step now (both compiles, on idle rows), so that neither capture nor the first
        requests wait for it. Raises whatever compiling raises; the caller decides to run uncompiled."""
        if self._compiled is None:
            return
        started, (graphs, hits) = time.monotonic(), _compile_counts()
        with torch.inference_mode():
            for rows in sorted({1, min(2, self._cache.slots)}):
                self._forward(rows, self.lengths[0])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compile_seconds = time.monotonic() - started
        graphs_now, hits_now = _compile_counts()
        self.compiled_graphs, self.compile_cache_hits = graphs_now - graphs, hits_now - hits

    def uncompile(self) -> None:
        self._compiled = None
        self.compile_seconds = None

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
