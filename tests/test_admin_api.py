"""The admin surface of the server as every deployment starts it (csm_triton.tools.server): the repository,
shared-memory, statistics, model-config, trace and logging APIs answer only with the admin key
header, while inference, health and metadata stay open; and `python -m csm_triton.tools.server` (make
serve, the image's command) writes a generated key that only its user can read, passes SIGTERM on
to tritonserver and exits with its status.

Without the key (or with a wrong one) HTTP answers 403 and gRPC UNAVAILABLE, both with "This API
(protocol) is restricted, expecting header '<name>'"."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shared_memory
from tritonclient.utils import InferenceServerException

from csm_client import CSMClient
from csm_triton import Generator
from csm_triton.tools.server import ADMIN_HEADERS, ADMIN_KEY_ENV, ServerOptions, TritonServer, model_repository_with

pytestmark = pytest.mark.server

PROTOCOLS = {"http": httpclient, "grpc": grpcclient}
REFUSED_STATUS = {"http": "403", "grpc": "StatusCode.UNAVAILABLE"}
# A model that no other test of the session server uses: loading and unloading it disturbs none.
SPARE_MODEL = "text_stream_tts"
REGION, REGION_KEY, REGION_BYTES = "admin_api_test", "/csm_admin_api_test", 64
START_TIMEOUT_S = 180.0

ADMIN_CALLS: dict[str, Callable[[Any, dict[str, str] | None], object]] = {
    "repository index": lambda client, headers: client.get_model_repository_index(headers=headers),
    "load": lambda client, headers: client.load_model(SPARE_MODEL, headers=headers),
    "unload": lambda client, headers: client.unload_model(SPARE_MODEL, headers=headers),
    "shared-memory registration": lambda client, headers: client.register_system_shared_memory(
        REGION, REGION_KEY, REGION_BYTES, headers=headers
    ),
    "statistics": lambda client, headers: client.get_inference_statistics("csm", headers=headers),
    "model config": lambda client, headers: client.get_model_config("csm", headers=headers),
    "trace settings": lambda client, headers: client.get_trace_settings(headers=headers),
    "log settings": lambda client, headers: client.get_log_settings(headers=headers),
}


@pytest.fixture(params=list(PROTOCOLS))
def protocol(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def client(triton_server: TritonServer, protocol: str) -> Iterator[Any]:
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    client = PROTOCOLS[protocol].InferenceServerClient(url)
    yield client
    client.close()


def model_states(client: Any, headers: dict[str, str]) -> dict[str, str]:
    """{model: state} from the repository index, whichever protocol's shape it comes in."""
    index = client.get_model_repository_index(headers=headers)
    models = index if isinstance(index, list) else [{"name": model.name, "state": model.state} for model in index.models]
    return {model["name"]: model.get("state", "") for model in models}


