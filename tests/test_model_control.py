"""csm and csm_stream in a tritonserver started with --model-control-mode=explicit and no model
loaded, as in a server shared with other models: loaded, served, unloaded and loaded again without a
restart, and loaded with other parameters (a KV-cache budget, a packed Python environment) given in
the load request. Every repository call carries the admin key (tests/test_admin_api.py)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sysconfig
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import tritonclient.grpc as grpcclient
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from conftest import tiny_server
from csm_triton import Generator
from csm_triton.model.config import MIB, ModelConfig
from csm_triton.model.model import kv_cache_bytes_per_slot
from csm_triton.tools.server import PROJECT_ROOT, TritonServer
from triton_tensors import request, tensors

pytestmark = pytest.mark.server

# csm forwards every request to csm_stream: load csm_stream first, unload it last.
MODELS = ("csm_stream", "csm")
SLOTS = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TritonServer]:
    with tiny_server(tmp_path_factory.mktemp("explicit"), tiny_model_dir, SLOTS, ["--model-control-mode=explicit"]) as server:
        yield server


@pytest.fixture
def client(server: TritonServer) -> Iterator[grpcclient.InferenceServerClient]:
    """A gRPC client; the test's models are unloaded after it, so every test starts with none."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    for name in reversed(MODELS):
        client.unload_model(name, headers=server.admin_headers("grpc"))
    wait_unloaded(server, client)
    client.close()


def stubs(server: TritonServer, model: str) -> list[psutil.Process]:
    """The python-backend stub processes running the model's model.py."""
    script = str(server.options.model_repository / model / "1" / "model.py")
    found = []
    for process in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if script in process.cmdline():
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def wait_unloaded(server: TritonServer, client: grpcclient.InferenceServerClient, timeout_s: float = 60.0) -> dict[str, dict]:
    """Triton answers an unload request at once and unloads in the background: wait until the
    repository index says every model is unavailable and their stubs have exited."""
    deadline = time.monotonic() + timeout_s
    while True:
        models = client.get_model_repository_index(headers=server.admin_headers("grpc"), as_json=True)["models"]
        index = {model["name"]: model for model in models}
        if all(index[name].get("state", "UNAVAILABLE") == "UNAVAILABLE" and not stubs(server, name) for name in MODELS):
            return index
        if time.monotonic() > deadline:
            raise AssertionError(f"models not unloaded within {timeout_s:.0f} s: {index}")
        time.sleep(0.2)


