"""The one inference engine: continuous batching on a dedicated thread, an asyncio API outside.

Every decode step runs one forward pass over all running sequences. Each step the scheduler
(scheduler.py) says what to run: a group of waiting prompts to prefill (then merged into the batch),
the next chunk of a long prompt, or a decode step; finished, cancelled and timed-out sequences leave
between steps. The HTTP and gRPC adapters only call ``submit``.

Threading: torch work happens on the engine thread (torch releases the GIL inside kernels, so the
event loop keeps serving); results go back with one ``call_soon_threadsafe`` per step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .decode_runner import StaticDecodeRunner
from .detokenizer import IncrementalDetokenizer
from .errors import ServiceError
from .kv_batch import PaddedKVBatch
from .kv_slots import SlotKVCache
from .loader import LoadedModel, cache_root
from .metrics import EngineMetrics
from .sampling import SamplerState, SamplingParams, sample_next_tokens
from .scheduler import Decode, Plan, PrefillChunk, PrefillGroup, Scheduler, SchedulerLimits

log = logging.getLogger(__name__)


class EngineError(ServiceError):
    """Base of the errors a caller of ``generate`` may see."""


class EngineOverloaded(EngineError):
    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineNotReady(EngineError):
    """The engine is not accepting work (starting or draining)."""


class RequestTimedOut(EngineError):
    pass


class EngineFailure(EngineError):
    """The forward pass failed for this request (the engine itself keeps running)."""


@dataclass(frozen=True)
class EngineLimits:
    max_running_requests: int = 32
    max_waiting_requests: int = 128
    max_prefill_tokens: int = 256
    request_timeout_s: float = 600.0
    max_decode_stall_s: float = 1.0
    # "padded": a left-padded cache that grows with use (kv_batch.py); "slots": fixed slots preallocated at
    # start-up (kv_slots.py); "auto": slots on a GPU, padded on the CPU (there it is as fast and takes only
    # the memory in use)
    kv_cache: str = "auto"
    kv_cache_tokens: int = 0  # tokens per slot; 0: the context length, or what fits the GPU's memory
    gpu_memory_utilization: float = 0.9  # share of the GPU's free memory (after the weights) the slots may take
    # decode steps of fixed shape over the slot cache (decode_runner.py): "auto": captured as CUDA graphs where
    # the slot cache is on a CUDA device; "on": the same, and an error elsewhere; "eager": the fixed-shape steps
    # run without capture (any device); "off": eager steps shaped to the batch
    cuda_graphs: str = "auto"
    cuda_graph_batch_sizes: tuple[int, ...] = ()  # the batch buckets; (): decode_runner.default_batch_sizes
    # compile the fixed-shape decode step (torch.compile) before capture: "auto": where the steps are captured
    # as CUDA graphs (measured on an H100: 1.2-2.6x faster); "on": also uncaptured (on the CPU it implies
    # cuda_graphs "eager"); "off": never
    torch_compile: str = "auto"
    # torch.compile's kernel cache (TORCHINDUCTOR_CACHE_DIR unless the user set it): a restart that finds the
    # kernels there compiles ~5x faster; "": torch-compile/ in the service's cache folder (loader.cache_root)
    compile_cache_dir: str = ""


@dataclass
class GenerationOutput:
    """One step's worth of output for one request: a text delta and the token ids behind it."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | None while running


@dataclass(eq=False)
class _Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue
    sampler: SamplerState
    detokenizer: IncrementalDetokenizer
    arrival: float
    deadline: float
    output_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    cancelled: bool = False
    done: bool = False
    slot_released: bool = False  # its admission slot was given back (at cancel or finish, once)
    slot: int | None = None  # its batch slot while the scheduler runs it


