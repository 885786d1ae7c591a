#!/usr/bin/env python3
"""`make run`: the whole stack on this machine, no Docker: r-nacos, N model services, the gateway.

    r-nacos        127.0.0.1:8848 (HTTP) / 9848 (gRPC)        data in .run/rnacos (kept between runs), login
                   127.0.0.1:10848 (console)                   required (accounts in .run/rnacos/accounts.env)
    model-service  127.0.0.1:8000+i (HTTP) / 50051+i (gRPC)   registered in Nacos, internal API key on
    gateway        127.0.0.1:8080 (API) / 8081 (actuator)      finds the pods in Nacos; a development key

Everything listens on loopback only: this stack is for one machine. r-nacos runs with its open-API auth on:
the admin account (console, publishing the policy) and a read-only service account that the model services
and the gateway log in with are generated on the first run (docs/security.md). The gateway routes only to
instances on loopback addresses.

Prints how to call it, then waits. Ctrl-C (SIGINT) or SIGTERM stops the parts in order: the gateway
first (no new traffic), then the model services with SIGTERM (they deregister from Nacos and finish
their running requests), then Nacos. A second Ctrl-C kills what is left at once. When any part fails
to start, the others are stopped and the tail of its log is printed.

Once the stack is up it behaves like the deployments it stands for: a model service that dies (a crash, an
OOM kill, `kill -9` to see the failover) is restarted on its ports with a bounded exponential back-off (1 s,
doubled per crash in a row, at most 30 s) while the gateway routes to the other pods; it registers in Nacos
again by itself. A pod that keeps dying before it is ready (4 restarts in a row: a broken model) stops the
stack with its log's tail. Nacos or the gateway dying stops the stack, with its log's tail: here each is a
single instance, so its death is an outage anyway, and stopping loudly shows what broke it rather than
bouncing it (in Kubernetes their own Deployments restart them).

Options: --replicas N (model services; `make run REPLICAS=2`), ports (--gateway-port,
--gateway-management-port, --nacos-port, --http-port, --grpc-port: the first replica's, +1 per replica),
--run-dir; anything after `--` goes to
every `python -m model_service serve` (e.g. `-- --model /models/glm-4-9b-chat-hf`). The development key
is kept in .run/dev-api-key (or set DEV_API_KEY); the internal key between gateway and pods is new on
every run. Logs: .run/logs/.

Only the standard library: this runs with the project's virtualenv Python, but imports nothing from it.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RNACOS_VERSION = "0.8.8"
DEFAULT_RNACOS = Path.home() / ".cache" / "model-service" / f"rnacos-{RNACOS_VERSION}" / "bin" / "rnacos"
GATEWAY_JAR = ROOT / "java-gateway" / "gateway" / "target" / "llm-gateway.jar"
NACOS_GRPC_OFFSET = 1000  # Nacos 2.x clients dial gRPC at HTTP port + 1000
NACOS_CONSOLE_OFFSET = 2000  # r-nacos's console (the only place where users are managed): HTTP port + 2000
LOOPBACK_NETWORKS = "127.0.0.0/8,::1/128"  # where the gateway may route (and send the internal key) here
PR_SET_PDEATHSIG = 1


class StartError(Exception):
    """A part failed to start (the message says which and why)."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during start-up."""


# ---------------------------------------------------------------------------------------- signals
class Signals:
    """Counts SIGINT/SIGTERM/SIGHUP; waits poll it (no exception is raised from inside a handler)."""

    def __init__(self) -> None:
        self.count = 0
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.count += 1
        if self.count == 1:
            print(f"\n{signal.Signals(signum).name}: stopping the stack (again to kill at once)", flush=True)
        elif self.count == 2:
            print("\nkilling what is left", flush=True)

    @property
    def stop(self) -> bool:
        return self.count > 0

    @property
    def force(self) -> bool:
        return self.count > 1

    def sleep(self, seconds: float) -> None:
        if self.stop:
            raise Interrupted
        time.sleep(seconds)


