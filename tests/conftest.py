"""Shared fixtures: real servers on free loopback ports, the real default model, a tiny GLM.

Servers are started as subprocesses (`python -m model_service serve`) and stopped by their pid.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-internal-key"


def ensure_grpc_stubs() -> None:
    """Generate the gRPC stubs like `make proto` when they are missing or older than proto/ (fresh clone)."""
    gen = ROOT / "model_service" / "gen"
    protos = sorted((ROOT / "proto").rglob("*.proto"))
    marker = gen / "llm" / "v1" / "llm_service_pb2_grpc.py"
    if marker.is_file() and all(p.stat().st_mtime <= marker.stat().st_mtime for p in protos):
        return
    gen.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={gen}", f"--pyi_out={gen}",
                    f"--grpc_python_out={gen}", *(str(p.relative_to(ROOT)) for p in protos)], cwd=ROOT, check=True)
    for package in (gen / "llm", gen / "llm" / "v1"):
        (package / "__init__.py").touch()


ensure_grpc_stubs()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, /, **labels: str) -> float:
        """The sum of the pod's ``/metrics`` samples ``name`` whose labels include ``labels``."""
        return metric_sum(httpx.get(f"{self.base_url}/metrics", timeout=10).text, name, **labels)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.base_url}/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_server(tmp_dir: Path, *args: str, env: dict | None = None, wait: bool = True) -> ServerProcess:
    http_port, grpc_port = free_port(), free_port()
    log_path = tmp_dir / f"server-{http_port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "model_service", "serve", "--host", "127.0.0.1",
           "--http-port", str(http_port), "--grpc-port", str(grpc_port), *args]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, http_port, grpc_port, log_path)
    if wait:
        try:
            server.wait_ready()
        except Exception:
            server.stop(signal.SIGKILL)
            raise
    return server


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> ServerProcess:
    """The real service on the embedded default model, with the internal API key on."""
    srv = start_server(tmp_path_factory.mktemp("server"), env={"MODEL_SERVICE_API_KEY": API_KEY})
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server) -> httpx.Client:
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=120) as c:
        yield c


@pytest.fixture(scope="session")
def smollm():
    """The default model loaded in-process, for engine-level tests."""
    from model_service.llm.loader import load_model

    return load_model("smollm2-135m-instruct")


def chat_ids(tokenizer, question: str) -> list[int]:
    from model_service.llm.chat import encode_chat

    return encode_chat(tokenizer, [{"role": "user", "content": question}])


# ---------------------------------------------------------------------------------------- pods in Nacos, the gateway
# Shared by tests/test_gateway_e2e.py and tests/test_faults.py (real r-nacos, real pods, the real gateway jar).
GATEWAY_JAR = ROOT / "java-gateway" / "gateway" / "target" / "llm-gateway.jar"
CLIENT_JAR = ROOT / "java-gateway" / "grpc-client" / "target" / "llm-grpc-client.jar"


def sha256(value: str) -> str:
    import hashlib

    return hashlib.sha256(value.encode()).hexdigest()


def need_jar(path: Path) -> Path:
    """The jar (and java), or skip; fail under `make test` (MODEL_SERVICE_REQUIRE_GATEWAY=1), which builds it."""
    import shutil

    if path.is_file() and shutil.which("java"):
        return path
    message = f"{path} (or java) missing; run `make gateway`"
    if os.environ.get("MODEL_SERVICE_REQUIRE_GATEWAY"):
        pytest.fail(message)
    pytest.skip(message)


