"""Load-aware routing vs round robin, in the same run (issue 12): TTFT of short requests while one pod is busy.

Real processes on loopback: r-nacos, two model-service pods on the embedded default model, two gateways in front
of the same pods, one with `load-balancer.strategy=least-loaded` (the default), one with `round-robin` (the old
choice). Both pods run with a small batch (`--max-running-requests`, 4 by default); one is kept full by streams sent
to it directly (ignore_eos, each replaced as soon as it ends), so a request sent there waits in its queue; then
short streamed requests go through each gateway in turn (interleaved, one at a time) and their time to first token
is measured at the client.
Which pod served them comes from the pods' own request counts. Writes bench/results/routing.md (a figure, not a
pass/fail test).

    .venv/bin/python bench/bench_routing.py [--requests 20] [--max-running 4] [--busy-streams 4] [--busy-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import start_gateway, start_pods  # noqa: E402
from nacos_fixtures import RNacos, make_seed, wait_for  # noqa: E402

INTERNAL_KEY = "bench-internal-key"
KEYS = {"bench": ("sk-bench-routing", 0, 0)}  # unlimited
MODEL = "smollm2-135m-instruct"


def chat(max_tokens: int, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0, "max_tokens": max_tokens, "stream": True, **extra}


def served(pod) -> float:
    text = httpx.get(f"{pod.base_url}/metrics", timeout=10).text
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("model_service_e2e_request_latency_seconds_count"))


def running(pod) -> float:
    text = httpx.get(f"{pod.base_url}/metrics", timeout=10).text
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("model_service_num_requests_running"))


def ttft(url: str) -> float:
    """Seconds from sending a short streamed request to its first content chunk."""
    started = time.perf_counter()
    with httpx.Client(timeout=300) as client:
        with client.stream("POST", f"{url}/v1/chat/completions", json=chat(8),
                           headers={"Authorization": f"Bearer {KEYS['bench'][0]}"}) as r:
            r.raise_for_status()
            first = None
            for line in r.iter_lines():
                # the first token: a chunk with text (the first chunk, role and empty content, comes at once)
                if first is None and line.startswith("data: {") and any(
                        (choice.get("delta") or {}).get("content") for choice in json.loads(line[6:])["choices"]):
                    first = time.perf_counter() - started
            return first if first is not None else time.perf_counter() - started


def keep_busy(pod, streams: int, tokens: int, stop: threading.Event) -> list[threading.Thread]:
    """``streams`` streams of ``tokens`` tokens sent straight to the pod, each replaced as soon as it ends."""
    def run():
        with httpx.Client(timeout=900) as client:
            while not stop.is_set():
                with client.stream("POST", f"{pod.base_url}/v1/chat/completions", json=chat(tokens, ignore_eos=True),
                                   headers={"Authorization": f"Bearer {INTERNAL_KEY}"}) as r:
                    for _ in r.iter_lines():
                        if stop.is_set():
                            return
    threads = [threading.Thread(target=run, daemon=True) for _ in range(streams)]
    for t in threads:
        t.start()
    return threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20, help="short requests per gateway")
    parser.add_argument("--max-running", type=int, default=4, help="the pods' --max-running-requests")
    parser.add_argument("--busy-streams", type=int, default=4, help="streams kept on the busy pod")
    parser.add_argument("--busy-tokens", type=int, default=256, help="tokens of each of those streams")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "routing.md"))
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    nacos = RNacos(tmp / "nacos", seed=make_seed(tmp / "seed")).start()
    pods, gateways, stop, threads = [], {}, threading.Event(), []
    try:
        pods = start_pods(tmp, nacos, 2, "--max-running-requests", str(args.max_running),
                          env={"MODEL_SERVICE_API_KEY": INTERNAL_KEY, "MODEL_SERVICE_THREADS": "1"})
        for strategy in ("least-loaded", "round-robin"):
            gateways[strategy] = start_gateway(tmp, nacos.address, INTERNAL_KEY, KEYS,
                                               f"--llm-gateway.load-balancer.strategy={strategy}", timeout=180)
        busy, idle = pods
        threads = keep_busy(busy, args.busy_streams, args.busy_tokens, stop)
        wait_for(lambda: running(busy) >= min(args.busy_streams, args.max_running), 120,
                 message="busy pod running its streams")
        time.sleep(2)  # several scrapes of the busy pod by the least-loaded gateway
        times = {s: [] for s in gateways}
        served_idle = {s: 0.0 for s in gateways}
        for _ in range(args.requests):
            for strategy, gw in gateways.items():
                before = served(idle)
                times[strategy].append(ttft(gw.url))
                served_idle[strategy] += served(idle) - before
        rows = []
        for strategy in gateways:
            t = sorted(times[strategy])
            p50 = statistics.median(t)
            p90 = t[min(len(t) - 1, int(round(0.9 * (len(t) - 1))))]
            rows.append((strategy, p50, p90, served_idle[strategy] / len(t)))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for gw in gateways.values():
            gw.stop()
        for pod in pods:
            pod.stop()
        nacos.stop()

    lines = [
        "# Load-aware routing vs round robin (bench/bench_routing.py)",
        "",
        f"Same run, same two pods (embedded {MODEL}, CPU, `MODEL_SERVICE_THREADS=1`, "
        f"`--max-running-requests {args.max_running}` each) on a {os.cpu_count()}-core machine; one pod kept full "
        f"with {args.busy_streams} streams of {args.busy_tokens} tokens sent to it directly (each replaced when it "
        "ends), so a request sent there waits in its queue; "
        f"{args.requests} short streamed requests (max_tokens 8) through each gateway, interleaved one at a time. "
        "TTFT measured at the client (time to the first chunk with text); the serving pod from the pods' own request "
        "counts. A figure, not a timed assertion.",
        "",
        "| gateway `load-balancer.strategy` | TTFT p50 (s) | TTFT p90 (s) | served by the idle pod |",
        "|---|---|---|---|",
    ]
    for strategy, p50, p90, share in rows:
        lines.append(f"| `{strategy}` | {p50:.3f} | {p90:.3f} | {share:.0%} |")
    lines += ["", "Raw TTFTs (s): `" + json.dumps({s: [round(x, 3) for x in v] for s, v in times.items()}) + "`", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
