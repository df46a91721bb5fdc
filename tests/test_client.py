"""csm_client against a real tritonserver serving the tiny model: both protocols, sync and
asyncio, RemoteGenerator and csm-say, checked against the in-process Generator."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

import csm_triton
from csm_client import AsyncCSMClient, CSMClient, CSMError, RemoteGenerator, Segment
from csm_client.contract import SAMPLES_PER_FRAME

pytestmark = pytest.mark.server

PROTOCOLS = ("grpc", "http")
PARAMS = {"temperature": 0.8, "topk": 40, "max_audio_length_ms": 480, "seed": 7}


def url(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


def sine(seconds: float, sample_rate: int, hz: float = 220.0) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(int(seconds * sample_rate)) / sample_rate)).astype(np.float32)


@pytest.fixture(scope="module", params=PROTOCOLS)
def client(request: pytest.FixtureRequest, triton_server) -> CSMClient:
    with CSMClient(url(triton_server, request.param), request.param) as client:
        yield client


def test_client_is_ready(client: CSMClient) -> None:
    assert client.is_ready()


def test_unreachable_server_is_not_ready_and_raises_csm_error() -> None:
    for protocol in PROTOCOLS:
        with CSMClient("localhost:1", protocol, timeout_s=5) as client:
            assert not client.is_ready()
            with pytest.raises(CSMError):
                client.generate("Hello.", 0, max_audio_length_ms=240)


def test_generate_returns_24khz_float32_audio_of_the_generated_frames(client: CSMClient) -> None:
    audio, sample_rate = client.generate("Hello from Sesame.", 0, **PARAMS)
    codes = client.generate_codes("Hello from Sesame.", 0, **PARAMS)
    assert sample_rate == 24_000
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert len(codes) > 0 and len(audio) == len(codes) * SAMPLES_PER_FRAME
    assert np.isfinite(audio).all()


def test_generate_codes_equal_in_process(client: CSMClient, generator: csm_triton.Generator) -> None:
    codes = client.generate_codes("Hello from Sesame.", 1, **PARAMS)
    expected = generator.generate_codes("Hello from Sesame.", 1, [], **PARAMS)
    assert codes.dtype == np.int32 and codes.shape == (6, 32)
    np.testing.assert_array_equal(codes, expected.numpy())


def test_context_with_audio_and_text_equals_in_process(client: CSMClient, generator: csm_triton.Generator) -> None:
    clip = sine(0.5, 16_000)
    context = [
        Segment(speaker=0, text="An earlier turn.", audio=clip, sample_rate=16_000),
        Segment(text="And a reply.", speaker=1, is_audio=False),
    ]
    in_process = [
        csm_triton.Segment(speaker=0, text="An earlier turn.", audio=clip, sample_rate=16_000),
        csm_triton.Segment(1, "And a reply."),
    ]
    expected = generator.generate_codes("The answer.", 0, in_process, **PARAMS).numpy()
    np.testing.assert_array_equal(client.generate_codes("The answer.", 0, context, **PARAMS), expected)
    # csm_triton's Segment objects are accepted as they are (csm_client.Segment is the same class).
    np.testing.assert_array_equal(client.generate_codes("The answer.", 0, in_process, **PARAMS), expected)


def test_context_audio_at_different_rates_is_resampled_in_the_client(client: CSMClient, generator: csm_triton.Generator) -> None:
    low, high = sine(0.5, 16_000), sine(0.4, 24_000, hz=330.0)
    context = [Segment(0, "First.", low, sample_rate=16_000), Segment(1, "Second.", high)]
    in_process = [csm_triton.Segment(0, "First.", low, sample_rate=16_000), csm_triton.Segment(1, "Second.", high)]
    expected = generator.generate_codes("Third.", 0, in_process, **PARAMS).numpy()
    np.testing.assert_array_equal(client.generate_codes("Third.", 0, context, **PARAMS), expected)


def test_context_codes_an_earlier_answer_returned_are_sent_as_they_are(client: CSMClient, generator: csm_triton.Generator) -> None:
    earlier = client.generate_codes("An earlier turn.", 0, **PARAMS)  # [frames, 32] int32
    context = [Segment(0, "An earlier turn.", codes=earlier), Segment(1, "And a reply.", sine(0.3, 24_000)), Segment(0, "Text.")]
    in_process = [csm_triton.Segment(0, "An earlier turn.", codes=torch.from_numpy(earlier)), *context[1:]]
    expected = generator.generate_codes("The answer.", 1, in_process, **PARAMS).numpy()
    np.testing.assert_array_equal(client.generate_codes("The answer.", 1, context, **PARAMS), expected)
    with pytest.raises(CSMError, match=r"^CONTEXT_CODES: segment 0 codes must be in \[0, 2050\], got 4096"):
        client.generate_codes("The answer.", 1, [Segment(0, "a", codes=np.full_like(earlier, 4096))], **PARAMS)


def test_server_errors_are_csm_errors_with_tritons_message(client: CSMClient) -> None:
    with pytest.raises(CSMError, match="^TOPK") as caught:
        client.generate("Hello.", 0, topk=0, max_audio_length_ms=240)
    assert "INVALID_ARG" in str(caught.value.status) or "400" in str(caught.value.status)
    with pytest.raises(CSMError, match="^MAX_AUDIO_LENGTH_MS"):
        client.generate_codes("Hello.", 0, max_audio_length_ms=10)
    assert client.is_ready()  # a bad request leaves the server serving


def test_segment_forms_and_mono_check() -> None:
    assert Segment(text="Hello.", speaker=0, is_audio=False).audio is None
    segment = Segment(speaker=1, text="Hi.", audio=torch.zeros(1, 480))
    assert segment.is_audio and segment.audio.shape == (480,) and segment.audio.dtype == np.float32
    with pytest.raises(ValueError, match="multi-channel"):
        Segment(speaker=0, text="Stereo.", audio=np.zeros((2, 480), dtype=np.float32))
    with pytest.raises(ValueError, match="is_audio=True"):
        Segment(speaker=0, text="No audio.", is_audio=True)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_async_concurrent_requests_equal_sync_ones(protocol: str, triton_server) -> None:
    asks = [("First line.", 0, 1), ("A second line.", 1, 2), ("Third.", 0, 3)]

    async def run() -> list[np.ndarray]:
        async with AsyncCSMClient(url(triton_server, protocol), protocol) as client:
            assert await client.is_ready()
            audio, sample_rate = await client.generate("Audio too.", 0, max_audio_length_ms=240, seed=1)
            assert sample_rate == 24_000 and len(audio) > 0
            with pytest.raises(CSMError, match="^TOPK"):
                await client.generate_codes("Bad.", 0, topk=0, max_audio_length_ms=240)
            return await asyncio.gather(
                *(client.generate_codes(text, speaker, max_audio_length_ms=400, seed=seed) for text, speaker, seed in asks)
            )

    concurrent = asyncio.run(run())
    with CSMClient(url(triton_server, protocol), protocol) as client:
        for (text, speaker, seed), codes in zip(asks, concurrent, strict=True):
            np.testing.assert_array_equal(codes, client.generate_codes(text, speaker, max_audio_length_ms=400, seed=seed))


def test_remote_generator_equals_in_process_generator(triton_server, generator: csm_triton.Generator) -> None:
    context = [Segment(text="Hello, how are you?", speaker=0, is_audio=False)]
    in_process = [csm_triton.Segment(text="Hello, how are you?", speaker=0, is_audio=False)]
    with RemoteGenerator(triton_server.grpc_url) as remote:
        assert remote.sample_rate == generator.sample_rate == 24_000
        audio = remote.generate("Fine, thanks.", 1, context, max_audio_length_ms=560, seed=11)
        expected = generator.generate("Fine, thanks.", 1, in_process, max_audio_length_ms=560, seed=11)
        assert audio.dtype == torch.float32 and audio.dim() == 1
        torch.testing.assert_close(audio, expected, atol=1e-5, rtol=0)
        codes = remote.generate_codes("Fine, thanks.", 1, context, temperature=0.7, topk=20, max_audio_length_ms=320, seed=3)
        expected_codes = generator.generate_codes("Fine, thanks.", 1, in_process, temperature=0.7, topk=20, max_audio_length_ms=320, seed=3)
        assert codes.dtype == torch.long and torch.equal(codes, expected_codes)


def csm_say(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "csm-say"), *args], capture_output=True, text=True, timeout=300)


def test_csm_say_writes_a_wav_with_context(triton_server, tmp_path: Path) -> None:
    earlier = tmp_path / "earlier.wav"
    soundfile.write(earlier, sine(0.5, 16_000), 16_000)
    out = tmp_path / "out.wav"
    result = csm_say(
        "Nice to meet you.", "--speaker", "1", "--context-text", "Hello there.", "0", "--context", str(earlier), "Hi!", "1",
        "--max-ms", "400", "--seed", "5", "--url", triton_server.http_url, "--protocol", "http", "-o", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    audio, sample_rate = soundfile.read(out, dtype="float32", always_2d=True)
    assert sample_rate == 24_000 and audio.shape[1] == 1 and len(audio) > 0 and np.isfinite(audio).all()


def test_csm_say_sends_context_codes_from_a_npy_file(triton_server, generator: csm_triton.Generator, tmp_path: Path) -> None:
    codes = generator.generate_codes("Hello there.", 0, [], max_audio_length_ms=400, seed=5).numpy()
    numpy_file, out = tmp_path / "earlier.npy", tmp_path / "out.wav"
    np.save(numpy_file, codes)
    result = csm_say(
        "Nice to meet you.", "--speaker", "1", "--context-codes", str(numpy_file), "Hello there.", "0",
        "--max-ms", "400", "--seed", "5", "--url", triton_server.grpc_url, "-o", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    audio, _ = soundfile.read(out, dtype="float32")
    context = [csm_triton.Segment(0, "Hello there.", codes=codes)]
    expected = generator.codec.decode(generator.generate_codes("Nice to meet you.", 1, context, max_audio_length_ms=400, seed=5))
    np.testing.assert_allclose(audio, expected.numpy(), atol=1e-4)  # a 16-bit WAV's rounding
    result = csm_say("Hi.", "--context-codes", str(tmp_path / "missing.npy"), "a", "0", "--url", triton_server.grpc_url, "-o", str(out))
    assert result.returncode == 1 and "--context-codes" in result.stderr


def test_csm_say_reports_errors_with_exit_code_1(triton_server, tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    result = csm_say("Hello.", "--topk", "0", "--max-ms", "240", "--url", triton_server.grpc_url, "-o", str(out))
    assert result.returncode == 1 and "TOPK" in result.stderr and not out.exists()
    stereo = tmp_path / "stereo.wav"
    soundfile.write(stereo, np.zeros((2400, 2), dtype=np.float32), 24_000)
    result = csm_say("Hello.", "--context", str(stereo), "Hi.", "0", "--url", triton_server.grpc_url, "-o", str(out))
    assert result.returncode == 1 and "mono" in result.stderr
