"""Clients for the "csm" Triton model over gRPC or HTTP, blocking and asyncio, and for the
decoupled "csm_stream" model over gRPC streams (`stream`: audio chunks as they are generated).

All four transports (grpc, http, grpc.aio, http.aio) share `build_inputs`, so a request is the
same tensors whichever way it travels; they differ only in the tritonclient class they drive.
The server validates every request: its INVALID_ARG messages come back as `CSMError`.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import numpy as np
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from .contract import AUDIO_NUM_CODEBOOKS, INPUTS, SAMPLE_RATE
from .control import PROBE, SILENCE_PROBE_S, stream_model_gone
from .segment import context_arrays

if TYPE_CHECKING:  # annotations only: typing.Unpack needs Python 3.11 (NVIDIA's container has 3.10)
    from typing_extensions import Unpack

logger = logging.getLogger(__name__)

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
DEFAULT_TIMEOUT_S = 300.0  # generation of long audio on a busy server takes a while
DEFAULT_STREAM_MODEL = "csm_stream"
# Refusals, not failures: Triton's message when a model's queue is full (max_queue_size), and the csm
# model's when it forwards max_inflight requests already ("csm: 64 requests in flight; retry later").
BUSY_MARKERS = ("Exceeds maximum queue size", "requests in flight; retry later")
BUSY_PREFIX = "server busy: "
# Asks Triton (24.09 and later) to end a stream with the request's gRPC status (INVALID_ARGUMENT, ...)
# instead of an error message alone, so that streamed errors carry a status like unary ones.
STREAM_HEADERS = {"triton_grpc_error": "true"}
# How long a PROBE of the stream model may take: a live one answers at once.
PROBE_TIMEOUT_S = 10.0
LOST_STATUS = "StatusCode.UNAVAILABLE"


class CSMError(Exception):
    """A failed request: the server's message (for an invalid request it starts with the
    offending tensor's name, e.g. "TOPK: ..."), or why the server could not be reached."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    @property
    def busy(self) -> bool:
        """The server was full and refused the request (a full queue, or csm's max_inflight): worth
        retrying later, unlike an invalid request."""
        return self.message.startswith(BUSY_PREFIX)

    @classmethod
    def wrap(cls, error: BaseException, url: str) -> CSMError:
        """The CSMError for what a tritonclient call raised. A request refused because the server
        is full gets the message "server busy: <the server's message>", whichever transport it used."""
        if isinstance(error, InferenceServerException):
            message = error.message() or str(error)
            busy = any(marker in message for marker in BUSY_MARKERS)
            return cls(f"{BUSY_PREFIX}{message}" if busy else message, error.status())
        return cls(f"cannot reach the server at {url}: {type(error).__name__}: {error}")


def request_arrays(
    text: str,
    speaker: int,
    context: Sequence[Any] = (),
    temperature: float | None = None,
    topk: int | None = None,
    max_audio_length_ms: int | None = None,
    seed: int | None = None,
    first_chunk_frames: int | None = None,
    chunk_frames: int | None = None,
    voice: str | None = None,
    context_overflow: str | None = None,
    context_pinned: int | None = None,
) -> dict[str, np.ndarray]:
    """One request's input arrays, each with its batch dimension of 1. Optional inputs left as
    None are not sent, so the server's defaults apply. The chunk sizes (frames of 80 ms) are
    inputs of the streaming model only. `voice` names a voice of csm_stream's voice library (its
    clip becomes the first context segment). `context_overflow` "drop_oldest" lets the server drop
    the oldest context segments, all but the first `context_pinned`, until the prompt fits."""
    if not isinstance(text, str):
        raise ValueError(f"text: must be a string, got {type(text).__name__}")
    arrays = {
        "TEXT": np.array([[text.encode("utf-8")]], dtype=INPUTS["TEXT"].dtype),
        "SPEAKER": np.array([[speaker]], dtype=INPUTS["SPEAKER"].dtype),
    }
    arrays.update(context_arrays(context))
    optional = {
        "TEMPERATURE": temperature,
        "TOPK": topk,
        "MAX_AUDIO_LENGTH_MS": max_audio_length_ms,
        "SEED": seed,
        "FIRST_CHUNK_FRAMES": first_chunk_frames,
        "CHUNK_FRAMES": chunk_frames,
        "VOICE": None if voice is None else voice.encode("utf-8"),
        "CONTEXT_OVERFLOW": None if context_overflow is None else context_overflow.encode("utf-8"),
        "CONTEXT_PINNED": context_pinned,
    }
    for name, value in optional.items():
        if value is not None:
            arrays[name] = np.array([[value]], dtype=INPUTS[name].dtype)
    return arrays


