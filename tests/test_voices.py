"""csm_stream's voice library (csm_triton/triton/voices.py): a voices_dir of reference clips with their
transcripts and speaker ids, each Mimi-encoded once at load; a request's VOICE names one (never a
path) and gets its clip as its first context segment. Against a real tritonserver on the tiny model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
import tritonclient.grpc as grpcclient
from test_gateway import free_port, running, s16
from tritonclient.utils import InferenceServerException

from conftest import tiny_server
from csm_client import CSMClient
from csm_triton import Generator, Segment
from csm_triton.request import RequestLimits
from csm_triton.tools.server import TritonServer
from csm_triton.triton.voices import read_voices
from gateway.audio import pcm16
from gateway.config import GatewayConfig
from triton_tensors import request, tensors, vector

pytestmark = pytest.mark.server

RATE = 16_000


def clip(seed: int, seconds: float = 0.4) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.5, 0.5, int(seconds * RATE)).astype(np.float32)


def library(directory: Path, voices: dict[str, tuple[int, str, np.ndarray]]) -> Path:
    """A voices_dir: a 16 kHz float WAV per voice (read back exactly) and the manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, (speaker, transcript, samples) in voices.items():
        soundfile.write(directory / f"{name}.wav", samples, RATE, subtype="FLOAT")
        manifest[name] = {"clip": f"{name}.wav", "transcript": transcript, "speaker": speaker}
    (directory / "voices.json").write_text(json.dumps(manifest))
    return directory


VOICES = {"narrator": (3, "A clip of the narrator.", clip(1)), "guide.2": (5, "And one of the guide.", clip(2, 0.3))}


def test_the_library_is_read_with_every_clip_and_checked(tmp_path: Path) -> None:
    limits = RequestLimits()
    read = read_voices(library(tmp_path / "ok", VOICES), limits)
    assert [(v.name, v.speaker, v.transcript, v.sample_rate) for v in read] == [
        ("narrator", 3, "A clip of the narrator.", RATE),
        ("guide.2", 5, "And one of the guide.", RATE),
    ]
    assert np.array_equal(read[0].samples, VOICES["narrator"][2])
    bad = {
        "a name that is a path": ({"../x": {"clip": "x.wav", "transcript": "t", "speaker": 0}}, "voice '../x': a name is"),
        "a clip outside the directory": ({"x": {"clip": "../x.wav", "transcript": "t", "speaker": 0}}, "clip must be a file name"),
        "no transcript": ({"x": {"clip": "x.wav", "transcript": " ", "speaker": 0}}, "transcript must be text"),
        "a negative speaker": ({"x": {"clip": "x.wav", "transcript": "t", "speaker": -1}}, "speaker must be an integer id >= 0"),
        "a missing clip": ({"x": {"clip": "gone.wav", "transcript": "t", "speaker": 0}}, "cannot read gone.wav as audio"),
        "an unknown key": ({"x": {"clip": "x.wav", "transcript": "t", "speaker": 0, "path": "/"}}, 'must be {"clip"'),
    }
    for case, (manifest, message) in bad.items():
        directory = tmp_path / case.replace(" ", "-")
        directory.mkdir()
        soundfile.write(directory / "x.wav", clip(0), RATE)
        (directory / "voices.json").write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match="^voices_dir: ") as caught:
            read_voices(directory, limits)
        assert message in str(caught.value), case
    with pytest.raises(ValueError, match="^voices_dir: cannot read"):
        read_voices(tmp_path / "nowhere", limits)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("voices")
    with tiny_server(root, tiny_model_dir, 2, models={"csm_stream": {"voices_dir": str(library(root / "voices", VOICES))}}) as server:
        yield server


def codes(server: TritonServer, arrays: dict[str, np.ndarray], model: str = "csm") -> np.ndarray:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    result = client.infer(model, tensors(grpcclient, arrays), outputs=[grpcclient.InferRequestedOutput("AUDIO_CODES")])
    return result.as_numpy("AUDIO_CODES")[0]


def encodes(server: TritonServer) -> int:
    return server.log_file.read_text(errors="replace").count(": Mimi-encoded ")


def voice(name: str) -> np.ndarray:
    return np.array([[name.encode()]], dtype=object)


def test_a_voice_s_clip_is_the_first_context_segment(server: TritonServer, generator: Generator) -> None:
    speaker, transcript, samples = VOICES["narrator"]
    in_process = [Segment(speaker, transcript, samples, sample_rate=RATE), Segment(0, "An earlier turn.")]
    expected = generator.generate_codes("Hello there.", speaker, in_process, max_audio_length_ms=400, seed=3).numpy()
    arrays = request("Hello there.", speaker, VOICE=voice("narrator"), CONTEXT_TEXT=vector([b"An earlier turn."], object),
                     CONTEXT_SPEAKER=vector([0], np.int32))  # fmt: skip
    assert np.array_equal(codes(server, arrays), expected)
    assert not np.array_equal(codes(server, request("Hello there.", speaker, VOICE=voice("guide.2"))), expected)


def test_each_clip_is_encoded_once_at_load_and_never_for_a_request(server: TritonServer) -> None:
    assert encodes(server) == len(VOICES)  # at load
    for name in [*VOICES, *VOICES]:
        codes(server, request("Again.", 1, VOICE=voice(name)))
    assert encodes(server) == len(VOICES)


@pytest.mark.parametrize("name", ["nobody", "../voices/narrator", "narrator.wav", "/etc/passwd"])
def test_an_unknown_voice_or_a_path_is_invalid_arg_naming_voice(server: TritonServer, name: str) -> None:
    with pytest.raises(
        InferenceServerException, match=r"^\[StatusCode.INVALID_ARGUMENT\] VOICE: no voice .* its voices: guide.2, narrator"
    ):
        codes(server, request(VOICE=voice(name)))


def test_the_client_names_a_voice(server: TritonServer) -> None:
    with CSMClient(server.grpc_url) as client:
        assert np.array_equal(client.generate_codes("Hi.", 3, voice="narrator", seed=3, max_audio_length_ms=400),
                              codes(server, request("Hi.", 3, VOICE=voice("narrator"))))  # fmt: skip


def test_the_gateway_maps_a_voice_name_onto_a_voice_of_the_library(server: TritonServer, tmp_path: Path) -> None:
    voices_file = tmp_path / "voices.json"
    voices_file.write_text(
        json.dumps({"echo": {"speaker": 3, "server_voice": "narrator"}, "ash": {"speaker": 1, "server_voice": "nobody"}})
    )
    options = {"seed": 3, "max_audio_length_ms": 400}
    config = GatewayConfig(triton_url=server.grpc_url, port=free_port(), voices_file=voices_file)
    with running(config) as url, CSMClient(server.grpc_url, stream_model_name="csm_stream") as direct:

        def speech(name: str) -> httpx.Response:
            body = {"model": "csm-1b", "input": "Hello there.", "voice": name, "response_format": "pcm", **options}
            return httpx.post(f"{url}/v1/audio/speech", json=body, timeout=60)

        expected = np.concatenate(list(direct.stream("Hello there.", 3, [], voice="narrator", **options)))
        assert np.array_equal(s16(speech("echo").content), s16(pcm16(expected)))
        plain = np.concatenate(list(direct.stream("Hello there.", 0, [], **options)))  # alloy: still speaker 0 alone
        assert np.array_equal(s16(speech("alloy").content), s16(pcm16(plain)))
        refused = speech("ash")
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "voice"
        assert refused.json()["error"]["message"].startswith("VOICE: no voice 'nobody' in the voice library")
