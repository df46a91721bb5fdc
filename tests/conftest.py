"""Shared fixtures: one staged tiny model (what `python -m export tiny` makes), its Generator,
and a real tritonserver serving it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from csm_triton import Generator, load_csm_1b
from csm_triton.tools.server import ServerOptions, TritonServer, model_repository_with
from export.tiny import make_tiny
from make_serve import MakeServe

SERVER_SLOTS = 4


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    make_tiny(out, seed=0)
    return out


@pytest.fixture(scope="session")
def generator(tiny_model_dir: Path) -> Generator:
    return load_csm_1b(tiny_model_dir, device="cpu", slots=SERVER_SLOTS)


@contextlib.contextmanager
def tiny_server(root: Path, tiny_model_dir: Path, slots: int, extra_args: Sequence[str] = ()) -> Iterator[TritonServer]:
    """tritonserver on free ports serving a copy of the model repository in `root`, csm_stream on the
    tiny model with `slots` slots; `extra_args` go to tritonserver."""
    parameters = {"model_dir": str(root / "no-weights-staged"), "tiny_model_dir": str(tiny_model_dir), "slots": str(slots)}
    options = ServerOptions.on_free_ports(model_repository_with(root / "model_repository", parameters))
    options.extra_args.extend(extra_args)
    server = TritonServer(options, log_file=root / "tritonserver.log").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TritonServer]:
    """tritonserver on free ports, serving the tiny model on the CPU."""
    with tiny_server(tmp_path_factory.mktemp("triton"), tiny_model_dir, SERVER_SLOTS) as server:
        yield server


@pytest.fixture(scope="session")
def make_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeServe]:
    """`make serve` in this checkout with its defaults (tests/make_serve.py), for the tests of what a
    user meets first: the gateway's front door and recovery from a dead process."""
    server = MakeServe(tmp_path_factory.mktemp("make-serve")).start()
    try:
        yield server
    finally:
        server.stop()
