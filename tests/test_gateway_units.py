"""The gateway's parts that need no server: its configuration from the environment and the command
line, the voices file, the audio helpers (the WAV header, the speed change, decoding uploads) and
its answer to an unexpected error."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from fastapi.testclient import TestClient

from gateway import GatewayConfig, create_app
from gateway.audio import AudioInputError, SpeedChange, atempo_chain, decode_audio, decode_base64_audio, resample, wav_bytes, wav_header
from gateway.config import OPENAI_VOICES, load_voices


def tone(seconds: float, rate: int = 24_000) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def test_configuration_from_the_environment_and_flags_the_flag_winning(tmp_path: Path) -> None:
    environ = {"GATEWAY_PORT": "9000", "CSM_GATEWAY_API_KEYS": "a, b,", "CSM_GATEWAY_FIRST_CHUNK_FRAMES": "3",
               "CSM_GATEWAY_VOICES_DIR": str(tmp_path), "CSM_GATEWAY_MAX_CONTEXT_AUDIO_S": "12.5"}  # fmt: skip
    config = GatewayConfig.from_env(environ)
    assert (config.port, config.api_keys, config.first_chunk_frames, config.voices_dir) == (9000, ("a", "b"), 3, tmp_path)
    assert config.max_context_audio_s == 12.5 and config.triton_url == "localhost:8001"
    assert GatewayConfig.from_env(environ, port=7000).port == 7000
    flags = GatewayConfig.from_command_line(["--port", "8123", "--models", "csm-1b", "--triton-url", "triton:8001"])
    assert (flags.port, flags.models, flags.triton_url) == (8123, ("csm-1b",), "triton:8001")
    with pytest.raises(ValueError, match="models"):
        GatewayConfig(models=())


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
    for entry, message in (({"speaker": -1}, "speaker id"), ({"speaker": 0, "audio": "none.wav"}, "no file")):
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
def test_the_speed_change_keeps_the_rate_and_scales_the_duration(speed: float) -> None:
    change, audio = SpeedChange(speed), tone(2.0)
    out = np.concatenate([*(change.feed(audio[i : i + 3840]) for i in range(0, len(audio), 3840)), change.finish()])
    assert len(out) == pytest.approx(len(audio) / speed, rel=0.03)
    assert np.prod(atempo_chain(speed)) == pytest.approx(speed) and all(0.5 <= factor <= 100 for factor in atempo_chain(speed))


def test_uploads_decode_to_mono_within_their_bound() -> None:
    stereo = io.BytesIO()
    soundfile.write(stereo, np.stack([tone(1.0, 16_000), -tone(1.0, 16_000)], axis=1), 16_000, format="FLAC")
    samples, rate = decode_audio(stereo.getvalue(), max_seconds=5)
    assert rate == 16_000 and len(samples) == 16_000 and np.abs(samples).max() < 1e-3  # the channels averaged
    with pytest.raises(AudioInputError, match="longer than 0.5 s"):
        decode_audio(wav_bytes(tone(1.0)), max_seconds=0.5)
    with pytest.raises(AudioInputError, match="base64"):
        decode_base64_audio("@@@", max_seconds=5)
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


def test_the_gateway_needs_no_torch() -> None:
    """It holds no model: importing all of it with torch made unimportable works."""
    code = "import sys; sys.modules['torch'] = sys.modules['torchaudio'] = None; import gateway.app, gateway.serve, gateway.voices"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