def build_inputs(module: ModuleType, text: str, speaker: int, context: Sequence[Any] = (), **options: Any) -> list:
    """The InferInput list of one request for a tritonclient protocol module (tritonclient.grpc,
    tritonclient.http or their .aio). `options`: request_arrays' (temperature, topk, ..., and for
    the streaming model first_chunk_frames, chunk_frames)."""
    inputs = []
    for name, array in request_arrays(text, speaker, context, **options).items():
        infer_input = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


def protocol_module(protocol: str, aio: bool = False) -> ModuleType:
    """tritonclient.grpc / .http (or their .aio), imported on demand: each pulls in its own
    transport (grpcio, geventhttpclient, aiohttp)."""
    if protocol not in DEFAULT_URLS:
        raise ValueError(f"protocol: must be 'grpc' or 'http', got {protocol!r}")
    return importlib.import_module(f"tritonclient.{protocol}{'.aio' if aio else ''}")


def check_streaming(protocol: str) -> None:
    """Streams are gRPC's: tritonclient's HTTP clients cannot receive a decoupled model's responses."""
    if protocol != "grpc":
        raise CSMError(f"streaming needs protocol='grpc' (tritonclient streams only over gRPC); this client uses {protocol!r}")


def transport_errors(protocol: str, aio: bool) -> tuple[type[BaseException], ...]:
    """What a failed call raises: Triton's errors, and the HTTP clients' connection errors,
    which tritonclient passes through unwrapped."""
    errors: tuple[type[BaseException], ...] = (InferenceServerException, OSError, asyncio.TimeoutError)
    if protocol == "http" and aio:
        import aiohttp

        errors += (aiohttp.ClientError,)
    return errors


class Options(TypedDict, total=False):
    """Optional sampling settings; those left out take the server's defaults."""

    temperature: float
    topk: int
    max_audio_length_ms: int
    seed: int
    voice: str  # a voice of csm_stream's voice library
    context_overflow: str  # "refuse" (the default) or "drop_oldest": what the server does with a context too long for the prompt
    context_pinned: int  # under drop_oldest, the first context segments that are never dropped


@dataclass(frozen=True)
class TurnChunk:
    """One chunk of a streamed turn (`stream_turn`), with what a conversation keeps of it: its codes,
    which go back as the turn's context codes next time (never encoded again), on the first
    chunk how many of the request's context segments the server dropped to fit the prompt
    (context_overflow "drop_oldest"), so that the caller can forget them too, and, on the last
    chunk of a turn streamed `with_reference`, the turn's reference: one string that goes back in
    their place (`TurnRef(chunk.turn)`)."""

    audio: np.ndarray  # [samples] float32 at 24 kHz
    codes: np.ndarray  # [frames, 32] int32: this chunk's Mimi codes (AUDIO_CODES)
    context_dropped: int | None = None  # on the first chunk only
    turn: str | None = None  # on the last chunk only, of a turn that completed (TURN)


# What each kind of stream asks for.
AUDIO_OUTPUTS = ("AUDIO",)
TURN_OUTPUTS = ("AUDIO", "AUDIO_CODES", "CONTEXT_DROPPED")


def _turn_outputs(with_reference: bool) -> tuple[str, ...]:
    """What a stream_turn asks for: TURN only when asked, since a server without a turn key refuses it."""
    return (*TURN_OUTPUTS, "TURN") if with_reference else TURN_OUTPUTS


Chunk = TypeVar("Chunk")


def _audio(result: Any) -> np.ndarray:
    return result.as_numpy("AUDIO")[0].copy()  # [1, samples] -> [samples]; copied: tritonclient's view is read-only


def _codes(result: Any) -> np.ndarray:
    return result.as_numpy("AUDIO_CODES")[0].copy()  # [1, frames, 32] -> [frames, 32]


