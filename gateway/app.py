"""The gateway's HTTP API (FastAPI): OpenAI's `POST /v1/audio/speech` streamed from Triton's
decoupled `csm_stream` model over gRPC, `GET /v1/models`, `GET /v1/audio/voices`, the design
document's `POST /generate`, `/health`, `/metrics` and the page at `/`.

A speech request becomes one csm_stream request (csm_client's AsyncCSMClient builds its tensors);
its audio chunks are encoded and sent as they arrive, so the first bytes leave with the first
chunk. A client that goes away closes the response's iterator, which cancels the Triton stream.

A reply that completes comes with its turn's reference (csm_client.turns: its text, speaker and
codes, signed with turn_key), which a later request's context names in place of the turn's audio,
so that a conversation's client sends only its new line, to any replica that shares the key.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from csm_client import AsyncCSMClient, CSMError, Segment, TurnChunk
from csm_client.contract import AUDIO_NUM_CODEBOOKS, CONTEXT_OVERFLOW_MODES, INPUTS, INT32_MAX, SAMPLES_PER_FRAME
from csm_client.turns import TurnRecord, open_turn, sign_turn

from . import audio, clips, request_ids
from .body import parse_form, parse_model, read_body
from .config import GatewayConfig
from .connections import BodyDeadline
from .errors import APIError, from_triton, named, shown
from .metrics import GatewayMetrics
from .voices import StoredVoice, VoiceError, VoiceLibrary

logger = logging.getLogger("gateway")
STATIC = Path(__file__).parent / "static"
CONTEXT_USED = "x-context-used"  # the request's context turns the prompt held, comma-separated
FORM_FIELDS_BYTES = 64 * 1024  # a voice upload's form fields besides its clip
Model = TypeVar("Model", bound=BaseModel)
SURROGATE = re.compile("[\ud800-\udfff]")


def bounded(input_name: str, **field: Any) -> Any:
    """A request field of a number sent as the input `input_name`: from the contract's least value
    to the largest its tensor's type holds, so that none wraps (csm_stream checks the rest)."""
    tensor = INPUTS[input_name]
    return Field(ge=tensor.least, le=tensor.most, **field)


def unicode_text(value: str) -> str:
    """A string that is Unicode text: JSON's \\u escapes can carry lone surrogates, which no UTF-8 holds."""
    if not value.isascii() and SURROGATE.search(value):
        raise ValueError("holds a lone surrogate (\\ud800 to \\udfff), which is no Unicode text")
    return value


Text = Annotated[str, AfterValidator(unicode_text)]
Name = Annotated[str, Field(max_length=256), AfterValidator(unicode_text)]


class VoiceRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Name


# One Mimi frame of a turn's codes: csm_stream checks the values (below its audio vocabulary);
# here they need only fit its INT32 tensor.
CodeFrame = Annotated[list[Annotated[int, bounded("CONTEXT_CODES")]], Field(min_length=AUDIO_NUM_CODEBOOKS, max_length=AUDIO_NUM_CODEBOOKS)]


class Turn(BaseModel):
    """An earlier turn of the conversation, in one of two forms (Gateway.turn checks which): its
    text and speaker, with its audio as base64 (a clip of gateway/clips.py's formats) or the Mimi
    codes the server returned for it ([frames][32] integers: AUDIO_CODES), which csm_stream uses as
    they are, never encoding them; or the reference an earlier reply came with (`ref`), which
    carries all three, and how much of that reply was played (`played_ms`)."""

    model_config = ConfigDict(extra="forbid")
    text: Text | None = None
    speaker: int | None = bounded("CONTEXT_SPEAKER", default=None)
    audio: str | None = None  # base64, whose decoder refuses anything but ASCII
    codes: list[CodeFrame] | None = Field(default=None, min_length=1)
    ref: str | None = None  # open_turn bounds its length before any other work
    played_ms: int | None = Field(default=None, ge=0, le=INT32_MAX)


