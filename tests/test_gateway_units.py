"""The gateway's parts that need no server: its configuration from the environment and the command
line, the voices file, the audio helpers (the WAV header, the encoders, the speed change), the
clips' decoding within its allow-list and bounds, bodies read and parsed within theirs, and its
answer to an unexpected error."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import time
import tracemalloc
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from fastapi.testclient import TestClient
from starlette.requests import Request

from gateway import GatewayConfig, create_app
from gateway.audio import FORMATS, Encoder, SpeedChange, atempo_chain, wav_bytes, wav_header
from gateway.body import MAX_FORM_PARTS, json_values, parse_form, parse_json, read_body
from gateway.clips import AudioInputError, ClipBounds, decode_audio, decode_base64_audio, demuxer_of, resample
from gateway.config import OPENAI_VOICES, load_voices
from gateway.errors import APIError
from gateway.voices import VoiceError, VoiceLibrary

pytestmark = pytest.mark.unit

BOUNDS = ClipBounds(8000, 48_000, 8)


def tone(seconds: float, rate: int = 24_000) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def test_configuration_from_the_environment_and_flags_the_flag_winning(tmp_path: Path) -> None:
    environ = {"GATEWAY_PORT": "9000", "CSM_GATEWAY_API_KEYS": "a, b,", "CSM_GATEWAY_FIRST_CHUNK_FRAMES": "3",
               "CSM_GATEWAY_VOICES_DIR": str(tmp_path), "CSM_GATEWAY_MAX_CONTEXT_AUDIO_S": "12.5",
               "CSM_GATEWAY_MAX_JSON_VALUES": "1000", "CSM_GATEWAY_MAX_CLIP_SAMPLE_RATE": "44100"}  # fmt: skip
    config = GatewayConfig.from_env(environ)
    assert (config.port, config.api_keys, config.first_chunk_frames, config.voices_dir) == (9000, ("a", "b"), 3, tmp_path)
    assert config.max_context_audio_s == 12.5 and config.triton_url == "localhost:8001"
    assert (config.max_json_values, config.max_clip_sample_rate, ClipBounds.from_config(config)) == (
        1000,
        44_100,
        ClipBounds(8000, 44_100, 8),
    )
    assert GatewayConfig.from_env(environ, port=7000).port == 7000
    flags = GatewayConfig.from_command_line(["--port", "8123", "--models", "csm-1b", "--triton-url", "triton:8001"])
    assert (flags.port, flags.models, flags.triton_url) == (8123, ("csm-1b",), "triton:8001")
    with pytest.raises(ValueError, match="models"):
        GatewayConfig(models=())
    with pytest.raises(ValueError, match="min_clip_sample_rate"):
        GatewayConfig(min_clip_sample_rate=48_001)


def test_voices_cors_and_timeouts_from_the_environment() -> None:
    environ = {"CSM_GATEWAY_OPEN_VOICES": "True", "CSM_GATEWAY_CORS_ORIGINS": "https://a.example, http://b:3000",
               "CSM_GATEWAY_HEADER_TIMEOUT_S": "2.5"}  # fmt: skip
    config = GatewayConfig.from_env(environ)
    assert config.open_voices and config.cors_origins == ("https://a.example", "http://b:3000") and config.header_timeout_s == 2.5
    assert GatewayConfig.from_command_line(["--voice-keys", "k1,k2", "--open-voices", "no"]).voice_keys == ("k1", "k2")
    with pytest.raises(ValueError, match="true or false"):
        GatewayConfig.from_env({"CSM_GATEWAY_OPEN_VOICES": "maybe"})
    with pytest.raises(ValueError, match="open_voices and voice_keys"):
        GatewayConfig.from_env({**environ, "CSM_GATEWAY_VOICE_KEYS": "k1"})
    with pytest.raises(ValueError, match="body_timeout_s"):
        GatewayConfig(body_timeout_s=0)


def test_the_voices_file_adds_to_openai_s_names_and_checks_its_entries(tmp_path: Path) -> None:
    assert [voice.speaker for voice in load_voices(None).values()] == list(range(len(OPENAI_VOICES)))
    soundfile.write(tmp_path / "maya.wav", tone(0.5), 24_000)
    (tmp_path / "voices.json").write_text(
        json.dumps({"maya": {"speaker": 1, "audio": "maya.wav", "transcript": "Hi."}, "alloy": {"speaker": 5}})
    )
    voices = load_voices(tmp_path / "voices.json")
    assert voices["maya"].audio == tmp_path / "maya.wav" and voices["maya"].transcript == "Hi." and voices["alloy"].speaker == 5
    for entry, message in (
        ({"speaker": -1}, "speaker id"),
        ({"speaker": 2**31}, "speaker id"),
        ({"speaker": 0, "audio": "none.wav"}, "no file"),
    ):
        (tmp_path / "bad.json").write_text(json.dumps({"bad": entry}))
        with pytest.raises(ValueError, match=message):
            load_voices(tmp_path / "bad.json")


def test_wav_headers_stream_or_give_exact_sizes() -> None:
    header = wav_header()
    assert len(header) == 44 and header[4:8] == header[40:44] == b"\xff\xff\xff\xff"
    assert struct.unpack("<I", header[24:28])[0] == 24_000 and struct.unpack("<H", header[34:36])[0] == 16
    samples, rate = soundfile.read(io.BytesIO(wav_bytes(tone(0.1))), dtype="float32")
    assert rate == 24_000 and len(samples) == 2400 and np.abs(samples - tone(0.1)).max() < 1e-4


@pytest.mark.parametrize("speed", [0.25, 0.5, 1.5, 4.0])
def test_the_speed_change_keeps_the_rate_and_scales_the_duration_to_the_sample(speed: float) -> None:
    change, audio = SpeedChange(speed), tone(2.0)
    parts = [change.feed(audio[i : i + 3840]) for i in range(0, len(audio), 3840)]
    assert len(parts[0]) == 0  # atempo holds back its first chunk: the encoders get nothing for it
    out = np.concatenate([*parts, change.finish()])
    assert len(out) == round(len(audio) / speed) and out.dtype == np.float32
    assert np.prod(atempo_chain(speed)) == pytest.approx(speed) and all(0.5 <= factor <= 100 for factor in atempo_chain(speed))


@pytest.mark.parametrize("response_format", list(FORMATS))
def test_an_encoder_fed_nothing_sends_nothing_and_still_ends_a_valid_file(response_format: str) -> None:
    encoder = Encoder(response_format)
    data = encoder.feed(np.zeros(0, np.float32)) + encoder.feed(tone(0.2)) + encoder.feed(np.zeros(0, np.float32)) + encoder.finish()
    if response_format != "pcm":
        with av.open(io.BytesIO(data)) as container:
            assert sum(frame.samples for frame in container.decode(audio=0)) >= 0.2 * container.streams.audio[0].rate


def encoded(muxer: str, codec: str, rate: int, seconds: float = 1.0, channels: int = 1, options: dict | None = None) -> bytes:
    """A tone of `seconds` encoded by ffmpeg as a file of `muxer`."""
    out = io.BytesIO()
    layout = "mono" if channels == 1 else "stereo"
    with av.open(out, "w", format=muxer, container_options=options or {}) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.repeat(tone(seconds, rate), channels)[None], format="flt", layout=layout)
        frame.sample_rate = rate
        for converted in av.AudioResampler(stream.codec_context.format.name, layout, rate).resample(frame):
            for packet in stream.encode(converted):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out.getvalue()


@pytest.mark.parametrize(
    ("muxer", "codec", "rate", "options", "demuxer"),
    [
        ("wav", "pcm_s16le", 16_000, None, "wav"),
        ("flac", "flac", 44_100, None, "flac"),
        ("mp3", "libmp3lame", 24_000, None, "mp3"),  # with an ID3 tag
        ("mp3", "libmp3lame", 22_050, {"id3v2_version": "0"}, "mp3"),  # MPEG frames from the first byte
        ("ogg", "libopus", 48_000, None, "ogg"),
        ("adts", "aac", 32_000, None, "aac"),
        ("ipod", "aac", 24_000, None, "mov"),  # M4A
        ("webm", "libopus", 48_000, None, "matroska"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_each_allowed_container_is_recognised_and_decodes_to_mono(muxer: str, codec: str, rate: int, options, demuxer: str) -> None:
    data = encoded(muxer, codec, rate, channels=2, options=options)
    assert demuxer_of(data) == demuxer
    samples, decoded_rate = decode_audio(data, 5, BOUNDS)
    # The lossy codecs' priming and padding: up to a frame or two more.
    assert decoded_rate == rate and rate <= len(samples) <= rate + 2 * 1152 and samples.dtype == np.float32


def wav_with(rate: int, channels: int = 1, samples: int = 100, declared: int | None = None) -> bytes:
    """A 16-bit PCM WAV whose header says what a test needs (`declared`: the data chunk's size)."""
    data = bytes(2 * channels * samples)
    size = len(data) if declared is None else declared
    return (
        b"RIFF" + struct.pack("<I", (36 + size) & 0xFFFFFFFF) + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, rate, (2 * channels * rate) & 0xFFFFFFFF, (2 * channels) & 0xFFFF, 16)
        + b"data" + struct.pack("<I", size) + data
    )  # fmt: skip


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"ffconcat version 1.0\nfile 'voice.wav'\n", "not audio of a format accepted"),
        (b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nvoice.wav\n#EXT-X-ENDLIST\n", "not audio of a format accepted"),
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "not audio of a format accepted"),
        (b"", "not audio of a format accepted"),
        (wav_with(655_350), r"sample rate must be in \[8000, 48000\] Hz, got 655350"),
        (wav_with(1), "got 1$"),
        (wav_with(2**31 - 1), "got 2147483647"),
        (wav_with(12_007), "resampling filter"),  # in range, but csm_stream refuses its resampling
        (wav_with(16_000, channels=9), "9 channels"),
        (wav_with(16_000)[:30], "cannot be decoded as wav"),  # truncated in its header
        (wav_with(16_000, samples=0, declared=0xFFFFFFF0), "holds no samples"),  # a length that lies
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_clip_outside_the_allow_list_or_its_bounds_is_refused_before_decoding(data: bytes, message: str) -> None:
    with pytest.raises(AudioInputError, match=message):
        decode_audio(data, 30, BOUNDS)


