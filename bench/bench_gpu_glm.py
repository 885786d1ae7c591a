"""The engine on a GPU with a GLM-4-9B-shaped model, next to compiled static-cache ``generate`` and the HBM roofline.

The model has GLM-4-9B's shapes (40 layers, hidden 4096, 32 heads / 2 KV heads, vocab 151552) with random
bf16 weights built directly on the GPU (no files, no download): speed depends on the shapes, not the values.
Prompts of ~256 tokens, 128 new tokens (ignore_eos), greedy; the engine driven in-process at concurrency
1, 8, 32 and 64; in the same run, transformers' ``generate`` with ``cache_implementation="static"`` (its
forward compiled) at batch 1 and 32, and the measured HBM bandwidth (a device-to-device copy) with the
roofline it implies (weights bytes / bandwidth per decode step). Results to bench/results/gpu-glm4-9b.md.
One engine, as a pod runs it by default (--cuda-graphs auto, --torch-compile auto: its CUDA graphs replay the
compiled decode step), serves every concurrency level, so its step is compiled and its graphs captured once;
the compile and capture times and how many steps were graph replays are part of the results, next to the
same engine with --torch-compile off (graphs of the uncompiled step) at every concurrency level and with
--cuda-graphs off (the eager decode the graphs replace) at concurrency 1 and 32. The results file is
rewritten after each phase, so a run cut short by a time limit keeps what finished.

    python bench/bench_gpu_glm.py            # `make bench-gpu`; a few minutes on an H100/H200
    python bench/bench_gpu_glm.py --smoke    # the whole script on tiny shapes on the CPU, results to /tmp
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model_service.llm.engine import Engine, EngineLimits  # noqa: E402
from model_service.llm.loader import LoadedModel  # noqa: E402
from model_service.llm.sampling import SamplingParams  # noqa: E402

SHAPES = {
    "glm4-9b": dict(hidden_size=4096, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=32,
                    num_key_value_heads=2, head_dim=128, vocab_size=151552),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=1000),
}


def build(shape: str, device: str, dtype: torch.dtype, context: int) -> LoadedModel:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, Glm4Config, Glm4ForCausalLM, PreTrainedTokenizerFast

    dims = SHAPES[shape]
    vocab = {"<|endoftext|>": 0, "<unk>": 1} | {f"w{i}": i for i in range(2, dims["vocab_size"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    config = Glm4Config(**dims, max_position_embeddings=context, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Glm4ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.eval().requires_grad_(False)
    model.generation_config = GenerationConfig(eos_token_id=0, pad_token_id=0)
    return LoadedModel(model=model, tokenizer=tokenizer, name=f"random-{shape}", architecture="Glm4ForCausalLM",
                       context_length=context, eos_token_ids=[0], dtype=str(dtype).removeprefix("torch."),
                       source="random weights", device=str(next(model.parameters()).device))


def prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    # ~length-token prompts of varied length (within +-8), distinct per request
    return [[2 + (i * 7919 + j * 104729) % (vocab - 2) for j in range(length - 8 + i % 17)] for i in range(n)]


def engine_run(engine: Engine, concurrency: int, prompt_len: int, new_tokens: int) -> dict:
    loaded = engine.model_info

    async def main():
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        rows = prompts(concurrency, prompt_len, loaded.model.config.vocab_size)

        async def one(ids):
            started, first, stamps = time.perf_counter(), None, []
            async for out in engine.submit(ids, params):
                stamps.append(time.perf_counter())
                if first is None:
                    first = stamps[-1] - started
            return first, len(stamps), [b - a for a, b in zip(stamps, stamps[1:])]

        await asyncio.gather(*(one(p) for p in rows))  # warm-up at the same concurrency
        started = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in rows))
        wall = time.perf_counter() - started
        itl = [gap for r in results for gap in r[2]]
        return {"tokens_per_s": sum(r[1] for r in results) / wall,
                "ttft_p50_ms": 1000 * statistics.median(r[0] for r in results),
                "itl_p50_ms": 1000 * statistics.median(itl) if itl else float("nan")}

    return asyncio.run(main())


def run_engine(loaded, cuda_graphs: str, levels: list[int], args, label: str = "engine",
               torch_compile: str = "auto") -> tuple[list, str]:
    """One engine for all concurrency levels (its graphs captured once); freed before returning."""
    started = time.perf_counter()
    engine = Engine(loaded, EngineLimits(max_running_requests=max(args.concurrency), max_waiting_requests=64,
                                         max_prefill_tokens=4096, cuda_graphs=cuda_graphs,
                                         torch_compile=torch_compile))
    print(f"{label} ready in {time.perf_counter() - started:.1f} s", flush=True)
    engine.start()
    rows, split = [], []
    try:
        for c in levels:
            r = engine_run(engine, c, args.prompt_tokens, args.new_tokens)
            rows.append((c, r))
            print(f"{label} c={c}: {r['tokens_per_s']:.0f} tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms, "
                  f"ITL p50 {r['itl_p50_ms']:.1f} ms", flush=True)
        for c in [c for c in (1, 32) if c in levels]:
            try:
                split.append(replay_split(engine, c, args))
            except Exception as exc:  # noqa: BLE001 - a diagnostic must not cost the numbers measured above
                split.append(f"c={c}: replay timing failed: {type(exc).__name__}: {exc}")
    finally:
        engine.shutdown()
    mode = decode_mode(engine) + "".join(f"; {s}" for s in split if s)
    del engine  # its KV slots and graph pool, before the next engine or generate allocates its own
    gc.collect()  # the engine and its (stopped) thread refer to each other
    if loaded.model.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, mode


def replay_split(engine: Engine, concurrency: int, args) -> str:
    """Where a decode step's time goes: the graph's own time on the GPU (CUDA events around each replay) against
    the time between tokens, in a short extra run (32 tokens), so the timed runs above carry no events. What the
    GPU does not account for is host work between replays: if batch 1 misses its target, this says whether
    fusing kernels (--torch-compile) or the host is the lever."""
    runner = engine._runner
    if runner is None or not runner.graphs:
        return ""
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    class Timed:
        def __init__(self, graph):
            self.graph = graph

        def replay(self):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.graph.replay()
            end.record()
            events.append((start, end))

    graphs = dict(runner._graphs)
    runner._graphs = {shape: Timed(graph) for shape, graph in graphs.items()}
    try:
        r = engine_run(engine, concurrency, args.prompt_tokens, 32)
    finally:
        runner._graphs = graphs
    torch.cuda.synchronize()
    gpu = statistics.median(start.elapsed_time(end) for start, end in events)
    return (f"c={concurrency}: a graph replay takes {gpu:.2f} ms on the GPU (p50) of an ITL p50 of "
            f"{r['itl_p50_ms']:.2f} ms")


def decode_mode(engine: Engine) -> str:
    """How the engine decoded: captured graphs (how many, how long the capture took, replays) or eager."""
    runner = engine._runner
    if runner is None:
        return "eager decode steps shaped to the batch (no CUDA graphs)"
    steps = sum(runner.steps.values())
    compiled = (f"step compiled in {runner.compile_seconds:.1f} s ({runner.compile_cache_hits} of "
                f"{runner.compiled_graphs} graphs from the cache), " if runner.compiled else "")
    if not runner.graphs:
        return f"{compiled}fixed-shape decode steps run without capture ({steps} steps)"
    return (f"{compiled}{runner.graphs} CUDA graphs captured at start-up in {runner.capture_seconds:.1f} s (batch "
            f"buckets {','.join(map(str, runner.batch_sizes))}; read lengths {','.join(map(str, runner.lengths))}); "
            f"{runner.replays} of {steps} decode steps were graph replays")


def static_generate_run(loaded, batch: int, prompt_len: int, new_tokens: int) -> float:
    """transformers' own fast path: static cache, compiled forward (its default with a static cache)."""
    model = loaded.model
    rows = prompts(batch, prompt_len, model.config.vocab_size)
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=model.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
    kwargs = dict(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, cache_implementation="static")
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    # transformers compiles the decode step with a static cache on a GPU (not on a CPU: --smoke runs it eager)
    with torch.inference_mode():
        model.generate(**kwargs)  # compiles
        sync()
        started = time.perf_counter()
        model.generate(**kwargs)
        sync()
    return batch * new_tokens / (time.perf_counter() - started)


