"""The gateway's HTTP API (FastAPI): OpenAI's `POST /v1/audio/speech` streamed from Triton's
decoupled `csm_stream` model over gRPC, `GET /v1/models`, `GET /v1/audio/voices`, the design
document's `POST /generate`, `/health`, `/metrics` and the page at `/`.

A speech request becomes one csm_stream request (csm_client's AsyncCSMClient builds its tensors);
its audio chunks are encoded and sent as they arrive, so the first bytes leave with the first
chunk. A client that goes away closes the response's iterator, which cancels the Triton stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from csm_client import AsyncCSMClient, CSMError, Segment

from . import audio, request_ids
from .config import GatewayConfig, load_voices
from .connections import BodyDeadline
from .errors import APIError, from_triton, named, shown
from .metrics import GatewayMetrics
from .voices import StoredVoice, VoiceError, VoiceLibrary

logger = logging.getLogger("gateway")
STATIC = Path(__file__).parent / "static"
SAMPLES_PER_FRAME = 1920  # one 80 ms Mimi frame at 24 kHz


class VoiceRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str


# One Mimi frame of a turn's codes: csm_stream checks the values (below its audio vocabulary);
# here they need only fit its INT32 tensor.
CodeFrame = Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(min_length=32, max_length=32)]


class Turn(BaseModel):
    """An earlier turn of the conversation: its text and speaker, and its audio as base64 (WAV,
    or anything ffmpeg decodes) or the Mimi codes the server returned for it ([frames][32]
    integers: AUDIO_CODES), which csm_stream uses as they are, never encoding them."""

    model_config = ConfigDict(extra="forbid")
    text: str
    speaker: int = Field(ge=0)
    audio: str | None = None
    codes: list[CodeFrame] | None = Field(default=None, min_length=1)


class Sampling(BaseModel):
    """CSM's extensions to OpenAI's request; those left out take the server's defaults."""

    seed: int | None = Field(default=None, ge=0, lt=2**63)
    temperature: float | None = Field(default=None, gt=0)
    topk: int | None = Field(default=None, ge=1)
    max_audio_length_ms: int | None = Field(default=None, ge=80)
    context: list[Turn] = Field(default_factory=list)


class SpeechRequest(Sampling):
    model_config = ConfigDict(extra="forbid")
    model: str
    input: str
    voice: str | VoiceRef
    instructions: str | None = None  # accepted for compatibility; CSM takes no style instructions
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"


class GenerateRequest(Sampling):
    """The design document's REST route: text, speaker, temperature, topk -> {"audio": base64 WAV}."""

    model_config = ConfigDict(extra="forbid")
    text: str
    speaker: int = Field(default=0, ge=0)


@dataclass
class Job:
    """One request for csm_stream, as the client's stream call takes it."""

    text: str
    speaker: int
    context: list[Segment]
    options: dict[str, Any]


