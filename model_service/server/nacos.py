"""Nacos: service registration and the hot-reloaded policy document, over nacos-sdk-python's v2 API.

``NacosRegistrar`` is the whole surface ``serve()`` uses::

    registrar = NacosRegistrar(settings, on_config=dynamic.apply_nacos)
    await registrar.start()                                # config now; nothing registered yet
    await registrar.register(http_port, grpc_port, model)  # once the model is ready
    await registrar.deregister()                           # first thing on SIGTERM/SIGINT
    await registrar.close()

Nothing here blocks serving. Clients are created in background tasks on the running loop; when
Nacos is unreachable the service serves anyway and keeps trying with backoff (logged).

Reconnects: the SDK (3.2.0) reconnects within about a second of a Nacos restart, but re-registers
its cached instances only on its redo timer (up to 30 s later), and a restarted Nacos has lost every
ephemeral instance. So a connection listener registers again on every (re)connect, and a check
every ``CHECK_INTERVAL_S`` asks Nacos whether this instance is listed and registers it if not.

The SDK's own log files and its config cache go to a private temporary directory per process (removed
on close): a cache shared between processes can hold a copy of the document that makes the SDK skip
notifying a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable

from model_service import __version__
from model_service.config import Settings

log = logging.getLogger("model_service.nacos")


def advertise_ip(settings: Settings) -> str:
    """The address other services reach this pod at: --advertise-host, else a concrete --host, else the
    primary outbound interface's address."""
    if settings.advertise_host:
        return settings.advertise_host
    host = settings.host.strip("[]")
    if host not in ("", "0.0.0.0", "::"):
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:  # a host name: what it resolves to here
            with contextlib.suppress(OSError):
                return socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)[0][4][0]
    return primary_ip()


def primary_ip() -> str:
    """The source address of the default route (a UDP connect sends nothing), else the host name's address."""
    for family, probe in ((socket.AF_INET, ("10.254.254.254", 1)), (socket.AF_INET6, ("2001:db8::1", 1))):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(probe)
                ip = s.getsockname()[0]
            if not ipaddress.ip_address(ip).is_unspecified:
                return ip
        except OSError:
            continue
    with contextlib.suppress(OSError):
        return socket.gethostbyname(socket.gethostname())
    return "127.0.0.1"


class NacosUnavailable(Exception):
    pass


class _ConnectionWatch:
    """The SDK's connection listener interface (on_connected / on_disconnect), forwarded to the registrar."""

    def __init__(self, registrar: NacosRegistrar):
        self._registrar = registrar

    async def on_connected(self) -> None:
        self._registrar._connection_changed(True)

    async def on_disconnect(self) -> None:
        self._registrar._connection_changed(False)