def hbm_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    if not device.startswith("cuda"):
        return float("nan")
    src = torch.empty(1 << 31, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    rate = 2 * src.numel() * 10 / (time.perf_counter() - started)
    del src, dst
    torch.cuda.empty_cache()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="glm4-9b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--generate-batches", type=int, nargs="*", default=[1, 32])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off", "eager"])
    parser.add_argument("--torch-compile", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--uncompiled", type=int, nargs="*", default=None,
                        help="concurrency levels to rerun with --torch-compile off (default: all of --concurrency; "
                             "none: skip)")
    parser.add_argument("--eager-baseline", type=int, nargs="*", default=[1, 32],
                        help="concurrency levels to rerun with --cuda-graphs off (none: skip)")
    parser.add_argument("--out", default=None, help="default: bench/results/gpu-glm4-9b.md (--smoke: a temp file)")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script end to end in seconds: tiny shapes, CPU, float32, fixed-shape decode "
                             "run eagerly; results to a temp file, never to bench/results")
    args = parser.parse_args()
    if args.smoke:
        args.shape, args.device, args.dtype = "tiny", "cpu", "float32"
        args.cuda_graphs = "eager" if args.cuda_graphs == "auto" else args.cuda_graphs
        args.concurrency, args.generate_batches, args.prompt_tokens, args.new_tokens = [1, 2], [1, 2], 32, 8
        args.eager_baseline = args.uncompiled = [2]
        args.torch_compile = "on"  # the compiled step, uncaptured: what auto does on a GPU, but for the capture
        args.out = args.out or str(Path(tempfile.gettempdir()) / "gpu-glm-smoke.md")
    if args.uncompiled is None:
        args.uncompiled = args.concurrency
    out = Path(args.out or ROOT / "bench" / "results" / "gpu-glm4-9b.md")
    dtype = getattr(torch, args.dtype)

    bandwidth = hbm_bandwidth(args.device)
    loaded = build(args.shape, args.device, dtype, context=args.prompt_tokens + args.new_tokens + 64)
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    step_s = weights / bandwidth
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"{device}: weights {weights / 1e9:.1f} GB, HBM {bandwidth / 1e12:.2f} TB/s, "
          f"roofline {step_s * 1000:.2f} ms/step", flush=True)

    results = Results(args, device, weights, bandwidth, step_s, out)
    results.rows, results.mode = run_engine(loaded, args.cuda_graphs, args.concurrency, args,
                                            torch_compile=args.torch_compile)
    print(f"decode: {results.mode}", flush=True)
    results.write()
    for b in args.generate_batches:
        try:
            results.generate[b] = static_generate_run(loaded, b, args.prompt_tokens, args.new_tokens)
        except Exception as exc:  # noqa: BLE001 - a baseline that breaks must not cost the engine's other phases
            results.notes.append(f"static compiled generate batch {b} failed: {type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())[:300]}")
            print(results.notes[-1], flush=True)
            if loaded.model.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        print(f"static compiled generate batch {b}: {results.generate[b]:.0f} tok/s", flush=True)
        results.write()
    # the same engine, its graphs replaying the uncompiled step (--torch-compile off), in the same run
    if args.uncompiled and args.cuda_graphs != "off" and args.torch_compile != "off":
        rows, results.uncompiled_mode = run_engine(loaded, args.cuda_graphs, args.uncompiled, args,
                                                   label="uncompiled engine", torch_compile="off")
        results.uncompiled = dict(rows)
        print(f"uncompiled decode: {results.uncompiled_mode}", flush=True)
        results.write()
    # the same engine decoding eagerly (--cuda-graphs off), in the same run: what the graphs are worth
    if args.eager_baseline and args.cuda_graphs != "off":
        rows, _ = run_engine(loaded, "off", args.eager_baseline, args, label="eager engine", torch_compile="off")
        results.eager = dict(rows)
        results.write()
    print(out.read_text())