def _chunk(result: Any) -> np.ndarray | None:
    """A streamed response's samples; None for an empty one (the final flag alone, or zero samples)."""
    audio = result.as_numpy("AUDIO")
    return audio[0].copy() if audio is not None and audio.size else None


def _turn_chunk(result: Any) -> TurnChunk | None:
    """A streamed response as a TurnChunk; None for an empty one, unless it is the first or the
    last: they carry CONTEXT_DROPPED and TURN, also for a turn that has no frame."""
    dropped, turn = result.as_numpy("CONTEXT_DROPPED"), result.as_numpy("TURN")
    audio = _chunk(result)
    if audio is None and dropped is None and turn is None:
        return None
    codes = result.as_numpy("AUDIO_CODES")
    return TurnChunk(
        np.zeros(0, np.float32) if audio is None else audio,
        np.zeros((0, AUDIO_NUM_CODEBOOKS), np.int32) if codes is None else codes[0].copy(),  # [1, frames, 32] -> [frames, 32]
        None if dropped is None else int(dropped.reshape(-1)[0]),
        None if turn is None else turn.reshape(-1)[0].decode("ascii"),
    )


def _stream_inputs(
    client: CSMClient | AsyncCSMClient,
    text: str,
    speaker: int,
    context: Sequence[Any],
    first_chunk_frames: int | None,
    chunk_frames: int | None,
    options: dict[str, Any],
) -> list:
    """A stream's request, built before its iterator starts, so that a bad argument raises at the call."""
    check_streaming(client.protocol)
    inputs = build_inputs(
        client.module, text, speaker, context, first_chunk_frames=first_chunk_frames, chunk_frames=chunk_frames, **options
    )
    logger.debug("stream %s: speaker %d, %d context segments, %s", client.url, speaker, len(context), options)
    return inputs


def _is_final(result: Any) -> bool:
    parameters = result.get_response().parameters
    return "triton_final_response" in parameters and parameters["triton_final_response"].bool_param


def _lost(model: str, answer: str | None) -> CSMError | None:
    """The error that ends a silent stream when a PROBE's answer shows its stream model's process
    dead or unloaded since: its streams never end otherwise (control.py says why)."""
    if not stream_model_gone(answer):
        return None
    return CSMError(f"{model}'s process died and this stream was lost; retry it ({answer})", LOST_STATUS)