def config_with(server: TritonServer, model: str, **parameters: str) -> str:
    """The model's config.pbtxt with some parameters set, as the JSON a load request takes."""
    text = (server.options.model_repository / model / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return json_format.MessageToJson(config)


def load(server: TritonServer, client: grpcclient.InferenceServerClient, model: str, **parameters: str) -> None:
    """Loads the model with some parameters of its config.pbtxt changed in the load request."""
    client.load_model(model, headers=server.admin_headers("grpc"), config=config_with(server, model, **parameters))


def codes(client: grpcclient.InferenceServerClient) -> np.ndarray:
    result = client.infer("csm", tensors(grpcclient, request()), outputs=[grpcclient.InferRequestedOutput("AUDIO_CODES")])
    return result.as_numpy("AUDIO_CODES")[0]


def expected_codes(generator: Generator) -> np.ndarray:
    return generator.generate_codes("Hello from Sesame.", 0, [], max_audio_length_ms=400, seed=3).numpy()


def test_load_serve_unload_and_load_again_without_a_restart(
    server: TritonServer, client: grpcclient.InferenceServerClient, generator: Generator
) -> None:
    assert not any(client.is_model_ready(name) for name in MODELS)  # explicit mode loads nothing by itself
    for name in MODELS:
        client.load_model(name, headers=server.admin_headers("grpc"))
    first = codes(client)
    assert np.array_equal(first, expected_codes(generator))
    first_stubs = {process.pid for name in MODELS for process in stubs(server, name)}
    assert len(first_stubs) == len(MODELS)

    for name in reversed(MODELS):
        client.unload_model(name, headers=server.admin_headers("grpc"))
    index = wait_unloaded(server, client)
    assert {name: index[name].get("reason") for name in MODELS} == {name: "unloaded" for name in MODELS}
    assert client.is_server_live() and client.is_server_ready() and server.process.poll() is None
    with pytest.raises(InferenceServerException, match="csm"):
        codes(client)

    for name in MODELS:
        client.load_model(name, headers=server.admin_headers("grpc"))
    assert np.array_equal(codes(client), first)
    assert not first_stubs & {process.pid for name in MODELS for process in stubs(server, name)}  # new processes


def test_a_kv_cache_budget_given_at_load_bounds_the_slots(
    server: TritonServer, client: grpcclient.InferenceServerClient, tiny_model_dir: Path
) -> None:
    per_slot = kv_cache_bytes_per_slot(ModelConfig.from_json(tiny_model_dir / "config.json"), torch.float32)
    one_slot_mb = math.ceil(per_slot / MIB)
    assert one_slot_mb * MIB < SLOTS * per_slot

    with pytest.raises(InferenceServerException, match="kv_cache_memory_mb: 1 MiB holds no slot"):
        load(server, client, "csm_stream", kv_cache_memory_mb="1")
    # Triton's strict readiness: a model that failed to load leaves the server live but not ready.
    assert client.is_server_live() and not client.is_server_ready()
    assert not client.is_model_ready("csm_stream") and not stubs(server, "csm_stream")

    load(server, client, "csm_stream", kv_cache_memory_mb=str(one_slot_mb))
    assert client.is_server_ready()
    log = Path(server.log_file).read_text()
    assert re.search(rf"KV caches: {per_slot} bytes .* 1 slots, .* \(slots {SLOTS}, kv_cache_memory_mb {one_slot_mb}\)", log)
    with urllib.request.urlopen(f"http://localhost:{server.options.metrics_port}/metrics", timeout=5) as response:
        assert re.search(r'^csm_slots\{model="csm_stream"\} 1$', response.read().decode(), re.MULTILINE)


@pytest.fixture(scope="module")
def packed_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make pack-env`, then moved elsewhere: the environment must not depend on where it was built."""
    root = tmp_path_factory.mktemp("packed")
    subprocess.run(["make", "--no-print-directory", "pack-env", f"PACK_ENV={root / 'built'}"], cwd=PROJECT_ROOT, check=True)
    return Path(shutil.move(root / "built", root / "moved"))


@pytest.mark.deploy
def test_csm_stream_runs_in_a_packed_environment(
    server: TritonServer, client: grpcclient.InferenceServerClient, packed_env: Path, generator: Generator
) -> None:
    # The packed packages are the checkout's, file for file: no module left over from an earlier build.
    site_packages = packed_env / "lib" / f"python{sysconfig.get_python_version()}" / "site-packages"
    for package, source in (
        ("csm_triton", PROJECT_ROOT / "python_backend" / "csm_triton"),
        ("csm_client", PROJECT_ROOT / "client" / "csm_client"),
    ):
        assert python_files(site_packages / package) == python_files(source), package
    load(server, client, "csm_stream", EXECUTION_ENV_PATH=str(packed_env))
    client.load_model("csm", headers=server.admin_headers("grpc"))  # beside it, in the server's own environment
    assert np.array_equal(codes(client), expected_codes(generator))

    # The stub runs on the packed libpython; its engine process, a child, is the packed python3 and
    # maps torch from the packed environment. (That python3 finds its libpython by the RPATH it was
    # built with while that path exists, as here, else by the stub's LD_LIBRARY_PATH: the same file.)
    [stub] = stubs(server, "csm_stream")
    [engine] = [process for process in stub.children() if "csm_triton.triton.engine_worker" in process.cmdline()]
    assert Path(engine.exe()).resolve() == (packed_env / "bin" / "python3").resolve()
    libpython = packed_env / "lib" / sysconfig.get_config_var("INSTSONAME")
    assert [path for path in mapped_files(stub) if "libpython" in path] == [str(libpython)]
    torch_libraries = [path for path in mapped_files(engine) if "/torch/lib/" in path]
    assert torch_libraries and all(path.startswith(f"{packed_env}/") for path in torch_libraries)


def python_files(package: Path) -> dict[str, str]:
    """{path within the package: text} of its .py files."""
    return {str(path.relative_to(package)): path.read_text() for path in package.rglob("*.py")}


def mapped_files(process) -> set[str]:
    maps = Path(f"/proc/{process.pid}/maps").read_text().splitlines()
    return {line.split()[-1] for line in maps if line.split()[-1].startswith("/")}
