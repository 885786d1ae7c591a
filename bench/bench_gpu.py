"""The engine on a GPU (--device cuda) next to plain batched ``model.generate``, in one run.

No weights travel to a GPU machine here (no hub, and the embedded GGUF is larger than what can be
carried), so the model has SmolLM2-135M's layer shapes with random weights and a small word-level
vocabulary: speed depends on the shapes, not on the values. The engine is driven in-process (no HTTP), 64
new tokens per request (ignore_eos), greedy, at concurrency 1, 8 and 32; results to bench/results/gpu.md.

    python bench/bench_gpu.py [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model_service.llm.engine import Engine, EngineLimits  # noqa: E402
from model_service.llm.loader import load_model  # noqa: E402
from model_service.llm.sampling import SamplingParams  # noqa: E402

NEW_TOKENS = 64
NOTE = ("A 135M model is far too small to load an H100: a step is bound by Python and kernel launches (30 layers "
        "of small kernels), not by the GPU's arithmetic, so these numbers show that the GPU path works and "
        "batches, not what a 9B GLM would reach. Each number is one measured pass after a warm-up pass at the "
        "same concurrency.")


def build_model(path: Path) -> None:
    """SmolLM2-135M's shapes (30 layers, hidden 576, 9 heads / 3 KV heads), random weights, a word vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<|endoftext|>", "<unk>"] + [f"w{i}" for i in range(2000)]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=0, pad_token_id=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def prompts(n: int) -> list[list[int]]:
    # ~40-token prompts of varied length, as in bench_engine.py
    return [[2 + (i * 37 + j * 11) % 2000 for j in range(34 + i % 12)] for i in range(n)]


def engine_run(loaded, concurrency: int) -> dict:
    async def main():
        # slots of 256 tokens hold every request (~40 + 64): one read length, so few CUDA graphs to capture
        engine = Engine(loaded, EngineLimits(max_running_requests=64, max_waiting_requests=64, kv_cache_tokens=256))
        engine.start()
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)

        async def one(ids):
            started, first, count = time.perf_counter(), None, 0
            async for out in engine.submit(ids, params):
                if first is None and out.token_ids:
                    first = time.perf_counter() - started
                count += len(out.token_ids)
            return first, count

        try:
            # warm-up at the same concurrency: a GPU's first pass over new shapes picks and loads kernels
            await asyncio.gather(*(one(p) for p in prompts(concurrency)))
            started = time.perf_counter()
            results = await asyncio.gather(*(one(p) for p in prompts(concurrency)))
            wall = time.perf_counter() - started
        finally:
            engine.shutdown()
        tokens = sum(r[1] for r in results)
        return {"tokens_per_s": tokens / wall, "ttft_p50_s": statistics.median(r[0] for r in results)}

    return asyncio.run(main())


def generate_run(loaded, batch: int) -> float:
    model = loaded.model
    rows = prompts(batch)
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=model.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
    kwargs = dict(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0,
                  max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        model.generate(**{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
        sync()
        started = time.perf_counter()
        model.generate(**kwargs)
        sync()
    return batch * NEW_TOKENS / (time.perf_counter() - started)


def device_name(loaded) -> str:
    device = loaded.model.device
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda", help="cpu only to try the script itself")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.md"))
    args = parser.parse_args()
    path = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    build_model(path)
    loaded = load_model(str(path), dtype=args.dtype, device=args.device)
    rows = []
    for c in args.concurrency:
        ours = engine_run(loaded, c)
        ceiling = generate_run(loaded, c)
        rows.append((c, ours["tokens_per_s"], ours["ttft_p50_s"], ceiling))
        print(f"c={c}: engine {ours['tokens_per_s']:.0f} tok/s (TTFT p50 {ours['ttft_p50_s'] * 1000:.0f} ms), "
              f"generate {ceiling:.0f} tok/s", flush=True)
    lines = [
        f"# Engine on a GPU ({args.dtype})", "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, {device_name(loaded)}, torch {torch.__version__}; "
        "SmolLM2-135M's shapes with random weights; greedy, 64 new tokens per request (ignore_eos); the engine "
        "driven in-process (no HTTP); one run of `python bench/bench_gpu.py`.", "",
        "| concurrency | engine tok/s | TTFT p50 (ms) | batched generate() tok/s | engine / generate |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {c} | {t:.0f} | {f * 1000:.0f} | {g:.0f} | {t / g:.2f}x |" for c, t, f, g in rows]
    lines += ["", NOTE]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