def start_pods(tmp_dir: Path, nacos, count: int, *args: str, env: dict | None = None,
               listed_timeout: float = 30) -> list[ServerProcess]:
    """``count`` model-service pods registered in ``nacos`` (an RNacos), started together; returns once all are
    ready and Nacos lists every one of them. On failure the started pods are killed."""
    from nacos_fixtures import wait_for

    servers = [start_server(tmp_dir, "--nacos-server", nacos.address, *args, env=env, wait=False)
               for _ in range(count)]
    try:
        for srv in servers:
            srv.wait_ready()
        ports = {srv.http_port for srv in servers}
        wait_for(lambda: ports <= {h["port"] for h in nacos.instances()}, listed_timeout,
                 message=f"pods {sorted(ports)} listed in Nacos")
    except BaseException:
        for srv in servers:
            srv.stop(signal.SIGKILL)
        raise
    return servers


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    """The response is ``status`` with an OpenAI error object (message, type, param, code); returns the error."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"]
    return error


def metric_values(text: str, name: str, /, **labels: str) -> list[float]:
    """Values of the Prometheus samples ``name`` / ``name{...}`` in ``text`` whose labels include ``labels``."""
    values = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            sample = dict(re.findall(r'(\w+)="([^"]*)"', line[:line.rindex("}")]))
        elif line.startswith(name + " "):
            sample = {}
        else:
            continue
        if all(sample.get(k) == v for k, v in labels.items()):
            values.append(float(line.rsplit(" ", 1)[1]))
    return values


def metric_sum(text: str, name: str, /, **labels: str) -> float:
    """The sum of ``metric_values`` (0 when there is no such sample)."""
    return sum(metric_values(text, name, **labels))


class Gateway:
    """The gateway jar as a subprocess (stopped by its pid). ``url``: the public port; ``management_url``: the
    actuator's own port (health, Prometheus)."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path, management_port: int):
        self.proc, self.port, self.log_path = proc, port, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.management_port = management_port
        self.management_url = f"http://127.0.0.1:{management_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_log(self) -> list[dict]:
        """The access log's entries so far (one JSON line each, logger ``llm_gateway.access``)."""
        return [json.loads(line) for line in self.log().splitlines()
                if line.startswith("{") and '"llm_gateway.access"' in line]

    def prometheus(self) -> str:
        r = httpx.get(f"{self.management_url}/actuator/prometheus", timeout=30)
        assert r.status_code == 200, r.text
        return r.text

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_gateway(tmp_dir: Path, nacos_address: str, internal_key: str, keys: dict[str, tuple[str, int, int]],
                  *extra_args: str, timeout: float = 120, env: dict | None = None) -> Gateway:
    """The gateway on a free port (and its actuator on another), finding pods in Nacos at ``nacos_address``.
    ``keys``: caller name -> (plain key, requests/min, tokens/min); the gateway gets only their SHA-256.
    ``env``: extra environment (e.g. GATEWAY_UPSTREAM_ALLOWED_NETWORKS). Returns once it routes
    ``GET /v1/models`` (with the first key) to a pod."""
    need_jar(GATEWAY_JAR)
    port, management_port = free_port(), free_port()
    log_path = tmp_dir / f"gateway-{port}.log"
    args = [
        "java", "-Xmx384m", "-XX:TieredStopAtLevel=1", "-jar", str(GATEWAY_JAR),
        f"--server.port={port}", "--server.address=127.0.0.1",
        f"--management.server.port={management_port}",
        f"--spring.cloud.nacos.discovery.server-addr={nacos_address}",
        f"--llm-gateway.internal-api-key={internal_key}",
    ]
    for i, (name, (key, rpm, tpm)) in enumerate(keys.items()):
        args += [f"--llm-gateway.api-keys[{i}].name={name}", f"--llm-gateway.api-keys[{i}].sha256={sha256(key)}",
                 f"--llm-gateway.api-keys[{i}].requests-per-minute={rpm}",
                 f"--llm-gateway.api-keys[{i}].tokens-per-minute={tpm}"]
    args += list(extra_args)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, "GATEWAY_LOG_FORMAT": "logstash", **(env or {})})
    gw = Gateway(proc, port, log_path, management_port)
    first_key = next(iter(keys.values()))[0]
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode}:\n{gw.log()[-4000:]}")
            try:
                r = httpx.get(f"{gw.url}/v1/models", headers={"Authorization": f"Bearer {first_key}"}, timeout=5)
                if r.status_code == 200:
                    return gw
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"gateway not routing in {timeout}s:\n{gw.log()[-4000:]}")
            time.sleep(0.5)
    except BaseException:
        gw.stop()
        raise