# ---------------------------------------------------------------------------------------- processes
def _die_with_parent() -> None:
    """In the child: SIGTERM when this script dies, even by SIGKILL (Linux), so nothing is left behind."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Part:
    """One child process, in its own session: a Ctrl-C on the terminal reaches only this script,
    which then stops the children in the right order."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict | None = None,
                 cwd: Path = ROOT, stop_timeout: float = 30):
        """``env``: the child's whole environment (default: this process's)."""
        self.name, self.cmd, self.log_path, self.env, self.cwd = name, cmd, log_path, env, cwd
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen | None = None

    def start(self, append: bool = False) -> Part:
        """``append``: a restart adds to the log (the lines before a crash stay); a new stack starts a new one."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab" if append else "wb") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env if self.env is not None else os.environ,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in text[-lines:])

    def check_alive(self) -> None:
        code = self.exited()
        if code is not None:
            raise StartError(f"{self.name} exited with code {code} during start-up. "
                             f"Last lines of {rel(self.log_path)}:\n{self.tail()}")


def stop_parts(parts: list[Part], signals: Signals) -> None:
    """SIGTERM all of ``parts`` together, wait for them (bounded), SIGKILL what is left."""
    live = [p for p in parts if p.running]
    if not live:
        return
    names = ", ".join(p.name for p in live)
    print(f"stopping {names} ...", end="", flush=True)
    started = time.monotonic()
    for p in live:
        with _suppress(ProcessLookupError):
            p.proc.send_signal(signal.SIGKILL if signals.force else signal.SIGTERM)
    deadline = started + max(p.stop_timeout for p in live)
    while any(p.running for p in live) and time.monotonic() < deadline and not signals.force:
        time.sleep(0.1)
    killed = []
    for p in live:
        if p.running:
            killed.append(p.name)
            with _suppress(ProcessLookupError):
                p.proc.kill()
            p.proc.wait(10)
    codes = ", ".join(f"{p.name}={p.proc.returncode}" + (" (SIGTERM)" if p.proc.returncode == 143 else "")
                      for p in live)
    note = f"; killed {', '.join(killed)}" if killed else ""
    print(f" stopped in {time.monotonic() - started:.1f}s (exit codes {codes}{note})", flush=True)


class _suppress:
    def __init__(self, *exc):
        self.exc = exc

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, self.exc)


# ---------------------------------------------------------------------------------------- helpers
def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def http(method: str, url: str, data: dict | None = None, headers: dict | None = None,
         timeout: float = 5) -> tuple[int, str]:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def http_json(method: str, url: str, body: dict, headers: dict | None = None, timeout: float = 5) -> tuple[int, dict]:
    """A JSON request; returns (status, the parsed answer or {})."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, text = r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, {}


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_until(what: str, check, timeout: float, parts: list[Part], signals: Signals, interval: float = 0.3):
    """Poll ``check`` until truthy; fail fast when one of ``parts`` exits or on Ctrl-C."""
    deadline = time.monotonic() + timeout
    while True:
        for p in parts:
            p.check_alive()
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        if time.monotonic() > deadline:
            logs = "\n".join(f"  last lines of {rel(p.log_path)}:\n{p.tail(15)}" for p in parts)
            raise StartError(f"{what}: not reached in {timeout:.0f}s\n{logs}")
        signals.sleep(interval)


def dev_api_key(run_dir: Path) -> str:
    if os.environ.get("DEV_API_KEY"):
        return os.environ["DEV_API_KEY"]
    path = run_dir / "dev-api-key"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    key = "sk-dev-" + secrets.token_hex(16)
    path.write_text(key + "\n")
    path.chmod(0o600)
    return key