class NacosRegistrar:
    CHECK_INTERVAL_S = 5.0  # how often a registered instance is confirmed listed
    RETRY_MIN_S = 1.0
    RETRY_MAX_S = 30.0
    OP_TIMEOUT_S = 5.0  # one Nacos call (the SDK retries inside it)

    def __init__(self, settings: Settings, on_config: Callable[[str | None], object] | None = None):
        self.settings = settings
        self.enabled = bool(settings.nacos_server)
        self._on_config = on_config
        self._naming = None  # v2.nacos.NacosNamingService
        self._config = None  # v2.nacos.NacosConfigService
        self._instance = None  # the RegisterInstanceParam we want listed, or None
        self._registered = False
        self._ever_registered = False
        self._registered_on: str | None = None  # the gRPC connection the registration was made on
        self._lock = asyncio.Lock()  # one register/deregister call at a time
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._workdir: str | None = None
        self._started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def _where(self) -> dict:
        return {"nacos_server": self.settings.nacos_server, "service": self.settings.nacos_service_name,
                "group": self.settings.nacos_group}

    def _client_config(self):
        from v2.nacos import ClientConfigBuilder

        s = self.settings
        builder = (ClientConfigBuilder()
                   .server_address(s.nacos_server)
                   .namespace_id(s.nacos_namespace)
                   .log_level(logging.WARNING)
                   .log_dir(os.path.join(self._workdir, "logs"))
                   .cache_dir(os.path.join(self._workdir, "cache"))
                   .load_cache_at_start(False))
        if s.nacos_username:
            builder.username(s.nacos_username)
        if s.nacos_password is not None:
            builder.password(s.nacos_password.get_secret_value())
        return builder.build()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if not self.enabled:
            log.info("nacos off: no --nacos-server given; not registering, no remote policy")
            return
        self._workdir = tempfile.mkdtemp(prefix="model-service-nacos-")
        log.info("nacos on", extra={**self._where(), "config_data_id": self.settings.nacos_config_data_id,
                                    "sdk_log_dir": os.path.join(self._workdir, "logs")})
        self._tasks.append(asyncio.create_task(self._naming_loop(), name="nacos-naming"))
        if self._on_config is not None:
            self._tasks.append(asyncio.create_task(self._config_setup(), name="nacos-config"))

    async def register(self, http_port: int, grpc_port: int | None, model: str) -> None:
        """Ask for this instance to be listed; returns at once (registration and retries run in the background)."""
        if not self.enabled:
            return
        from v2.nacos import RegisterInstanceParam

        s = self.settings
        metadata = {
            "gRPC_port": str(grpc_port) if grpc_port else "",
            "http_port": str(http_port),
            "model": model,
            "version": __version__,
            "pid": str(os.getpid()),
            "hostname": socket.gethostname(),
            "started_at": self._started_at,
            "max_running_requests": str(s.max_running_requests),
            "max_waiting_requests": str(s.max_waiting_requests),
        }
        self._instance = RegisterInstanceParam(
            ip=advertise_ip(s), port=http_port, service_name=s.nacos_service_name, group_name=s.nacos_group,
            ephemeral=True, healthy=True, enabled=True, weight=1.0, metadata=metadata,
        )
        log.info("registering in nacos", extra={**self._where(), "ip": self._instance.ip, "port": http_port,
                                                "metadata": metadata})
        if self._naming is None or not await self._naming.server_health():
            log.warning("nacos registration pending: nacos not reachable yet; retrying in the background",
                        extra=self._where())
        self._wake.set()

    async def deregister(self) -> None:
        """Take this instance out of Nacos now (bounded by OP_TIMEOUT_S); new traffic stops coming."""
        instance, self._instance = self._instance, None
        self._wake.set()
        if instance is None or self._naming is None:
            return
        from v2.nacos import DeregisterInstanceParam

        try:
            async with asyncio.timeout(self.OP_TIMEOUT_S):
                async with self._lock:
                    if not self._registered and not await self._naming.server_health():
                        return  # never listed, or its connection (and so the ephemeral instance) is gone
                    await self._naming.deregister_instance(DeregisterInstanceParam(
                        ip=instance.ip, port=instance.port, service_name=instance.service_name,
                        group_name=instance.group_name, ephemeral=True))
            log.info("deregistered from nacos", extra={**self._where(), "ip": instance.ip, "port": instance.port})
        except Exception as exc:  # noqa: BLE001 - shutdown goes on; the instance goes when the connection closes
            log.warning("nacos deregistration failed; the instance disappears when the connection closes",
                        extra={**self._where(), "error": _describe(exc)})
        finally:
            self._registered = False

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._config is not None:
            await _shutdown_config(self._config)
            self._config = None
        if self._naming is not None:
            await _shutdown_naming(self._naming)
            self._naming = None
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    # ------------------------------------------------------------------ registration
    async def _naming_loop(self) -> None:
        delay = self.RETRY_MIN_S
        while True:
            self._wake.clear()
            try:
                if self._naming is None:
                    self._naming = await self._create_naming()
                if self._instance is not None:
                    await self._ensure_registered()
                wait, delay = self.CHECK_INTERVAL_S, self.RETRY_MIN_S
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep serving; keep trying
                if self._instance is not None:
                    log.warning("nacos registration pending; retrying", extra={
                        **self._where(), "error": _describe(exc), "retry_in_s": delay})
                wait, delay = delay, min(delay * 2, self.RETRY_MAX_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _create_naming(self):
        from v2.nacos import NacosNamingService

        naming = await NacosNamingService.create_naming_service(self._client_config())
        rpc_client = getattr(naming.grpc_client_proxy, "rpc_client", None)
        if rpc_client is not None:
            await rpc_client.register_connection_listener(_ConnectionWatch(self))
        return naming

    def _connection_changed(self, connected: bool) -> None:
        # After any reconnect the server may have lost the instance (a restarted Nacos has no
        # ephemeral data): register again at once rather than on the SDK's 30 s redo timer.
        if connected:
            self._wake.set()

    def _connection_id(self) -> str | None:
        rpc_client = getattr(self._naming.grpc_client_proxy, "rpc_client", None)
        connection = getattr(rpc_client, "current_connection", None)
        return connection.get_connection_id() if connection is not None else None

    async def _ensure_registered(self) -> None:
        async with self._lock:
            instance = self._instance
            if instance is None:
                return
            if not await self._naming.server_health():
                self._registered = False
                raise NacosUnavailable("not connected to nacos (the client keeps reconnecting)")
            connection = self._connection_id()
            why = "retry" if self._ever_registered else "initial"
            if self._registered:
                if connection != self._registered_on:
                    why = "reconnected"
                elif await self._is_listed(instance):
                    return
                else:
                    why = "missing"
                    log.warning("this instance is no longer listed in nacos; registering again",
                                extra=self._where())
            async with asyncio.timeout(self.OP_TIMEOUT_S):
                await self._naming.register_instance(instance.model_copy(deep=True))
            if self._instance is instance:
                self._registered = self._ever_registered = True
                self._registered_on = connection
                log.info("registered in nacos", extra={**self._where(), "ip": instance.ip, "port": instance.port,
                                                       "reason": why})

    async def _is_listed(self, instance) -> bool:
        """Ask the server (not the SDK's push-fed cache) whether this instance is listed."""
        proxy = self._naming.grpc_client_proxy
        if not hasattr(proxy, "do_subscribe"):
            return True  # another SDK version: rely on reconnect events and the SDK's redo
        async with asyncio.timeout(self.OP_TIMEOUT_S):
            service = await proxy.do_subscribe(instance.service_name, instance.group_name, "")
        hosts = getattr(service, "hosts", None) or []
        return any(h.ip == instance.ip and h.port == instance.port for h in hosts)

    # ------------------------------------------------------------------ config
    async def _config_setup(self) -> None:
        from v2.nacos import ConfigParam, NacosConfigService

        s = self.settings
        delay = self.RETRY_MIN_S
        while self._config is None:
            try:
                self._config = await NacosConfigService.create_config_service(self._client_config())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.warning("nacos config client not started; retrying",
                            extra={**self._where(), "error": _describe(exc), "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.RETRY_MAX_S)
        try:
            async with asyncio.timeout(self.OP_TIMEOUT_S):
                content = await self._config.get_config(ConfigParam(data_id=s.nacos_config_data_id, group=s.nacos_group))
        except Exception as exc:  # noqa: BLE001 - the listener below picks it up once Nacos answers
            log.warning("nacos policy not readable yet; it is applied as soon as nacos answers",
                        extra={**self._where(), "data_id": s.nacos_config_data_id, "error": _describe(exc)})
        else:
            self._deliver(content)
        await self._config.add_listener(s.nacos_config_data_id, s.nacos_group, self._on_change)

    async def _on_change(self, tenant: str, group: str, data_id: str, content: str | None) -> None:
        log.info("nacos policy changed", extra={"data_id": data_id, "group": group})
        self._deliver(content)

    def _deliver(self, content: str | None) -> None:
        try:
            self._on_config(content)
        except Exception:  # a bug in applying must not kill the SDK's listener task
            log.exception("applying the nacos policy failed")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


async def _shutdown_naming(naming) -> None:
    proxy = getattr(naming, "grpc_client_proxy", None)
    redo_task = getattr(getattr(proxy, "redo_service", None), "_listen_task", None)
    if redo_task is not None:  # the SDK leaves it waiting (up to 30 s); nothing to redo any more
        redo_task.cancel()
    try:
        async with asyncio.timeout(3):
            await naming.shutdown()
    except Exception as exc:  # noqa: BLE001
        log.debug("nacos naming client shutdown: %s", _describe(exc))


async def _shutdown_config(config) -> None:
    proxy = getattr(config, "grpc_client_proxy", None)
    listen_task = getattr(proxy, "listen_task", None)
    manager = getattr(proxy, "rpc_client_manager", None)
    try:
        async with asyncio.timeout(3):
            if listen_task is not None and manager is not None:
                # what config.shutdown() does, without waiting up to 5 s for the listen loop's next turn
                proxy.stop_event.set()
                listen_task.cancel()
                await asyncio.gather(listen_task, return_exceptions=True)
                await manager.shutdown_all_clients()
            else:
                await config.shutdown()
    except Exception as exc:  # noqa: BLE001
        log.debug("nacos config client shutdown: %s", _describe(exc))
