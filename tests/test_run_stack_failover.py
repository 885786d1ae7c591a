"""`make run REPLICAS=2` as a cluster (issue 12): SIGKILL one model service under steady traffic through the gateway.

The real stack (scripts/run_stack.py: r-nacos, two real pods, the real gateway) on free loopback ports with a
temporary run folder. While a few clients keep calling the gateway, pod 1 is killed with SIGKILL (no deregistration,
no drain): at least 99% of the requests must still succeed, run_stack.py must restart the pod (a new process on the
same ports), the pod must register in Nacos again and get traffic from the gateway, Nacos, the gateway and pod 0
must keep running, and Ctrl-C must still stop everything with exit code 0.

"Registered again" is checked on the restarted process's own request counter (a new process starts at 0, so a
request it finished was routed to it after its new registration) and on Nacos's healthy list, never on the
instance metadata's pid: r-nacos keeps the metadata of an ip:port's first registration (README).
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time

import httpx
import psutil
import pytest
from conftest import GATEWAY_JAR, need_jar
from test_run_stack import STOP_TIMEOUT_S, Stack, nacos_token

pytestmark = pytest.mark.slow

CLIENTS = 3
MIN_REQUESTS = 150  # so that one lost request is under 1%
TRAFFIC_LIMIT_S = 420  # the whole fault window, bounded (a restarted pod loads the model again)
BACK_TIMEOUT_S = 300  # from the kill to the restarted pod registered in Nacos again


class Traffic:
    """CLIENTS threads calling the gateway back to back with short chats; each outcome is recorded."""

    def __init__(self, stack: Stack):
        self.url = f"http://127.0.0.1:{stack.gateway_port}/v1/chat/completions"
        self.results: list[tuple[float, int | str]] = []  # (time, HTTP status or the exception's name)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(CLIENTS)]
        for t in self.threads:
            t.start()

    def _client(self, n: int) -> None:
        body = {"model": "smollm2-135m-instruct", "max_tokens": 2, "temperature": 0,
                "messages": [{"role": "user", "content": f"Say a number, client {n}"}]}
        with httpx.Client(headers={"Authorization": "Bearer sk-test-run-stack"}, timeout=120) as client:
            while not self.stop.is_set():
                try:
                    outcome: int | str = client.post(self.url, json=body).status_code
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                self.results.append((time.monotonic(), outcome))

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(150)

    def failures(self) -> list:
        return [r for r in self.results if r[1] != 200]


def pod_process(stack: Stack, http_port: int) -> psutil.Process:
    """The `python -m model_service serve` child of run_stack.py on ``http_port``."""
    for p in stack.processes():
        try:
            cmd = p.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "model_service" in cmd and "--http-port" in cmd and cmd[cmd.index("--http-port") + 1] == str(http_port):
            return p
    raise AssertionError(f"no model service on {http_port} among {[p.pid for p in stack.processes()]}")


def requests_finished(http_port: int) -> float:
    """The pod's own count of finished requests (its /metrics)."""
    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=5).text
    return sum(float(m.group(1)) for m in re.finditer(r"^model_service_requests_finished_total\{[^}]*\} (\S+)$",
                                                          text, re.MULTILINE))


def wait_for(what: str, check, timeout: float, stack: Stack) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert stack.proc.poll() is None, f"run_stack.py stopped while waiting for {what}:\n{stack.output()}"
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{what}: not within {timeout:.0f}s\n{stack.output()}")


def healthy_ports(stack: Stack) -> set[int]:
    r = httpx.get(f"http://127.0.0.1:{stack.nacos_port}/nacos/v1/ns/instance/list",
                  params={"serviceName": "model-service", "accessToken": nacos_token(stack, admin=False)})
    assert r.status_code == 200, r.text
    return {h["port"] for h in r.json()["hosts"] if h["healthy"]}


def test_a_killed_pod_is_restarted_while_the_gateway_keeps_serving(tmp_path):
    need_jar(GATEWAY_JAR)
    stack = Stack(tmp_path / "run", replicas=2)
    traffic = None
    try:
        stack.wait_up()
        pod0, pod1 = stack.http_port, stack.http_port + 1
        assert healthy_ports(stack) == {pod0, pod1}
        others = {p.pid for p in stack.processes() if p.pid != pod_process(stack, pod1).pid}

        traffic = Traffic(stack)
        wait_for("traffic flowing", lambda: sum(1 for r in traffic.results if r[1] == 200) >= 2 * CLIENTS, 120, stack)
        victim = pod_process(stack, pod1)
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()

        wait_for("run_stack.py restarting model-service-1",
                 lambda: "restarting model-service-1" in "".join(stack.lines), 60, stack)
        wait_for("model-service-1 registered in Nacos again",
                 lambda: "model-service-1 is registered in Nacos again" in "".join(stack.lines), BACK_TIMEOUT_S, stack)
        restarted = pod_process(stack, pod1)
        assert restarted.pid != victim.pid
        assert pod1 in healthy_ports(stack)
        # the gateway routes to the new process: it finishes requests of its own
        wait_for("the gateway routing to the restarted pod", lambda: requests_finished(pod1) >= 1, 120, stack)
        wait_for(f"{MIN_REQUESTS} requests since the kill",
                 lambda: sum(1 for t, _ in traffic.results if t >= killed_at) >= MIN_REQUESTS,
                 max(10.0, TRAFFIC_LIMIT_S - (time.monotonic() - killed_at)), stack)
        traffic.finish()

        total, failed = len(traffic.results), traffic.failures()
        print(f"{total} requests through the gateway, {len(failed)} failed {failed}; model-service-1 back and "
              f"routed to {time.monotonic() - killed_at:.0f}s after the kill (with {MIN_REQUESTS} requests since)")
        print("".join(line for line in stack.lines if line.startswith("[")))  # run_stack.py's restart lines
        assert len(failed) <= total * 0.01, f"{len(failed)} of {total} failed: {failed[:10]}\n{stack.output()}"
        assert healthy_ports(stack) == {pod0, pod1}
        assert stack.proc.poll() is None
        still = {p.pid for p in stack.processes()}
        assert others <= still, "Nacos, the gateway or model-service-0 was restarted too"
        output = "".join(stack.lines)
        assert re.search(r"model-service-1 exited with signal SIGKILL; restarting it in \d+s", output), output

        children = stack.processes()
        stack.proc.send_signal(signal.SIGINT)
        try:
            code = stack.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"run_stack.py did not stop within {STOP_TIMEOUT_S}s:\n{stack.output()}")
        assert code == 0, stack.output()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left running: {[p.pid for p in alive]}"
    finally:
        if traffic:
            traffic.finish()
        if stack.proc.poll() is None:
            stack.kill()
