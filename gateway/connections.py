"""Slow and vanishing clients. uvicorn bounds neither how long a request head may take (on h11)
nor how long a body may: a client that sends a few bytes and then nothing holds its connection
for ever. Here a connection whose next request head is not in within header_timeout_s is closed,
a body that does not arrive in time is answered 408, and a client that goes away while sending its
body is no error of the gateway's."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .config import GatewayConfig
from .errors import APIError, shown
from .metrics import GatewayMetrics

logger = logging.getLogger("gateway")
# A body may take body_timeout_s, and one second more for each of these many bytes (Apache's
# MinRate): a large upload on a slow link gets its time, a body that trickles in does not.
BODY_MIN_RATE = 1024


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection that holds no request being handled and has
    not brought a complete request head within `head_timeout_s` of its opening or of its previous
    response. So a head that trickles in is cut off, and so is the rest of a body that a refusal
    (401, 413) left unread, which would otherwise hold the connection for as long as it comes."""

    def __init__(self, *args: Any, head_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout_s = head_timeout_s
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.watch()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        super().connection_lost(exc)

    def watch(self) -> None:
        """The timer runs while no request is in hand: before the first head, after each response."""
        if self.cycle is None or self.cycle.response_complete:
            if self.head_timer is None:
                self.head_timer = self.loop.call_later(self.head_timeout_s, self.head_timed_out)
        elif self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_timed_out(self) -> None:
        self.head_timer = None
        if not self.transport.is_closing():
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            logger.info("%s: no complete request head within %g s; connection closed", client, self.head_timeout_s)
            self.transport.close()


def uvicorn_config(app: Any, config: GatewayConfig, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for the gateway: its address, log level and the protocol above."""
    protocol = functools.partial(HeadTimeoutProtocol, head_timeout_s=config.header_timeout_s)
    return uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level.lower(), http=protocol, **options)


class BodyInterrupted(BaseException):
    """A request body that stopped coming: raised from `receive` into the route reading it. A
    BaseException, as asyncio's CancelledError is, so that the routes' broad handlers (a form
    parser's `except Exception`, the 500 handler) pass it up to BodyDeadline untouched."""

    def __init__(self, received: int, timed_out: bool) -> None:
        super().__init__(received, timed_out)
        self.received = received
        self.timed_out = timed_out


class BodyDeadline:
    """Reads each request's body against its deadline (plain ASGI). Past it the request is
    answered 408 and its connection closed (the routes read their bodies before they answer); a
    client gone mid-body is logged once, at info, and counted nowhere: no one is left to answer."""

    def __init__(self, app: Any, timeout_s: float, metrics: GatewayMetrics) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        started = loop.time()
        received, complete = 0, False

        async def timed() -> dict:
            nonlocal received, complete
            if complete:  # after the body: waiting for the client to go away is no read
                return await receive()
            remaining = started + self.timeout_s + received / BODY_MIN_RATE - loop.time()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0))
            except asyncio.TimeoutError:
                raise BodyInterrupted(received, timed_out=True) from None
            if message["type"] == "http.disconnect":
                raise BodyInterrupted(received, timed_out=False)
            received += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            return message

        try:
            await self.app(scope, timed, send)
        except BodyInterrupted as interrupted:
            where = f"{scope['method']} {shown(scope['path'])}"
            if not interrupted.timed_out:
                logger.info("%s: the client went away after %d bytes of its body", where, interrupted.received)
                return
            logger.info("%s: 408, %d bytes of its body in %.0f s", where, interrupted.received, loop.time() - started)
            self.metrics.errors.labels("408").inc()
            error = APIError(408, f"the request body did not arrive in time ({interrupted.received} bytes came)", code="request_timeout")
            response = error.response()
            response.headers["Connection"] = "close"  # the rest of the body is not read: the connection cannot carry another request
            await response(scope, receive, send)