class CSMClient:
    """Blocking client: `generate` -> (float32 audio [samples], 24000), `generate_codes` ->
    int32 Mimi codes [frames, 32], `stream` -> audio chunks as they are made (gRPC). One client
    per thread (tritonclient's are not thread-safe)."""

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        model_name: str = "csm",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        stream_model_name: str = DEFAULT_STREAM_MODEL,
        silence_probe_s: float = SILENCE_PROBE_S,
    ) -> None:
        self.module = protocol_module(protocol)
        self.url = url or DEFAULT_URLS[protocol]
        self.protocol = protocol
        self.model_name = model_name
        self.stream_model_name = stream_model_name
        self.timeout_s = timeout_s
        self.silence_probe_s = silence_probe_s
        self._errors = transport_errors(protocol, aio=False)
        self._streaming = False  # whether self._client's one gRPC stream is taken
        if protocol == "grpc":
            self._client = self.module.InferenceServerClient(self.url)
            self._infer_options = {"client_timeout": timeout_s}
        else:
            self._client = self.module.InferenceServerClient(self.url, network_timeout=timeout_s)
            self._infer_options = {}

    def is_ready(self) -> bool:
        """Whether the server answers and the model is loaded."""
        try:
            return bool(self._client.is_model_ready(self.model_name, **self._infer_options))
        except self._errors as error:
            logger.debug("%s not ready at %s: %s", self.model_name, self.url, error)
            return False

    def probe(self) -> str | None:
        """The stream model's answer to a PROBE: None while it can serve, else why it cannot
        (a stub process that has died, a model not loaded, ...). gRPC only."""
        check_streaming(self.protocol)
        answers: queue.Queue[InferenceServerException | None] = queue.Queue()
        triton = self.module.InferenceServerClient(self.url)
        try:
            triton.start_stream(lambda result, error: answers.put(error), stream_timeout=PROBE_TIMEOUT_S, headers=STREAM_HEADERS)
            triton.async_stream_infer(
                self.stream_model_name, build_inputs(self.module, "", 0), parameters={PROBE: True}, enable_empty_final_response=True
            )
            error = answers.get(timeout=PROBE_TIMEOUT_S)
        except queue.Empty:
            return f"no answer to a probe in {PROBE_TIMEOUT_S:.0f} s"
        except self._errors as failure:
            error = failure
        finally:
            triton.stop_stream(cancel_requests=True)
            triton.close()
        return None if error is None else CSMError.wrap(error, self.url).message

    def _infer(self, output: str, text: str, speaker: int, context: Sequence[Any], **options: Any) -> Any:
        inputs = build_inputs(self.module, text, speaker, context, **options)
        logger.debug("%s %s: speaker %d, %d context segments, %s", self.protocol, self.url, speaker, len(context), options)
        try:
            return self._client.infer(self.model_name, inputs, outputs=[self.module.InferRequestedOutput(output)], **self._infer_options)
        except self._errors as error:
            raise CSMError.wrap(error, self.url) from error

    def generate(self, text: str, speaker: int, context: Sequence[Any] = (), **options: Unpack[Options]) -> tuple[np.ndarray, int]:
        """Speak `text` as `speaker` after `context`: (mono float32 audio [samples], sample rate)."""
        return _audio(self._infer("AUDIO", text, speaker, context, **options)), SAMPLE_RATE

    def generate_codes(self, text: str, speaker: int, context: Sequence[Any] = (), **options: Unpack[Options]) -> np.ndarray:
        """The sampled Mimi codes, int32 [frames, 32], without decoding them to audio."""
        return _codes(self._infer("AUDIO_CODES", text, speaker, context, **options))

    def stream(
        self,
        text: str,
        speaker: int,
        context: Sequence[Any] = (),
        *,
        first_chunk_frames: int | None = None,
        chunk_frames: int | None = None,
        request_id: str = "",
        **options: Unpack[Options],
    ) -> Iterator[np.ndarray]:
        """Speak `text` as `speaker` after `context`, yielding mono float32 audio chunks as the
        server makes them, so playback can start after the first `first_chunk_frames` frames (80 ms
        each) instead of at the end; later chunks hold `chunk_frames` frames (None: the server's
        schedule, by default as many as keep ahead of playback). Joined, the chunks are
        `generate`'s audio. Closing the iterator early (break, .close()) cancels the request on
        the server. After `silence_probe_s` without a chunk the client PROBEs the stream model,
        and raises CSMError (UNAVAILABLE) when its process has died: such a stream never ends
        otherwise. `request_id` is the Triton request's id (in Triton's log and its responses).
        gRPC only."""
        inputs = _stream_inputs(self, text, speaker, context, first_chunk_frames, chunk_frames, options)
        return self._chunks(inputs, request_id, AUDIO_OUTPUTS, _chunk)

    def stream_turn(
        self,
        text: str,
        speaker: int,
        context: Sequence[Any] = (),
        *,
        first_chunk_frames: int | None = None,
        chunk_frames: int | None = None,
        request_id: str = "",
        with_reference: bool = False,
        **options: Unpack[Options],
    ) -> Iterator[TurnChunk]:
        """`stream` for a conversation's turn: TurnChunks, each chunk's codes beside its audio, the
        first with how many context segments the server dropped (context_overflow), and
        `with_reference` the last with the turn's reference (TurnChunk.turn; a server without a
        turn key refuses it). gRPC only."""
        inputs = _stream_inputs(self, text, speaker, context, first_chunk_frames, chunk_frames, options)
        return self._chunks(inputs, request_id, _turn_outputs(with_reference), _turn_chunk)

    def _chunks(self, inputs: list, request_id: str, outputs: Sequence[str], read: Callable[[Any], Chunk | None]) -> Iterator[Chunk]:
        """The stream's responses, `outputs` asked for, as `read` makes them (None: an empty one, skipped)."""
        # tritonclient allows one stream per client: the first uses our client (its channel is
        # already connected), a stream opened while it runs gets a client of its own.
        own = self._streaming
        triton = self.module.InferenceServerClient(self.url) if own else self._client
        self._streaming = True
        responses: queue.Queue[tuple[Any, InferenceServerException | None]] = queue.Queue()
        finished = False
        try:
            triton.start_stream(lambda result, error: responses.put((result, error)), stream_timeout=self.timeout_s, headers=STREAM_HEADERS)
            # The empty final response (of a request the server cancels) tells that the request ended.
            requested = [self.module.InferRequestedOutput(name) for name in outputs]
            try:
                triton.async_stream_infer(
                    self.stream_model_name, inputs, outputs=requested, request_id=request_id, enable_empty_final_response=True
                )
            except InferenceServerException:
                # The stream broke before the request went out (an unreachable server): its callback has the reason.
                _, error = responses.get(timeout=self.timeout_s)
                raise CSMError.wrap(error, self.url) from error
            last_response = time.monotonic()
            while not finished:
                try:
                    result, error = responses.get(timeout=self.silence_probe_s)
                except queue.Empty:
                    if time.monotonic() - last_response > self.timeout_s:
                        raise CSMError(f"{self.stream_model_name} at {self.url}: no response in {self.timeout_s:.0f} s") from None
                    if lost := _lost(self.stream_model_name, self.probe()):
                        raise lost from None
                    continue
                last_response = time.monotonic()
                if error is not None:
                    raise CSMError.wrap(error, self.url) from error
                finished = _is_final(result)
                chunk = read(result)
                if chunk is not None:
                    yield chunk
        except self._errors as error:
            raise CSMError.wrap(error, self.url) from error
        finally:
            if not finished:
                logger.debug("stream %s: cancelling the request", self.url)
            triton.stop_stream(cancel_requests=not finished)
            if own:
                triton.close()
            else:
                self._streaming = False

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> CSMClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncCSMClient:
    """asyncio client with CSMClient's methods as coroutines (`stream` as an async iterator);
    concurrent calls (asyncio.gather) are batched together by the server. Use it from one event loop."""

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        model_name: str = "csm",
        timeout_s: float = DEFAULT_TIMEOUT_S,
        stream_model_name: str = DEFAULT_STREAM_MODEL,
        silence_probe_s: float = SILENCE_PROBE_S,
    ) -> None:
        self.module = protocol_module(protocol, aio=True)
        self.url = url or DEFAULT_URLS[protocol]
        self.protocol = protocol
        self.model_name = model_name
        self.stream_model_name = stream_model_name
        self.timeout_s = timeout_s
        self.silence_probe_s = silence_probe_s
        self._errors = transport_errors(protocol, aio=True)
        self._infer_options = {"client_timeout": timeout_s} if protocol == "grpc" else {}
        self._client: Any = None

    def _triton(self) -> Any:
        # Made on first use: aiohttp's session must be created inside the running event loop.
        if self._client is None:
            if self.protocol == "grpc":
                self._client = self.module.InferenceServerClient(self.url)
            else:
                self._client = self.module.InferenceServerClient(self.url, conn_timeout=self.timeout_s)
        return self._client

    async def is_ready(self) -> bool:
        """Whether the server answers and the model is loaded."""
        try:
            return bool(await self._triton().is_model_ready(self.model_name, **self._infer_options))
        except self._errors as error:
            logger.debug("%s not ready at %s: %s", self.model_name, self.url, error)
            return False

    async def probe(self) -> str | None:
        """CSMClient.probe as a coroutine."""
        import grpc

        check_streaming(self.protocol)

        async def requests() -> AsyncIterator[dict]:
            yield {"model_name": self.stream_model_name, "inputs": build_inputs(self.module, "", 0), "parameters": {PROBE: True}}

        # Answered by an error, or by an empty final response, which ends the call without a result.
        answers = self._triton().stream_infer(requests(), stream_timeout=PROBE_TIMEOUT_S, headers=STREAM_HEADERS)
        try:
            async for _result, error in answers:
                if error is not None:
                    return CSMError.wrap(error, self.url).message
        except grpc.RpcError as error:
            return error.details() or str(error.code())
        except self._errors as error:
            return CSMError.wrap(error, self.url).message
        finally:
            answers.cancel()
        return None

    async def _infer(self, output: str, text: str, speaker: int, context: Sequence[Any], **options: Any) -> Any:
        inputs = build_inputs(self.module, text, speaker, context, **options)
        logger.debug("%s.aio %s: speaker %d, %d context segments, %s", self.protocol, self.url, speaker, len(context), options)
        try:
            return await self._triton().infer(
                self.model_name, inputs, outputs=[self.module.InferRequestedOutput(output)], **self._infer_options
            )
        except self._errors as error:
            raise CSMError.wrap(error, self.url) from error

    async def generate(self, text: str, speaker: int, context: Sequence[Any] = (), **options: Unpack[Options]) -> tuple[np.ndarray, int]:
        """Speak `text` as `speaker` after `context`: (mono float32 audio [samples], sample rate)."""
        return _audio(await self._infer("AUDIO", text, speaker, context, **options)), SAMPLE_RATE

    async def generate_codes(self, text: str, speaker: int, context: Sequence[Any] = (), **options: Unpack[Options]) -> np.ndarray:
        """The sampled Mimi codes, int32 [frames, 32], without decoding them to audio."""
        return _codes(await self._infer("AUDIO_CODES", text, speaker, context, **options))

    def stream(
        self,
        text: str,
        speaker: int,
        context: Sequence[Any] = (),
        *,
        first_chunk_frames: int | None = None,
        chunk_frames: int | None = None,
        request_id: str = "",
        **options: Unpack[Options],
    ) -> AsyncIterator[np.ndarray]:
        """CSMClient.stream as an async iterator (`async for chunk in client.stream(...)`).
        Closing it early (aclose(), or cancelling the task that iterates) cancels the request on
        the server; after a `break`, wrap it in contextlib.aclosing to cancel at once rather than
        when it is garbage-collected. gRPC only."""
        inputs = _stream_inputs(self, text, speaker, context, first_chunk_frames, chunk_frames, options)
        return self._chunks(inputs, request_id, AUDIO_OUTPUTS, _chunk)

    def stream_turn(
        self,
        text: str,
        speaker: int,
        context: Sequence[Any] = (),
        *,
        first_chunk_frames: int | None = None,
        chunk_frames: int | None = None,
        request_id: str = "",
        with_reference: bool = False,
        **options: Unpack[Options],
    ) -> AsyncIterator[TurnChunk]:
        """CSMClient.stream_turn as an async iterator; closing it early cancels, as for `stream`. gRPC only."""
        inputs = _stream_inputs(self, text, speaker, context, first_chunk_frames, chunk_frames, options)
        return self._chunks(inputs, request_id, _turn_outputs(with_reference), _turn_chunk)

    async def _chunks(
        self, inputs: list, request_id: str, outputs: Sequence[str], read: Callable[[Any], Chunk | None]
    ) -> AsyncIterator[Chunk]:
        """CSMClient._chunks for asyncio."""
        import grpc  # grpc.aio's stream call raises its own errors, not tritonclient's

        async def requests() -> AsyncIterator[dict]:
            # One request, then the request side closes: the server ends the call after the last response.
            requested = [self.module.InferRequestedOutput(name) for name in outputs]
            yield {"model_name": self.stream_model_name, "inputs": inputs, "outputs": requested, "request_id": request_id}

        responses = self._triton().stream_infer(requests(), stream_timeout=self.timeout_s, headers=STREAM_HEADERS)
        pending: asyncio.Future | None = None  # the next response, awaited across silence probes
        finished = False
        try:
            while True:
                pending = pending or asyncio.ensure_future(anext(responses, None))
                done, _ = await asyncio.wait({pending}, timeout=self.silence_probe_s)
                if not done:
                    if lost := _lost(self.stream_model_name, await self.probe()):
                        raise lost
                    continue
                item, pending = pending.result(), None
                if item is None:
                    break
                result, error = item
                if error is not None:
                    raise CSMError.wrap(error, self.url) from error
                chunk = read(result)
                if chunk is not None:
                    yield chunk
            finished = True
        except grpc.RpcError as error:
            raise CSMError.wrap(InferenceServerException(error.details(), str(error.code())), self.url) from error
        except self._errors as error:
            raise CSMError.wrap(error, self.url) from error
        finally:
            if pending is not None:
                pending.cancel()
            if not finished:
                logger.debug("stream.aio %s: cancelling the request", self.url)
                responses.cancel()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> AsyncCSMClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