class Sampling(BaseModel):
    """CSM's extensions to OpenAI's request; those left out take the server's defaults. Each
    number is bounded to the Triton tensor it becomes, so that none wraps."""

    seed: int | None = Field(default=None, ge=0, le=INPUTS["SEED"].most)  # the API takes seeds >= 0; csm_stream any INT64
    temperature: float | None = Field(default=None, gt=0, le=INPUTS["TEMPERATURE"].most, allow_inf_nan=False)
    topk: int | None = bounded("TOPK", default=None)
    max_audio_length_ms: int | None = bounded("MAX_AUDIO_LENGTH_MS", default=None)
    context: list[Turn] = Field(default_factory=list)
    # A context whose prompt does not fit the model: refused (400), or its oldest turns left out
    # until it fits (a voice's reference clip stays); the response says which turns were used.
    context_overflow: Literal[CONTEXT_OVERFLOW_MODES] = CONTEXT_OVERFLOW_MODES[0]


class SpeechRequest(Sampling):
    model_config = ConfigDict(extra="forbid")
    model: Name
    input: Text
    voice: Name | VoiceRef
    instructions: Text | None = None  # accepted for compatibility; CSM takes no style instructions
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"


class GenerateRequest(Sampling):
    """The design document's REST route: text, speaker, temperature, topk -> {"audio": base64 WAV}."""

    model_config = ConfigDict(extra="forbid")
    text: Text
    speaker: int = bounded("SPEAKER", default=0)


@dataclass
class Job:
    """One request for csm_stream, as the client's stream call takes it."""

    text: str
    speaker: int
    context: list[Segment]
    options: dict[str, Any]
    text_param: str = "input"  # the route's name for the text, for csm_stream's errors about it
    turns: int = 0  # the request's context turns, which follow the voice's clip (pinned) in `context`

    def context_used(self, first: TurnChunk | None) -> list[int]:
        """The request's context turns that the prompt held: all but the oldest the server dropped
        to fit it (its first chunk says how many; it never drops the pinned voice clip)."""
        dropped = first.context_dropped if first is not None and first.context_dropped is not None else 0
        return list(range(dropped, self.turns))


