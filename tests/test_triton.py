"""The "csm" model in a real tritonserver, spoken to with raw tritonclient tensors: outputs,
batching, and every kind of bad input failing alone with INVALID_ARG naming the tensor."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from csm_client.contract import SAMPLES_PER_FRAME
from csm_triton import Generator, Segment
from csm_triton.tools.server import TritonServer
from triton_tensors import long_prompt, request, scalar, tensors, vector

pytestmark = pytest.mark.server

MODEL = "csm"


def infer(server: TritonServer, arrays: dict[str, np.ndarray], protocol: str = "grpc", outputs: tuple[str, ...] = ("AUDIO", "AUDIO_CODES")):
    module = grpcclient if protocol == "grpc" else httpclient
    url = server.grpc_url if protocol == "grpc" else server.http_url
    client = module.InferenceServerClient(url)
    result = client.infer(MODEL, tensors(module, arrays), outputs=[module.InferRequestedOutput(name) for name in outputs])
    return {name: result.as_numpy(name) for name in outputs}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_audio_matches_the_frames_and_codes_match_in_process(triton_server: TritonServer, generator: Generator, protocol: str) -> None:
    out = infer(triton_server, request(), protocol)
    codes, audio = out["AUDIO_CODES"], out["AUDIO"]
    assert codes.dtype == np.int32 and codes.shape == (1, 5, 32)
    assert audio.dtype == np.float32 and audio.shape == (1, 5 * SAMPLES_PER_FRAME)
    expected = generator.generate_codes("Hello from Sesame.", 0, [], max_audio_length_ms=400, seed=3)
    assert np.array_equal(codes[0], expected.numpy())
    assert np.allclose(audio[0], generator.codec.decode(expected).numpy(), atol=1e-5)


@pytest.mark.parametrize(("wanted", "absent"), [("AUDIO_CODES", "AUDIO"), ("AUDIO", "AUDIO_CODES")])
def test_only_the_requested_outputs_are_returned(triton_server: TritonServer, wanted: str, absent: str) -> None:
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    result = client.infer(MODEL, tensors(grpcclient, request()), outputs=[grpcclient.InferRequestedOutput(wanted)])
    assert result.as_numpy(wanted) is not None
    assert result.as_numpy(absent) is None


def test_context_with_audio_and_text_segments(triton_server: TritonServer, generator: Generator) -> None:
    clip = (0.3 * np.sin(np.arange(8000) / 6.0)).astype(np.float32)  # 0.5 s at 16 kHz
    arrays = request(
        "And you?",
        1,
        CONTEXT_TEXT=vector([b"How are you?", b"Fine, thanks."], object),
        CONTEXT_SPEAKER=vector([0, 1], np.int32),
        CONTEXT_AUDIO=vector(clip, np.float32),
        CONTEXT_AUDIO_LENGTHS=vector([0, len(clip)], np.int32),
        CONTEXT_SAMPLE_RATE=scalar(16_000, np.int32),
    )
    codes = infer(triton_server, arrays, outputs=("AUDIO_CODES",))["AUDIO_CODES"][0]
    context = [Segment(0, "How are you?"), Segment(1, "Fine, thanks.", clip, sample_rate=16_000)]
    expected = generator.generate_codes("And you?", 1, context, max_audio_length_ms=400, seed=3)
    assert np.array_equal(codes, expected.numpy())


def with_context_codes(turns: list[tuple[int, str, np.ndarray]], text: str = "And you?", speaker: int = 1) -> dict[str, np.ndarray]:
    """A request whose context turns (speaker, text, codes [frames, 32]) carry their codes."""
    return request(
        text,
        speaker,
        CONTEXT_TEXT=vector([turn_text.encode() for _, turn_text, _ in turns], object),
        CONTEXT_SPEAKER=vector([turn_speaker for turn_speaker, _, _ in turns], np.int32),
        CONTEXT_CODES=vector(np.concatenate([codes.reshape(-1) for _, _, codes in turns]), np.int32),
        CONTEXT_CODES_LENGTHS=vector([len(codes) for _, _, codes in turns], np.int32),
    )


def encodes(server: TritonServer) -> int:
    """Clips csm_stream has Mimi-encoded so far, as its log says (csm_triton/engine/prompt.py)."""
    return server.log_file.read_text(errors="replace").count(": Mimi-encoded ")


def test_context_codes_are_used_as_they_are(triton_server: TritonServer, generator: Generator) -> None:
    """The codes an earlier request returned, sent back as its turn's context, give what the
    in-process API gives for a segment holding those codes: the prompt is built from them as they
    are (audio re-encoded by Mimi would give other codes)."""
    first = infer(triton_server, request(), outputs=("AUDIO_CODES",))["AUDIO_CODES"][0]  # [frames, 32] int32
    codes = infer(triton_server, with_context_codes([(0, "Hello from Sesame.", first)]), outputs=("AUDIO_CODES",))["AUDIO_CODES"][0]
    expected = generator.generate_codes("And you?", 1, [Segment(0, "Hello from Sesame.", codes=first)], max_audio_length_ms=400, seed=3)
    assert np.array_equal(codes, expected.numpy())
    tokens, mask = generator.prompt("And you?", 1, [Segment(0, "Hello from Sesame.", codes=first)])
    frames = tokens[mask[:, 0]][:, :32]  # the prompt's audio positions: the codes, then the end-of-audio frame
    assert np.array_equal(frames[:-1].numpy(), first) and not frames[-1].any()


def test_a_conversation_sent_as_codes_encodes_nothing(triton_server: TritonServer, generator: Generator) -> None:
    before = encodes(triton_server)
    turns: list[tuple[int, str, np.ndarray]] = []
    for index in range(5):
        text, speaker = f"Turn {index} of the talk.", index % 2
        arrays = with_context_codes(turns, text, speaker) if turns else request(text, speaker)
        codes = infer(triton_server, arrays, outputs=("AUDIO_CODES",))["AUDIO_CODES"][0]
        context = [Segment(turn_speaker, turn_text, codes=turn_codes) for turn_speaker, turn_text, turn_codes in turns]
        assert np.array_equal(codes, generator.generate_codes(text, speaker, context, max_audio_length_ms=400, seed=3).numpy())
        turns.append((speaker, text, codes))
    # Then one turn as audio: its encode reaches the log, after anything the codes requests logged.
    infer(triton_server, with_context_audio(np.full(1920, 0.1, dtype=np.float32)), outputs=("AUDIO_CODES",))
    deadline = time.monotonic() + 10
    while encodes(triton_server) == before and time.monotonic() < deadline:
        time.sleep(0.1)  # the engine's log reaches the file through the stub's pipe
    assert encodes(triton_server) == before + 1


async def infer_all(server: TritonServer, requests: list[dict[str, np.ndarray]]) -> list:
    """Send every request at once; each result is its codes or the InferenceServerException."""
    client = grpcclient_aio.InferenceServerClient(server.grpc_url)
    try:
        calls = [
            client.infer(MODEL, tensors(grpcclient_aio, arrays), outputs=[grpcclient_aio.InferRequestedOutput("AUDIO_CODES")])
            for arrays in requests
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await client.close()
    return [r if isinstance(r, Exception) else r.as_numpy("AUDIO_CODES")[0] for r in results]


def model_statistics(server: TritonServer) -> tuple[int, int]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    stats = client.get_inference_statistics(MODEL, headers=server.admin_headers("grpc"), as_json=True)
    model = stats["model_stats"][0]
    return int(model.get("inference_count", 0)), int(model.get("execution_count", 0))


BATCHING_TRIES = 5


def infer_batched(server: TritonServer, requests: list[dict[str, np.ndarray]], check: Callable[[list], None]) -> None:
    """Send every request at once and `check` their results, until the dynamic batcher has handed
    some of them to one execute(). It batches only what arrives while an execute() runs (csm's
    has no queue delay), which a loaded machine can spread out: every try is checked, and one
    of BATCHING_TRIES must have batched."""
    for _ in range(BATCHING_TRIES):
        inferences_before, executions_before = model_statistics(server)
        check(asyncio.run(infer_all(server, requests)))
        inferences, executions = model_statistics(server)
        assert inferences - inferences_before == len(requests)
        if executions - executions_before < len(requests):
            return
    raise AssertionError(f"{BATCHING_TRIES} times, every request had an execute() of its own")


def test_concurrent_requests_run_together(triton_server: TritonServer, generator: Generator) -> None:
    texts = [f"Request number {i}, of a different length{'!' * i}" for i in range(8)]
    expected = [generator.generate_codes(text, i % 3, [], max_audio_length_ms=400, seed=3).numpy() for i, text in enumerate(texts)]

    def check(results: list) -> None:
        for codes, want in zip(results, expected, strict=True):
            assert np.array_equal(codes, want)

    infer_batched(triton_server, [request(text, i % 3) for i, text in enumerate(texts)], check)


def with_context_audio(samples, **extra: np.ndarray) -> dict[str, np.ndarray]:
    """A request with one context segment holding `samples`."""
    return request(
        CONTEXT_TEXT=vector([b"a"], object),
        CONTEXT_SPEAKER=vector([0], np.int32),
        CONTEXT_AUDIO=vector(samples, np.float32),
        CONTEXT_AUDIO_LENGTHS=vector([len(samples)], np.int32),
        **extra,
    )


BAD_REQUESTS = {
    "missing TEXT": (request(TEXT=None), "TEXT: required input is missing"),
    "empty TEXT": (request(""), "TEXT: must not be empty"),
    "invalid UTF-8": (request(b"\xff\xfe bad"), "TEXT: is not valid UTF-8"),
    "TEXT over max_text_bytes": (request("x" * 4097), "TEXT: holds 4097 bytes of UTF-8, more than max_text_bytes 4096"),
    "negative SPEAKER": (request(speaker=-1), r"SPEAKER: must be in \[0, 2147483647\], got -1"),
    "zero TEMPERATURE": (request(TEMPERATURE=scalar(0.0, np.float32)), "TEMPERATURE: must be a finite number > 0"),
    "NaN TEMPERATURE": (request(TEMPERATURE=scalar(math.nan, np.float32)), "TEMPERATURE: must be a finite number > 0"),
    "zero TOPK": (request(TOPK=scalar(0, np.int32)), r"TOPK: must be in \[1, 2051\], got 0"),
    "huge TOPK": (request(TOPK=scalar(2052, np.int32)), r"TOPK: must be in \[1, 2051\], got 2052"),
    "zero MAX_AUDIO_LENGTH_MS": (request(MAX_AUDIO_LENGTH_MS=scalar(0, np.int32)), r"MAX_AUDIO_LENGTH_MS: must be in \[80, 30000\]"),
    "MAX_AUDIO_LENGTH_MS over the maximum": (
        request(MAX_AUDIO_LENGTH_MS=scalar(30_080, np.int32)),
        r"MAX_AUDIO_LENGTH_MS: must be in \[80, 30000\], got 30080",
    ),
    "context arrays of different lengths": (
        request(CONTEXT_TEXT=vector([b"a", b"b"], object), CONTEXT_SPEAKER=vector([0], np.int32)),
        "CONTEXT_TEXT, CONTEXT_SPEAKER, CONTEXT_AUDIO_LENGTHS: one entry per context segment, got 2, 1 and 2",
    ),
    "lengths not summing to the samples": (
        request(
            CONTEXT_TEXT=vector([b"a"], object),
            CONTEXT_SPEAKER=vector([0], np.int32),
            CONTEXT_AUDIO=vector(np.zeros(100), np.float32),
            CONTEXT_AUDIO_LENGTHS=vector([90], np.int32),
        ),
        "CONTEXT_AUDIO_LENGTHS: sums to 90 samples but CONTEXT_AUDIO holds 100",
    ),
    "NaN context audio": (with_context_audio([0.0, math.nan, 0.1]), "CONTEXT_AUDIO: has samples that are not finite"),
    "infinite context audio": (with_context_audio([0.0, math.inf]), "CONTEXT_AUDIO: has samples that are not finite"),
    "too many context segments": (
        request(CONTEXT_TEXT=vector([b"turn"] * 33, object), CONTEXT_SPEAKER=vector([0] * 33, np.int32)),
        "CONTEXT_TEXT: holds 33 segments, more than max_context_segments 32",
    ),
    "CONTEXT_SAMPLE_RATE out of range": (
        with_context_audio([0.0] * 4, CONTEXT_SAMPLE_RATE=scalar(1_000_000, np.int32)),
        r"CONTEXT_SAMPLE_RATE: must be in \[8000, 48000\] Hz, got 1000000",
    ),
    "CONTEXT_SAMPLE_RATE with a huge resampling filter": (
        with_context_audio([0.0] * 4, CONTEXT_SAMPLE_RATE=scalar(12_007, np.int32)),
        "CONTEXT_SAMPLE_RATE: 12007 Hz is 12007:24000 .* such as 12000 Hz first",
    ),
    "CONTEXT_AUDIO longer than the prompt at its rate": (
        with_context_audio(np.zeros(2045 * 640 + 8), CONTEXT_SAMPLE_RATE=scalar(8000, np.int32)),
        "CONTEXT_AUDIO: segment 0 holds 1308808 samples at 8000 Hz, which bring the context audio to 2047 prompt positions",
    ),
    "prompt over 2048 positions": (long_prompt(), "prompt: .* exceed the model's 2048-position limit"),
    "context codes out of range": (
        with_context_codes([(0, "a", np.full((2, 32), 2051))]),
        r"CONTEXT_CODES: segment 0 codes must be in \[0, 2050\], got 2051",
    ),
    "context codes and audio in one segment": (
        with_context_audio([0.1] * 4, CONTEXT_CODES=vector(np.zeros(32), np.int32), CONTEXT_CODES_LENGTHS=vector([1], np.int32)),
        "CONTEXT_CODES_LENGTHS: segment 0 has both codes and audio",
    ),
    "context codes not whole frames": (
        with_context_codes([(0, "a", np.zeros((1, 32)))]) | {"CONTEXT_CODES": vector(np.zeros(40), np.int32)},
        r"CONTEXT_CODES_LENGTHS: sums to 1 frames \(32 codes of 32 codebooks\) but CONTEXT_CODES holds 40",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_invalid_arg_naming_the_field(triton_server: TritonServer, case: str) -> None:
    arrays, message = BAD_REQUESTS[case]
    with pytest.raises(InferenceServerException, match=message) as caught:
        infer(triton_server, arrays)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_request_over_max_request_bytes_is_refused_naming_its_largest_input(triton_server: TritonServer, protocol: str) -> None:
    arrays = with_context_audio(np.zeros(8_400_000))  # 33.6 MB
    message = (
        r"CONTEXT_AUDIO: the request's inputs take 336000\d\d bytes, more than max_request_bytes 33554432; CONTEXT_AUDIO is the largest"
    )
    with pytest.raises(InferenceServerException, match=message) as caught:
        infer(triton_server, arrays, protocol)
    assert caught.value.status() in ("StatusCode.INVALID_ARGUMENT", "400")


def test_bad_requests_fail_alone_in_a_batch_with_good_ones(triton_server: TritonServer, generator: Generator) -> None:
    bad = [BAD_REQUESTS[case][0] for case in ("invalid UTF-8", "NaN context audio", "prompt over 2048 positions", "zero TOPK")]
    good = [request(f"Good request {i}.", i) for i in range(4)]
    expected = [generator.generate_codes(f"Good request {i}.", i, [], max_audio_length_ms=400, seed=3).numpy() for i in range(4)]

    def check(results: list) -> None:
        assert all(isinstance(r, InferenceServerException) for r in results[1::2])
        for codes, want in zip(results[0::2], expected, strict=True):
            assert np.array_equal(codes, want)

    # Good and bad share execute() calls.
    infer_batched(triton_server, [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3], bad[3]], check)
    assert grpcclient.InferenceServerClient(triton_server.grpc_url).is_server_ready()
    assert grpcclient.InferenceServerClient(triton_server.grpc_url).is_model_ready(MODEL)
