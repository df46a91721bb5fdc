"""The torch-free pieces of the fronts (csm, text_stream_tts) outside a server: they import no torch,
the control protocol's csm_stream side reads hostile parameters safely and its callers read a
probe's answer, csm's deadline and settings, the fronts' config.pbtxt parameters against their
settings' defaults, how csm's watch finds the server's repository API, and which models a server
loads at start."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytriton

from csm_client import control
from csm_triton.tools import server
from csm_triton.tools.server import PROJECT_ROOT

pytestmark = pytest.mark.unit

# triton_python_backend_utils.py, as the python backend ships it: importable outside a stub (the
# stub adds its classes, which these tests do not use).
BACKEND_UTILS = Path(pytriton.__file__).parent / "tritonserver" / "backends" / "python"
FRONT_MODULES = {
    "csm_triton.triton.csm",
    "csm_triton.triton.text_stream_tts",
    "csm_triton.triton.bls",
    "csm_triton.triton.parameters",
    "csm_triton.triton.unary_front",
    "csm_triton.triton.stream_watch",
    "csm_triton.triton.sentences",
}


@pytest.fixture(scope="module")
def front_path() -> Iterator[None]:
    """The python backend's utils on sys.path, as in csm's stub."""
    sys.path.insert(0, str(BACKEND_UTILS))
    try:
        yield
    finally:
        sys.path.remove(str(BACKEND_UTILS))


@pytest.fixture(scope="module")
def bls(front_path):
    from csm_triton.triton import bls

    return bls


@dataclass
class FakeRequest:
    """What Control.of reads of a python-backend request: its parameters as JSON text."""

    text: str

    def parameters(self) -> str:
        return self.text


def test_control_requests_are_read_from_parameters(bls) -> None:
    assert bls.Control.of(FakeRequest(json.dumps({bls.PROBE: True}))) == bls.Control(probe=True)
    assert bls.Control.of(FakeRequest(json.dumps({bls.CANCEL: "ab12"}))) == bls.Control(cancel="ab12")
    forwarded = bls.Control.of(FakeRequest(json.dumps({bls.FORWARD_ID: "ab12", "triton_enable_empty_final_response": True})))
    assert forwarded == bls.Control(forward_id="ab12") and not forwarded.is_control
    assert bls.Control.of(FakeRequest(json.dumps({bls.PROBE: True}))).is_control


@pytest.mark.parametrize(
    "parameters",
    ["", "not json", "[1, 2]", '"csm_probe"', '{"csm_probe": "true"}', '{"csm_probe": 1}', '{"csm_cancel": 5}', '{"csm_cancel": ""}'],
)
def test_malformed_control_parameters_ask_nothing(bls, parameters: str) -> None:
    assert bls.Control.of(FakeRequest(parameters)) == bls.Control()


def test_an_overlong_forward_id_is_no_id(bls) -> None:
    assert bls.Control.of(FakeRequest(json.dumps({bls.FORWARD_ID: "x" * 65, bls.CANCEL: "y" * 65}))) == bls.Control()


def test_a_cancel_stops_the_stream_it_names_before_or_after_it_starts(bls) -> None:
    streams = bls.ForwardedStreams()
    running = streams.start("running")
    other = streams.start("other")
    unnamed = streams.start(None)
    streams.cancel("running")
    assert running() and not other() and not unnamed()
    streams.cancel("early")  # overtook its request
    assert streams.start("early")()
    assert not streams.start("early")()  # remembered once: a second stream with that id is not stopped
    streams.finish("other")
    streams.cancel("other")  # finished: the cancel is remembered as early, harmlessly
    assert not other()


def test_early_cancels_are_bounded(bls) -> None:
    streams = bls.ForwardedStreams()
    for index in range(bls.EARLY_CANCELS + 1):
        streams.cancel(f"id{index}")
    assert not streams.start("id0")()  # the oldest was dropped
    assert streams.start("id1")() and streams.start(f"id{bls.EARLY_CANCELS}")()


@dataclass(frozen=True)
class Example:
    name: str = "x"
    count: int = 1
    seconds: float = 1.0
    enabled: bool = False
    extra: dict | None = None


def parameters(**values: str) -> dict[str, dict[str, str]]:
    return {key: {"string_value": value} for key, value in values.items()}


def test_parameters_take_their_fields_types() -> None:
    from csm_triton.triton.parameters import typed_parameters

    values = typed_parameters(Example, parameters(name="y", count="3", seconds="0.5", enabled="true", extra='{"a": 1}'))
    assert values == {"name": "y", "count": 3, "seconds": 0.5, "enabled": True, "extra": '{"a": 1}'}


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"count": "1.5"}, "count: invalid literal"),
        ({"seconds": "soon"}, "seconds: could not convert"),
        ({"enabled": "yes"}, "enabled: must be true or false"),
        ({"count": "0"}, "count must be > 0, got 0"),
    ],
)
def test_bad_parameters_are_refused_naming_the_key(given: dict[str, str], message: str) -> None:
    from csm_triton.triton.parameters import typed_parameters

    with pytest.raises(ValueError, match=message):
        typed_parameters(Example, parameters(**given), positive=("count", "seconds"))


def test_the_deadline_grows_with_the_audio_asked_for(front_path) -> None:
    from csm_triton.triton.unary_front import Settings

    settings = Settings.from_parameters(parameters(first_audio_timeout_s="60", max_real_time_factor="20"))
    deadline = settings.deadline(10_000)
    assert deadline.seconds == 260
    assert deadline.reason == "first_audio_timeout_s 60 + 10 s of audio x max_real_time_factor 20"
    with pytest.raises(ValueError, match="max_inflight must be > 0"):
        Settings.from_parameters(parameters(max_inflight="0"))


@pytest.mark.parametrize(
    ("model", "module", "deployment"), [("csm", "unary_front", {}), ("text_stream_tts", "text_stream_tts", {"text_model": "vllm_model"})]
)
def test_a_fronts_parameters_are_its_settings_defaults(front_path, model: str, module: str, deployment: dict[str, str]) -> None:
    """Every parameter a front's config.pbtxt sets is its Settings' default, defined there once;
    the text model text_stream_tts speaks for is the deployment's alone."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    settings = importlib.import_module(f"csm_triton.triton.{module}").Settings
    config = text_format.Parse((PROJECT_ROOT / "model_repository" / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert settings.from_parameters({key: {"string_value": value.string_value} for key, value in config.parameters.items()}) == settings(
        **deployment
    )


@pytest.mark.parametrize(
    ("args", "url"),
    [
        (["tritonserver", "--model-control-mode=explicit"], "http://127.0.0.1:8000/v2/repository/models"),
        (["tritonserver", "--model-control-mode", "EXPLICIT", "--http-port=9000"], "http://127.0.0.1:9000/v2/repository/models"),
        (["tritonserver", "--model-control-mode=explicit", "--http-address", "10.0.0.5"], "http://10.0.0.5:8000/v2/repository/models"),
        (["tritonserver"], None),
        (["tritonserver", "--model-control-mode=poll"], None),
        (["tritonserver", "--model-control-mode=explicit", "--allow-http=false"], None),
    ],
)
def test_the_watch_finds_the_repository_api_on_the_servers_command_line(front_path, args: list[str], url: str | None) -> None:
    from csm_triton.triton.stream_watch import ServerControl

    control = ServerControl.of_server(args)
    assert (control.url if control else None) == url


@pytest.mark.parametrize(
    ("answer", "gone"),
    [
        (None, False),
        ("Stub process 'csm_stream_0' is not healthy.", True),
        ("csm_stream (csm_probe): Stub process 'csm_stream_0' is not healthy.", True),
        ("Request for unknown model: 'csm_stream' has no available versions", True),
        ("Request for unknown model: 'csm_stream' is not found", True),
        ("csm_stream cannot serve: the engine process exited (killed by SIGKILL); a new one is starting", False),
        ("no answer to a probe in 10 s", False),
        ("cannot reach the server at localhost:8001: ...", False),
    ],
)
def test_a_probe_answer_tells_a_lost_stream_from_one_its_stub_will_end(answer: str | None, gone: bool) -> None:
    assert control.stream_model_gone(answer) is gone


def test_text_stream_tts_is_loaded_at_start_only_beside_its_text_model(tmp_path: Path) -> None:
    assert server.startup_models([PROJECT_ROOT / "model_repository"]) == ["csm", "csm_stream"]
    both = [PROJECT_ROOT / "model_repository", PROJECT_ROOT / "tests" / "model_repository"]
    assert server.startup_models(both) == ["csm", "csm_stream", "fake_llm"]  # text_model is vllm_model
    config = PROJECT_ROOT / "model_repository" / "text_stream_tts" / "config.pbtxt"
    (tmp_path / "text_stream_tts").mkdir()
    (tmp_path / "text_stream_tts" / "config.pbtxt").write_text(config.read_text().replace('"vllm_model"', '"fake_llm"'))
    assert server.startup_models([tmp_path, PROJECT_ROOT / "tests" / "model_repository"]) == ["text_stream_tts", "fake_llm"]
    options = server.ServerOptions(tmp_path, extra_args=["--model-repository", str(PROJECT_ROOT / "tests" / "model_repository")])
    loaded = [arg for arg in server.tritonserver_args(options) if arg.startswith("--load-model")]
    assert loaded == ["--load-model=text_stream_tts", "--load-model=fake_llm"]
