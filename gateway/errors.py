"""OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`, for every failure, and
the mapping of Triton's errors onto it: an INVALID_ARG message starts with the tensor at fault
("TOPK: must be in [1, 2051], got 0"), which names the request parameter."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from csm_client import CSMError

# Triton input -> the request parameter it comes from.
TENSOR_PARAMS = {
    "TEXT": "input",
    "SPEAKER": "voice",
    "TEMPERATURE": "temperature",
    "TOPK": "topk",
    "MAX_AUDIO_LENGTH_MS": "max_audio_length_ms",
    "SEED": "seed",
    "FIRST_CHUNK_FRAMES": "first_chunk_frames",
    "CHUNK_FRAMES": "chunk_frames",
    "CONTEXT_TEXT": "context",
    "CONTEXT_SPEAKER": "context",
    "CONTEXT_AUDIO": "context",
    "CONTEXT_AUDIO_LENGTHS": "context",
    "CONTEXT_SAMPLE_RATE": "context",
    "CONTEXT_CODES": "context",
    "CONTEXT_CODES_LENGTHS": "context",
    "VOICE": "voice",
    "CONTEXT_OVERFLOW": "context_overflow",
    "CONTEXT_PINNED": "context",  # the gateway's own: 1 when a voice's clip goes first
    "CONTEXT_TURN": "context",  # the gateway opens its turns' refs itself and sends their codes
    "CONTEXT_PLAYED_MS": "context",
    "prompt": "input",  # a prompt (context + text) too long for the model
}
TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
         408: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
         429: "rate_limit_error", 503: "service_unavailable", 500: "server_error"}  # fmt: skip
# A client's value quoted in a message or a log line: at most this many characters of it.
ECHO_CHARS = 64
# A message, whatever it quotes (Triton's text included): at most this many characters.
MAX_MESSAGE_CHARS = 500


def shown(value: str, limit: int = ECHO_CHARS) -> str:
    """A client's string as a message or a log line quotes it: its repr, so that no newline or
    control character in it can start a line of its own, of at most `limit` of its characters."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def named(name: str) -> str:
    """A name the client chose (a JSON key) as a message names it: as it is when short and
    printable, else `shown`."""
    return name if len(name) <= ECHO_CHARS and name.isprintable() else shown(name)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = f"{message[:MAX_MESSAGE_CHARS]}... ({len(message)} characters)"
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "server_error"), "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def from_triton(error: CSMError, text_param: str = "input") -> APIError:
    """The API error for a failed Triton stream: 400 for an invalid request (its parameter named,
    the text by the route's name for it), 429 for a full server, 503 for one that cannot serve
    now, 500 for anything else."""
    status = (error.status or "").upper()
    message = error.message
    if "INVALID_ARG" in status:
        param = TENSOR_PARAMS.get(message.split(":", 1)[0].strip())
        return APIError(400, message, text_param if param == "input" else param, "invalid_value")
    if error.busy:
        return APIError(429, message, code="server_busy")
    if "UNAVAILABLE" in status or error.status is None:  # None: the server could not be reached
        return APIError(503, message, code="model_unavailable")
    if "CANCELLED" in status:
        return APIError(503, message, code="cancelled")
    return APIError(500, message, code="internal_error")