class Gateway:
    """What the routes share: the configuration, the voices, one asyncio Triton client, the count
    of streams in flight and the metrics."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.voices = VoiceLibrary(config)
        self.clip_bounds = clips.ClipBounds.from_config(config)
        self.metrics = GatewayMetrics()
        self.streams = 0
        self._client: AsyncCSMClient | None = None
        self.turn_key = config.turn_key.encode("utf-8")
        if not self.turn_key:
            logger.warning(
                "turn_key not set: turn references are signed with a random key of this process, so they open on this replica "
                "only, and not after a restart (set CSM_GATEWAY_TURN_KEY, the same on every replica)"
            )
            self.turn_key = secrets.token_bytes(32)

    @property
    def client(self) -> AsyncCSMClient:
        # Made inside the running event loop, where grpc.aio needs it.
        if self._client is None:
            self._client = AsyncCSMClient(
                self.config.triton_url, model_name=self.config.stream_model, timeout_s=self.config.timeout_s,
                stream_model_name=self.config.stream_model,
            )  # fmt: skip
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    def voice(self, value: str | VoiceRef) -> StoredVoice:
        name = value.id if isinstance(value, VoiceRef) else value
        voice = self.voices.find(name)
        if voice is None:
            raise APIError(404, f"voice {shown(name)} not found; GET /v1/audio/voices lists them", "voice", "voice_not_found")
        return voice

    def job(self, text: str, text_param: str, speaker: int, request: Sampling, voice: StoredVoice | None = None) -> Job:
        """Checks what the gateway bounds itself (the rest is csm_stream's to check), every count
        and text before any clip is decoded, then decodes the context audio."""
        if not text.strip():
            raise APIError(400, f"{text_param}: must not be blank", text_param, "invalid_value")
        if len(text) > self.config.max_input_chars:
            raise APIError(
                400, f"{text_param}: {len(text)} characters, more than {self.config.max_input_chars}", text_param, "string_above_max_length"
            )
        if len(request.context) > self.config.max_context_turns:
            message = f"context: {len(request.context)} turns, more than max_context_turns {self.config.max_context_turns}"
            raise APIError(400, message, "context", "invalid_value")
        records = [self.turn(index, turn) for index, turn in enumerate(request.context)]
        context: list[Segment] = []
        budget = self.config.max_context_audio_s
        pinned = voice is not None and voice.samples is not None
        if pinned:
            context.append(Segment(speaker=voice.speaker, text=voice.transcript, audio=voice.samples, sample_rate=voice.rate))
        for index, (turn, record) in enumerate(zip(request.context, records, strict=True)):
            if record is not None:  # its codes as they were generated (none: text only), never encoded
                context.append(record.segment())
                continue
            clip, rate, codes = None, audio.SAMPLE_RATE, None
            if turn.codes is not None:
                codes = np.array(turn.codes, dtype=np.int32)
            elif turn.audio is not None:
                try:
                    clip, rate = clips.decode_base64_audio(turn.audio, budget, self.clip_bounds)
                except clips.AudioInputError as error:
                    raise APIError(400, f"context[{index}].audio: {error}", "context", "invalid_audio") from error
                budget -= len(clip) / rate
            context.append(Segment(speaker=turn.speaker, text=turn.text, audio=clip, sample_rate=rate, codes=codes))
        rates = {segment.sample_rate for segment in context if segment.audio is not None}
        if len(rates) > 1:  # Triton takes one CONTEXT_SAMPLE_RATE a request: bring the clips to Mimi's
            for segment in context:
                if segment.audio is not None and segment.sample_rate != audio.SAMPLE_RATE:
                    segment.audio = clips.resample(segment.audio, segment.sample_rate, audio.SAMPLE_RATE)
                    segment.sample_rate = audio.SAMPLE_RATE
        options = {
            "seed": request.seed,
            "temperature": request.temperature,
            "topk": request.topk,
            "max_audio_length_ms": request.max_audio_length_ms,
            "first_chunk_frames": self.config.first_chunk_frames,
            "voice": voice.server_voice if voice is not None and voice.server_voice else None,
            "context_overflow": request.context_overflow,
            "context_pinned": 1 if pinned else None,  # the voice's clip stays (csm_stream pins a server voice itself)
        }
        options = {key: value for key, value in options.items() if value is not None}
        return Job(text, speaker, context, options, text_param, len(request.context))

    def turn(self, index: int, turn: Turn) -> TurnRecord | None:
        """Checks a context turn's form and text; a turn by reference -> the turn it names, cut to
        what was played (TurnRecord.played), else None (its audio is decoded after every check)."""
        where = f"context[{index}]"
        if turn.ref is not None:
            if (turn.text, turn.speaker, turn.audio, turn.codes) != (None, None, None, None):
                message = f"{where}: holds a ref and text, speaker, audio or codes; a turn by reference carries its own, send one form"
                raise APIError(400, message, "context", "invalid_value")
            try:
                record = open_turn(self.turn_key, turn.ref)
            except ValueError as error:
                raise APIError(400, f"{where}.ref: {error}", "context", "invalid_turn_ref") from error
            if turn.played_ms is not None:
                record = record.played(turn.played_ms)
            text = record.text
        else:
            if turn.played_ms is not None:
                raise APIError(400, f"{where}.played_ms: goes with a ref, the turn whose playing it counts", "context", "invalid_value")
            if turn.text is None or turn.speaker is None:
                raise APIError(400, f"{where}: needs text and speaker (or a ref)", "context", "missing_field")
            if turn.codes is not None and turn.audio is not None:
                raise APIError(400, f"{where}: holds both audio and codes; send one of them", "context", "invalid_value")
            text, record = turn.text, None
        size, most = len(text.encode("utf-8")), self.config.max_context_text_bytes
        if size > most:
            message = f"{where}.text: {size} bytes of UTF-8, more than max_context_text_bytes {most}"
            raise APIError(400, message, "context", "string_above_max_length")
        return record

    def reference(self, job: Job, codes: list[np.ndarray]) -> str:
        """The reference of a reply, or of its turn so far: its text, its speaker and its chunks' codes ([frames, 32] each)."""
        frames = np.concatenate(codes) if codes else np.zeros((0, AUDIO_NUM_CODEBOOKS), np.int32)
        return sign_turn(self.turn_key, job.text, job.speaker, frames)

    def acquire(self) -> None:
        """Takes one of max_streams (each `release`d once): a request past them is refused with 429
        before it reaches Triton. Only the event loop's thread calls these."""
        if self.streams >= self.config.max_streams:
            raise APIError(429, f"{self.streams} requests in flight (max_streams); retry later", code="server_busy")
        self.streams += 1
        self.metrics.streams.set(self.streams)

    def release(self) -> None:
        self.streams -= 1
        self.metrics.streams.set(self.streams)

    async def open(self, job: Job, request_id: str) -> tuple[TurnChunk | None, AsyncIterator[TurnChunk]]:
        """Starts the Triton stream (its request id the HTTP request's) and waits for its first chunk,
        so that an invalid request gets its status code before any byte is sent: (the first chunk,
        which says what context was dropped, or None when none came; the rest)."""
        chunks = self.client.stream_turn(job.text, job.speaker, job.context, request_id=request_id, **job.options)
        try:
            return await anext(chunks), chunks
        except StopAsyncIteration:
            return None, chunks
        except BaseException as error:
            await chunks.aclose()
            if isinstance(error, CSMError):
                raise from_triton(error, job.text_param) from error
            raise


def create_app(config: GatewayConfig | None = None) -> FastAPI:
    config = config or GatewayConfig()
    gateway = Gateway(config)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        logger.info(
            "gateway for %s at %s: voices %s", config.stream_model, config.triton_url, ", ".join(v.name for v in gateway.voices.all())
        )
        yield
        await gateway.close()

    app = FastAPI(title="CSM speech gateway", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.gateway = gateway
    # Each add wraps those before it: request ids outermost, then CORS, the count, the body's deadline.
    app.add_middleware(BodyDeadline, timeout_s=config.body_timeout_s, metrics=gateway.metrics)
    app.add_middleware(CountRequests, metrics=gateway.metrics)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", request_ids.HEADER], expose_headers=[request_ids.HEADER, CONTEXT_USED],
        )  # fmt: skip
    app.add_middleware(request_ids.RequestIds)
    request_ids.log_request_ids()

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        gateway.metrics.errors.labels(str(error.status)).inc()
        logger.info("%s %s: %d %r", request.method, shown(request.url.path), error.status, error.message)
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = [named(str(part)) for part in first["loc"] if part != "body"]
        param = location[0] if location else None
        where = ".".join(location) or "body"
        return await api_error(request, APIError(400, f"{where}: {first['msg']}", param, "invalid_value"))

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, shown(request.url.path))
        response = await api_error(request, APIError(500, f"internal error: {type(error).__name__}", code="internal_error"))
        # Starlette sends this response outside the middleware, RequestIds included.
        response.headers[request_ids.HEADER] = request_ids.current()
        return response

    def bearer(request: Request, keys: tuple[str, ...]) -> bool:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and any(hmac.compare_digest(key.encode(), known.encode()) for known in keys)

    def authorized(request: Request) -> None:
        if config.api_keys and not bearer(request, config.api_keys):
            raise APIError(401, "a valid API key is required (Authorization: Bearer <key>)", code="invalid_api_key")

    def manages_voices(request: Request) -> None:
        """Creating and deleting voices takes a key of voice_keys, or with open_voices what speech takes."""
        if config.open_voices:
            return authorized(request)
        if not config.voice_keys:
            raise APIError(403, "creating and deleting voices is off here (no voice_keys, open_voices false)", code="voices_off")
        if not bearer(request, config.voice_keys):
            raise APIError(401, "creating and deleting voices takes a voices key (Authorization: Bearer <key>)", code="invalid_api_key")

    async def read_json(request: Request, kind: type[Model]) -> Model:
        """The body as the request model `kind`, bounded while it is read and parsed off the event loop.
        Only as application/json: a browser sends a cross-origin POST of text/plain or a form without
        asking first, so without this any page a user visits could start speech here (CORS only keeps
        it from reading the answer); a JSON one it asks for first, which CORS refuses."""
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            got = shown(media_type) if media_type else "none"
            raise APIError(415, f"body: Content-Type must be application/json, got {got}", code="unsupported_media_type")
        data = await read_body(request, config.max_body_bytes, max_json_values=config.max_json_values)
        return await asyncio.to_thread(parse_model, kind, data)

    @app.post("/v1/audio/speech", dependencies=[Depends(authorized)])
    async def speech(request: Request) -> Response:
        started = time.monotonic()
        body: SpeechRequest = await read_json(request, SpeechRequest)
        if body.model not in config.models:
            raise APIError(404, f"model {shown(body.model)} not found; GET /v1/models lists them", "model", "model_not_found")
        voice = gateway.voice(body.voice)
        job = await asyncio.to_thread(gateway.job, body.input, "input", voice.speaker, body, voice)  # decodes context audio
        gateway.acquire()
        try:
            first, chunks = await gateway.open(job, request_ids.current())
        except BaseException:
            gateway.release()
            raise
        gateway.metrics.first_audio.labels("speech").observe(time.monotonic() - started)
        media_type = "text/event-stream" if body.stream_format == "sse" else audio.FORMATS[body.response_format].media_type
        used = job.context_used(first)
        stream = speech_body(gateway, body, job, first, chunks)  # releases the stream's slot when it ends
        # Started here, so that its `finally` (the slot, the Triton stream) runs however the response
        # ends, even if the client is gone before the body is sent (then at its garbage collection).
        head = await anext(stream, b"")
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", CONTEXT_USED: ",".join(map(str, used))}
        return StreamingResponse(joined(head, stream), media_type=media_type, headers=headers)

    @app.post("/generate", dependencies=[Depends(authorized)])
    async def generate(request: Request) -> JSONResponse:
        body: GenerateRequest = await read_json(request, GenerateRequest)
        job = await asyncio.to_thread(gateway.job, body.text, "text", body.speaker, body)
        gateway.acquire()
        try:
            first, chunks = await gateway.open(job, request_ids.current())
            parts = [] if first is None else [first]
            async with contextlib.aclosing(chunks):
                parts.extend([chunk async for chunk in chunks])
        except CSMError as error:
            raise from_triton(error, job.text_param) from error
        finally:
            gateway.release()
        samples = np.concatenate([part.audio for part in parts]) if parts else np.zeros(0, np.float32)
        gateway.metrics.audio_seconds.inc(len(samples) / audio.SAMPLE_RATE)
        return JSONResponse({
            "audio": base64.b64encode(audio.wav_bytes(samples)).decode("ascii"), "sample_rate": audio.SAMPLE_RATE,
            "turn": gateway.reference(job, [part.codes for part in parts]), "context_used": job.context_used(first),
        })  # fmt: skip

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        return {"object": "list", "data": [model_card(name) for name in config.models]}

    @app.get("/v1/models/{name}", dependencies=[Depends(authorized)])
    async def model(name: str) -> dict:
        if name not in config.models:
            raise APIError(404, f"model {shown(name)} not found", "model", "model_not_found")
        return model_card(name)

    @app.get("/v1/audio/voices", dependencies=[Depends(authorized)])
    async def voices() -> dict:
        return {"object": "list", "data": [voice.card() for voice in gateway.voices.all()]}

    @app.post("/v1/audio/voices", dependencies=[Depends(manages_voices)])
    async def create_voice(request: Request) -> dict:
        """OpenAI's custom voice from an audio sample (multipart: name, audio_sample, consent), with
        CSM's `transcript` of the clip and an optional `speaker` id (0)."""
        data = await read_body(request, config.max_voice_upload_bytes + FORM_FIELDS_BYTES, "audio_sample")
        form = await asyncio.to_thread(parse_form, data, request.headers.get("content-type", ""))
        del data  # the body: the clip is decoded without it
        clip = form.files.get("audio_sample")
        if clip is None:
            raise APIError(400, "audio_sample: a file is required", "audio_sample", "missing_field")
        if len(clip) > config.max_voice_upload_bytes:
            raise APIError(
                413, f"audio_sample: more than max_voice_upload_bytes {config.max_voice_upload_bytes}", "audio_sample", "request_too_large"
            )
        fields = form.fields
        if fields.get("type", "audio_sample") != "audio_sample":
            raise APIError(400, "type: only audio_sample voices can be made here (CSM has no voices from prompts)", "type", "invalid_value")
        try:
            voice = await asyncio.to_thread(
                gateway.voices.create, fields.get("name", ""), clip, fields.get("transcript", ""), fields.get("consent", ""),
                fields.get("speaker", "0"),
            )  # fmt: skip
        except VoiceError as error:
            raise APIError(400, str(error), error.param, "invalid_value") from error
        logger.info("voice %s (%s) created: speaker %d, %.1f s clip", voice.id, voice.name, voice.speaker, len(voice.samples) / voice.rate)
        return voice.card()

    @app.delete("/v1/audio/voices/{voice_id}", dependencies=[Depends(manages_voices)])
    async def delete_voice(voice_id: str) -> dict:
        if gateway.voices.delete(voice_id) is None:
            raise APIError(404, f"no custom voice with id {shown(voice_id)}", "voice_id", "voice_not_found")
        return {"id": voice_id, "object": "audio.voice.deleted", "deleted": True}

    @app.get("/health")
    async def health() -> JSONResponse:
        """Whether csm_stream serves: its answer to a probe, which also tells a stub process that
        has died from one that lives (Triton's readiness says READY for both)."""
        problem = await gateway.client.probe()
        status = {"status": "ready" if problem is None else "unavailable", "model": config.stream_model, "triton": config.triton_url}
        if problem is not None:
            status["reason"] = problem
        return JSONResponse(status, status_code=200 if problem is None else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type=gateway.metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


class CountRequests:
    """Counts every answer by route and status (plain ASGI: it never reads or wraps the body, so a
    streamed response still sees its client go away)."""

    def __init__(self, app: Any, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")
                self.metrics.requests.labels(getattr(route, "path", "other"), str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counted)


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "sesame"}


async def speech_body(
    gateway: Gateway, request: SpeechRequest, job: Job, first: TurnChunk | None, chunks: AsyncIterator[TurnChunk]
) -> AsyncIterator[bytes]:
    """The response body: each chunk through the speed change and the encoder as it comes; for sse,
    each piece as a `speech.audio.delta` event with the reference of the turn so far (its text,
    speaker and the codes of every chunk received, which cover at least the audio sent: a client
    that stops the reply sends it back with played_ms), then `speech.audio.done` with the whole
    turn's reference and the context turns used. Closing it (the client gone) closes `chunks`,
    which cancels the Triton stream."""
    sse = request.stream_format == "sse"
    encoder = audio.Encoder(request.response_format)
    tempo = audio.SpeedChange(request.speed) if request.speed != 1.0 else None
    frames = 0
    codes: list[np.ndarray] = []  # the turn's, for its reference, which only sse has a place for
    signed = (-1, "")  # (chunks signed, their reference): each chunk's codes are signed once, when an event goes out

    def turn_so_far() -> str:
        nonlocal signed
        if signed[0] != len(codes):
            signed = (len(codes), gateway.reference(job, codes))  # ~1 ms for the longest turn
        return signed[1]

    def piece(data: bytes) -> bytes:
        if not sse:
            return data
        if not data:  # the encoder held it back: a later event carries a later reference
            return b""
        return event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii"), "turn": turn_so_far()})

    def encode(samples: np.ndarray) -> bytes:
        return encoder.feed(tempo.feed(samples) if tempo else samples)

    try:
        async with contextlib.aclosing(chunks):
            chunk = first
            while chunk is not None:
                frames += len(chunk.audio) // SAMPLES_PER_FRAME
                gateway.metrics.audio_seconds.inc(len(chunk.audio) / audio.SAMPLE_RATE)
                if sse:
                    codes.append(chunk.codes)
                if len(chunk.audio) and (data := piece(encode(chunk.audio))):  # the first chunk may hold no audio
                    yield data
                chunk = await anext(chunks, None)
        tail = (encoder.feed(tempo.finish()) if tempo else b"") + encoder.finish()
        if data := piece(tail):
            yield data
        if sse:
            usage = {"input_tokens": 0, "output_tokens": frames, "total_tokens": frames}
            yield event({"type": "speech.audio.done", "usage": usage, "turn": turn_so_far(), "context_used": job.context_used(first)})
    except CSMError as failure:  # after the first chunk: the status line has gone already
        logger.warning("speech stream failed after %d frames: %s", frames, failure.message)
        if sse:
            yield event({"type": "error", "error": from_triton(failure).body()["error"]})
        else:
            raise  # the connection is cut before the body's end, so the client sees an incomplete response
    except (asyncio.CancelledError, GeneratorExit):
        gateway.metrics.cancelled.inc()
        logger.info("client went away after %d frames: its Triton stream was cancelled", frames)
        raise
    finally:
        encoder.close()
        gateway.release()


async def joined(head: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if head:
        yield head
    async for piece in rest:
        yield piece


def event(data: dict) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()