class Results:
    """What the run measured so far, as the markdown table of bench/results/gpu-glm4-9b.md."""

    def __init__(self, args, device: str, weights: int, bandwidth: float, step_s: float, out: Path) -> None:
        self.args, self.device, self.weights, self.bandwidth, self.step_s, self.out = (
            args, device, weights, bandwidth, step_s, out)
        self.rows: list = []
        self.mode = self.uncompiled_mode = ""
        self.generate: dict[int, float] = {}
        self.uncompiled: dict[int, dict] = {}
        self.eager: dict[int, dict] = {}
        self.notes: list[str] = []  # what failed, said under the table

    def write(self) -> None:
        args, step_s = self.args, self.step_s
        lines = [
            f"# Engine on a GPU: GLM-4-9B shapes ({args.shape}, {args.dtype})", "",
            f"{time.strftime('%Y-%m-%d %H:%M')}, {self.device}, torch {torch.__version__}; random weights "
            f"({self.weights / 1e9:.1f} GB); prompts ~{args.prompt_tokens} tokens, {args.new_tokens} new tokens "
            "(ignore_eos), greedy; the engine driven in-process; one run of `python bench/bench_gpu_glm.py"
            f"{' --smoke' if args.smoke else ''}`.",
            f"Measured HBM bandwidth {self.bandwidth / 1e12:.2f} TB/s: roofline {step_s * 1000:.2f} ms per decode "
            "step.",
            f"Engine (--cuda-graphs {args.cuda_graphs}, --torch-compile {args.torch_compile}) decode: {self.mode}.",
        ]
        if self.uncompiled_mode:
            lines.append(f"Uncompiled engine (--torch-compile off) decode: {self.uncompiled_mode}.")
        lines += [
            "", "| concurrency | engine tok/s | TTFT p50 (ms) | ITL p50 (ms) | static compiled generate tok/s | "
            "engine / generate | roofline tok/s | uncompiled engine (--torch-compile off) tok/s, ITL p50 (ms), / "
            "generate | eager engine (graphs off) tok/s, ITL p50 (ms) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c, r in self.rows:
            g, e, k = self.generate.get(c), self.eager.get(c), self.uncompiled.get(c)
            vs_generate = f"{g:.0f} | {r['tokens_per_s'] / g:.2f}x" if g else "n/a | n/a"
            uncompiled = (f"{k['tokens_per_s']:.0f}, {k['itl_p50_ms']:.1f}"
                          + (f", {k['tokens_per_s'] / g:.2f}x" if g else "")) if k else "n/a"
            vs_eager = f"{e['tokens_per_s']:.0f}, {e['itl_p50_ms']:.1f}" if e else "n/a"
            lines.append(f"| {c} | {r['tokens_per_s']:.0f} | {r['ttft_p50_ms']:.0f} | {r['itl_p50_ms']:.1f} | "
                         f"{vs_generate} | {c / step_s:.0f} | {uncompiled} | {vs_eager} |")
        lines += [""] + self.notes if self.notes else []
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