class Gateway:
    """What the routes share: the configuration, the voices, one asyncio Triton client, the count
    of streams in flight and the metrics."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.voices = VoiceLibrary(load_voices(config.voices_file), config.max_voice_clip_s, config.voices_dir, config.max_custom_voices)
        self.metrics = GatewayMetrics()
        self.streams = 0
        self._client: AsyncCSMClient | None = None

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
        """Checks what the gateway bounds itself (the rest is csm_stream's to check) and decodes the context audio."""
        if not text.strip():
            raise APIError(400, f"{text_param}: must not be blank", text_param, "invalid_value")
        if len(text) > self.config.max_input_chars:
            raise APIError(
                400, f"{text_param}: {len(text)} characters, more than {self.config.max_input_chars}", text_param, "string_above_max_length"
            )
        context: list[Segment] = []
        budget = self.config.max_context_audio_s
        if voice is not None and voice.samples is not None:
            context.append(Segment(speaker=voice.speaker, text=voice.transcript, audio=voice.samples, sample_rate=voice.rate))
        for index, turn in enumerate(request.context):
            clip, rate = None, audio.SAMPLE_RATE
            if turn.codes is not None:
                if turn.audio is not None:
                    raise APIError(400, f"context[{index}]: holds both audio and codes; send one of them", "context", "invalid_value")
                context.append(Segment(speaker=turn.speaker, text=turn.text, codes=np.array(turn.codes, dtype=np.int32)))
                continue
            if turn.audio is not None:
                try:
                    clip, rate = audio.decode_base64_audio(turn.audio, budget)
                except audio.AudioInputError as error:
                    raise APIError(400, f"context[{index}].audio: {error}", "context", "invalid_audio") from error
                budget -= len(clip) / rate
            context.append(Segment(speaker=turn.speaker, text=turn.text, audio=clip, sample_rate=rate))
        rates = {segment.sample_rate for segment in context if segment.audio is not None}
        if len(rates) > 1:  # Triton takes one CONTEXT_SAMPLE_RATE a request: bring the clips to Mimi's
            for segment in context:
                if segment.audio is not None and segment.sample_rate != audio.SAMPLE_RATE:
                    segment.audio = audio.resample(segment.audio, segment.sample_rate, audio.SAMPLE_RATE)
                    segment.sample_rate = audio.SAMPLE_RATE
        options = {
            "seed": request.seed,
            "temperature": request.temperature,
            "topk": request.topk,
            "max_audio_length_ms": request.max_audio_length_ms,
            "first_chunk_frames": self.config.first_chunk_frames,
            "voice": voice.server_voice if voice is not None and voice.server_voice else None,
        }
        return Job(text, speaker, context, {key: value for key, value in options.items() if value is not None})

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

    async def open(self, job: Job, request_id: str) -> tuple[np.ndarray | None, AsyncIterator[np.ndarray]]:
        """Starts the Triton stream (its request id the HTTP request's) and waits for its first chunk,
        so that an invalid request gets its status code before any byte is sent: (the first chunk or
        None when no audio came, the rest)."""
        chunks = self.client.stream(job.text, job.speaker, job.context, request_id=request_id, **job.options)
        try:
            return await anext(chunks), chunks
        except StopAsyncIteration:
            return None, chunks
        except BaseException as error:
            await chunks.aclose()
            if isinstance(error, CSMError):
                raise from_triton(error) from error
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
            allow_headers=["Authorization", "Content-Type", request_ids.HEADER], expose_headers=[request_ids.HEADER],
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

    async def read_json(request: Request, kind: type[BaseModel]) -> Any:
        """The body, bounded before it is read (Content-Length) and while it is (chunked)."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > config.max_body_bytes:
            raise APIError(413, f"request body of {length} bytes, more than {config.max_body_bytes}", code="request_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > config.max_body_bytes:
                raise APIError(413, f"request body larger than {config.max_body_bytes} bytes", code="request_too_large")
        try:
            data = json.loads(body)
        except ValueError as error:
            raise APIError(400, f"body: not JSON ({error})", code="invalid_json") from error
        try:
            return kind.model_validate(data)
        except ValueError as error:  # pydantic's ValidationError
            raise RequestValidationError(error.errors()) from error

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
        stream = speech_body(gateway, body, first, chunks)  # releases the stream's slot when it ends
        # Started here, so that its `finally` (the slot, the Triton stream) runs however the response
        # ends, even if the client is gone before the body is sent (then at its garbage collection).
        head = await anext(stream, b"")
        return StreamingResponse(
            joined(head, stream), media_type=media_type, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

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
            raise from_triton(error) from error
        finally:
            gateway.release()
        samples = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        gateway.metrics.audio_seconds.inc(len(samples) / audio.SAMPLE_RATE)
        return JSONResponse({"audio": base64.b64encode(audio.wav_bytes(samples)).decode("ascii"), "sample_rate": audio.SAMPLE_RATE})

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
        length = request.headers.get("content-length", "")
        limit = config.max_voice_upload_bytes + 64 * 1024  # the form's other fields besides the clip
        if length.isdigit() and int(length) > limit:
            raise APIError(
                413,
                f"upload of {length} bytes, more than max_voice_upload_bytes {config.max_voice_upload_bytes}",
                "audio_sample",
                "request_too_large",
            )
        try:
            form = await request.form(max_files=1, max_fields=16)
        except Exception as error:  # starlette's MultiPartException, or a body that is no form at all
            raise APIError(400, f"body: not a multipart form ({error})", code="invalid_form") from error
        try:
            fields = {key: value for key, value in form.items() if isinstance(value, str)}
            sample = form.get("audio_sample")
            if sample is None or isinstance(sample, str):
                raise APIError(400, "audio_sample: a file is required", "audio_sample", "missing_field")
            clip = await sample.read(config.max_voice_upload_bytes + 1)
        finally:
            await form.close()
        if len(clip) > config.max_voice_upload_bytes:
            raise APIError(
                413, f"audio_sample: more than max_voice_upload_bytes {config.max_voice_upload_bytes}", "audio_sample", "request_too_large"
            )
        if fields.get("type", "audio_sample") != "audio_sample":
            raise APIError(400, "type: only audio_sample voices can be made here (CSM has no voices from prompts)", "type", "invalid_value")
        speaker = fields.get("speaker", "0")
        if not speaker.lstrip("-").isdigit():
            raise APIError(400, f"speaker: must be a whole number, got {speaker!r}", "speaker", "invalid_value")
        try:
            voice = await asyncio.to_thread(
                gateway.voices.create, fields.get("name", ""), clip, fields.get("transcript", ""), fields.get("consent", ""), int(speaker)
            )
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
    gateway: Gateway, request: SpeechRequest, first: np.ndarray | None, chunks: AsyncIterator[np.ndarray]
) -> AsyncIterator[bytes]:
    """The response body: each chunk through the speed change and the encoder as it comes; for sse,
    each piece as a `speech.audio.delta` event, then `speech.audio.done`. Closing it (the client
    gone) closes `chunks`, which cancels the Triton stream."""
    sse = request.stream_format == "sse"
    encoder = audio.Encoder(request.response_format)
    tempo = audio.SpeedChange(request.speed) if request.speed != 1.0 else None
    frames = 0

    def piece(data: bytes) -> bytes:
        if not sse:
            return data
        return b"" if not data else event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})

    def encode(samples: np.ndarray) -> bytes:
        return encoder.feed(tempo.feed(samples) if tempo else samples)

    try:
        async with contextlib.aclosing(chunks):
            chunk = first
            while chunk is not None:
                frames += len(chunk) // SAMPLES_PER_FRAME
                gateway.metrics.audio_seconds.inc(len(chunk) / audio.SAMPLE_RATE)
                if data := piece(encode(chunk)):
                    yield data
                chunk = await anext(chunks, None)
        tail = (encoder.feed(tempo.finish()) if tempo else b"") + encoder.finish()
        if data := piece(tail):
            yield data
        if sse:
            yield event({"type": "speech.audio.done", "usage": {"input_tokens": 0, "output_tokens": frames, "total_tokens": frames}})
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