def test_a_tiny_file_that_decodes_to_hours_stops_at_the_bound_holding_no_more() -> None:
    silence = io.BytesIO()  # digital silence compresses to almost nothing: 20 minutes in ~180 KB
    with soundfile.SoundFile(silence, "w", 48_000, 1, format="FLAC", subtype="PCM_16") as flac:
        for _ in range(20):
            flac.write(np.zeros(60 * 48_000, np.int16))
    assert len(silence.getvalue()) < 250_000
    tracemalloc.start()
    started = time.monotonic()
    with pytest.raises(AudioInputError, match="longer than 30 s"):
        decode_audio(silence.getvalue(), 30, BOUNDS)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.monotonic() - started < 5
    assert peak < BOUNDS.max_bytes(30) + (1 << 20)  # numpy's buffers are traced: the samples, never more


def test_uploads_decode_to_mono_within_their_bound() -> None:
    stereo = io.BytesIO()
    soundfile.write(stereo, np.stack([tone(1.0, 16_000), -tone(1.0, 16_000)], axis=1), 16_000, format="FLAC")
    samples, rate = decode_audio(stereo.getvalue(), 5, BOUNDS)
    assert rate == 16_000 and len(samples) == 16_000 and np.abs(samples).max() < 1e-3  # the channels averaged
    with pytest.raises(AudioInputError, match="longer than 0.5 s"):
        decode_audio(wav_bytes(tone(1.0)), 0.5, BOUNDS)
    with pytest.raises(AudioInputError, match="base64"):
        decode_base64_audio("@@@", 5, BOUNDS)
    assert len(resample(tone(1.0, 16_000), 16_000, 24_000)) == pytest.approx(24_000, abs=64)


