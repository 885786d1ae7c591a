"""A real Nacos for tests: r-nacos (Rust; Nacos 1.x HTTP OpenAPI + 2.x gRPC), no Docker.

The binary comes from `make nacos` (cargo, cached in ~/.cache/model-service). Each server runs on a
free HTTP port P whose P+1000 is free too (Nacos 2.x clients always dial gRPC at HTTP port + 1000),
with its data in a temporary folder, and is stopped by its pid.

r-nacos 0.8.8 can lose a start-up race on a fresh data folder (its raft state machine applies the
first log entry before it is wired up, and config writes then never apply). So one data folder is
initialised per test session, checked with a config round trip (retried on a new folder if needed),
and copied for every server.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

RNACOS_VERSION = "0.8.8"
DEFAULT_BIN = Path.home() / ".cache" / "model-service" / f"rnacos-{RNACOS_VERSION}" / "bin" / "rnacos"
GRPC_OFFSET = 1000  # fixed by the Nacos 2.x protocol: clients derive the gRPC port from the HTTP port


def rnacos_bin() -> Path:
    """The r-nacos binary, or skip (fail under `make test`, which builds it) when it is missing."""
    for candidate in (os.environ.get("RNACOS_BIN"), DEFAULT_BIN, shutil.which("rnacos")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    message = f"r-nacos not found (looked at $RNACOS_BIN, {DEFAULT_BIN}, PATH); run `make nacos`"
    if os.environ.get("MODEL_SERVICE_REQUIRE_NACOS"):
        pytest.fail(message)
    pytest.skip(message)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_nacos_port() -> int:
    """A free HTTP port P with P + 1000 free as well."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + GRPC_OFFSET <= 65535 and _port_free(port + GRPC_OFFSET):
            return port
    raise RuntimeError("no free port pair (P, P+1000) found")


class RNacos:
    """One r-nacos process. ``start()``/``stop()`` may be repeated (a restart keeps the data folder,
    so configs survive and ephemeral instances do not, as with a real Nacos restart)."""

    def __init__(self, workdir: Path, port: int | None = None, seed: Path | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_nacos_port()
        self.data_dir = self.workdir / "data"
        if seed is not None and not self.data_dir.exists():
            shutil.copytree(seed, self.data_dir)
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"rnacos-{self.starts}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, wait: bool = True) -> RNacos:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RNACOS_")},
            "RNACOS_HTTP_PORT": str(self.port),
            "RNACOS_GRPC_PORT": str(self.port + GRPC_OFFSET),
            "RNACOS_HTTP_CONSOLE_PORT": "0",  # no separate console
            "RNACOS_SDK_HOST": "127.0.0.1",
            "RNACOS_DATA_DIR": str(self.data_dir),
            "RNACOS_HTTP_WORKERS": "1",
            "RUST_LOG": "warn",
        }
        with open(self.log_path, "wb") as log_file:
            # cwd is our own folder: r-nacos reads a .env file from its working directory
            self.proc = subprocess.Popen([str(rnacos_bin())], cwd=self.workdir, env=env,
                                         stdout=log_file, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15) -> None:
        """Up when a config write is readable back (the raft state machine works)."""
        deadline = time.monotonic() + timeout
        probe = f"probe-{self.starts}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"r-nacos exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if "panicked at" in self.log():
                raise RuntimeError(f"r-nacos panicked:\n{self.log()[-3000:]}")
            try:
                if self.publish_config("__probe__.txt", probe) and self.get_config("__probe__.txt") == probe:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"r-nacos not ready in {timeout}s:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()

    # ---------------------------------------------------------------- the Nacos HTTP OpenAPI
    def instances(self, service: str = "model-service", group: str = "DEFAULT_GROUP") -> list[dict]:
        r = httpx.get(f"{self.url}/nacos/v1/ns/instance/list",
                      params={"serviceName": service, "groupName": group}, timeout=5)
        r.raise_for_status()
        return r.json().get("hosts") or []

    def publish_config(self, data_id: str, content: str, group: str = "DEFAULT_GROUP") -> bool:
        r = httpx.post(f"{self.url}/nacos/v1/cs/configs",
                       data={"dataId": data_id, "group": group, "content": content}, timeout=5)
        return r.status_code == 200 and r.text.strip() == "true"

    def get_config(self, data_id: str, group: str = "DEFAULT_GROUP") -> str | None:
        r = httpx.get(f"{self.url}/nacos/v1/cs/configs", params={"dataId": data_id, "group": group}, timeout=5)
        return r.text if r.status_code == 200 else None


def make_seed(root: Path, attempts: int = 6) -> Path:
    """An initialised r-nacos data folder (see the module docstring) to copy for each server."""
    root = Path(root)
    for attempt in range(attempts):
        work = root / f"seed-{attempt}"
        server = RNacos(work)
        try:
            server.start(wait=False)
            server.wait_ready(timeout=5)
        except (RuntimeError, TimeoutError):
            continue
        finally:
            server.stop()
        return server.data_dir
    raise RuntimeError(f"r-nacos did not initialise in {attempts} attempts; logs under {root}")


def wait_for(predicate, timeout: float, interval: float = 0.25, message: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"{message} not reached in {timeout}s" + (f" (last error: {last_exc})" if last_exc else ""))


def start_seeded_rnacos(tmp_path_factory, prefix: str) -> RNacos:
    """A started r-nacos for one test module, on a copy of a data folder known to have initialised."""
    rnacos_bin()
    seed = make_seed(tmp_path_factory.mktemp(f"{prefix}-rnacos-seed"))
    return RNacos(tmp_path_factory.mktemp(f"{prefix}-rnacos"), seed=seed).start()
