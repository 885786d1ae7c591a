"""Faults under traffic: the whole stack (real r-nacos, real model-service pods, the real gateway jar) on loopback.

    client threads ──HTTP/SSE──▶ gateway ──lb://model-service (Nacos)──▶ pod A | pod B

1. kill -9 one of two pods while the gateway carries a steady stream of requests: ≥ 99% of the requests
   sent after the kill succeed;
2. SIGTERM a pod while it streams: every client stream still ends with a finish_reason and [DONE]
   (the pod deregisters, drains, exits 0), and streams started during its drain go to the other pod;
3. restart Nacos under traffic: requests keep succeeding and the pods reappear in Nacos;
4. overload the gateway: 429s (pod admission and the caller's request budget), no crash, RSS of the gateway
   and the pods bounded.

Bounded: small requests (max_tokens ≤ 8, a few per second), each phase a few seconds to ~20 s, the whole file a
few minutes on 2 CPU cores. The tests run in order on one stack; each starts by bringing it back to two pods.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import GATEWAY_JAR, Gateway, ServerProcess, need_jar, start_gateway, start_pods
from nacos_fixtures import RNacos, start_seeded_rnacos, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

INTERNAL_KEY = "internal-faults-key"
KEYS = {  # name: (key, requests/min, tokens/min); 0 = unlimited
    "load": ("sk-load-faults", 0, 0),
    "limited": ("sk-limited-faults", 20, 0),
}
POD_ENV = {"MODEL_SERVICE_API_KEY": INTERNAL_KEY, "MODEL_SERVICE_THREADS": "1"}
POD_ARGS = ("--drain-timeout-s", "30")
# Test 4 lowers the pods' admission limits through Nacos (hot config), so that a few dozen requests overload them.
OVERLOAD_POLICY = "max_running_requests: 4\nmax_waiting_requests: 4\n"
PROMPT = "Name a colour."


def body(stream: bool, max_tokens: int = 6, **extra) -> dict:
    return {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": PROMPT}],
            "temperature": 0, "max_tokens": max_tokens, "stream": stream, **extra}


def auth(name: str = "load") -> dict:
    return {"Authorization": f"Bearer {KEYS[name][0]}"}


# ---------------------------------------------------------------------------------------- one request
@dataclass
class Outcome:
    started: float
    ended: float
    stream: bool
    ok: bool
    status: int | None = None
    detail: str = ""
    finish_reason: str | None = None
    headers: httpx.Headers = field(default_factory=httpx.Headers)  # of a refused request (Retry-After)


def call(client: httpx.Client, url: str, stream: bool, max_tokens: int = 6, key: str = "load", **extra) -> Outcome:
    """One chat completion through the gateway. A stream is ok only when it ends with a finish_reason and
    ``[DONE]``; an answer only when it is a 200 with a message."""
    started = time.monotonic()
    try:
        if not stream:
            r = client.post(f"{url}/v1/chat/completions", json=body(False, max_tokens, **extra), headers=auth(key))
            if r.status_code != 200:
                return Outcome(started, time.monotonic(), False, False, r.status_code, r.text[:1000],
                               headers=r.headers)
            choice = r.json()["choices"][0]
            return Outcome(started, time.monotonic(), False, choice["finish_reason"] in ("stop", "length"), 200,
                           finish_reason=choice["finish_reason"])
        with client.stream("POST", f"{url}/v1/chat/completions", json=body(True, max_tokens, **extra),
                           headers=auth(key)) as r:
            if r.status_code != 200:
                r.read()
                return Outcome(started, time.monotonic(), True, False, r.status_code, r.text[:1000],
                               headers=r.headers)
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        finish = None
        for event in events[:-1]:
            chunk = json.loads(event)
            if "error" in chunk:
                return Outcome(started, time.monotonic(), True, False, 200, f"error event: {event[:300]}")
            for choice in chunk.get("choices") or []:
                finish = choice.get("finish_reason") or finish
        ok = bool(events) and events[-1] == "[DONE]" and finish in ("stop", "length")
        return Outcome(started, time.monotonic(), True, ok, 200, "" if ok else f"broken stream: {events[-3:]}",
                       finish)
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return Outcome(started, time.monotonic(), stream, False, None, f"{type(exc).__name__}: {exc}")


class Load:
    """Steady traffic: ``rate`` requests per second (alternating streamed and not) from a thread pool."""

    def __init__(self, url: str, rate: float = 4.0, max_tokens: int = 6):
        self.url, self.rate, self.max_tokens = url, rate, max_tokens
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=24)
        self._client = httpx.Client(timeout=httpx.Timeout(60, connect=5),
                                    limits=httpx.Limits(max_connections=32, max_keepalive_connections=32))
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _one(self, stream: bool) -> None:
        outcome = call(self._client, self.url, stream, self.max_tokens)
        with self._lock:
            self.outcomes.append(outcome)

    def _run(self) -> None:
        i, next_at = 0, time.monotonic()
        while not self._stop.is_set():
            self._pool.submit(self._one, i % 2 == 1)
            i += 1
            next_at += 1 / self.rate
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(10)
            self._pool.shutdown(wait=True)
            self._client.close()

    def since(self, t: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.started >= t]


def summary(outcomes: list[Outcome]) -> str:
    failures = [o for o in outcomes if not o.ok]
    kinds = Counter((o.status, o.detail[:120]) for o in failures)
    latencies = sorted(o.ended - o.started for o in outcomes) or [0.0]
    return (f"{len(outcomes) - len(failures)}/{len(outcomes)} ok (latency median {latencies[len(latencies) // 2]:.1f}s,"
            f" max {latencies[-1]:.1f}s); failures: {dict(kinds)}")


# ---------------------------------------------------------------------------------------- the stack
@dataclass
class Stack:
    nacos: RNacos
    tmp: Path
    pods: list[ServerProcess] = field(default_factory=list)
    gateway: Gateway | None = None

    def live_pods(self) -> list[ServerProcess]:
        self.pods = [p for p in self.pods if p.proc.poll() is None]
        return self.pods

    def ensure_pods(self, count: int = 2) -> list[ServerProcess]:
        """Start pods until ``count`` run (all registered, and routed to by the gateway)."""
        missing = count - len(self.live_pods())
        if missing > 0:
            self.pods += start_pods(self.tmp, self.nacos, missing, *POD_ARGS, env=POD_ENV)
        if self.gateway is not None:
            wait_for(self.gateway_sees_all, 30, interval=0.5, message="the gateway routes to every pod")
        return self.pods

    def gateway_sees_all(self) -> bool:
        """Every live pod answers requests sent through the gateway (seen in the pods' own access logs)."""
        def answered(pod: ServerProcess) -> int:
            return pod.log().count('"path": "/v1/models"')

        pods = self.live_pods()
        before = {p.http_port: answered(p) for p in pods}
        with httpx.Client(timeout=30) as client:
            for _ in range(4 * len(pods)):
                client.get(f"{self.gateway.url}/v1/models", headers=auth())
                if all(answered(p) > before[p.http_port] for p in pods):
                    return True
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    need_jar(GATEWAY_JAR)
    nacos = start_seeded_rnacos(tmp_path_factory, "faults")
    st = Stack(nacos, tmp_path_factory.mktemp("faults-pods"))
    try:
        st.ensure_pods(2)
        st.gateway = start_gateway(tmp_path_factory.mktemp("faults-gw"), nacos.address, INTERNAL_KEY, KEYS,
                                   # it does not register itself: no need to wait after "deregistering" on stop
                                   "--spring.cloud.nacos.discovery.graceful-shutdown-wait-time=0")
        yield st
    finally:
        if st.gateway is not None:
            st.gateway.stop()
        for pod in st.pods:
            pod.stop()
        nacos.stop()


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the JVM has none; a pod has none)."""
    proc = psutil.Process(pid)
    return (proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))) / 2**20


# ---------------------------------------------------------------------------------------- 1. kill -9
def test_kill_9_one_of_two_pods_under_steady_traffic(stack):
    victim, survivor = stack.ensure_pods(2)[:2]
    with Load(stack.gateway.url, rate=3) as load:
        time.sleep(8)
        killed_at = time.monotonic()
        victim.stop(signal.SIGKILL)
        wait_for(lambda: victim.http_port not in {h["port"] for h in stack.nacos.instances()}, 30,
                 message="the killed pod leaves Nacos")
        time.sleep(max(0.0, killed_at + 20 - time.monotonic()))
    before = [o for o in load.outcomes if o.ended < killed_at]
    in_flight = [o for o in load.outcomes if o.started < killed_at <= o.ended]
    after = load.since(killed_at)
    print(f"kill -9: before {summary(before)}; in flight {summary(in_flight)}; after {summary(after)}")
    assert len(before) >= 3 and all(o.ok for o in before), summary(before)
    assert len(after) >= 40, summary(after)
    ok = sum(o.ok for o in after)
    assert ok >= 0.99 * len(after), f"after the kill: {summary(after)}; in flight at the kill: {summary(in_flight)}"
    assert survivor.proc.poll() is None
    # the survivor carried the traffic after the kill
    assert survivor.metric("model_service_requests_finished_total") > 0


# ---------------------------------------------------------------------------------------- 2. SIGTERM while streaming
def test_sigterm_during_streams_breaks_no_client_stream(stack):
    victim, other = stack.ensure_pods(2)[:2]
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    client = httpx.Client(timeout=httpx.Timeout(90, connect=5), limits=httpx.Limits(max_connections=32))

    def stream(max_tokens: int) -> None:
        # ignore_eos: every stream runs its full length, so the drain has real work to finish
        outcome = call(client, stack.gateway.url, True, max_tokens, ignore_eos=True)
        with lock:
            outcomes.append(outcome)

    with ThreadPoolExecutor(max_workers=16) as pool:
        for _ in range(8):
            pool.submit(stream, 48)
        # SIGTERM the victim while it is generating for some of these streams
        wait_for(lambda: victim.metric("model_service_num_requests_running") >= 2, 30, interval=0.05,
                 message="streams running on the victim")
        victim.proc.send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()
        # new streams keep coming while the victim deregisters and drains
        for _ in range(6):
            pool.submit(stream, 8)
            time.sleep(0.4)
        assert victim.proc.wait(60) == 0, victim.log()[-3000:]
    client.close()
    drained = time.monotonic() - sigterm_at

    print(f"SIGTERM: {summary(outcomes)}; drained in {drained:.1f}s")
    assert len(outcomes) == 14
    broken = [o for o in outcomes if not o.ok]
    assert not broken, summary(outcomes)
    assert all(o.finish_reason == "length" for o in outcomes)
    # the victim really had streams in flight when it was told to stop, and finished them
    shutdown = [json.loads(line) for line in victim.log().splitlines()
                if line.startswith("{") and '"shutting down"' in line]
    assert shutdown and shutdown[-1]["in_flight"] >= 1, victim.log()[-3000:]
    assert '"drain timeout' not in victim.log()
    assert victim.http_port not in {h["port"] for h in stack.nacos.instances()}
    assert drained < 40
    assert other.proc.poll() is None


# ---------------------------------------------------------------------------------------- 3. Nacos restart
def test_nacos_restart_under_traffic(stack):
    pods = stack.ensure_pods(2)
    ports = {p.http_port for p in pods}
    with Load(stack.gateway.url, rate=3) as load:
        time.sleep(3)
        down_at = time.monotonic()
        stack.nacos.stop()
        time.sleep(4)  # Nacos down: the gateway keeps routing to the pods it knows
        stack.nacos.start()
        back_at = time.monotonic()
        wait_for(lambda: ports <= {h["port"] for h in stack.nacos.instances()}, 45,
                 message="both pods registered again after the Nacos restart")
        reappeared = time.monotonic() - back_at
        time.sleep(5)
    during = load.since(down_at)
    print(f"Nacos restart: {summary(during)}; pods registered again {reappeared:.1f}s after Nacos was back")
    assert len(during) >= 20, summary(during)
    ok = sum(o.ok for o in during)
    assert ok >= 0.99 * len(during), f"from the Nacos stop on: {summary(during)}"
    assert reappeared < 45
    # after the restart the gateway still routes to both pods (its Nacos subscription came back)
    assert stack.gateway_sees_all()


# ---------------------------------------------------------------------------------------- 4. overload
def test_overload_gives_429s_not_crashes_and_memory_stays_bounded(stack):
    pods = stack.ensure_pods(2)
    gw = stack.gateway
    # hot config: lower the admission limits of every pod through Nacos, without a restart
    assert stack.nacos.publish_config("model-service.yaml", OVERLOAD_POLICY)

    def limits_applied(pod: ServerProcess) -> bool:
        return any(line.startswith("{") and '"engine limits changed"' in line
                   and json.loads(line).get("max_running_requests") == 4 for line in pod.log().splitlines())

    wait_for(lambda: all(limits_applied(p) for p in pods), 30, message="the pods apply the Nacos policy")
    client = httpx.Client(timeout=httpx.Timeout(120, connect=5),
                          limits=httpx.Limits(max_connections=80, max_keepalive_connections=80))

    def wave(n: int = 60) -> list[Outcome]:
        with ThreadPoolExecutor(max_workers=n) as pool:
            return list(pool.map(lambda i: call(client, gw.url, i % 3 == 0, 8), range(n)))

    wave()  # warm-up: the JVM's and the pods' steady state
    rss_before = {"gateway": rss_mb(gw.proc.pid), **{f"pod-{p.http_port}": rss_mb(p.proc.pid) for p in pods}}
    outcomes = []
    for _ in range(4):
        outcomes += wave()
    rss_after = {"gateway": rss_mb(gw.proc.pid), **{f"pod-{p.http_port}": rss_mb(p.proc.pid) for p in pods}}

    statuses = Counter(o.status for o in outcomes)
    print(f"overload: {dict(statuses)}; RSS MB before {rss_before} after {rss_after}")
    # A 500 "Bulkhead ... is full" then 503 "circuit open" here means the route's Resilience4j bulkhead (25
    # concurrent calls by default) turned a burst into gateway errors that opened the route breaker for everyone.
    assert set(statuses) <= {200, 429}, summary(outcomes)
    assert statuses[429] >= 20, f"expected overload 429s: {statuses}"
    assert statuses[200] >= 40, f"the pods kept serving their capacity: {statuses}"
    # The "load" caller has no budget: every 429 is a full pod's own refusal (docs/errors.md: EngineOverloaded),
    # passed through by the gateway once its retries met full pods, with the pod's Retry-After.
    rejected = [o for o in outcomes if o.status == 429]
    for o in rejected:
        error = json.loads(o.detail)["error"]
        assert (error["type"], error["code"]) == ("rate_limit_error", "server_overloaded"), o.detail
        assert int(o.headers.get("Retry-After", "0")) >= 1, o.headers

    # the caller's request budget (20/min) also answers 429, at the gateway, without touching the pods
    with ThreadPoolExecutor(max_workers=30) as pool:
        responses = list(pool.map(lambda _: client.get(f"{gw.url}/v1/models", headers=auth("limited")), range(40)))
    codes = Counter(r.status_code for r in responses)
    assert codes[429] >= 10 and set(codes) <= {200, 429}, codes
    limited = next(r for r in responses if r.status_code == 429)
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    client.close()

    # nothing crashed, and all still answer
    assert gw.proc.poll() is None and all(p.proc.poll() is None for p in pods)
    assert httpx.get(f"{gw.management_url}/actuator/health", timeout=10).json()["status"] == "UP"
    with httpx.Client(timeout=60) as c:
        assert call(c, gw.url, True, 4).ok and call(c, gw.url, False, 4).ok
    growth = {k: rss_after[k] - rss_before[k] for k in rss_before}
    # bounds: the gateway's heap is capped (-Xmx384m), so its RSS settles; a pod's KV buffers are reused
    assert growth["gateway"] < 150, (rss_before, rss_after)
    assert all(v < 120 for k, v in growth.items() if k.startswith("pod-")), (rss_before, rss_after)
    assert rss_after["gateway"] < 1024 and all(v < 2048 for k, v in rss_after.items() if k.startswith("pod-"))
