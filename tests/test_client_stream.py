"""csm_client's streams against a real tritonserver serving the tiny model: chunks as they are
made (sync, asyncio, RemoteGenerator, csm-say --stream), equal joined to the unary audio; errors;
and cancellation on the server when the client stops reading early."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from tritonclient.utils import InferenceServerException

from csm_client import AsyncCSMClient, CSMClient, CSMError, RemoteGenerator
from csm_client.contract import SAMPLES_PER_FRAME
from triton_tensors import chunk_sizes

pytestmark = pytest.mark.server

TEXT = "Streaming from Sesame."
PARAMS = {"temperature": 0.8, "topk": 40, "max_audio_length_ms": 800, "seed": 7}  # 10 frames
CHUNKING = {"first_chunk_frames": 2, "chunk_frames": 3}
LONG_MS = 20_000  # 250 frames: far longer than the test waits, so only a cancel ends it in time


@pytest.fixture(scope="module")
def client(triton_server) -> CSMClient:
    with CSMClient(triton_server.grpc_url) as client:
        yield client


@pytest.fixture(scope="module")
def unary_audio(client: CSMClient) -> np.ndarray:
    audio, _ = client.generate(TEXT, 0, **PARAMS)
    assert len(audio) > 3 * SAMPLES_PER_FRAME  # enough frames for several chunks
    return audio


def assert_chunks_join_to(chunks: list[np.ndarray], expected: np.ndarray) -> None:
    assert all(chunk.dtype == np.float32 and chunk.ndim == 1 for chunk in chunks)
    sizes = [len(chunk) // SAMPLES_PER_FRAME for chunk in chunks if len(chunk)]
    assert sizes == chunk_sizes(len(expected) // SAMPLES_PER_FRAME, CHUNKING["first_chunk_frames"], CHUNKING["chunk_frames"])
    joined = np.concatenate(chunks)
    assert joined.shape == expected.shape
    np.testing.assert_allclose(joined, expected, atol=1e-4, rtol=0)


def sync_chunks(url: str) -> list[np.ndarray]:
    with CSMClient(url) as client:
        return list(client.stream(TEXT, 0, **CHUNKING, **PARAMS))


def async_chunks(url: str) -> list[np.ndarray]:
    async def run() -> list[np.ndarray]:
        async with AsyncCSMClient(url) as client:
            return [chunk async for chunk in client.stream(TEXT, 0, **CHUNKING, **PARAMS)]

    return asyncio.run(run())


def remote_generator_chunks(url: str) -> list[np.ndarray]:
    """RemoteGenerator streams torch tensors, as the in-process Generator does."""
    with RemoteGenerator(url) as remote:
        chunks = list(remote.generate_streaming(TEXT, 0, [], **PARAMS, **CHUNKING))
    assert all(isinstance(chunk, torch.Tensor) for chunk in chunks)
    return [chunk.numpy() for chunk in chunks]


@pytest.mark.parametrize("chunks_of", [sync_chunks, async_chunks, remote_generator_chunks], ids=["sync", "async", "remote generator"])
def test_stream_chunks_join_to_the_unary_audio(triton_server, unary_audio: np.ndarray, chunks_of) -> None:
    assert_chunks_join_to(chunks_of(triton_server.grpc_url), unary_audio)


def test_stream_errors_are_csm_errors(client: CSMClient, triton_server) -> None:
    with pytest.raises(CSMError, match="^TOPK") as caught:
        list(client.stream("Hello.", 0, topk=0, max_audio_length_ms=240))
    assert "INVALID_ARGUMENT" in str(caught.value.status)
    with pytest.raises(CSMError, match="^CHUNK_FRAMES"):
        list(client.stream("Hello.", 0, chunk_frames=0, max_audio_length_ms=240))

    async def run_async() -> None:
        async with AsyncCSMClient(triton_server.grpc_url) as aio:
            with pytest.raises(CSMError, match="^TOPK") as caught:
                [chunk async for chunk in aio.stream("Hello.", 0, topk=0, max_audio_length_ms=240)]
            assert "INVALID_ARGUMENT" in str(caught.value.status)
        async with AsyncCSMClient(triton_server.http_url, "http") as aio_http:
            with pytest.raises(CSMError, match="protocol='grpc'"):
                aio_http.stream("Hello.", 0)

    asyncio.run(run_async())
    with CSMClient(triton_server.http_url, "http") as http, pytest.raises(CSMError, match="protocol='grpc'"):
        http.stream("Hello.", 0)
    # The client is still usable after failed streams.
    assert len(np.concatenate(list(client.stream("Hello.", 0, max_audio_length_ms=160, seed=1)))) > 0


def test_streams_to_an_unreachable_server_raise_csm_errors() -> None:
    with CSMClient("localhost:1", timeout_s=5) as client, pytest.raises(CSMError, match="connect") as caught:
        list(client.stream("Hello.", 0))
    assert "UNAVAILABLE" in str(caught.value.status)

    async def run() -> None:
        async with AsyncCSMClient("localhost:1", timeout_s=5) as client:
            with pytest.raises(CSMError, match="connect") as caught:
                [chunk async for chunk in client.stream("Hello.", 0)]
            assert "UNAVAILABLE" in str(caught.value.status)

    asyncio.run(run())


def test_a_full_queue_is_reported_as_server_busy() -> None:
    # Triton's rejection when max_queue_size is reached, as a stream delivers it (no status).
    rejected = InferenceServerException("[request id: <id_unknown>] Exceeds maximum queue size")
    error = CSMError.wrap(rejected, "localhost:8001")
    assert error.message == "server busy: [request id: <id_unknown>] Exceeds maximum queue size" and error.busy
    invalid = CSMError.wrap(InferenceServerException("TOPK: must be in [1, 2051], got 0", "StatusCode.INVALID_ARGUMENT"), "x")
    assert invalid.message.startswith("TOPK") and invalid.status == "StatusCode.INVALID_ARGUMENT" and not invalid.busy


def active_streams(triton_server) -> float:
    """The server's csm_streams gauge: requests accepted and not yet finished."""
    with urllib.request.urlopen(f"http://localhost:{triton_server.options.metrics_port}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    match = re.search(r'^csm_streams\{[^}]*model="csm_stream"[^}]*\} (\S+)$', metrics, re.MULTILINE)
    assert match, "the server exports no csm_streams gauge"
    return float(match.group(1))


def wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_stopping_early_cancels_the_request_on_the_server(client: CSMClient, triton_server) -> None:
    for chunk in client.stream(TEXT, 0, max_audio_length_ms=LONG_MS, seed=3):
        assert len(chunk) == 2 * SAMPLES_PER_FRAME  # the server's default first chunk
        assert wait_until(lambda: active_streams(triton_server) >= 1, 5), "the running request is not counted"
        closing = time.monotonic()
        break

    async def close_early_then_wait() -> bool:
        async with AsyncCSMClient(triton_server.grpc_url) as aio:
            async with contextlib.aclosing(aio.stream(TEXT, 1, max_audio_length_ms=LONG_MS, seed=4)) as chunks:
                async for _ in chunks:
                    break
            # Both clients stay open: closing the streams alone must cancel the requests.
            return await asyncio.to_thread(wait_until, lambda: active_streams(triton_server) == 0, 10)

    assert asyncio.run(close_early_then_wait()), "closed streams still run on the server"
    # Closing neither waited for the 250 frames nor left them running: the requests were cancelled.
    assert time.monotonic() - closing < 15
    # The client and the server serve the next request.
    assert len(np.concatenate(list(client.stream("Next.", 0, max_audio_length_ms=160, seed=1)))) > 0


def csm_say(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "csm-say"), *args], capture_output=True, text=True, timeout=120)