def _use_compile_cache(directory: str) -> str:
    """Point torch.compile's kernel cache (TORCHINDUCTOR_CACHE_DIR) at ``directory`` ("": the service's cache
    folder) unless the user chose one; returns the folder in use. Importing torch._dynamo already sets the
    variable to torch's temp default, so "not chosen" means unset or that default. A folder that cannot be
    written (a read-only root file system) is logged and torch's default stays."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        path = Path(directory).expanduser() if directory else cache_root() / "torch-compile"
        try:
            path.mkdir(parents=True, exist_ok=True)
            if not os.access(path, os.W_OK | os.X_OK):
                raise PermissionError(f"{path} is not writable")
        except OSError as exc:
            log.warning("compile cache %s cannot be used (%s); compiling into torch's temp folder", path, exc)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return cache_dir()


class Engine:
    def __init__(self, loaded: LoadedModel, limits: EngineLimits, metrics: EngineMetrics | None = None):
        self.model_info = loaded
        self._model = loaded.model
        self._device = torch.device(loaded.device)  # the model's; the batch's masks and ids live on the CPU
        self._tokenizer = loaded.tokenizer
        self._eos = frozenset(loaded.eos_token_ids)
        self._pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else (
            loaded.eos_token_ids[0])
        self._num_layers = loaded.model.config.get_text_config(decoder=True).num_hidden_layers
        self.limits = limits
        self.metrics = metrics or EngineMetrics(model_name=loaded.name)

        self._ids = itertools.count(1)
        self._inbox: queue.SimpleQueue[_Sequence] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._lock = threading.Lock()
        self._admitted = 0  # submitted and not yet finished; bounds running + waiting
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None

        # engine-thread state: who runs next is the scheduler's; the tensors are ours
        self._scheduler = Scheduler(SchedulerLimits(max_running_requests=limits.max_running_requests,
                                                    max_prefill_tokens=limits.max_prefill_tokens,
                                                    max_decode_stall_s=limits.max_decode_stall_s))
        self._batch = PaddedKVBatch(self._num_layers)  # the running sequences' cache, rows in scheduler order
        self._slots = self._allocate_slots() if self._use_slots() else None  # or fixed slots, by scheduler slot
        self._runner = self._static_decode() if self._slots is not None else None  # graphs: captured here
        self._chunk_kv: PaddedKVBatch | None = None  # the cache of the long prompt being prefilled in chunks

    def _use_slots(self) -> bool:
        mode, graphs = self.limits.kv_cache, self.limits.cuda_graphs
        if mode not in ("auto", "padded", "slots"):
            raise ValueError(f"kv_cache must be auto, padded or slots, not {mode!r}")
        if graphs not in ("auto", "on", "off", "eager"):
            raise ValueError(f"cuda_graphs must be auto, on, off or eager, not {graphs!r}")
        if self.limits.torch_compile not in ("auto", "on", "off"):
            raise ValueError(f"torch_compile must be auto, on or off, not {self.limits.torch_compile!r}")
        if graphs == "on" and self._device.type != "cuda":
            raise ValueError(f"--cuda-graphs on needs a CUDA device; the model is on {self._device} "
                             "(use auto, or eager for the same fixed-shape steps without capture)")
        if self.limits.torch_compile == "on" and graphs == "off":
            raise ValueError("--torch-compile on compiles the fixed-shape decode step: it needs --cuda-graphs "
                             "auto, on or eager, not off")
        static = self._fixed_shape_steps_asked()
        if static and mode == "padded":
            flag = f"--cuda-graphs {graphs}" if graphs != "auto" else "--torch-compile on"
            raise ValueError(f"{flag} decodes over the slot cache: use --kv-cache slots or auto")
        return mode == "slots" or (mode == "auto" and (self._device.type == "cuda" or static))

    def _fixed_shape_steps_asked(self) -> bool:
        """Fixed-shape decode steps asked for in so many words (on a CUDA device they are the default)."""
        return self.limits.cuda_graphs in ("on", "eager") or self.limits.torch_compile == "on"

    def _compiles_decode_step(self) -> bool:
        """--torch-compile auto: where the steps are captured as CUDA graphs, the lever measured on a GPU (on a
        CPU the compiled step is ~12% faster at one client and no faster at 32: not worth its start-up)."""
        wanted = self.limits.torch_compile
        return wanted == "on" or (wanted == "auto" and self._device.type == "cuda"
                                  and self.limits.cuda_graphs in ("auto", "on"))

    def _static_decode(self) -> StaticDecodeRunner | None:
        """The fixed-shape decode runner, its graphs captured now (so the first request is not slow); None to
        decode eagerly in shapes of the batch. A capture that fails leaves the engine serving, eagerly."""
        graphs = self.limits.cuda_graphs
        if graphs == "off" or (self._device.type != "cuda" and not self._fixed_shape_steps_asked()):
            return None
        runner = StaticDecodeRunner(self._model, self._slots, self._pad_id, self.limits.cuda_graph_batch_sizes,
                                    compile=self._compiles_decode_step())
        if runner.compiled:
            self._compile(runner)
        if graphs == "eager" or self._device.type != "cuda":
            log.info("decode: fixed-shape steps run without capture (%s)",
                     "compiled" if runner.compiled else "eagerly",
                     extra={"batch_sizes": list(runner.batch_sizes), "lengths": list(runner.lengths)})
            return runner
        captured = self._capture(runner)
        if not captured and runner.compiled:
            runner.uncompile()
            captured = self._capture(runner)
        if not captured:
            return None
        log.info("CUDA graphs: %d decode graphs%s captured in %.1f s (batch sizes %s; read lengths %s)",
                 runner.graphs, " of the compiled step" if runner.compiled else "", runner.capture_seconds,
                 ",".join(map(str, runner.batch_sizes)), ",".join(map(str, runner.lengths)),
                 extra={"graphs": runner.graphs, "seconds": round(runner.capture_seconds, 2),
                        "compiled": runner.compiled,
                        "batch_sizes": list(runner.batch_sizes), "lengths": list(runner.lengths)})
        return runner

    def _capture(self, runner: StaticDecodeRunner) -> bool:
        try:
            runner.capture()
            return True
        except Exception as exc:  # noqa: BLE001 - whatever breaks capture, the pod must still serve
            runner.discard_graphs()
            fallback = "capturing the uncompiled step" if runner.compiled else "decoding eagerly"
            self._warn_failed("CUDA graph capture", fallback, exc)
            try:
                torch.cuda.synchronize(self._device)
            except Exception:  # noqa: BLE001 - reported above; the first step will say more
                pass
            return False

    def _compile(self, runner: StaticDecodeRunner) -> None:
        try:
            cache = _use_compile_cache(self.limits.compile_cache_dir)
            log.info("decode: compiling the decode step (torch.compile; minutes for a large model, much less "
                     "with its kernels already in %s)", cache, extra={"cache_dir": cache})
            runner.compile()
        except Exception as exc:  # noqa: BLE001 - a compiler problem must not keep the pod from serving
            runner.uncompile()
            self._warn_failed("torch.compile of the decode step", "running it uncompiled", exc)
            return
        log.info("decode: step compiled in %.1f s (%d of %d graphs from the cache)", runner.compile_seconds,
                 runner.compile_cache_hits, runner.compiled_graphs,
                 extra={"seconds": round(runner.compile_seconds, 2), "graphs": runner.compiled_graphs,
                        "cache_hits": runner.compile_cache_hits})

    @staticmethod
    def _warn_failed(what: str, fallback: str, exc: Exception) -> None:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        log.warning("%s failed; %s: %s: %s", what, fallback, type(exc).__name__, reason,
                    extra={"error": type(exc).__name__})

    def _allocate_slots(self) -> SlotKVCache:
        """Preallocate one KV slot per running request; lower the context length to what a slot holds."""
        config = self._model.config.get_text_config(decoder=True)
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = next(self._model.parameters()).dtype
        slots = self.limits.max_running_requests
        per_token = SlotKVCache.bytes_per_token(self._num_layers, kv_heads, head_dim, dtype)
        tokens = self.limits.kv_cache_tokens or self.model_info.context_length
        if self._device.type == "cuda" and not self.limits.kv_cache_tokens:
            free, _ = torch.cuda.mem_get_info(self._device)
            fits = int(free * self.limits.gpu_memory_utilization) // (per_token * slots) - 1
            if fits < 16:
                raise ValueError(f"the GPU has room for {fits} KV tokens per slot at {slots} slots: lower "
                                 "--max-running-requests")
            tokens = min(tokens, fits)
        tokens = min(tokens, self.model_info.context_length)
        cache = SlotKVCache(self._num_layers, slots, tokens, kv_heads, head_dim, dtype, self._device)
        if tokens < self.model_info.context_length:
            # requests are validated against this: a prompt that cannot fit a slot gets a 400 naming it
            self.model_info = dataclasses.replace(self.model_info, context_length=tokens)
        log.info("KV cache: %d slots x %d tokens (%.2f GiB, fixed)", slots, tokens, cache.nbytes / 2**30,
                 extra={"slots": slots, "tokens_per_slot": tokens, "bytes": cache.nbytes})
        return cache

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()
        self._accepting = True

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def in_flight(self) -> int:
        return self._admitted

    def stop_accepting(self) -> None:
        self._accepting = False

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting and wait for in-flight requests to finish. True when all finished."""
        self.stop_accepting()
        deadline = time.monotonic() + timeout_s
        while self._admitted and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self._admitted == 0

    def shutdown(self) -> None:
        """Stop the engine thread; anything still running ends with an error."""
        self._accepting = False
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------ public API
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> "RequestStream":
        """Admit a request now (or raise EngineOverloaded / EngineNotReady) and return its output stream.

        Submitting before the caller commits to a response lets HTTP answer 429/503 with a real status.
        Iterate the stream for outputs; ``cancel()`` (or leaving it unfinished and closing it) frees the slot.
        """
        return RequestStream(self, self._submit(prompt_ids, params))

    def _submit(self, prompt_ids: list[int], params: SamplingParams) -> _Sequence:
        if not self._accepting:
            self.metrics.rejected("not_ready")
            raise EngineNotReady("the model service is not accepting requests (starting up or shutting down)")
        with self._lock:
            if self._admitted >= self.limits.max_running_requests + self.limits.max_waiting_requests:
                self.metrics.rejected("queue_full")
                raise EngineOverloaded(
                    f"the server is at capacity ({self.limits.max_running_requests} running, "
                    f"{self.limits.max_waiting_requests} waiting); retry shortly")
            self._admitted += 1
        now = time.monotonic()
        seq = _Sequence(
            id=next(self._ids),
            prompt_ids=list(prompt_ids),
            params=params,
            loop=asyncio.get_running_loop(),
            outbox=asyncio.Queue(),
            sampler=SamplerState(params, prompt_ids),
            detokenizer=IncrementalDetokenizer(self._tokenizer, prompt_ids, params.stop),
            arrival=now,
            deadline=now + self.limits.request_timeout_s,
        )
        self._inbox.put(seq)
        self._wakeup.set()
        return seq

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        log.info("engine started", extra={"max_running_requests": self.limits.max_running_requests,
                                          "max_waiting_requests": self.limits.max_waiting_requests})
        with torch.inference_mode():
            while not self._stopping:
                self._wakeup.clear()
                self._collect_new()
                events: list[tuple[_Sequence, object]] = []
                self._reap(events)
                plan = self._scheduler.schedule()
                if plan is not None:
                    try:
                        self._execute(plan, events)
                    except Exception as exc:  # a failed forward must not kill the engine
                        log.exception("engine step failed; failing the requests of that step")
                        self._fail(plan.sequences, events, EngineFailure(f"inference failed: {type(exc).__name__}"))
                self._update_gauges()
                self._deliver(events)
                if plan is None and not events:
                    self._wakeup.wait(timeout=0.5)
            self._collect_new()
            events = []
            self._fail(self._scheduler.all_sequences(), events,
                       EngineNotReady("the model service shut down before this request finished"))
            self._deliver(events)
        log.info("engine stopped")

    def _collect_new(self) -> None:
        while True:
            try:
                self._scheduler.add(self._inbox.get_nowait())
            except queue.Empty:
                break
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.num_requests_waiting.set(len(self._scheduler.waiting))
        self.metrics.num_requests_running.set(len(self._scheduler.running))
        self.metrics.kv_cache_usage.set(self._scheduler.slots_in_use / self.limits.max_running_requests)

    def _reap(self, events: list) -> None:
        """End cancelled and timed-out sequences, wherever they are; drop their rows from the batch."""
        reaped, keep = self._scheduler.reap()
        for r in reaped:
            error = None if r.reason == "cancelled" else RequestTimedOut(f"the request timed out {r.stage}")
            self._finish(r.sequence, r.reason, events, error)
        if keep is not None and self._slots is None:
            self._batch.select(keep)
        if self._scheduler.chunked is None:
            self._chunk_kv = None

    def _execute(self, plan: Plan, events: list) -> None:
        if isinstance(plan, PrefillGroup):
            self._prefill(plan, events)
        elif isinstance(plan, PrefillChunk):
            self._prefill_chunk(plan, events)
        else:
            self._decode(plan, events)

    def _fail(self, sequences: list[_Sequence], events: list, error: Exception) -> None:
        """End ``sequences`` with ``error`` (a failed step's, or all at shutdown); the others go on."""
        for seq in self._scheduler.fail(sequences):
            if not seq.done:
                self._finish(seq, "error", events, error)
        if self._scheduler.chunked is None:
            self._chunk_kv = None
        if self._slots is None and self._batch.batch_size != len(self._scheduler.running):
            # the step died while changing the batch's cache: it cannot be trusted for anyone
            for seq in self._scheduler.fail(list(self._scheduler.running)):
                self._finish(seq, "error", events, error)
        if not self._scheduler.running:
            self._batch = PaddedKVBatch(self._num_layers)

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        device = self._device
        out = self._model(
            input_ids=input_ids.to(device, non_blocking=True),
            attention_mask=attention_mask.to(device, non_blocking=True),
            position_ids=position_ids.to(device, non_blocking=True),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]

    def _record_admission(self, group: list[_Sequence]) -> None:
        now = time.monotonic()
        for seq in group:
            self.metrics.request_queue_time.observe(now - seq.arrival)
            self.metrics.prompt_tokens.inc(len(seq.prompt_ids))

    def _prefill(self, plan: PrefillGroup, events: list) -> None:
        """Prefill a group of prompts (left-padded to one width) in one forward pass."""
        group = plan.sequences
        self._record_admission(group)
        if self._slots is not None:
            ids, mask, positions = self._slots.prefill([s.prompt_ids for s in group], [s.slot for s in group],
                                                       self._pad_id)
            self._start_decoding(plan, None, self._forward(ids, mask, positions, self._slots.cache), events)
            return
        width = max(len(s.prompt_ids) for s in group)
        input_ids = torch.full((len(group), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, seq in enumerate(group):
            n = len(seq.prompt_ids)
            input_ids[row, width - n:] = torch.tensor(seq.prompt_ids, dtype=torch.long)
            mask[row, width - n:] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        fresh = PaddedKVBatch(self._num_layers)
        fresh.mask = mask
        logits = self._forward(input_ids, mask, positions, fresh.cache)
        self._start_decoding(plan, fresh, logits, events)

    def _prefill_chunk(self, plan: PrefillChunk, events: list) -> None:
        """Prefill the next chunk of the long prompt in progress; on its last chunk, join the batch."""
        if plan.start == 0:
            self._record_admission([plan.sequence])
            if self._slots is None:
                self._chunk_kv = PaddedKVBatch(self._num_layers, batch_size=1)
        if self._slots is not None:
            seq = plan.sequence
            ids, mask, positions = self._slots.prefill_chunk(seq.prompt_ids, seq.slot, plan.start, plan.end)
            logits = self._forward(ids, mask, positions, self._slots.cache)
            if plan.last:
                self._start_decoding(plan, None, logits, events)
            else:
                self._scheduler.chunk_done(plan)
            return
        kv = self._chunk_kv
        input_ids = torch.tensor([plan.sequence.prompt_ids[plan.start:plan.end]], dtype=torch.long)
        positions = torch.arange(plan.start, plan.end, dtype=torch.long).unsqueeze(0)
        logits = self._forward(input_ids, kv.mask_for_step(plan.end - plan.start), positions, kv.cache)
        if plan.last:
            self._chunk_kv = None
            self._start_decoding(plan, kv, logits, events)
        else:
            self._scheduler.chunk_done(plan)

    def _start_decoding(self, plan: PrefillGroup | PrefillChunk, fresh: PaddedKVBatch | None,
                        logits: torch.Tensor, events: list) -> None:
        """Sample the first token of freshly prefilled sequences and merge them into the running batch."""
        group = plan.sequences
        tokens = sample_next_tokens(logits, [s.sampler for s in group])
        keep = [i for i, (seq, tok) in enumerate(zip(group, tokens)) if not self._on_token(seq, tok, events)]
        if fresh is not None:  # the padded cache: merge the group's rows into the batch
            if len(keep) < len(group):
                fresh.select(keep)
            if keep:
                self._batch.absorb(fresh)
        self._scheduler.complete_prefill(plan, [group[i] for i in keep])

    def _decode(self, plan: Decode, events: list) -> None:
        running = plan.sequences
        if self._slots is not None:
            last = {s.slot: s.output_ids[-1] for s in running}
            positions = {s.slot: len(s.prompt_ids) + len(s.output_ids) - 1 for s in running}
            if self._runner is not None:  # fixed shapes: a CUDA graph replay
                logits = self._runner.decode(last, positions)
            else:
                ids, mask, position_ids, _ = self._slots.decode(last, positions, self._pad_id)
                logits = self._forward(ids, mask, position_ids, self._slots.cache)
            # logits row r is slot r's
            logits = logits[torch.tensor([s.slot for s in running], device=logits.device)]
        else:
            logits = self._decode_padded(running)
        self.metrics.batch_size.observe(len(running))
        tokens = sample_next_tokens(logits, [s.sampler for s in running])
        finished = [seq for seq, tok in zip(running, tokens) if self._on_token(seq, tok, events)]
        if finished:
            keep = self._scheduler.leave(finished)
            if self._slots is None:
                self._batch.select(keep)

    def _decode_padded(self, running: list[_Sequence]) -> torch.Tensor:
        input_ids = torch.tensor([[s.output_ids[-1]] for s in running], dtype=torch.long)
        positions = torch.tensor([[len(s.prompt_ids) + len(s.output_ids) - 1] for s in running], dtype=torch.long)
        mask = self._batch.mask_for_step(1)
        return self._forward(input_ids, mask, positions, self._batch.cache)

    def _on_token(self, seq: _Sequence, token: int, events: list) -> bool:
        """Record one generated token; queue its output. Returns True when the sequence finished."""
        now = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.time_to_first_token.observe(now - seq.arrival)
        else:
            self.metrics.inter_token_latency.observe(now - seq.last_token_at)
        seq.last_token_at = now
        seq.output_ids.append(token)
        seq.sampler.record(token)
        self.metrics.generation_tokens.inc()

        finish = None
        if token in self._eos and not seq.params.ignore_eos:
            text = seq.detokenizer.flush()
            finish = "stop"
        else:
            text = seq.detokenizer.add_token(token)
            if seq.detokenizer.stopped:
                finish = "stop"
            elif (len(seq.output_ids) >= seq.params.max_tokens
                  or len(seq.prompt_ids) + len(seq.output_ids) >= self.model_info.context_length):
                text += seq.detokenizer.flush()
                finish = "length"
        events.append((seq, GenerationOutput(text, [token], len(seq.prompt_ids), len(seq.output_ids), finish)))
        if finish is not None:
            self._finish(seq, finish, events, None)
            return True
        return False

    def _finish(self, seq: _Sequence, reason: str, events: list, error: Exception | None) -> None:
        seq.done = True
        self.metrics.finished(reason)
        self.metrics.e2e_request_latency.observe(time.monotonic() - seq.arrival)
        self._release_slot(seq)
        if error is not None:
            events.append((seq, error))

    def _release_slot(self, seq: _Sequence) -> None:
        with self._lock:
            if not seq.slot_released:
                seq.slot_released = True
                self._admitted -= 1

    @staticmethod
    def _deliver(events: list) -> None:
        """Hand a step's outputs to the event loop(s) in one thread-safe call per loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, item in events:
            by_loop.setdefault(seq.loop, []).append((seq.outbox, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass


class RequestStream:
    """The outputs of one request, in order; the last one has a finish_reason."""

    def __init__(self, engine: Engine, seq: _Sequence):
        self._engine = engine
        self._seq = seq
        self._ended = False  # the final output was returned, or the caller cancelled

    @property
    def prompt_tokens(self) -> int:
        return len(self._seq.prompt_ids)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> GenerationOutput:
        if self._ended:
            raise StopAsyncIteration
        item = await self._seq.outbox.get()
        if item is _CANCELLED or self._ended:
            raise StopAsyncIteration
        if isinstance(item, Exception):
            self._ended = True
            raise item
        if item.finish_reason is not None:
            self._ended = True
        return item

    def cancel(self) -> None:
        """Stop generating for this request; its batch slot is freed before the next decode step."""
        if self._ended:
            return
        self._ended = True
        self._seq.outbox.put_nowait(_CANCELLED)  # wakes a consumer waiting in __anext__
        if not self._seq.done:
            self._seq.cancelled = True
            # The admission slot is free now: the next request may be accepted at once. The batch row
            # itself is dropped before the next decode step.
            self._engine._release_slot(self._seq)
            self._engine._wakeup.set()


_CANCELLED = object()


async def collect(stream) -> tuple[str, GenerationOutput | None]:
    """Run a request stream to its end: (all text, the final output), or (partial text, None) if cancelled.

    Engine errors propagate; the request is cancelled whatever happens, so its slot never leaks.
    """
    parts, last = [], None
    try:
        async for out in stream:
            parts.append(out.text)
            last = out
    finally:
        stream.cancel()
    return "".join(parts), last


def _put_all(items: list) -> None:
    for outbox, item in items:
        outbox.put_nowait(item)
