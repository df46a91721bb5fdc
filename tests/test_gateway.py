"""The gateway (gateway/) against the real stack on the CPU: a tritonserver serving the tiny model,
and the gateway run in-process by uvicorn on a free port, called through the official `openai`
package and plain HTTP. Audio is checked against the same request sent straight to csm_stream."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import numpy as np
import openai
import psutil
import pytest
import uvicorn
from test_metrics import scrape, series, settled

from csm_client import CSMClient, CSMError, Segment
from csm_client.contract import SAMPLES_PER_FRAME
from csm_triton.tools.server import ServerOptions, TritonServer, model_repository_with
from gateway import GatewayConfig, create_app
from gateway.audio import FORMATS, SAMPLE_RATE, pcm16, wav_bytes
from gateway.config import OPENAI_VOICES
from gateway.connections import uvicorn_config
from gateway.errors import from_triton

pytestmark = pytest.mark.server

TEXT = "Hello from the gateway."
SHORT = {"seed": 7, "max_audio_length_ms": 800}  # 10 frames: ~0.5 s of the tiny model on 2 cores
# Encoder delay and padding of the lossy codecs, in samples at 24 kHz: mp3 (LAME) adds up to ~1.6k, aac 1024 + a frame.
CODEC_SLACK = {"mp3": 2 * 1152, "aac": 2 * 1024, "opus": 960}


@pytest.fixture(scope="module")
def triton(triton_server: TritonServer) -> TritonServer:
    """The session's tritonserver on the tiny model (conftest), shared with the page's test."""
    return triton_server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(config: GatewayConfig) -> Iterator[str]:
    """The gateway under uvicorn in a thread, as `make serve` runs it; yields its base URL."""
    config = dataclasses.replace(config, host="127.0.0.1", log_level="warning")
    server = uvicorn.Server(uvicorn_config(create_app(config), config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def gateway(triton: TritonServer) -> Iterator[str]:
    """Voices open to all: these tests are of what voices do (test_gateway_defaults.py of the key)."""
    with running(GatewayConfig(triton_url=triton.grpc_url, port=free_port(), open_voices=True)) as url:
        yield url


@pytest.fixture(scope="module")
def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def direct(triton: TritonServer) -> Iterator[CSMClient]:
    with CSMClient(triton.grpc_url, stream_model_name="csm_stream") as csm:
        yield csm


def straight_to_triton(direct: CSMClient, speaker: int, text: str = TEXT, context: list[Segment] = (), **options) -> np.ndarray:
    return np.concatenate(list(direct.stream(text, speaker, list(context), **options)))


def decode(data: bytes, response_format: str) -> tuple[np.ndarray, int]:
    """(float samples, the decoder's rate) of a response; pcm is read as 24 kHz s16le."""
    if response_format == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32767, SAMPLE_RATE
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = np.concatenate([frame.to_ndarray().reshape(-1) for frame in container.decode(stream)])
        if samples.dtype == np.int16:  # the lossless codecs decode to s16: back by pcm16's own scale
            samples = samples.astype(np.float32) / 32767
        return samples, stream.codec_context.sample_rate


def s16(data: bytes) -> np.ndarray:
    return np.frombuffer(data, "<i2")


@pytest.fixture(scope="module")
def reference(direct: CSMClient) -> np.ndarray:
    """csm_stream's audio for TEXT as voice alloy (speaker 0) with SHORT's seed and length."""
    audio = straight_to_triton(direct, 0, **SHORT)
    assert len(audio) % SAMPLES_PER_FRAME == 0 and len(audio) > 0
    return audio


@pytest.mark.parametrize("streaming", [False, True], ids=["create", "with_streaming_response"])
@pytest.mark.parametrize("response_format", list(FORMATS))
def test_every_format_decodes_to_the_frames_generated(
    client: openai.OpenAI, reference: np.ndarray, response_format: str, streaming: bool
) -> None:
    arguments = {"model": "csm-1b", "input": TEXT, "voice": "alloy", "response_format": response_format, "extra_body": SHORT}
    if streaming:
        with client.audio.speech.with_streaming_response.create(**arguments) as response:
            assert response.headers["content-type"] == FORMATS[response_format].media_type
            data = b"".join(response.iter_bytes())
    else:
        data = client.audio.speech.create(**arguments).content
    samples, rate = decode(data, response_format)
    frames = len(reference) // SAMPLES_PER_FRAME
    if response_format == "opus":  # Opus always decodes at 48 kHz; the stream was encoded from 24 kHz
        assert rate == 48_000
        samples = samples[::2]
    else:
        assert rate == SAMPLE_RATE
    slack = CODEC_SLACK.get(response_format, 0)
    assert frames * SAMPLES_PER_FRAME <= len(samples) <= frames * SAMPLES_PER_FRAME + slack
    if response_format in ("pcm", "wav", "flac"):  # lossless: exactly csm_stream's samples, as 16-bit PCM
        assert np.array_equal(s16(pcm16(samples)), s16(pcm16(reference)))
    if response_format == "wav":
        assert data[:4] == b"RIFF" and data[4:8] == b"\xff\xff\xff\xff"  # the streaming header: length unknown


def test_the_same_seed_voice_and_input_give_triton_s_audio(client: openai.OpenAI, direct: CSMClient) -> None:
    """Voice echo is speaker 4 by default; a context turn with audio goes to csm_stream as it would directly."""
    speaker = OPENAI_VOICES.index("echo")
    turn_audio = straight_to_triton(direct, 1, "An earlier turn.", seed=3, max_audio_length_ms=400)
    context = [{"text": "An earlier turn.", "speaker": 1, "audio": base64.b64encode(wav_bytes(turn_audio)).decode()}]
    body = {"seed": 11, "max_audio_length_ms": 640, "temperature": 0.7, "topk": 20, "context": context}
    data = client.audio.speech.create(model="csm-1b", input=TEXT, voice="echo", response_format="pcm", extra_body=body).content
    wav_turn = s16(pcm16(turn_audio)).astype(np.float32) / 32768  # what the WAV carries, read back as soundfile would
    expected = straight_to_triton(
        direct, speaker, context=[Segment(speaker=1, text="An earlier turn.", audio=wav_turn)], seed=11, max_audio_length_ms=640,
        temperature=0.7, topk=20,
    )  # fmt: skip
    assert np.array_equal(s16(data), s16(pcm16(expected)))
    by_id = client.audio.speech.create(model="tts-1", input=TEXT, voice={"id": "echo"}, response_format="pcm", extra_body=body).content
    assert by_id == data


def test_context_codes_go_to_csm_stream_as_they_are_and_a_conversation_of_codes_encodes_nothing(
    client: openai.OpenAI, direct: CSMClient, triton: TritonServer
) -> None:
    """Turns sent as the codes csm_stream returned for them (AUDIO_CODES) give what the same
    request sent straight to Triton with those codes gives, and no turn is ever encoded."""
    start = encodes(triton)
    turns: list[dict] = []
    segments: list[Segment] = []
    for index in range(5):
        text, speaker = f"Codes turn {index}.", index % 2
        body = {"seed": index, "max_audio_length_ms": 400, "context": turns}
        voice = OPENAI_VOICES[speaker]  # alloy, ash, ...: speakers 0 and 1 by default
        data = client.audio.speech.create(model="csm-1b", input=text, voice=voice, response_format="pcm", extra_body=body).content
        expected = straight_to_triton(direct, speaker, text, segments, seed=index, max_audio_length_ms=400)
        assert np.array_equal(s16(data), s16(pcm16(expected)))
        codes = direct.generate_codes(text, speaker, segments, seed=index, max_audio_length_ms=400)  # the turn's AUDIO_CODES
        turns = [*turns, {"text": text, "speaker": speaker, "codes": codes.tolist()}]
        segments = [*segments, Segment(speaker=speaker, text=text, codes=codes)]
    time.sleep(1)  # an encode would have reached the log by now (settled_encodes waits up to 5 s for one)
    assert encodes(triton) == start


def test_bytes_arrive_before_generation_ends(client: openai.OpenAI) -> None:
    arrivals = []
    started = time.monotonic()
    options = {"seed": 5, "max_audio_length_ms": 4000}
    with client.audio.speech.with_streaming_response.create(
        model="csm-1b", input=TEXT, voice="alloy", response_format="wav", extra_body=options
    ) as response:
        for piece in response.iter_bytes(chunk_size=None):
            arrivals.append((time.monotonic() - started, len(piece)))
    total = arrivals[-1][0]
    assert len(arrivals) >= 4, arrivals
    assert arrivals[0][0] < 0.5 * total, arrivals  # the first chunk (2 frames) leaves long before the 50th frame
    assert sum(size for _, size in arrivals) == 44 + 2 * 50 * SAMPLES_PER_FRAME


def sse_events(data: bytes) -> list[dict]:
    return [json.loads(block[len("data: ") :]) for block in data.decode().split("\n\n") if block.startswith("data: ")]


def test_sse_deltas_join_to_the_same_samples(client: openai.OpenAI, reference: np.ndarray) -> None:
    with client.audio.speech.with_streaming_response.create(
        model="csm-1b", input=TEXT, voice="alloy", response_format="pcm", stream_format="sse", extra_body=SHORT
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.read())
    deltas = [event for event in events if event["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2 and events[-1]["type"] == "speech.audio.done" and len(events) == len(deltas) + 1
    audio = b"".join(base64.b64decode(event["audio"]) for event in deltas)
    assert audio == pcm16(reference)
    assert events[-1]["usage"]["output_tokens"] == len(reference) // SAMPLES_PER_FRAME


@pytest.mark.parametrize("speed", [0.5, 1.5, 4.0])  # 1.0: the test above
@pytest.mark.parametrize("response_format", list(FORMATS))
def test_every_format_at_every_speed_decodes_to_the_frames_over_the_speed(
    client: openai.OpenAI, reference: np.ndarray, response_format: str, speed: float
) -> None:
    """The speed change keeps the rate and makes the audio `speed` times shorter, to the sample
    before the lossy codecs' padding; atempo holds back the first chunk, which no encoder minds."""
    data = client.audio.speech.create(
        model="csm-1b", input=TEXT, voice="alloy", response_format=response_format, speed=speed, extra_body=SHORT
    ).content
    samples, rate = decode(data, response_format)
    if response_format == "opus":
        samples = samples[::2]
    expected = round(len(reference) / speed)
    assert rate == (48_000 if response_format == "opus" else SAMPLE_RATE)
    assert expected <= len(samples) <= expected + CODEC_SLACK.get(response_format, 0)


def test_generate_models_voices_health_and_metrics(gateway: str, direct: CSMClient, reference: np.ndarray) -> None:
    answer = httpx.post(f"{gateway}/generate", json={"text": TEXT, "speaker": 0, **SHORT}, timeout=60).json()
    samples, rate = decode(base64.b64decode(answer["audio"]), "wav")
    assert rate == SAMPLE_RATE and np.array_equal(s16(pcm16(samples)), s16(pcm16(reference)))
    models = httpx.get(f"{gateway}/v1/models").json()
    assert models["object"] == "list" and {"csm-1b", "tts-1"} <= {model["id"] for model in models["data"]}
    assert httpx.get(f"{gateway}/v1/models/csm-1b").json()["id"] == "csm-1b"
    voices = {voice["id"]: voice for voice in httpx.get(f"{gateway}/v1/audio/voices").json()["data"]}
    assert set(OPENAI_VOICES) <= set(voices) and voices["alloy"]["speaker"] == 0
    health = httpx.get(f"{gateway}/health")
    assert health.status_code == 200 and health.json()["status"] == "ready"
    metrics = httpx.get(f"{gateway}/metrics").text
    assert 'gateway_time_to_first_audio_seconds_count{route="speech"}' in metrics and "gateway_audio_seconds_total" in metrics
    assert 'gateway_requests_total{route="/generate",status="200"} 1.0' in metrics
    page = httpx.get(f"{gateway}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def speech(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/audio/speech", json={"model": "csm-1b", "input": TEXT, "voice": "alloy", **body}, timeout=60)


@pytest.mark.parametrize(
    ("body", "param", "starts"),
    [
        ({"speed": 4.5}, "speed", "speed:"),
        ({"response_format": "ogg"}, "response_format", "response_format:"),
        ({"input": "   "}, "input", "input: must not be blank"),
        ({"input": "x" * 4097}, "input", "input: 4097 characters"),
        ({"stream_format": "chunks"}, "stream_format", "stream_format:"),
        ({"unknown_option": 1}, "unknown_option", "unknown_option:"),
        ({"topk": 3000}, "topk", "TOPK: must be in [1, 2051]"),  # csm_stream's INVALID_ARG, mapped to the parameter
        ({"max_audio_length_ms": 10**6}, "max_audio_length_ms", "MAX_AUDIO_LENGTH_MS:"),
        ({"temperature": 0}, "temperature", "temperature:"),
        ({"context": [{"text": "a", "speaker": 0, "audio": "not base64!"}]}, "context", "context[0].audio: is not valid base64"),
        (
            {"context": [{"text": "a", "speaker": 0, "audio": base64.b64encode(b"RIFF junk").decode()}]},
            "context",
            "context[0].audio: is not audio of a format accepted",
        ),
        ({"context": [{"text": "a", "speaker": 0, "codes": [[0] * 31]}]}, "context", "context.0.codes.0:"),
        ({"context": [{"text": "a", "speaker": 0, "codes": [[-1] * 32]}]}, "context", "context.0.codes.0.0:"),
        ({"context": [{"text": "a", "speaker": 0, "codes": []}]}, "context", "context.0.codes:"),
        (
            {"context": [{"text": "a", "speaker": 0, "codes": [[2051] * 32]}]},
            "context",
            r"CONTEXT_CODES: segment 0 codes must be in [0, 2050]",
        ),
        (
            {"context": [{"text": "a", "speaker": 0, "codes": [[0] * 32], "audio": base64.b64encode(b"RIFF").decode()}]},
            "context",
            "context[0]: holds both audio and codes",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_an_invalid_request_is_400_naming_its_parameter(gateway: str, body: dict, param: str, starts: str) -> None:
    error = error_of(speech(gateway, **body), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"].startswith(starts), error


def test_a_body_that_is_not_json_or_too_large_is_refused(gateway: str) -> None:
    json_type = {"Content-Type": "application/json"}
    assert error_of(httpx.post(f"{gateway}/v1/audio/speech", content=b"{nope", headers=json_type), 400)["code"] == "invalid_json"
    huge = httpx.post(f"{gateway}/v1/audio/speech", content=b" " * (32 * 1024 * 1024 + 1), headers=json_type)
    assert error_of(huge, 413)["code"] == "request_too_large"


def test_an_unknown_voice_or_model_is_404(gateway: str) -> None:
    for body, param in (({"voice": "nobody"}, "voice"), ({"voice": {"id": "nobody"}}, "voice"), ({"model": "whisper-1"}, "model")):
        error = error_of(speech(gateway, **body), 404)
        assert error["param"] == param and error["type"] == "not_found_error"
    assert error_of(httpx.get(f"{gateway}/v1/models/whisper-1"), 404)["param"] == "model"


def test_api_keys_when_configured(triton: TritonServer) -> None:
    with running(GatewayConfig(triton_url=triton.grpc_url, port=free_port(), api_keys=("sk-one", "sk-two"))) as url:
        assert error_of(httpx.get(f"{url}/v1/models"), 401)["code"] == "invalid_api_key"
        assert error_of(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-three"}), 401)["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).audio.speech.create(
                model="csm-1b", input=TEXT, voice="alloy"
            )
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-two"}).status_code == 200
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-one", max_retries=0)
        assert (
            len(keyed.audio.speech.create(model="csm-1b", input=TEXT, voice="alloy", response_format="pcm", extra_body=SHORT).content) > 0
        )
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key


def test_busy_is_429_and_an_unreachable_triton_is_503(triton: TritonServer) -> None:
    with running(GatewayConfig(triton_url=triton.grpc_url, port=free_port(), max_streams=1)) as url:
        body = {"model": "csm-1b", "input": TEXT, "voice": "alloy", "response_format": "pcm", "max_audio_length_ms": 4000}
        with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=60) as first:
            pieces = first.iter_raw()  # kept: an iterator dropped here would close the response
            next(pieces)
            error = error_of(speech(url, **SHORT), 429)
            assert error["type"] == "rate_limit_error" and error["code"] == "server_busy"
    with running(GatewayConfig(triton_url=f"127.0.0.1:{free_port()}", port=free_port(), timeout_s=5)) as url:
        assert error_of(speech(url, **SHORT), 503)["code"] == "model_unavailable"
        assert httpx.get(f"{url}/health").status_code == 503


def test_triton_errors_map_to_statuses() -> None:
    """The statuses that the tiny server cannot be made to answer on demand (a full queue, a crash)."""
    busy = from_triton(CSMError("server busy: Exceeds maximum queue size: 32 requests are waiting", "StatusCode.UNAVAILABLE"))
    assert (busy.status, busy.code) == (429, "server_busy")
    assert from_triton(CSMError("csm_stream's process died", "StatusCode.UNAVAILABLE")).status == 503
    internal = from_triton(CSMError("something broke", "StatusCode.INTERNAL"))
    assert internal.status == 500 and internal.body()["error"]["type"] == "server_error"
    prompt = from_triton(CSMError("prompt: 2100 positions do not fit", "StatusCode.INVALID_ARGUMENT"))
    assert (prompt.status, prompt.param) == (400, "input")


def settle(triton: TritonServer, key: str, predicate, timeout_s: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(triton)
        if predicate(samples.get(key, 0.0)) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def test_a_client_that_disconnects_frees_its_slot(gateway: str, triton: TritonServer) -> None:
    cancelled = series("csm_rejected_requests_total", reason="cancelled", field="")
    before = settled(triton).get(cancelled, 0.0)  # once the cancels of earlier tests have been reported
    body = {"model": "csm-1b", "input": TEXT, "voice": "alloy", "response_format": "pcm", "max_audio_length_ms": 20000}
    with httpx.stream("POST", f"{gateway}/v1/audio/speech", json=body, timeout=60) as response:
        pieces = response.iter_raw()  # kept: an iterator dropped here would close the response
        next(pieces)
        streaming = settle(triton, series("csm_active_slots"), lambda value: value >= 1)
        assert streaming[series("csm_active_slots")] >= 1
        closed = time.monotonic()
    after = settle(triton, cancelled, lambda value: value > before)
    # Freed as the engine reports it: csm_stream's gauges lag by up to a second (README, "Metrics").
    assert after[cancelled] == before + 1 and time.monotonic() - closed < 5
    assert settle(triton, series("csm_streams"), lambda value: value == 0)[series("csm_streams")] == 0
    assert "gateway_cancelled_streams_total 1.0" in httpx.get(f"{gateway}/metrics").text


def test_concurrent_requests_share_one_batch(client: openai.OpenAI, triton: TritonServer) -> None:
    steps, slot_steps = series("csm_engine_steps_total"), series("csm_engine_slot_steps_total")
    before = settle(triton, series("csm_streams"), lambda value: value == 0)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        calls = [
            pool.submit(client.audio.speech.create, model="csm-1b", input=TEXT, voice=voice, response_format="pcm",
                        extra_body={"seed": index, "max_audio_length_ms": 1600})
            for index, voice in enumerate(("alloy", "echo", "nova", "onyx"))
        ]  # fmt: skip
        assert all(len(call.result().content) == 2 * 20 * SAMPLES_PER_FRAME for call in calls)
    time.sleep(1.5)  # the engine's totals reach the metrics port every 0.5 s
    after = scrape(triton)
    occupancy = (after[slot_steps] - before[slot_steps]) / (after[steps] - before[steps])
    assert occupancy > 2.0, occupancy  # 80 frames in all, in steps that each generated for more than two requests


@pytest.fixture(scope="module")
def clip(direct: CSMClient) -> tuple[bytes, np.ndarray]:
    """A reference clip (WAV) of 0.4 s, and its samples as the gateway decodes them."""
    samples = straight_to_triton(direct, 2, "A clip of my voice.", seed=9, max_audio_length_ms=400)
    return wav_bytes(samples), s16(pcm16(samples)).astype(np.float32) / 32768


def test_a_custom_voice_is_usable_by_name_and_id_then_deleted(client: openai.OpenAI, direct: CSMClient, clip) -> None:
    data, samples = clip
    voice = client.audio.voices.create(
        name="maya", audio_sample=("maya.wav", data, "audio/wav"), consent="cons_1234",
        extra_body={"transcript": "A clip of my voice.", "speaker": "2"},
    )  # fmt: skip
    assert voice.object == "audio.voice" and voice.name == "maya" and voice.type == "audio_sample" and voice.id.startswith("voice_")
    by_name = client.audio.speech.create(model="csm-1b", input=TEXT, voice="maya", response_format="pcm", extra_body=SHORT).content
    by_id = client.audio.speech.create(model="csm-1b", input=TEXT, voice={"id": voice.id}, response_format="pcm", extra_body=SHORT)
    expected = straight_to_triton(direct, 2, context=[Segment(speaker=2, text="A clip of my voice.", audio=samples)], **SHORT)
    assert by_name == by_id.content and np.array_equal(s16(by_name), s16(pcm16(expected)))
    listed = {entry["id"]: entry for entry in client.get("/audio/voices", cast_to=object)["data"]}
    assert listed[voice.id]["name"] == "maya" and listed[voice.id]["reference_clip"]
    deleted = client.audio.voices.delete(voice.id)
    assert deleted.deleted and deleted.id == voice.id
    with pytest.raises(openai.NotFoundError):
        client.audio.speech.create(model="csm-1b", input=TEXT, voice="maya", extra_body=SHORT)
    with pytest.raises(openai.NotFoundError):
        client.audio.voices.delete(voice.id)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"name": "bad name!"}, "name"),
        ({"consent": " "}, "consent"),
        ({"transcript": ""}, "transcript"),
        ({"speaker": "-1"}, "speaker"),
        ({"speaker": "one"}, "speaker"),
        ({"type": "prompt"}, "type"),
        ({"clip": b"not audio at all"}, "audio_sample"),
        ({"clip": None}, "audio_sample"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_voice_that_cannot_be_made_is_400_naming_its_field(gateway: str, clip, fields: dict, param: str) -> None:
    form = {"name": "nova2", "consent": "cons_1", "transcript": "A clip of my voice.", **fields}
    upload = form.pop("clip", clip[0])
    files = {} if upload is None else {"audio_sample": ("clip.wav", upload, "audio/wav")}
    error = error_of(httpx.post(f"{gateway}/v1/audio/voices", data=form, files=files), 400)
    assert error["param"] == param, error


def test_voice_names_are_unique_uploads_bounded_and_voices_kept_in_voices_dir(triton: TritonServer, clip, tmp_path: Path) -> None:
    config = GatewayConfig(
        triton_url=triton.grpc_url, port=free_port(), voices_dir=tmp_path, max_voice_upload_bytes=len(clip[0]), open_voices=True
    )
    form = {"name": "kept", "consent": "cons_1", "transcript": "A clip of my voice."}
    with running(config) as url:
        made = httpx.post(f"{url}/v1/audio/voices", data=form, files={"audio_sample": ("clip.wav", clip[0])}).json()
        again = httpx.post(f"{url}/v1/audio/voices", data=form, files={"audio_sample": ("clip.wav", clip[0])})
        assert error_of(again, 400)["message"] == "name: a voice named 'kept' exists already"
        big = httpx.post(
            f"{url}/v1/audio/voices", data={**form, "name": "big"}, files={"audio_sample": ("clip.wav", clip[0] + b"\0" * 70_000)}
        )
        assert error_of(big, 413)["param"] == "audio_sample"
        assert error_of(httpx.delete(f"{url}/v1/audio/voices/alloy"), 404)["param"] == "voice_id"  # configured voices stay
    config.port = free_port()
    with running(config) as url:  # a new gateway on the same directory has the voice
        voices = {voice["id"]: voice for voice in httpx.get(f"{url}/v1/audio/voices").json()["data"]}
        assert voices[made["id"]]["name"] == "kept" and voices[made["id"]]["created_at"] == made["created_at"]
        assert len(speech(url, voice="kept", response_format="pcm", **SHORT).content) == 2 * 10 * SAMPLES_PER_FRAME


def encodes(triton: TritonServer) -> int:
    """Clips csm_stream has Mimi-encoded so far, as its log says (csm_triton/engine/prompt.py)."""
    return triton.log_file.read_text(errors="replace").count(": Mimi-encoded ")


def settled_encodes(triton: TritonServer, expected: int) -> int:
    deadline = time.monotonic() + 5
    while encodes(triton) < expected and time.monotonic() < deadline:
        time.sleep(0.1)  # the engine's log reaches the file through the stub's pipe
    return encodes(triton)


def test_a_conversation_re_encodes_no_earlier_turn_and_a_voice_clip_is_encoded_once(
    client: openai.OpenAI, triton: TritonServer, direct: CSMClient
) -> None:
    start = encodes(triton)
    turns: list[dict] = []
    for index in range(5):
        text = f"Turn {index} of the conversation."
        body = {"seed": index, "max_audio_length_ms": 400, "context": turns}
        data = client.audio.speech.create(model="csm-1b", input=text, voice="alloy", response_format="wav", extra_body=body).content
        turns = [*turns, {"text": text, "speaker": index % 2, "audio": base64.b64encode(data).decode()}]
    # Turn 4 came with 4 earlier turns, turn 3 with 3...: 10 clips sent, 4 of them distinct, each encoded once.
    assert settled_encodes(triton, start + 4) == start + 4
    fresh = wav_bytes(straight_to_triton(direct, 3, "A clip no test has sent.", seed=21, max_audio_length_ms=400))
    start = encodes(triton)
    voice = client.audio.voices.create(
        name="once", audio_sample=("once.wav", fresh, "audio/wav"), consent="cons_1", extra_body={"transcript": "A clip no test has sent."}
    )
    for value in ("once", {"id": voice.id}, "once"):
        client.audio.speech.create(model="csm-1b", input=TEXT, voice=value, response_format="pcm", extra_body=SHORT)
    assert settled_encodes(triton, start + 1) == start + 1
    client.audio.voices.delete(voice.id)


@pytest.mark.deploy
def test_make_serve_runs_the_gateway_beside_tritonserver_and_stops_both(tmp_path: Path, tiny_model_dir: Path) -> None:
    """`python -m csm_triton.tools.serve` as `make serve` runs it; only `csm` is loaded (it holds no weights, so it
    loads in seconds): the gateway answers, and its /health says csm_stream is not ready."""
    from test_admin_api import serve_command, wait_for_line, without_admin_key

    repository = model_repository_with(tmp_path / "repo", {"model_dir": str(tmp_path / "none"), "tiny_model_dir": str(tiny_model_dir)})
    options, port, log_file = ServerOptions.on_free_ports(repository), free_port(), tmp_path / "serve.log"
    server_argv = serve_command(options, tmp_path / "admin-key", "--model-control-mode=explicit", "--load-model=csm")[3:]
    key_file = f"--voices-key-file={tmp_path / 'voices-key'}"
    argv = [sys.executable, "-m", "csm_triton.tools.serve", "--gateway-port", str(port), key_file, *server_argv]
    with open(log_file, "w") as log:
        process = subprocess.Popen(argv, env=without_admin_key(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_line(log_file, "tritonserver ready", process)
        assert f"gateway: http://localhost:{port}/" in log_file.read_text()
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200
        health = httpx.get(f"http://127.0.0.1:{port}/health")
        assert health.status_code == 503 and health.json()["triton"] == f"localhost:{options.grpc_port}"
        unloaded = error_of(speech(f"http://127.0.0.1:{port}", **SHORT), 503)  # Triton up, csm_stream not loaded
        assert unloaded["code"] == "model_unavailable" and "csm_stream" in unloaded["message"]
        [launcher] = psutil.Process(process.pid).children()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
    assert not launcher.is_running() and "successfully unloaded 'csm'" in log_file.read_text()