def find_rnacos() -> Path:
    for candidate in (os.environ.get("RNACOS_BIN"), DEFAULT_RNACOS, shutil.which("rnacos")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise StartError(f"r-nacos not found (looked at $RNACOS_BIN, {DEFAULT_RNACOS}, PATH): run `make nacos`")


# ---------------------------------------------------------------------------------------- Nacos accounts
class NacosAccounts:
    """The r-nacos accounts of this stack, generated with its data folder and kept next to it (0600):

    - the admin (r-nacos's initial user, created from RNACOS_INIT_ADMIN_* when the data folder is new): the
      console, and publishing the policy document;
    - a service account with r-nacos's "visitor" role, which the model services and the gateway log in with:
      it may read configs but not publish them. r-nacos 0.8.8 checks roles only for config writes (its naming
      API takes any logged-in user), so the same account also registers the pods.
    """

    SERVICE_USER = "llm-stack"

    def __init__(self, path: Path):
        self.path = path
        values = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        self.admin_user, self.admin_password = values["NACOS_ADMIN_USERNAME"], values["NACOS_ADMIN_PASSWORD"]
        self.user, self.password = values["NACOS_USERNAME"], values["NACOS_PASSWORD"]

    @classmethod
    def for_data(cls, rnacos_dir: Path) -> NacosAccounts:
        """The accounts of rnacos_dir/data; new ones (and a new data folder) when there are none. A data folder
        from before auth (its admin is admin/admin) is set aside: its accounts are unknown."""
        path, data_dir = rnacos_dir / "accounts.env", rnacos_dir / "data"
        if not path.is_file():
            if data_dir.exists():
                aside = rnacos_dir / "data.before-auth"
                shutil.rmtree(aside, ignore_errors=True)
                data_dir.rename(aside)
                print(f"  (r-nacos data without accounts set aside in {rel(aside)}: Nacos now requires a login)",
                      flush=True)
            rnacos_dir.mkdir(parents=True, exist_ok=True)
            text = (f"NACOS_ADMIN_USERNAME=admin\nNACOS_ADMIN_PASSWORD={secrets.token_urlsafe(18)}\n"
                    f"NACOS_USERNAME={cls.SERVICE_USER}\nNACOS_PASSWORD={secrets.token_urlsafe(18)}\n")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        return cls(path)

    def token(self, port: int, admin: bool = False) -> str | None:
        """An open-API access token, or None when the login is refused."""
        user, password = (self.admin_user, self.admin_password) if admin else (self.user, self.password)
        status, text = http("POST", f"http://127.0.0.1:{port}/nacos/v1/auth/login",
                            {"username": user, "password": password})
        return json.loads(text).get("accessToken") if status == 200 else None

    def ensure_service_user(self, console_port: int) -> None:
        """Create (or reset) the service account through the console API, logged in as the admin."""
        console = f"http://127.0.0.1:{console_port}/rnacos/api/console/v2"
        # the console's login form takes the password base64-encoded (AES with a captcha, which is off here)
        status, text = http("POST", console + "/login/login", {
            "username": self.admin_user, "password": base64.b64encode(self.admin_password.encode()).decode(),
            "captcha": ""})
        body = json.loads(text) if status == 200 else {}
        if not body.get("success"):
            raise StartError(f"r-nacos console login as {self.admin_user} failed (HTTP {status} {text[:200]}); "
                             f"remove {rel(self.path.parent)} to start afresh")
        session = {"Cookie": f"token={body['data']['token']}"}
        user = {"username": self.user, "nickname": self.user, "password": self.password, "enable": True,
                "roles": "2"}  # 2: visitor (read-only on configs)
        for action in ("add", "update"):  # add overwrites in 0.8.8; update covers a version that refuses
            status, result = http_json("POST", f"{console}/user/{action}", user, headers=session)
            if status == 200 and result.get("success"):
                return
        raise StartError(f"r-nacos refused to create the service account {self.user}: {result}")


# ---------------------------------------------------------------------------------------- the parts
def start_nacos(args, run_dir: Path, logs: Path, signals: Signals) -> tuple[Part, NacosAccounts]:
    """r-nacos with its data in run_dir/rnacos, loopback only, open-API auth on. r-nacos 0.8.8 can lose a
    start-up race on a fresh data folder (config writes then never apply): a fresh folder that fails the
    config round trip is wiped and tried again (tests/nacos_fixtures.py does the same)."""
    binary = find_rnacos()
    rnacos_dir = run_dir / "rnacos"
    data_dir = rnacos_dir / "data"
    accounts = NacosAccounts.for_data(rnacos_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNACOS_")}
    env.update({
        "RNACOS_HTTP_PORT": str(args.nacos_port),
        "RNACOS_GRPC_PORT": str(args.nacos_port + NACOS_GRPC_OFFSET),
        "RNACOS_SDK_HOST": "127.0.0.1",
        "RNACOS_HTTP_CONSOLE_PORT": str(args.nacos_port + NACOS_CONSOLE_OFFSET),
        "RNACOS_CONSOLE_HOST": "127.0.0.1",
        "RNACOS_CONSOLE_ENABLE_CAPTCHA": "false",  # this script logs in to create the service account
        "RNACOS_ENABLE_OPEN_API_AUTH": "true",
        "RNACOS_INIT_ADMIN_USERNAME": accounts.admin_user,  # used when the data folder has no user yet
        "RNACOS_INIT_ADMIN_PASSWORD": accounts.admin_password,
        # its raft requests (which skip the user check) need this token
        "RNACOS_CLUSTER_TOKEN": secrets.token_hex(16),
        "RNACOS_DATA_DIR": str(data_dir),
        "RNACOS_HTTP_WORKERS": "2",
        "RUST_LOG": "warn",
    })
    url = f"http://127.0.0.1:{args.nacos_port}/nacos/v1/cs/configs"

    admin_token: list[str] = []  # logged in once (r-nacos limits logins per minute)

    def config_round_trip() -> bool:
        if not admin_token:
            token = accounts.token(args.nacos_port, admin=True)
            if not token:
                return False
            admin_token.append(token)
        token = admin_token[0]
        probe = secrets.token_hex(4)
        status, text = http("POST", url, {"dataId": "run-stack-probe", "group": "DEFAULT_GROUP", "content": probe,
                                          "accessToken": token})
        if status != 200 or text.strip() != "true":
            return False
        status, text = http("GET", url + "?" + urllib.parse.urlencode(
            {"dataId": "run-stack-probe", "group": "DEFAULT_GROUP", "accessToken": token}))
        return status == 200 and text == probe

    for attempt in range(5):
        admin_token.clear()
        fresh = not data_dir.exists()
        # cwd = its own folder: r-nacos reads a .env file from its working directory
        (run_dir / "rnacos").mkdir(parents=True, exist_ok=True)
        part = Part("nacos", [str(binary)], logs / "rnacos.log", env=env, cwd=run_dir / "rnacos", stop_timeout=10)
        part.start()
        try:
            wait_until("Nacos accepting config writes", config_round_trip, 5 if fresh else 20, [part], signals)
            accounts.ensure_service_user(args.nacos_port + NACOS_CONSOLE_OFFSET)
            wait_until("the Nacos service account logging in", lambda: accounts.token(args.nacos_port) is not None,
                       10, [part], signals)
            return part, accounts
        except Interrupted:
            stop_parts([part], signals)
            raise
        except StartError:
            stop_parts([part], signals)
            if not fresh:
                raise StartError(f"r-nacos does not work on its data in {rel(data_dir)}; "
                                 f"remove {rel(run_dir / 'rnacos')} to start afresh. Last lines of "
                                 f"{rel(part.log_path)}:\n{part.tail()}") from None
            shutil.rmtree(data_dir, ignore_errors=True)
            print(f"  (r-nacos lost its start-up race on a fresh data folder; attempt {attempt + 2})", flush=True)
    raise StartError(f"r-nacos did not initialise in 5 attempts; see {rel(logs / 'rnacos.log')}")


def model_service_part(i: int, args, internal_key: str, accounts: NacosAccounts, logs: Path) -> Part:
    http_port, grpc_port = args.http_port + i, args.grpc_port + i
    # secrets through the environment, not argv (which every local user can read)
    env = {**os.environ, "MODEL_SERVICE_API_KEY": internal_key, "PYTHONUNBUFFERED": "1",
           "MODEL_SERVICE_NACOS_USERNAME": accounts.user, "MODEL_SERVICE_NACOS_PASSWORD": accounts.password}
    if "MODEL_SERVICE_THREADS" not in os.environ:  # share the cores between the replicas
        env["MODEL_SERVICE_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // args.replicas))
    cmd = [sys.executable, "-m", "model_service", "serve", "--host", "127.0.0.1",
           "--http-port", str(http_port), "--grpc-port", str(grpc_port),
           "--nacos-server", f"127.0.0.1:{args.nacos_port}", *args.serve_args]
    # drain (30 s by default) + the gRPC grace (5 s) + margin
    return Part(f"model-service-{i}", cmd, logs / f"model-service-{i}.log", env=env, stop_timeout=50)


def start_gateway(args, internal_key: str, api_key: str, accounts: NacosAccounts, logs: Path) -> Part:
    if not GATEWAY_JAR.is_file():
        raise StartError(f"{rel(GATEWAY_JAR)} is missing: run `make gateway`")
    if not shutil.which("java"):
        raise StartError("java (17+) is not on PATH")
    cmd = ["java", *args.java_opts.split(), "-jar", str(GATEWAY_JAR),
           "--server.address=127.0.0.1", f"--server.port={args.gateway_port}",
           # actuator (health, Prometheus: callers' names, pod addresses) on its own loopback port
           "--management.server.address=127.0.0.1", f"--management.server.port={args.gateway_management_port}",
           # route only to (and send the internal key only to) instances on this machine, whatever Nacos lists
           f"--llm-gateway.upstream.allowed-networks={LOOPBACK_NETWORKS}",
           f"--spring.cloud.nacos.discovery.server-addr=127.0.0.1:{args.nacos_port}",
           "--llm-gateway.api-keys[0].name=dev",
           f"--llm-gateway.api-keys[0].sha256={hashlib.sha256(api_key.encode()).hexdigest()}",
           "--llm-gateway.api-keys[0].requests-per-minute=600",
           "--llm-gateway.api-keys[0].tokens-per-minute=200000",
           # the gateway does not register itself in Nacos: nothing to wait for after "deregistering" on stop
           "--spring.cloud.nacos.discovery.graceful-shutdown-wait-time=0"]
    # secrets through the environment, not argv: the internal key as application.yml reads it, the Nacos
    # account under Spring's own names for the properties
    env = {**os.environ, "MODEL_SERVICE_API_KEY": internal_key,
           "SPRING_CLOUD_NACOS_DISCOVERY_USERNAME": accounts.user,
           "SPRING_CLOUD_NACOS_DISCOVERY_PASSWORD": accounts.password}
    return Part("gateway", cmd, logs / "gateway.log", env=env, stop_timeout=35)


def models_ready(port: int, timeout: float = 5) -> bool:
    return http("GET", f"http://127.0.0.1:{port}/health/ready", timeout=timeout)[0] == 200


class NacosRegistry:
    """The model services' instances as Nacos lists them, read with the service account (one login, renewed
    when refused: r-nacos limits logins per minute)."""

    def __init__(self, port: int, accounts: NacosAccounts):
        self.port, self.accounts = port, accounts
        self._token: str | None = None

    def healthy_ports(self) -> set[int]:
        for _ in range(2):
            self._token = self._token or self.accounts.token(self.port)
            status, text = http("GET", f"http://127.0.0.1:{self.port}/nacos/v1/ns/instance/list?"
                                "serviceName=model-service&groupName=DEFAULT_GROUP",
                                headers={"accessToken": self._token or ""})
            if status == 200:
                return {h["port"] for h in json.loads(text).get("hosts") or [] if h.get("healthy", True)}
            self._token = None
        return set()


def say(message: str) -> None:
    """A line of the running stack's own log (this terminal), with the time: it runs for hours."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------- restarts
def _answers(check) -> bool:
    """``check()``, False when what it asks is not listening (yet) or answers nonsense."""
    try:
        return bool(check())
    except (OSError, ValueError):  # URLError, refused, reset and timeouts are all OSErrors
        return False


RESTART_BACKOFF_S = 1.0  # the first restart of a pod that died; doubled for each crash in a row ...
RESTART_BACKOFF_CAP_S = 30.0  # ... up to this
STABLE_AFTER_S = 60.0  # a pod ready for this long starts its back-off afresh when it dies again
GIVE_UP_AFTER_FAILED_STARTS = 4  # restarts in a row that never got ready (a broken model): stop the stack


def restart_delay(crashes: int) -> float:
    """The wait before restarting a pod that crashed ``crashes`` times in a row (1, 2, 4, ... at most the cap)."""
    return min(RESTART_BACKOFF_CAP_S, RESTART_BACKOFF_S * 2 ** (crashes - 1))


class PodSupervisor:
    """Restarts a model service that dies once the stack is up, as a Deployment restarts its pods, while the
    gateway routes around it (it drops the pod from Nacos's list, its retry moves requests to the other pods).

    Non-blocking: ``step()`` runs from the watch loop every half second and does one thing at most (start a due
    restart, notice an exit, poll readiness or the registration), so several pods can be down at once. A pod
    that dies waits RESTART_BACKOFF_S, doubled for each crash in a row, at most RESTART_BACKOFF_CAP_S; a pod
    ready for STABLE_AFTER_S is healthy again. GIVE_UP_AFTER_FAILED_STARTS restarts in a row that exit (or
    miss --ready-timeout) before they are ready raise StartError, which stops the stack with the log's tail.
    """

    def __init__(self, index: int, part: Part, http_port: int, ready_timeout: float, registry: NacosRegistry):
        self.index, self.part, self.http_port = index, part, http_port
        self.ready_timeout, self.registry = ready_timeout, registry
        now = time.monotonic()
        self.started_at, self.ready_at = now, now  # handed over running and ready (start-up checked both)
        self.registered = True
        self.crashes = 0  # in a row, for the back-off
        self.failed_starts = 0  # in a row, for giving up
        self.restarts = 0
        self.restart_at: float | None = None
        self.down_since: float | None = None

    @property
    def name(self) -> str:
        return self.part.name

    def step(self, now: float) -> None:
        if self.restart_at is not None:
            if now >= self.restart_at:
                self._restart(now)
            return
        code = self.part.exited()
        if code is not None:
            self._died(code, now)
        elif self.ready_at is None:
            if now - self.started_at > self.ready_timeout:
                say(f"{self.name} not ready in {self.ready_timeout:.0f}s: killing it")
                self.part.proc.kill()  # the next step counts a failed start
            elif _answers(lambda: models_ready(self.http_port, timeout=1)):
                self.ready_at, self.failed_starts = now, 0
                say(f"{self.name} is ready again (pid {self.part.proc.pid}, {now - self.down_since:.0f}s after it "
                    "died); waiting for its registration in Nacos")
        elif not self.registered:
            if _answers(lambda: self.http_port in self.registry.healthy_ports()):
                self.registered = True
                say(f"{self.name} is registered in Nacos again: the gateway routes to it")

    def _died(self, code: int, now: float) -> None:
        """Count the crash, give up or schedule the restart."""
        self.down_since = now
        how = f"signal {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else f"code {code}"
        if self.ready_at is None:
            self.failed_starts += 1
            if self.failed_starts >= GIVE_UP_AFTER_FAILED_STARTS:
                raise StartError(f"{self.name} exited with {how} before it was ready, {self.failed_starts} restarts "
                                 f"in a row: giving up. Last lines of {rel(self.part.log_path)}:\n{self.part.tail()}")
        elif now - self.ready_at >= STABLE_AFTER_S:
            self.crashes = 0
        self.crashes += 1
        delay = restart_delay(self.crashes)
        self.restart_at = now + delay
        say(f"{self.name} exited with {how}; restarting it in {delay:.0f}s (crash {self.crashes} in a row; "
            f"log {rel(self.part.log_path)}). The gateway routes to the other pods meanwhile.")
        if code > 0:  # its own failure, not a kill: show why
            print(self.part.tail(8), flush=True)

    def _restart(self, now: float) -> None:
        self.restart_at, self.ready_at, self.registered = None, None, False
        self.restarts += 1
        self.started_at = now
        self.part.start(append=True)
        say(f"restarting {self.name} (restart {self.restarts}, pid {self.part.proc.pid}) on HTTP "
            f"127.0.0.1:{self.http_port}")


# ---------------------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    serve_args: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, serve_args = argv[:at], argv[at + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- go to every `python -m model_service serve`.")
    p.add_argument("--replicas", type=int, default=int(os.environ.get("REPLICAS") or 1))
    p.add_argument("--gateway-port", type=int, default=8080)
    p.add_argument("--gateway-management-port", type=int, default=8081, help="the gateway's actuator")
    p.add_argument("--nacos-port", type=int, default=8848,
                   help="HTTP; its gRPC port is this + 1000, its console this + 2000")
    p.add_argument("--http-port", type=int, default=8000, help="first model service; +1 per replica")
    p.add_argument("--grpc-port", type=int, default=50051, help="first model service; +1 per replica")
    p.add_argument("--run-dir", type=Path, default=ROOT / ".run")
    p.add_argument("--java-opts", default=os.environ.get("GATEWAY_JAVA_OPTS", "-Xmx512m"))
    p.add_argument("--ready-timeout", type=float, default=600,
                   help="seconds a model service may take to load (the first start converts the model)")
    args = p.parse_args(argv)
    if not 1 <= args.replicas <= 16:
        p.error("--replicas must be between 1 and 16")
    args.serve_args = serve_args
    return args


def run(args: argparse.Namespace) -> int:
    signals = Signals()
    run_dir = args.run_dir.resolve()
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    ports = {"gateway": args.gateway_port, "gateway management": args.gateway_management_port,
             "Nacos HTTP": args.nacos_port, "Nacos gRPC": args.nacos_port + NACOS_GRPC_OFFSET,
             "Nacos console": args.nacos_port + NACOS_CONSOLE_OFFSET}
    for i in range(args.replicas):
        ports[f"model-service-{i} HTTP"] = args.http_port + i
        ports[f"model-service-{i} gRPC"] = args.grpc_port + i
    busy = [f"{name} :{port}" for name, port in ports.items() if not port_free(port)]
    if busy:
        print("cannot start: ports in use: " + ", ".join(busy)
              + "\n(is another `make run` still running? or pick other ports, see scripts/run_stack.py --help)",
              file=sys.stderr)
        return 1

    api_key = dev_api_key(run_dir)
    internal_key = "internal-" + secrets.token_hex(16)
    nacos: Part | None = None
    pods: list[Part] = []
    gateway: Part | None = None
    code = 0
    try:
        t0 = time.monotonic()
        print(f"starting r-nacos on 127.0.0.1:{args.nacos_port} (gRPC {args.nacos_port + NACOS_GRPC_OFFSET}), "
              f"data in {rel(run_dir / 'rnacos')} ...", flush=True)
        nacos, accounts = start_nacos(args, run_dir, logs, signals)

        # The first replica alone (its first start may convert the model into the shared cache), then the rest.
        for group in ([0], list(range(1, args.replicas))):
            batch = []
            for i in group:
                part = model_service_part(i, args, internal_key, accounts, logs)
                print(f"starting {part.name}: HTTP 127.0.0.1:{args.http_port + i}, gRPC 127.0.0.1:{args.grpc_port + i}"
                      f" (log {rel(part.log_path)}) ...", flush=True)
                pods.append(part.start())
                batch.append((i, part))
            for i, part in batch:
                wait_until(f"{part.name} ready (/health/ready)", lambda i=i: models_ready(args.http_port + i),
                           args.ready_timeout, [nacos, part], signals, interval=0.5)

        registry = NacosRegistry(args.nacos_port, accounts)
        pod_ports = {args.http_port + i for i in range(args.replicas)}
        wait_until(f"{args.replicas} model service(s) registered in Nacos",
                   lambda: pod_ports <= registry.healthy_ports(), 60, [nacos, *pods], signals)

        gateway = start_gateway(args, internal_key, api_key, accounts, logs)
        print(f"starting the gateway on 127.0.0.1:{args.gateway_port} (log {rel(gateway.log_path)}) ...", flush=True)
        gateway.start()
        models_url = f"http://127.0.0.1:{args.gateway_port}/v1/models"
        auth = {"Authorization": f"Bearer {api_key}"}
        wait_until("the gateway routing to the model services", lambda: http("GET", models_url, headers=auth)[0] == 200,
                   240, [nacos, *pods, gateway], signals, interval=0.5)
        model = json.loads(http("GET", models_url, headers=auth)[1])["data"][0]["id"]
        print_banner(args, api_key, model, run_dir, accounts, time.monotonic() - t0)

        # Watch: a model service that dies is restarted (PodSupervisor); Nacos or the gateway dying stops the stack.
        supervisors = [PodSupervisor(i, pod, args.http_port + i, args.ready_timeout, registry)
                       for i, pod in enumerate(pods)]
        while True:
            for part in (nacos, gateway):
                code_ = part.exited()
                if code_ is not None:
                    raise StartError(f"{part.name} exited unexpectedly with code {code_}. "
                                     f"Last lines of {rel(part.log_path)}:\n{part.tail()}")
            for supervisor in supervisors:
                supervisor.step(time.monotonic())
            signals.sleep(0.5)
    except Interrupted:
        code = 0
    except StartError as exc:
        print(f"\nERROR: {exc}\nstopping the rest of the stack", file=sys.stderr, flush=True)
        code = 1
    except Exception as exc:  # noqa: BLE001 - stop the children whatever happened
        print(f"\nERROR: {type(exc).__name__}: {exc}\nstopping the rest of the stack", file=sys.stderr, flush=True)
        code = 1
    finally:
        # gateway first (no new traffic), then the pods (deregister + drain), then Nacos
        for group in ([gateway] if gateway else [], pods, [nacos] if nacos else []):
            stop_parts(group, signals)
    if code == 0:
        print("stopped", flush=True)
    return code


def print_banner(args, api_key: str, model: str, run_dir: Path, accounts: NacosAccounts, seconds: float) -> None:
    gw = f"http://127.0.0.1:{args.gateway_port}"
    pods = "\n".join(f"  model service {i}   http://127.0.0.1:{args.http_port + i} · gRPC 127.0.0.1:{args.grpc_port + i}"
                     " (internal key only; call through the gateway)" for i in range(args.replicas))
    key_note = "from $DEV_API_KEY" if os.environ.get("DEV_API_KEY") else f"kept in {rel(run_dir / 'dev-api-key')}"
    nacos = f"http://127.0.0.1:{args.nacos_port}"
    body = json.dumps({"model": model, "stream": True, "max_tokens": 64, "temperature": 0,
                       "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    print(f"""
The stack is up ({seconds:.0f}s), on this machine's loopback only. Ctrl-C stops it.

  gateway           {gw}   (OpenAI API under /v1)
  API key           {api_key}   ({key_note})
  model             {model}
  gateway actuator  http://127.0.0.1:{args.gateway_management_port}/actuator/health · /actuator/prometheus
{pods}
  Nacos             {nacos} (gRPC {args.nacos_port + NACOS_GRPC_OFFSET}), login required; accounts in {rel(accounts.path)}
                    console http://127.0.0.1:{args.nacos_port + NACOS_CONSOLE_OFFSET}/rnacos/ (user {accounts.admin_user})
  logs              {rel(run_dir / 'logs')}/

Stream an answer through the gateway:

  curl -N {gw}/v1/chat/completions -H 'Authorization: Bearer {api_key}' \\
    -H 'Content-Type: application/json' -d '{body}'

OpenAI SDK: OpenAI(base_url="{gw}/v1", api_key="{api_key}")

Nacos API (e.g. the instances), as the admin:

  . {rel(accounts.path)}; TOKEN=$(curl -s {nacos}/nacos/v1/auth/login -d username=$NACOS_ADMIN_USERNAME \\
    --data-urlencode password=$NACOS_ADMIN_PASSWORD | sed 's/.*"accessToken":"\\([^"]*\\)".*/\\1/')
  curl -H "Authorization: Bearer $TOKEN" '{nacos}/nacos/v1/ns/instance/list?serviceName=model-service'
""", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