def test_an_unexpected_error_is_500_with_the_request_s_id() -> None:
    """Starlette answers it outside the middleware (RequestIds included); the handler adds the id."""
    app = create_app(GatewayConfig())

    @app.get("/broken")
    async def broken() -> None:
        raise RuntimeError("a bug")

    response = TestClient(app, raise_server_exceptions=False).get("/broken", headers={"x-request-id": "bug-1"})
    assert response.status_code == 500 and response.headers["x-request-id"] == "bug-1"
    assert response.json()["error"] == {"message": "internal error: RuntimeError", "type": "server_error", "param": None,
                                        "code": "internal_error"}  # fmt: skip


def body_of(parts: list[bytes], headers: dict[str, str] | None = None) -> tuple[Request, list[dict]]:
    """A request whose body comes in `parts`, and the messages of it not read yet."""
    messages = [{"type": "http.request", "body": part, "more_body": True} for part in parts]
    messages.append({"type": "http.request", "body": b"", "more_body": False})

    async def receive() -> dict:
        return messages.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()]}
    return Request(scope, receive), messages


def test_a_body_is_refused_once_past_its_cap_or_its_json_values_the_rest_unread() -> None:
    request, unread = body_of([b"x" * 600, b"x" * 600, b"x" * 600])
    with pytest.raises(APIError, match="larger than 1000 bytes"):
        asyncio.run(read_body(request, 1000))
    assert len(unread) == 2  # the third part and the end
    request, unread = body_of([b"x"], {"content-length": "1001"})
    with pytest.raises(APIError, match="of 1001 bytes, more than 1000"):
        asyncio.run(read_body(request, 1000, "audio_sample"))
    assert len(unread) == 2  # nothing read
    request, unread = body_of([b"[" + b"1," * 60, b"1," * 60, b"1]"])
    with pytest.raises(APIError, match="more than max_json_values 100 JSON values .* in its first 241 bytes") as refused:
        asyncio.run(read_body(request, 10_000, max_json_values=100))
    assert refused.value.status == 413 and len(unread) == 2
    request, _ = body_of([b'{"a": [1, ', b"2]}"])
    assert asyncio.run(read_body(request, 10_000, max_json_values=100)) == b'{"a": [1, 2]}'
    assert json_values(b'[1, 2, {"c": [3]}]') == 5 and json_values(b'["a,[b"]') == 3  # 5 values besides the list; strings count


