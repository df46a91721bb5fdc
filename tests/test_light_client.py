"""The light distributions, each in a fresh venv as a user would install it from a clone: the client
(client/, csm-client) without torch or the server package, speaking through its `csm-say` against
the session's tritonserver, and the gateway (gateway/, csm-gateway) on top of it, answering speech.

uv installs them offline from its cache, which `make setup` has filled, at the lock's versions: seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile
from test_gateway import free_port

from csm_client import CSMClient
from csm_client.contract import SAMPLE_RATE, SAMPLES_PER_FRAME

pytestmark = [pytest.mark.deploy, pytest.mark.server]

ROOT = Path(__file__).parents[1]
# Modules a light venv must not hold: the model stack and the server.
HEAVY = ("torch", "torchaudio", "moshi", "torchtune", "csm_triton")


def fresh_venv(path: Path, *distributions: str) -> Path:
    """A venv at `path` with `distributions` (folders of this checkout) installed from clean copies,
    as from a fresh clone; returns its bin folder."""
    uv = [os.environ.get("PYTHON_BASE", "python3"), "-m", "uv"]  # as `make setup` runs it
    sources = []
    for distribution in distributions:
        copy = path.parent / f"{path.name}-{distribution}"
        shutil.copytree(ROOT / distribution, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        sources.append(str(copy))
    subprocess.run([*uv, "venv", "--quiet", "--python", sys.executable, str(path)], check=True, timeout=120)
    install = [*uv, "pip", "install", "--quiet", "--offline", "--python", str(path / "bin" / "python"), "--constraint", "requirements.lock"]
    subprocess.run([*install, *sources], check=True, timeout=300, cwd=ROOT)
    return path / "bin"


def absent(bin_dir: Path) -> list[str]:
    """Which of HEAVY the venv's Python cannot find."""
    code = f"import importlib.util, json; print(json.dumps([name for name in {HEAVY!r} if importlib.util.find_spec(name) is None]))"
    return json.loads(subprocess.run([bin_dir / "python", "-c", code], capture_output=True, text=True, check=True).stdout)


def test_the_client_alone_installs_without_torch_and_speaks_through_csm_say(triton_server, tmp_path: Path) -> None:
    bin_dir = fresh_venv(tmp_path / "client-venv", "client")
    assert absent(bin_dir) == list(HEAVY)
    refused = subprocess.run([bin_dir / "python", "-c", "import torch"], capture_output=True, text=True)
    assert refused.returncode == 1 and "No module named 'torch'" in refused.stderr
    out = tmp_path / "hello.wav"
    said = subprocess.run(
        [bin_dir / "csm-say", "Hello from a light client.", "--max-ms", "400", "--seed", "5", "--url", triton_server.grpc_url, "-o", out],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert said.returncode == 0, said.stderr
    audio, sample_rate = soundfile.read(out, dtype="float32")
    assert sample_rate == SAMPLE_RATE and audio.ndim == 1
    assert 0 < len(audio) <= 5 * SAMPLES_PER_FRAME and len(audio) % SAMPLES_PER_FRAME == 0  # whole frames, at most 400 ms
    with CSMClient(triton_server.grpc_url) as client:  # the same request from this venv's client
        expected, _ = client.generate("Hello from a light client.", 0, max_audio_length_ms=400, seed=5)
    np.testing.assert_allclose(audio, expected, atol=1 / 2**15)  # a 16-bit WAV's rounding


def test_the_gateway_installs_on_the_client_without_torch_and_speaks(triton_server, tmp_path: Path) -> None:
    bin_dir = fresh_venv(tmp_path / "gateway-venv", "client", "gateway")
    assert absent(bin_dir) == list(HEAVY)
    port, log = free_port(), tmp_path / "gateway.log"
    gateway = subprocess.Popen(
        [bin_dir / "csm-gateway", "--triton-url", triton_server.grpc_url, "--port", str(port), "--host", "127.0.0.1"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as health:
                    if health.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                assert gateway.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        body = {"model": "csm-1b", "input": "Hello.", "voice": "alloy", "response_format": "wav", "seed": 5, "max_audio_length_ms": 400}
        speech = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/audio/speech", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(speech, timeout=120) as answer:
            wav = answer.read()
        assert wav[:4] == b"RIFF" and int.from_bytes(wav[24:28], "little") == SAMPLE_RATE
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