def wait_for_state(client: Any, headers: dict[str, str], model: str, state: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while model_states(client, headers).get(model) != state:
        assert time.monotonic() < deadline, f"{model} not {state} within {timeout_s:.0f} s"
        time.sleep(0.2)


@pytest.mark.parametrize("call", list(ADMIN_CALLS))
def test_admin_apis_are_refused_without_the_key(client: Any, protocol: str, call: str) -> None:
    for headers in (None, {ADMIN_HEADERS[protocol]: "not-the-admin-key"}):
        with pytest.raises(InferenceServerException) as refused:
            ADMIN_CALLS[call](client, headers)
        assert refused.value.status() == REFUSED_STATUS[protocol]
        assert f"restricted, expecting header '{ADMIN_HEADERS[protocol]}'" in refused.value.message()


def test_admin_apis_answer_with_the_key(triton_server: TritonServer, client: Any, protocol: str) -> None:
    admin = triton_server.admin_headers(protocol)
    # Explicit model control with the repository loaded at startup, as make serve runs it: all but
    # text_stream_tts, whose text model the repository does not hold (server.startup_models).
    states = model_states(client, admin)
    assert (states["csm"], states["csm_stream"]) == ("READY", "READY") and states[SPARE_MODEL] != "READY"
    client.load_model(SPARE_MODEL, headers=admin)
    assert client.is_model_ready(SPARE_MODEL)
    client.unload_model(SPARE_MODEL, headers=admin)
    wait_for_state(client, admin, SPARE_MODEL, "UNAVAILABLE")

    region = shared_memory.create_shared_memory_region(REGION, REGION_KEY, REGION_BYTES)
    try:
        client.register_system_shared_memory(REGION, REGION_KEY, REGION_BYTES, headers=admin)
        assert REGION in str(client.get_system_shared_memory_status(headers=admin))
        client.unregister_system_shared_memory(REGION, headers=admin)
    finally:
        shared_memory.destroy_shared_memory_region(region)
    assert client.get_inference_statistics("csm", headers=admin)
    assert client.get_model_config("csm", headers=admin)


def test_inference_health_and_metadata_need_no_key(triton_server: TritonServer, client: Any, protocol: str, generator: Generator) -> None:
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("csm_stream")
    assert client.get_server_metadata() and client.get_model_metadata("csm")
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    expected = generator.generate_codes("Hello from Sesame.", 0, [], max_audio_length_ms=400, seed=3).numpy()
    with CSMClient(url, protocol) as csm:
        assert np.array_equal(csm.generate_codes("Hello from Sesame.", 0, max_audio_length_ms=400, seed=3), expected)
        if protocol == "grpc":
            assert list(csm.stream("Hello from Sesame.", 0, max_audio_length_ms=400, seed=3))


def serve_command(options: ServerOptions, key_file: Path, *extra: str) -> list[str]:
    """`python -m csm_triton.tools.server` as make serve runs it."""
    return [
        sys.executable,
        "-m",
        "csm_triton.tools.server",
        f"--model-repository={options.model_repository}",
        f"--http-port={options.http_port}",
        f"--grpc-port={options.grpc_port}",
        f"--metrics-port={options.metrics_port}",
        f"--admin-key-file={key_file}",
        *extra,
    ]


def without_admin_key() -> dict[str, str]:
    return {name: value for name, value in os.environ.items() if name != ADMIN_KEY_ENV}


def wait_for_line(log_file: Path, text: str, process: subprocess.Popen, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log_file.read_text():
        assert process.poll() is None, f"exited with {process.returncode}:\n{log_file.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout_s:.0f} s:\n{log_file.read_text()}"
        time.sleep(0.5)


def test_serve_writes_a_private_key_and_passes_sigterm_on(tmp_path: Path, tiny_model_dir: Path) -> None:
    repository = model_repository_with(
        tmp_path / "model_repository", {"model_dir": str(tmp_path / "none"), "tiny_model_dir": str(tiny_model_dir)}
    )
    options, key_file, log_file = ServerOptions.on_free_ports(repository), tmp_path / "build" / "admin-key", tmp_path / "serve.log"
    # csm alone loads in seconds: it holds no weights.
    argv = serve_command(options, key_file, "--model-control-mode=explicit", "--load-model=csm")
    with open(log_file, "w") as log:
        process = subprocess.Popen(argv, env=without_admin_key(), stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_line(log_file, "tritonserver ready", process)
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and str(key_file) in log_file.read_text()
        client = httpclient.InferenceServerClient(f"localhost:{options.http_port}")
        states = model_states(client, {ADMIN_HEADERS["http"]: key_file.read_text()})
        assert {model for model, state in states.items() if state == "READY"} == {"csm"}
        client.close()  # tritonserver waits for open HTTP connections, up to its exit timeout
        [tritonserver] = psutil.Process(process.pid).children()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:  # the test failed first; SIGKILL would leave tritonserver running
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
    assert not tritonserver.is_running()
    assert "successfully unloaded 'csm'" in log_file.read_text()  # tritonserver drained and unloaded


def test_serve_exits_with_tritonservers_status_and_refuses_a_bad_key(tmp_path: Path) -> None:
    options = ServerOptions.on_free_ports(tmp_path / "no-repository")
    failed = subprocess.run(
        serve_command(options, tmp_path / "admin-key"), env=without_admin_key(), capture_output=True, text=True, timeout=120
    )
    assert failed.returncode == 1 and "exited with code 1 before it was ready" in failed.stdout + failed.stderr

    bad_key = subprocess.run(
        serve_command(options, tmp_path / "admin-key"), env={**os.environ, ADMIN_KEY_ENV: "short"}, capture_output=True, text=True
    )
    assert bad_key.returncode == 1 and f"{ADMIN_KEY_ENV}: must be 16 or more" in bad_key.stderr
