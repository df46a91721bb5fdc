"""Clients for the "csm" Triton model over gRPC or HTTP, blocking and asyncio.

All four transports (grpc, http, grpc.aio, http.aio) share `build_inputs`, so a request is the
same tensors whichever way it travels; they differ only in the tritonclient class they drive.
The server validates every request: its INVALID_ARG messages come back as `CSMError`.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Sequence
from types import ModuleType
from typing import Any, TypedDict

import numpy as np
from tritonclient.utils import InferenceServerException, np_to_triton_dtype
from typing_extensions import Unpack  # typing.Unpack needs Python 3.11; NVIDIA's container has 3.10

from .segment import SAMPLE_RATE, context_arrays

logger = logging.getLogger(__name__)

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
DEFAULT_TIMEOUT_S = 300.0  # generation of long audio on a busy server takes a while


class CSMError(Exception):
    """A failed request: the server's message (for an invalid request it starts with the
    offending tensor's name, e.g. "TOPK: ..."), or why the server could not be reached."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    @classmethod
    def wrap(cls, error: BaseException, url: str) -> CSMError:
        if isinstance(error, InferenceServerException):
            return cls(error.message(), error.status())
        return cls(f"cannot reach the server at {url}: {type(error).__name__}: {error}")


def request_arrays(
    text: str,
    speaker: int,
    context: Sequence[Any] = (),
    temperature: float | None = None,
    topk: int | None = None,
    max_audio_length_ms: int | None = None,
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """One request's input arrays, each with its batch dimension of 1. Optional inputs left as
    None are not sent, so the server's defaults apply."""
    if not isinstance(text, str):
        raise ValueError(f"text: must be a string, got {type(text).__name__}")
    arrays = {"TEXT": np.array([[text.encode("utf-8")]], dtype=np.object_), "SPEAKER": np.array([[speaker]], dtype=np.int32)}
    arrays.update(context_arrays(context))
    optional = {
        "TEMPERATURE": (temperature, np.float32),
        "TOPK": (topk, np.int32),
        "MAX_AUDIO_LENGTH_MS": (max_audio_length_ms, np.int32),
        "SEED": (seed, np.int64),
    }
    for name, (value, dtype) in optional.items():
        if value is not None:
            arrays[name] = np.array([[value]], dtype=dtype)
    return arrays


def build_inputs(module: ModuleType, text: str, speaker: int, context: Sequence[Any] = (), **options: Any) -> list:
    """The InferInput list of one request for a tritonclient protocol module (tritonclient.grpc,
    tritonclient.http or their .aio). `options`: temperature, topk, max_audio_length_ms, seed."""
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


def _audio(result: Any) -> np.ndarray:
    return result.as_numpy("AUDIO")[0].copy()  # [1, samples] -> [samples]; copied: tritonclient's view is read-only


def _codes(result: Any) -> np.ndarray:
    return result.as_numpy("AUDIO_CODES")[0].copy()  # [1, frames, 32] -> [frames, 32]


class CSMClient:
    """Blocking client: `generate` -> (float32 audio [samples], 24000), `generate_codes` ->
    int32 Mimi codes [frames, 32]. One client per thread (tritonclient's are not thread-safe)."""

    def __init__(
        self, url: str | None = None, protocol: str = "grpc", model_name: str = "csm", timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.module = protocol_module(protocol)
        self.url = url or DEFAULT_URLS[protocol]
        self.protocol = protocol
        self.model_name = model_name
        self.timeout_s = timeout_s
        self._errors = transport_errors(protocol, aio=False)
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

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> CSMClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncCSMClient:
    """asyncio client with CSMClient's methods as coroutines; concurrent calls (asyncio.gather)
    are batched together by the server. Use it from one event loop."""

    def __init__(
        self, url: str | None = None, protocol: str = "grpc", model_name: str = "csm", timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.module = protocol_module(protocol, aio=True)
        self.url = url or DEFAULT_URLS[protocol]
        self.protocol = protocol
        self.model_name = model_name
        self.timeout_s = timeout_s
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

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> AsyncCSMClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