def test_csm_say_stream_writes_the_unary_wav(triton_server, unary_audio: np.ndarray, tmp_path: Path) -> None:
    out = tmp_path / "streamed.wav"
    result = csm_say(
        TEXT, "--stream", "--first-chunk-frames", "2", "--chunk-frames", "3", "--temperature", "0.8", "--topk", "40",
        "--max-ms", "800", "--seed", "7", "--url", triton_server.grpc_url, "-o", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.search(r"time to first audio: \d+\.\d+ s", result.stdout), result.stdout
    assert re.search(r"real-time factor: \d+\.\d+", result.stdout) and str(out) in result.stdout
    unary = tmp_path / "unary.wav"
    soundfile.write(unary, unary_audio, 24_000)  # what csm-say writes without --stream
    streamed, sample_rate = soundfile.read(out, dtype="float32")
    assert sample_rate == 24_000 and soundfile.info(out).subtype == soundfile.info(unary).subtype
    np.testing.assert_allclose(streamed, soundfile.read(unary, dtype="float32")[0], atol=1e-4, rtol=0)

    result = csm_say("Hello.", "--stream", "--url", triton_server.http_url, "--protocol", "http", "-o", str(tmp_path / "no.wav"))
    assert result.returncode == 1 and "protocol='grpc'" in result.stderr and not (tmp_path / "no.wav").exists()
