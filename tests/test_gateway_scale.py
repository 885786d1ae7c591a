"""The gateway at scale (issue 12), end to end with real processes on loopback: r-nacos, two real model-service
pods, a real redis-server and two replicas of the real gateway jar sharing their callers' budgets through it.

    client ──▶ gateway A (when-redis-down=fail-open)   ─┐              ┌─▶ pod 1
    client ──▶ gateway B (when-redis-down=fail-closed) ─┴─ redis ── lb ┴─▶ pod 2

- budgets: a request budget and a token budget (debited by the real usage) hold across both replicas and across
  a restart of one; Redis stopped mid-test gives each documented behaviour, and sharing comes back with Redis;
- load-aware routing: one pod kept busy with long streams (sent to it directly), new short requests through the
  gateway go to the other one, as the pods' own metrics show.

Redis runs without persistence here, so its own restart starts from full budgets (production: see docs/gateway.md).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import GATEWAY_JAR, free_port, metric_values, need_jar, start_gateway, start_pods
from nacos_fixtures import start_seeded_rnacos, wait_for

pytestmark = pytest.mark.slow

INTERNAL_KEY = "internal-scale-key"
MODEL = "smollm2-135m-instruct"
# caller -> (plain key, requests/min, tokens/min); "alice" first: start_gateway checks routing with it
KEYS = {
    "alice": ("sk-alice-scale", 100_000, 10_000_000),
    "counted": ("sk-counted-scale", 4, 0),
    "tokens": ("sk-tokens-scale", 100_000, 300),
    "restart": ("sk-restart-scale", 100_000, 10),
    "outage": ("sk-outage-scale", 2, 0),
    "again": ("sk-again-scale", 3, 0),
}


def auth(name: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[name][0]}"}


def chat(max_tokens: int = 8, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0, "max_tokens": max_tokens, **extra}


def assert_rate_limited(response: httpx.Response, limit: str) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == limit and error["code"] == "rate_limit_exceeded"
    assert int(response.headers["retry-after"]) >= 1


# ---------------------------------------------------------------------------------------- redis-server
class RedisServer:
    """A real redis-server on a free loopback port, its files in a temporary folder, stopped by its pid.
    ``stop()`` and ``start()`` may be repeated (same port): an outage."""

    def __init__(self, workdir: Path):
        binary = shutil.which("redis-server")
        if binary is None:
            message = "redis-server not found; run `make redis`"
            if os.environ.get("MODEL_SERVICE_REQUIRE_REDIS"):
                pytest.fail(message)
            pytest.skip(message)
        self.binary, self.workdir, self.port = binary, workdir, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> RedisServer:
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                                      str(self.workdir), "--save", "", "--appendonly", "no"],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(lambda: self.cli("PING") == "PONG", 15, message="redis-server answering")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def cli(self, *args: str) -> str:
        cli = shutil.which("redis-cli")
        out = subprocess.run([cli, "-h", "127.0.0.1", "-p", str(self.port), *args], capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip()

    def level(self, caller: str, limit: str = "tokens") -> float:
        """The level of a caller's budget as the gateways stored it (RedisCallerBudgets' key layout)."""
        value = self.cli("HGET", f"llm-gateway:budget:{{api_key:{caller}}}:{limit}", "level")
        return float(value) if value else float(KEYS[caller][2 if limit == "tokens" else 1])


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def nacos(tmp_path_factory):
    need_jar(GATEWAY_JAR)
    server = start_seeded_rnacos(tmp_path_factory, "scale")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pods(nacos, tmp_path_factory):
    servers = start_pods(tmp_path_factory.mktemp("scale-pods"), nacos, 2,
                         env={"MODEL_SERVICE_API_KEY": INTERNAL_KEY, "MODEL_SERVICE_THREADS": "1"})
    yield servers
    for srv in servers:
        srv.stop()


class Replicas:
    """The two gateway replicas; ``restart(name)`` replaces one by a fresh process with the same settings."""

    def __init__(self, tmp_dir: Path, nacos, redis):
        self.tmp_dir, self.nacos, self.redis = tmp_dir, nacos, redis
        self.gateways = {}

    def start(self, name: str):
        mode = {"open": "fail-open", "closed": "fail-closed"}[name]
        self.gateways[name] = start_gateway(
            self.tmp_dir, self.nacos.address, INTERNAL_KEY, KEYS,
            "--llm-gateway.budgets.store=redis", f"--llm-gateway.budgets.when-redis-down={mode}",
            f"--spring.data.redis.url={self.redis.url}", "--llm-gateway.resilience.open-state-wait=60s",
            timeout=180)
        return self.gateways[name]

    def restart(self, name: str):
        self.gateways[name].stop()
        return self.start(name)

    def __getitem__(self, name: str):
        return self.gateways[name]

    def stop(self) -> None:
        for gw in self.gateways.values():
            gw.stop()


@pytest.fixture(scope="module")
def gateways(nacos, redis, pods, tmp_path_factory):
    replicas = Replicas(tmp_path_factory.mktemp("scale-gw"), nacos, redis)
    try:
        replicas.start("open")
        replicas.start("closed")
        yield replicas
    finally:
        replicas.stop()


def gauge(text: str, name: str, /, **labels) -> float | None:
    """The value of the first sample of ``name`` whose labels include ``labels``."""
    values = metric_values(text, name, **labels)
    return values[0] if values else None


# ---------------------------------------------------------------------------------------- shared budgets
def test_a_request_budget_holds_across_both_replicas(gateways):
    results = []
    for i in range(4):
        gw = gateways["open" if i % 2 == 0 else "closed"]
        results.append(httpx.get(f"{gw.url}/v1/models", headers=auth("counted"), timeout=30).status_code)
    assert results == [200, 200, 200, 200]
    for name in ("open", "closed"):  # the fifth request, on either replica: 429 in OpenAI's shape
        assert_rate_limited(httpx.get(f"{gateways[name].url}/v1/models", headers=auth("counted"), timeout=30),
                            "requests")


def test_a_token_budget_is_debited_by_the_real_usage_across_replicas(gateways, redis):
    budget = KEYS["tokens"][2]
    refill_per_s = budget / 60
    started = time.monotonic()
    used = 0
    for name in ("open", "closed"):
        r = httpx.post(f"{gateways[name].url}/v1/chat/completions", headers=auth("tokens"), json=chat(8), timeout=120)
        assert r.status_code == 200, r.text
        used += r.json()["usage"]["total_tokens"]
    # settled to the real usage (sent to Redis before the answer's end reached us), plus the refill since
    wait_for(lambda: budget - used - 0.01 <= redis.level("tokens")
             <= budget - used + refill_per_s * (time.monotonic() - started) + 1, 5,
             message=f"tokens budget at {budget} - {used} (+ refill)")

    # A reservation taken on one replica is seen by the other at once: a stream that may take 400 tokens leaves
    # the budget negative while it runs, so the other replica refuses; its real usage then gives most of it back.
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", f"{gateways['open'].url}/v1/chat/completions", headers=auth("tokens"),
                           json=chat(400, stream=True)) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            assert redis.level("tokens") < 0
            assert_rate_limited(httpx.post(f"{gateways['closed'].url}/v1/chat/completions", headers=auth("tokens"),
                                           json=chat(4), timeout=60), "tokens")
            for _ in lines:
                pass
    wait_for(lambda: redis.level("tokens") > 0, 10, message="the stream's unused reservation given back")


def test_a_restarted_replica_keeps_what_was_spent(gateways, redis):
    # 10 tokens a minute: one real answer (~50 tokens) leaves the budget negative for minutes
    r = httpx.post(f"{gateways['open'].url}/v1/chat/completions", headers=auth("restart"), json=chat(8), timeout=120)
    assert r.status_code == 200, r.text
    assert redis.level("restart") < 0
    gw = gateways.restart("open")
    assert_rate_limited(httpx.post(f"{gw.url}/v1/chat/completions", headers=auth("restart"), json=chat(4),
                                   timeout=60), "tokens")


def test_redis_outage_fail_open_and_fail_closed_then_shared_again(gateways, redis):
    open_gw, closed_gw = gateways["open"], gateways["closed"]
    logged_before = {gw: gw.log().count("caller budgets: Redis unreachable") for gw in (open_gw, closed_gw)}
    redis.stop()
    try:
        # fail-open: served with this replica's own limits (2 a minute), then 429
        statuses = [httpx.get(f"{open_gw.url}/v1/models", headers=auth("outage"), timeout=30).status_code
                    for _ in range(3)]
        assert statuses == [200, 200, 429]
        # fail-closed: 503 in OpenAI's shape, with Retry-After
        r = httpx.get(f"{closed_gw.url}/v1/models", headers=auth("outage"), timeout=30)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "budget_store_unavailable"
        assert int(r.headers["retry-after"]) >= 1
        # visible: the metric, the health (fail-open stays UP overall, its component DEGRADED; fail-closed DOWN)
        wait_for(lambda: gauge(open_gw.prometheus(), "llm_gateway_budget_store_up") == 0, 10, message="gauge 0")
        health = httpx.get(f"{open_gw.management_url}/actuator/health", timeout=10)
        assert health.status_code == 200 and health.json()["components"]["budgetStore"]["status"] == "DEGRADED"
        health = httpx.get(f"{closed_gw.management_url}/actuator/health", timeout=10)
        assert health.status_code == 503 and health.json()["components"]["budgetStore"]["status"] == "DOWN"
        # logged once per outage, however many requests
        for gw in (open_gw, closed_gw):
            assert gw.log().count("caller budgets: Redis unreachable") == logged_before[gw] + 1, gw.log()[-3000:]
    finally:
        redis.start()
    for gw in (open_gw, closed_gw):
        wait_for(lambda: gauge(gw.prometheus(), "llm_gateway_budget_store_up") == 1, 20, message="Redis back")
        assert "caller budgets: Redis reachable again" in gw.log()
    # shared again: 3 a minute across both replicas
    results = [httpx.get(f"{gw.url}/v1/models", headers=auth("again"), timeout=30).status_code
               for gw in (open_gw, closed_gw, open_gw, closed_gw)]
    assert results == [200, 200, 200, 429]


# ---------------------------------------------------------------------------------------- load-aware routing
def keep_busy(pod, streams: int, stop: threading.Event) -> list[threading.Thread]:
    """``streams`` long streams sent straight to the pod (ignore_eos, 4000 tokens), held open until ``stop``."""
    def run():
        with httpx.Client(timeout=600) as client:
            with client.stream("POST", f"{pod.base_url}/v1/chat/completions",
                               headers={"Authorization": f"Bearer {INTERNAL_KEY}"},
                               json=chat(4000, stream=True, ignore_eos=True)) as response:
                for _ in response.iter_lines():
                    if stop.is_set():
                        return
    threads = [threading.Thread(target=run, daemon=True) for _ in range(streams)]
    for t in threads:
        t.start()
    return threads


def test_short_requests_go_to_the_idle_pod_not_the_busy_one(gateways, pods):
    gw = gateways["open"]
    busy, idle = pods
    stop = threading.Event()
    threads = keep_busy(busy, 6, stop)
    try:
        wait_for(lambda: busy.metric("model_service_num_requests_running") >= 6, 60,
                 message="busy pod running its 6 streams")
        # the gateway sees it from its own scrape of the pod's metrics
        busy_key = f"127.0.0.1:{busy.http_port}"
        httpx.get(f"{gw.url}/v1/models", headers=auth("alice"), timeout=30)  # lists the pods, if not yet
        wait_for(lambda: (gauge(gw.prometheus(), "llm_gateway_instance_load", instance=busy_key, kind="running")
                          or 0) >= 6, 30, message="the gateway's scrape of the busy pod")
        done_busy = busy.metric("model_service_e2e_request_latency_seconds_count")
        done_idle = idle.metric("model_service_e2e_request_latency_seconds_count")
        for _ in range(6):
            r = httpx.post(f"{gw.url}/v1/chat/completions", headers=auth("alice"), json=chat(4), timeout=120)
            assert r.status_code == 200, r.text
        assert idle.metric("model_service_e2e_request_latency_seconds_count") - done_idle == 6
        assert busy.metric("model_service_e2e_request_latency_seconds_count") - done_busy == 0
        picks = gauge(gw.prometheus(), "llm_gateway_lb_picks_total", instance=f"127.0.0.1:{idle.http_port}",
                      reason="least_loaded")
        assert picks is not None and picks >= 6
        # the gateway's scrapes (several a second) stay out of the pods' access logs, like health probes
        assert '"path": "/metrics"' not in busy.log()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
