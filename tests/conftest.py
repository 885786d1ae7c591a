"""Shared fixtures: real servers on free loopback ports, the real default model, a tiny GLM.

Servers are started as subprocesses (`python -m model_service serve`) and stopped by their pid.
"""

from __future__ import annotations

import os
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
