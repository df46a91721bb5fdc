"""Shared fixtures: one staged tiny model (what `python -m export tiny` makes), its Generator,
and a real tritonserver serving it."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from csm_triton import Generator, load_csm_1b
from csm_triton.server import PROJECT_ROOT, ServerOptions, TritonServer
from export.tiny import make_tiny

SERVER_SLOTS = 4


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    make_tiny(out, seed=0)
    return out


@pytest.fixture(scope="session")
def generator(tiny_model_dir: Path) -> Generator:
    return load_csm_1b(tiny_model_dir, device="cpu", slots=SERVER_SLOTS)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def model_repository_copy(target: Path, parameters: dict[str, str]) -> Path:
    """The project's model repository, copied, with config.pbtxt parameters replaced."""
    shutil.copytree(PROJECT_ROOT / "model_repository", target)
    config = target / "csm" / "config.pbtxt"
    text = config.read_text()
    for key, value in parameters.items():
        marker = f'{{ key: "{key}", value: {{ string_value: "'
        start = text.index(marker) + len(marker)
        text = text[:start] + value + text[text.index('"', start) :]
    config.write_text(text)
    return target


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TritonServer]:
    """tritonserver on free ports, serving the tiny model on the CPU."""
    root = tmp_path_factory.mktemp("triton")
    repository = model_repository_copy(
        root / "model_repository",
        {"model_dir": str(root / "no-weights-staged"), "tiny_model_dir": str(tiny_model_dir), "slots": str(SERVER_SLOTS)},
    )
    options = ServerOptions(repository, free_port(), free_port(), free_port())
    server = TritonServer(options, log_file=root / "tritonserver.log").start()
    yield server
    server.stop()
