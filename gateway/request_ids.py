"""Every request's id: the client's `x-request-id` when it is sane, else a new one. It comes back
in the response's `x-request-id` (OpenAI's clients read it there), starts each log line written
while the request is handled, and is the Triton request id of its csm_stream stream, so that one
id follows a request from the client to Triton's own log."""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from typing import Any

HEADER = "x-request-id"
# Printable ASCII without space, quote, percent or backslash: an id quotes anywhere as it is and
# forges no log line (nor a %-format of one).
SANE = re.compile(r"[!#$&-\[\]-~]{1,128}")
_current: ContextVar[str] = ContextVar("request_id", default="")


def current() -> str:
    """The id of the request being handled in this task ("" outside one: Triton's "no id")."""
    return _current.get()


def chosen(value: str | None) -> str:
    """The client's id when it is sane, else a new one (OpenAI's form: req_ and 32 hex digits)."""
    return value if value is not None and SANE.fullmatch(value) else f"req_{uuid.uuid4().hex}"


class RequestIds:
    """Gives each HTTP request its id and puts it on the response (plain ASGI: a streamed response
    passes through untouched). Outermost of the gateway's middleware, so that CORS preflights and
    every error carry it too."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = next((value.decode("latin-1") for name, value in scope["headers"] if name == HEADER.encode()), None)
        request_id = chosen(sent)
        # Not reset: each request runs in a task of its own, whose context ends with it, and
        # Starlette's handler of unexpected errors, outside this middleware, still reads it.
        _current.set(request_id)
        header = (HEADER.encode(), request_id.encode())

        async def with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(name, value) for name, value in message.get("headers", []) if name.lower() != HEADER.encode()]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        return await self.app(scope, receive, with_id)


class LogRequestIds(logging.Filter):
    """Starts each line logged while a request is handled with its id, so that a request's lines
    (the gateway's, and uvicorn's errors) can be found together."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _current.get()
        if request_id:
            record.msg = f"[{request_id}] {record.msg}"  # the format's arguments as they were: an id holds no %
        return True


LOG_FILTER = LogRequestIds()
# Not uvicorn.access: its formatter builds each line from the record's arguments alone.
LOGGERS = ("gateway", "uvicorn.error")


def log_request_ids() -> None:
    """Puts the filter on the gateway's and uvicorn's loggers (once, however often it is called)."""
    for name in LOGGERS:
        logging.getLogger(name).addFilter(LOG_FILTER)