def test_json_is_parsed_to_its_depth_bound_and_a_lone_surrogate_is_left_for_its_field() -> None:
    assert parse_json(b'{"a": [1, 2, {"b": "\\ud83d\\ude00"}]}') == {"a": [1, 2, {"b": "\U0001f600"}]}
    assert parse_json(b'{"input": "x\\ud800"}') == {"input": "x\ud800"}  # a model's check names the field
    for body, message in (
        (b"[" * 3000 + b"]" * 3000, "recursion limit"),
        (b'{"a": NaN}', "not JSON"),
        (b"{nope", "not JSON"),
        (b'"\xff"', "not JSON"),
    ):
        with pytest.raises(APIError, match=message) as refused:
            parse_json(body)
        assert (refused.value.status, refused.value.code) == (400, "invalid_json")


def multipart(*parts: tuple[str, bytes, str | None], boundary: str = "b0undary") -> tuple[bytes, str]:
    """(body, content type) of a form: (name, data, filename or None) each."""
    body = b""
    for name, data, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_a_form_is_parsed_from_memory_each_field_checked() -> None:
    form = parse_form(*multipart(("name", "mäya".encode(), None), ("audio_sample", b"RIFF\r\n--b0und", "a.wav")))
    assert form.fields == {"name": "mäya"} and form.files == {"audio_sample": b"RIFF\r\n--b0und"}
    assert parse_form(b"name=m%C3%A4ya&speaker=2", "application/x-www-form-urlencoded").fields == {"name": "mäya", "speaker": "2"}
    for body, content_type, param, message in (
        (*multipart(("transcript", b"\xff\xfe", None)), "transcript", "transcript: not valid UTF-8"),
        (*multipart(("name", b"a", None), ("name", b"b", None)), "name", "used once"),
        (*multipart(*[(f"f{index}", b"", None) for index in range(MAX_FORM_PARTS + 1)]), None, "form fields"),
        (b"name=maya", "text/plain", None, "multipart/form-data"),
        (b"name=%ff", "application/x-www-form-urlencoded", None, "UTF-8 fields"),
        (b"--b0undary\r\nbroken", "multipart/form-data; boundary=b0undary", None, "body:"),
    ):
        with pytest.raises(APIError) as refused:
            parse_form(body, content_type)
        assert (refused.value.status, refused.value.param) == (400, param) and message in refused.value.message


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"speaker": "--5"}, "speaker", "whole number"),
        ({"speaker": "99999999999999999999"}, "speaker", "whole number in [0, 2147483647]"),
        ({"speaker": "2147483648"}, "speaker", "whole number"),
        ({"speaker": "٣"}, "speaker", "whole number"),
        ({"transcript": "x" * 4097}, "transcript", "4097 bytes of UTF-8, more than max_context_text_bytes 4096"),
        ({"transcript": "é" * 2049}, "transcript", "4098 bytes"),
        ({"consent": "c" * 257}, "consent", "at most 256"),
        ({"clip": wav_with(12_007, samples=12_007)}, "audio_sample", "resampling filter"),
        ({"clip": wav_with(16_000, samples=31 * 16_000)}, "audio_sample", "longer than 30 s"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_voice_is_checked_when_it_is_made_never_at_each_use(fields: dict, param: str, message: str) -> None:
    library = VoiceLibrary(GatewayConfig())
    form = {"name": "maya", "clip": wav_bytes(tone(0.5)), "transcript": "Hi.", "consent": "cons_1", "speaker": "2", **fields}
    with pytest.raises(VoiceError, match=message.replace("[", r"\[")) as refused:
        library.create(**form)
    assert refused.value.param == param and not library.all()[len(OPENAI_VOICES) :]
    made = library.create("maya", wav_bytes(tone(0.5)), "é" * 2048, "c" * 256, "2147483647")  # every field at its bound
    assert made.speaker == 2**31 - 1 and made.rate == 24_000 and len(made.samples) == 12_000
