"""The HTTP server's transport settings: uvicorn's config, and a header-read timeout uvicorn lacks.

Values (see ``--http-keep-alive-timeout-s`` and ``--http-read-timeout-s``):

- idle keep-alive connections are closed after ``http_keep_alive_timeout_s`` (uvicorn's own timer);
- a request's headers must arrive within ``http_read_timeout_s`` of its first byte, or of the connection
  opening; uvicorn 0.54 has no such timeout (an idle or half-sent header kept a connection open for
  as long as the client liked), so ``H11WithHeaderTimeout`` adds one and answers 408;
- its body must arrive within ``http_read_timeout_s`` of the app starting to read it
  (``http_api.BodyReadTimeout``, 408);
- headers are at most MAX_HEADER_BYTES (uvicorn/h11 answer 400 past it); bodies at most
  ``--max-request-bytes`` (413).

The pods' HTTP port is internal: clients come through the gateway, which has its own edge timeouts and
routes only ``/v1/**`` (so the pods' ``/docs``, ``/openapi.json`` and ``/metrics`` are reachable only on
the pod network).
"""

from __future__ import annotations

import asyncio
import json

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from model_service.config import Settings

MAX_HEADER_BYTES = 16 * 1024  # the request line and headers; h11's own default, stated here


def header_timeout_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing connections whose request headers take longer than ``timeout_s``."""

    class H11WithHeaderTimeout(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._watch_headers()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_headers()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_header_timer()
            super().connection_lost(exc)

        def _watch_headers(self) -> None:
            # IDLE: no complete request line and headers yet (a new connection, or the next request on a
            # kept-alive one). The clock starts once, at the first byte or at connect, and is not reset
            # by each trickled byte.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self._header_timer is None:
                    self._header_timer = self.loop.call_later(timeout_s, self._headers_timed_out)
            else:
                self._stop_header_timer()

        def _stop_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # still answering the previous request; its keep-alive wait starts after
            # Raw bytes: h11 cannot send a response to a request it has not seen.
            body = json.dumps({"error": {"message": f"request headers not received within {timeout_s:g} s",
                                         "type": "invalid_request_error", "param": None,
                                         "code": "request_timeout"}}).encode()
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: " + str(len(body)).encode()
                                 + b"\r\n\r\n" + body)
            self.transport.close()

    return H11WithHeaderTimeout


def uvicorn_config(app, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        http=header_timeout_protocol(settings.http_read_timeout_s),
        log_config=None, access_log=False, lifespan="off",
        timeout_keep_alive=settings.http_keep_alive_timeout_s,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        server_header=False,  # no "server: uvicorn" towards clients; the date header stays
        timeout_graceful_shutdown=5,
    )
