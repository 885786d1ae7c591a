"""Engine benchmark: the real service vs. a naive wrapper vs. plain batched generate, in one run.

Streams greedy chat completions of exactly 64 new tokens (ignore_eos) at concurrency 1, 8 and 32
through the real HTTP server, and the same load through the naive one-generate-per-request
server; measures plain ``model.generate`` on the same prompts at the same batch sizes (the
ceiling of these kernels). Everything runs side by side on this machine in one invocation, so the
ratios mean something even on a noisy machine. Results: bench/results/engine.md and .json.

    python bench/bench_engine.py [--dtype float32] [--concurrency 1 8 32] [--new-tokens 64]
                                 [--temperature 0.7 --top-p 0.9] [--skip-ceiling] [--skip-naive] [--tag NAME]
                                 [--serve-args '--kv-cache slots --kv-cache-tokens 512']
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

TOPICS = ["the ocean", "a lighthouse", "a robot", "autumn", "a city at night", "a mountain", "the moon",
          "a library", "a train journey", "a garden", "a storm", "a cat", "coffee", "the desert", "a violin",
          "a forest", "a bridge", "winter", "a market", "a river", "a clock", "an island", "a kite", "snow",
          "a castle", "a dragon", "the stars", "a bakery", "a volcano", "a festival", "a ship", "a painter"]
PROMPTS = [f"Write a short story about {t}." for t in TOPICS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class Server:
    def __init__(self, cmd: list[str], port: int, log_name: str):
        self.port = port
        self.log = open(RESULTS / "tmp" / log_name, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd} exited; see {self.log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{cmd} not ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# Sampling parameters of every request: greedy unless --temperature/--top-p say otherwise.
SAMPLING = {"temperature": 0}


async def one_stream(client: httpx.AsyncClient, url: str, prompt: str, new_tokens: int) -> tuple[float, int]:
    started = time.perf_counter()
    ttft, tokens = None, 0
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": new_tokens, **SAMPLING,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft if ttft is not None else float("nan"), tokens


async def load_test(port: int, concurrency: int, new_tokens: int) -> dict:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        await one_stream(client, url, "Hello!", 4)  # warm-up
        started = time.perf_counter()
        results = await asyncio.gather(*(one_stream(client, url, PROMPTS[i % len(PROMPTS)], new_tokens)
                                         for i in range(concurrency)))
        wall = time.perf_counter() - started
    ttfts = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {"concurrency": concurrency, "tokens": tokens, "seconds": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50_s": round(pct(ttfts, 0.5), 3),
            "ttft_p95_s": round(pct(ttfts, 0.95), 3)}


def measure(name: str, server: Server, args) -> tuple[list[dict], float]:
    """The load test at each concurrency against a started server, then its peak RSS (MB); stops the server."""
    rows = []
    try:
        for c in args.concurrency:
            rows.append(asyncio.run(load_test(server.port, c, args.new_tokens)))
            print(f"  {name} c={c}: {rows[-1]}", flush=True)
        return rows, peak_rss_mb(server.proc.pid)
    finally:
        server.stop()


def batched_generate_ceiling(dtype: str, batch_sizes: list[int], new_tokens: int) -> list[dict]:
    """Plain ``model.generate`` over the same prompts, left-padded, one call per batch size."""
    import torch

    from model_service.llm.loader import load_model

    loaded = load_model("smollm2-135m-instruct", dtype=dtype)
    model, tok = loaded.model, loaded.tokenizer
    tok.padding_side = "left"
    rows = []
    for bs in batch_sizes:
        texts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                         add_generation_prompt=True, tokenize=False) for i in range(bs)]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        kwargs = dict(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      pad_token_id=tok.pad_token_id)
        with torch.inference_mode():
            model.generate(**{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            started = time.perf_counter()
            out = model.generate(**kwargs)
            wall = time.perf_counter() - started
        produced = (out.shape[1] - enc["input_ids"].shape[1]) * bs
        rows.append({"batch_size": bs, "tokens": produced, "seconds": round(wall, 3),
                     "tokens_per_s": round(produced / wall, 1)})
        print(f"  generate() batch {bs}: {produced / wall:.1f} tokens/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-naive", action="store_true", help="skip the slow naive baseline")
    parser.add_argument("--skip-ceiling", action="store_true", help="skip the batched generate() ceiling")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampled traffic where > 0")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--tag", default="", help="appended to the result file names (engine-<tag>.md)")
    parser.add_argument("--serve-args", default="", help="extra `serve` flags, e.g. '--kv-cache slots'")
    args = parser.parse_args()
    (RESULTS / "tmp").mkdir(parents=True, exist_ok=True)
    SAMPLING.update(temperature=args.temperature, top_p=args.top_p)

    ceiling = []
    if not args.skip_ceiling:
        print("1/3 ceiling: plain batched model.generate", flush=True)
        ceiling = batched_generate_ceiling(args.dtype, args.concurrency, args.new_tokens)

    print("2/3 the model service (continuous batching)", flush=True)
    port = free_port()
    ours, service_rss = measure("service", Server(
        [sys.executable, "-m", "model_service", "serve", "--http-port", str(port), "--grpc-port", "0",
         "--dtype", args.dtype, "--log-level", "warning", *args.serve_args.split()], port, "service.log"), args)

    naive, naive_rss = [], float("nan")
    if not args.skip_naive:
        print("3/3 naive baseline: one generate() thread per request", flush=True)
        port = free_port()
        naive, naive_rss = measure("naive", Server(
            [sys.executable, "bench/naive_server.py", str(port), args.dtype], port, "naive.log"), args)

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "dtype": args.dtype, "new_tokens": args.new_tokens, "ceiling_generate": ceiling, "service": ours,
        "naive": naive, "service_peak_rss_mb": round(service_rss, 1), "naive_peak_rss_mb": round(naive_rss, 1),
        "sampling": dict(SAMPLING), "tag": args.tag, "serve_args": args.serve_args,
    }
    write_report(report)


def write_report(report: dict) -> None:
    suffix = ("" if report["dtype"] == "float32" else f"-{report['dtype']}") + (
        f"-{report['tag']}" if report.get("tag") else "")
    sampling = report.get("sampling", {"temperature": 0})
    how = "greedy" if not sampling["temperature"] else ", ".join(f"{k} {v}" for k, v in sampling.items())
    (RESULTS / f"engine{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    ceiling = {row["batch_size"]: row for row in report["ceiling_generate"]}
    naive = {row["concurrency"]: row for row in report["naive"]}
    lines = [
        f"# Engine benchmark ({report['dtype']})", "",
        f"{report['date']}, {report['machine']}; {how}, {report['new_tokens']} new tokens per request "
        "(ignore_eos), streaming HTTP clients; all numbers from one run of `make bench`.", "",
        "| concurrency | service tok/s | TTFT p50 / p95 (s) | naive tok/s | naive TTFT p50 (s) | generate() ceiling "
        "tok/s | service / naive | service / ceiling |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["service"]:
        c = row["concurrency"]
        nv, cl = naive.get(c), ceiling.get(c)
        vs_naive = f"{row['tokens_per_s'] / nv['tokens_per_s']:.1f}x" if nv else "n/a"
        vs_ceiling = f"{row['tokens_per_s'] / cl['tokens_per_s']:.2f}x" if cl else "n/a"
        lines.append(
            f"| {c} | {row['tokens_per_s']} | {row['ttft_p50_s']} / {row['ttft_p95_s']} | "
            f"{nv['tokens_per_s'] if nv else 'n/a'} | {nv['ttft_p50_s'] if nv else 'n/a'} | "
            f"{cl['tokens_per_s'] if cl else 'n/a'} | {vs_naive} | {vs_ceiling} |")
    lines += ["", f"Peak RSS of the service process over the run (VmHWM): {report['service_peak_rss_mb']} MB; "
              f"naive server: {report['naive_peak_rss_mb']} MB.", ""]
    (RESULTS / f"engine{suffix}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
