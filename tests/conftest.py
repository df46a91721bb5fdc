"""Shared fixtures: one staged tiny model (what `python -m export tiny` makes), its Generator,
and a real tritonserver serving it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from csm_triton import Generator, load_csm_1b
from csm_triton.server import ServerOptions, TritonServer, model_repository_with
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


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TritonServer]:
    """tritonserver on free ports, serving the tiny model on the CPU."""
    root = tmp_path_factory.mktemp("triton")
    repository = model_repository_with(
        root / "model_repository",
        {"model_dir": str(root / "no-weights-staged"), "tiny_model_dir": str(tiny_model_dir), "slots": str(SERVER_SLOTS)},
    )
    server = TritonServer(ServerOptions.on_free_ports(repository), log_file=root / "tritonserver.log").start()
    yield server
    server.stop()
