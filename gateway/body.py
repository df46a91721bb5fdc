"""Request bodies, read and parsed within bounds before any other work on them.

A body is read up to a cap whether or not it declares its length: one whose Content-Length is
over it is refused unread, a chunked one as soon as it passes it, so memory holds at most the cap
and nothing is spooled to disk. A JSON body's values are counted as it comes and it is refused as
soon as they pass their bound, the rest unread; it is parsed off the event loop, and the bound
keeps a parse to tens of milliseconds of the GIL whatever the body, so that the chunks of the
streams beside it keep flowing. A multipart form (a voice upload) is parsed from memory.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pydantic
import pydantic_core
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import APIError

Model = TypeVar("Model", bound=pydantic.BaseModel)
MAX_FORM_PARTS = 16


async def read_body(request: Request, limit: int, param: str | None = None, max_json_values: int | None = None) -> bytearray:
    """The whole body, refused with 413 past `limit` bytes: unread when its Content-Length says so,
    else once that much has come (the rest is never read). With `max_json_values`, a JSON body is
    refused as soon as its values (json_values, counted part by part) pass it."""
    length = request.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {length} bytes, more than {limit}", param, "request_too_large")
    body, values = bytearray(), 0
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"request body larger than {limit} bytes", param, "request_too_large")
        if max_json_values is not None:
            values += json_values(part)
            if values > max_json_values:
                message = (
                    f"body: more than max_json_values {max_json_values} JSON values (commas and brackets) in its first {len(body)} bytes"
                )
                raise APIError(413, message, param, "request_too_large")
    return body


def json_values(data: bytes | bytearray) -> int:
    """A bound on the values a JSON text holds besides the outermost: its commas and opening
    brackets, those inside strings counted too. Counting costs ~1 ms a MB; parsing ~0.2 µs a value."""
    return sum(data.count(mark) for mark in b",[{")


def parse_json(body: bytes | bytearray) -> Any:
    """A JSON body, its values bounded (read_body) -> Python values, refused with 400 when it is
    no JSON. jiter (pydantic's parser) reads it at ~8 GB/s for strings and bounds nesting at 200; a
    body it refuses is read again by Python's parser, which takes a lone surrogate in a \\u escape
    into its string, so that the request's model names the field that holds it."""
    try:
        return pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as error:
        refused = error
    try:
        return json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as error:  # RecursionError: nested deeper than the interpreter's limit
        raise APIError(400, f"body: not JSON ({refused})", code="invalid_json") from error


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is no JSON number")


def parse_model(kind: type[Model], body: bytes | bytearray) -> Model:
    """A JSON body as the request model `kind`; a field out of bounds raises RequestValidationError (400 naming it)."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise APIError(400, f"body: must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return kind.model_validate(data)
    except pydantic.ValidationError as error:
        raise RequestValidationError(error.errors()) from None


@dataclass
class Form:
    """A multipart form's text fields and files, by name."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)


class _Parts:
    """python-multipart's callbacks: each part's headers and data as they are parsed."""

    def __init__(self) -> None:
        self.parts: list[_Part] = []
        self._name = bytearray()
        self._value = bytearray()

    def on_part_begin(self) -> None:
        if len(self.parts) == MAX_FORM_PARTS:
            raise APIError(400, f"body: more than {MAX_FORM_PARTS} form fields", code="invalid_form")
        self.parts.append(_Part())

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self.parts[-1].headers[bytes(self._name).lower()] = bytes(self._value)
        self._name.clear()
        self._value.clear()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.parts[-1].chunks.append(data[start:end])

    def callbacks(self) -> dict[str, Any]:
        names = ("on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_part_data")
        return {name: getattr(self, name) for name in names}


def parse_form(body: bytes | bytearray, content_type: str) -> Form:
    """A multipart/form-data body held in memory -> its fields (UTF-8 text) and files, each name
    once, at most MAX_FORM_PARTS parts; anything else is a 400, naming the field when there is one.
    An urlencoded form (which holds no files) gives its fields."""
    kind, options = parse_options_header(content_type)
    if kind == b"application/x-www-form-urlencoded":
        try:
            pairs = urllib.parse.parse_qsl(body.decode("ascii"), keep_blank_values=True, errors="strict", max_num_fields=MAX_FORM_PARTS)
        except ValueError as error:  # UnicodeDecodeError too
            message = f"body: not an urlencoded form of at most {MAX_FORM_PARTS} UTF-8 fields ({error})"
            raise APIError(400, message, code="invalid_form") from None
        if len({name for name, _ in pairs}) < len(pairs):
            raise APIError(400, "body: each form field used once", code="invalid_form")
        return Form(dict(pairs))
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise APIError(400, "body: must be a multipart/form-data form", code="invalid_form")
    collected = _Parts()
    try:
        parser = MultipartParser(options[b"boundary"], collected.callbacks())
        parser.write(body)
        parser.finalize()
    except FormParserError as error:
        raise APIError(400, f"body: not a multipart form ({error})", code="invalid_form") from error
    form = Form()
    for part in collected.parts:
        _, disposition = parse_options_header(part.headers.get(b"content-disposition", b"").decode("latin-1"))
        name = disposition.get(b"name", b"").decode("latin-1")
        if not name or name in form.fields or name in form.files:
            raise APIError(400, f"{name or 'body'}: each form field needs a name, used once", name or None, "invalid_form")
        data = b"".join(part.chunks)
        part.chunks.clear()
        if b"filename" in disposition:
            form.files[name] = data
            continue
        try:
            form.fields[name] = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise APIError(400, f"{name}: not valid UTF-8 text ({error.reason} at byte {error.start})", name, "invalid_value") from None
    return form
