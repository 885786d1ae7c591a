"""Process lifecycle: start the servers, load the model, serve, drain on SIGTERM/SIGINT, exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading

import uvicorn

from model_service.config import Settings, parse_batch_sizes
from model_service.llm.engine import Engine, EngineLimits
from model_service.llm.loader import ModelLoadError, load_model, resolve_model_source

from .dynamic_config import DynamicConfig
from .grpc_api import GrpcBindError, GrpcServer
from .http_api import create_app
from .http_server import uvicorn_config
from .logging_setup import configure_logging
from .nacos import NacosRegistrar
from .policy import PolicyError
from .service import ModelService, Phase

log = logging.getLogger("model_service")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: this process decides the shutdown order."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind now, so port 0 resolves to a real port we can log and advertise."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def engine_limits(settings: Settings) -> EngineLimits:
    return EngineLimits(
        max_running_requests=settings.max_running_requests,
        max_waiting_requests=settings.max_waiting_requests,
        max_prefill_tokens=settings.resolved_prefill_tokens(),
        request_timeout_s=settings.request_timeout_s,
        max_decode_stall_s=settings.max_decode_stall_s,
        kv_cache=settings.kv_cache,
        kv_cache_tokens=settings.kv_cache_tokens,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        cuda_graphs=settings.cuda_graphs,
        cuda_graph_batch_sizes=parse_batch_sizes(settings.cuda_graph_batch_sizes),
        torch_compile=settings.torch_compile,
        compile_cache_dir=settings.compile_cache_dir,
    )


def _in_daemon_thread(fn) -> asyncio.Future:
    """Run ``fn`` on a daemon thread: a signal during a long model load must not wait for the load."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def target():
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side
            loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    threading.Thread(target=target, name="load-model", daemon=True).start()
    return future


def _settle(future: asyncio.Future, result, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


async def serve(settings: Settings) -> int:
    """Run the service until a signal; returns the exit code."""
    try:
        _, _, default_name = resolve_model_source(settings.model)
    except ModelLoadError as exc:
        log.error("cannot start: %s", exc)
        return 2
    service = ModelService(settings, settings.served_model_name or default_name)
    try:
        # operator policy: --policy-file now, Nacos's document later
        dynamic = DynamicConfig(settings, on_policy=service.apply_policy)
    except PolicyError as exc:
        log.error("cannot start: %s", exc)
        return 2

    http_sock = bind_socket(settings.host, settings.http_port)
    http_port = http_sock.getsockname()[1]
    http_server = _Uvicorn(uvicorn_config(create_app(service), settings))
    http_task = asyncio.create_task(http_server.serve(sockets=[http_sock]), name="http")
    log.info("http listening", extra={"host": settings.host, "http_port": http_port})
    grpc_server = GrpcServer(service, settings)
    try:
        grpc_port = await grpc_server.start()  # health NOT_SERVING until the model is ready
    except GrpcBindError as exc:
        log.error("cannot start: %s", exc)
        http_server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(http_task, timeout=10)
        return 2
    log.info("grpc listening", extra={"host": settings.host, "grpc_port": grpc_port})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    registrar = NacosRegistrar(settings, on_config=dynamic.apply_nacos)  # off without --nacos-server
    await registrar.start()  # never blocks: Nacos being down only delays registration and remote policy
    await dynamic.start()

    exit_code = 0
    load_task = _in_daemon_thread(lambda: load_model(
        settings.model, dtype=settings.dtype, device=settings.device, trust_remote_code=settings.trust_remote_code,
        threads=settings.resolved_threads(), max_model_len=settings.max_model_len,
        served_model_name=service.model_name,
    ))
    stop_wait = asyncio.create_task(stop.wait())
    await asyncio.wait({load_task, stop_wait, http_task}, return_when=asyncio.FIRST_COMPLETED)

    engine = None
    if load_task.done() and not stop.is_set() and not http_task.done():
        try:
            loaded = load_task.result()
        except ModelLoadError as exc:
            log.error("cannot start: %s", exc)
            service.phase, exit_code = Phase.FAILED, 2
            stop.set()
        except Exception:
            log.exception("cannot start: the model failed to load")
            service.phase, exit_code = Phase.FAILED, 1
            stop.set()
        else:
            try:  # off the event loop: allocating the KV slots and capturing CUDA graphs take seconds on a GPU
                engine = await _in_daemon_thread(lambda: Engine(loaded, engine_limits(settings), service.metrics))
            except ValueError as exc:  # the engine's settings do not fit this device
                log.error("cannot start: %s", exc)
                service.phase, exit_code = Phase.FAILED, 2
                stop.set()
        if engine is not None:
            engine.start()
            service.attach_engine(engine)
            service.phase = Phase.READY
            await grpc_server.set_serving(True)
            log.info("ready", extra={"model": service.model_name, "http_port": http_port, "grpc_port": grpc_port})
            await registrar.register(http_port, grpc_port, service.model_name)
            await asyncio.wait({stop_wait, http_task}, return_when=asyncio.FIRST_COMPLETED)
    if http_task.done() and http_task.exception():
        log.error("http server failed: %s", http_task.exception())
        exit_code = 1

    # Shutdown order: stop taking work (readiness 503), let running requests finish, then close.
    log.info("shutting down", extra={"in_flight": service.engine.in_flight if service.engine else 0})
    await registrar.deregister()  # first, so discovery stops sending traffic here
    if service.phase is Phase.READY:
        service.phase = Phase.DRAINING
    await grpc_server.set_serving(False)
    if service.engine is not None:
        drained = await service.engine.drain(settings.drain_timeout_s)
        if not drained:
            log.warning("drain timeout: ending the remaining requests", extra={"in_flight": service.engine.in_flight})
        await asyncio.to_thread(service.engine.shutdown)
    await grpc_server.stop(grace=5)
    http_server.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(http_task, timeout=10)
    stop_wait.cancel()
    if not load_task.done():
        load_task.cancel()
        log.info("model load interrupted")  # the loader thread is a daemon and dies with the process
    await registrar.close()
    await dynamic.close()
    log.info("stopped", extra={"exit_code": exit_code})
    return exit_code


def run(settings: Settings) -> int:
    configure_logging(settings.log_level, settings.log_format)
    return asyncio.run(serve(settings))
