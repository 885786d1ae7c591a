"""`make run` as a user runs it: scripts/run_stack.py with the real r-nacos, one real pod and the real gateway.

Checks what the local stack promises about exposure (issue 13): every socket it listens on is on loopback, Nacos
refuses anonymous writes and the pods' and gateway's account cannot publish the policy, the gateway's actuator is
on its management port and not on the public one; and that Ctrl-C (SIGINT) stops it all with exit code 0.
Ports are free ones and the run folder is temporary, so a `make run` on this machine is not disturbed.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import GATEWAY_JAR, ROOT, free_port, need_jar
from nacos_fixtures import rnacos_bin

pytestmark = pytest.mark.slow

START_TIMEOUT_S = 420  # a first start converts the model; the JVM is slow on a loaded machine
STOP_TIMEOUT_S = 120


def _free_port_with(offsets) -> int:
    """A free port P with P + each of ``offsets`` free too (r-nacos: +1000 gRPC, +2000 console; replicas: +1 ...)."""
    for _ in range(200):
        port = free_port()
        if port + max(offsets, default=0) > 65535:
            continue
        try:
            for offset in offsets:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no free port P with P + {list(offsets)} free")


class Stack:
    def __init__(self, run_dir: Path, replicas: int = 1):
        self.run_dir = run_dir
        self.nacos_port = _free_port_with((1000, 2000))
        self.gateway_port, self.management_port = free_port(), free_port()
        # replica i listens on http_port + i and grpc_port + i
        extra = range(1, replicas)
        self.http_port, self.grpc_port = _free_port_with(extra), _free_port_with(extra)
        self.lines: list[str] = []
        self.up = threading.Event()
        cmd = [sys.executable, str(ROOT / "scripts" / "run_stack.py"), "--run-dir", str(run_dir),
               "--nacos-port", str(self.nacos_port), "--gateway-port", str(self.gateway_port),
               "--gateway-management-port", str(self.management_port),
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), "--replicas", str(replicas)]
        env = {**os.environ, "RNACOS_BIN": str(rnacos_bin()), "DEV_API_KEY": "sk-test-run-stack"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("The stack is up"):
                self.up.set()

    def output(self) -> str:
        return "".join(self.lines[-80:])

    def wait_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.up.wait(1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"run_stack.py did not come up (exit {self.proc.poll()}):\n{self.output()}")

    def processes(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def kill(self) -> None:
        """Last resort: the script and what it started, by pid."""
        for p in [*self.processes(), psutil.Process(self.proc.pid)] if self.proc.poll() is None else []:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(30)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    need_jar(GATEWAY_JAR)
    s = Stack(tmp_path_factory.mktemp("run-stack"))
    try:
        s.wait_up()
        yield s
    finally:
        if s.proc.poll() is None:
            s.kill()


def nacos_token(stack: Stack, admin: bool) -> str:
    env = dict(line.split("=", 1) for line in (stack.run_dir / "rnacos" / "accounts.env").read_text().splitlines())
    user, password = ((env["NACOS_ADMIN_USERNAME"], env["NACOS_ADMIN_PASSWORD"]) if admin
                      else (env["NACOS_USERNAME"], env["NACOS_PASSWORD"]))
    r = httpx.post(f"http://127.0.0.1:{stack.nacos_port}/nacos/v1/auth/login",
                   data={"username": user, "password": password})
    assert r.status_code == 200, r.text
    return r.json()["accessToken"]


def test_everything_listens_on_loopback_only(stack):
    listening = []
    for p in stack.processes():
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    listening.append((p.name(), c.laddr.ip, c.laddr.port))
        except psutil.NoSuchProcess:
            pass
    ports = {port for _, _, port in listening}
    expected = {stack.nacos_port, stack.nacos_port + 1000, stack.nacos_port + 2000, stack.gateway_port,
                stack.management_port, stack.http_port, stack.grpc_port}
    assert expected <= ports, f"missing listeners: {expected - ports}; found {listening}"
    public = [entry for entry in listening if entry[1] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not public, f"listening beyond loopback: {public}"


def test_accounts_file_is_private(stack):
    mode = (stack.run_dir / "rnacos" / "accounts.env").stat().st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_nacos_refuses_anonymous_and_read_only_writes(stack):
    nacos = f"http://127.0.0.1:{stack.nacos_port}/nacos/v1"
    fake = {"serviceName": "model-service", "groupName": "DEFAULT_GROUP", "ip": "127.0.0.1", "port": "9",
            "ephemeral": "true"}
    assert httpx.post(f"{nacos}/ns/instance", data=fake).status_code == 403
    assert httpx.get(f"{nacos}/ns/instance/list", params={"serviceName": "model-service"}).status_code == 403
    policy = {"dataId": "model-service.yaml", "group": "DEFAULT_GROUP", "content": "max_waiting_requests: 0\n"}
    assert httpx.post(f"{nacos}/cs/configs", data=policy).status_code == 403
    # the pods' and gateway's account reads the registry but cannot publish the policy
    service = {"accessToken": nacos_token(stack, admin=False)}
    listed = httpx.get(f"{nacos}/ns/instance/list", params={"serviceName": "model-service", **service})
    assert listed.status_code == 200 and len(listed.json()["hosts"]) == 1, listed.text
    published = httpx.post(f"{nacos}/cs/configs", data={**policy, **service})
    assert published.status_code != 200 or published.text.strip() != "true", published.text
    # the admin can
    admin = {"accessToken": nacos_token(stack, admin=True)}
    probe = {"dataId": "run-stack-test", "group": "DEFAULT_GROUP", "content": "x"}
    assert httpx.post(f"{nacos}/cs/configs", data={**probe, **admin}).text.strip() == "true"


def test_actuator_only_on_the_management_port(stack):
    public = httpx.get(f"http://127.0.0.1:{stack.gateway_port}/actuator/prometheus")
    assert public.status_code in (401, 404), public.text[:200]
    health = httpx.get(f"http://127.0.0.1:{stack.management_port}/actuator/health")
    assert health.status_code == 200 and health.json()["status"] == "UP"
    assert httpx.get(f"http://127.0.0.1:{stack.management_port}/actuator/prometheus").status_code == 200


def test_chat_through_the_gateway(stack):
    r = httpx.post(f"http://127.0.0.1:{stack.gateway_port}/v1/chat/completions", timeout=120,
                   headers={"Authorization": "Bearer sk-test-run-stack"},
                   json={"model": "smollm2-135m-instruct", "max_tokens": 4, "temperature": 0,
                         "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_ctrl_c_stops_everything(stack):
    """Last in this module: SIGINT, as Ctrl-C on the terminal sends it to the script."""
    children = stack.processes()
    assert children
    stack.proc.send_signal(signal.SIGINT)
    try:
        code = stack.proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stack.kill()
        pytest.fail(f"run_stack.py did not stop within {STOP_TIMEOUT_S}s:\n{stack.output()}")
    assert code == 0, stack.output()
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {[p.pid for p in alive]}"
    assert "stopped" in stack.output()
