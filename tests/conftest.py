"""Shared fixtures: one staged tiny model (what `python -m export tiny` makes), its Generator,
and a real tritonserver serving it. Torch, the engine and export load inside the fixtures only,
so a test of a torch-free module collects and runs without them.

Every test has a tier (pyproject's markers): `make test-unit` runs the unit tier alone."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from csm_triton.tools.server import ServerOptions, TritonServer, model_repository_with, set_parameters
from make_serve import MakeServe

if TYPE_CHECKING:
    from csm_triton import Generator

SERVER_SLOTS = 4
# csm_stream's turn_key in the test servers, so that TURN and CONTEXT_TURN are served (test_turn_refs.py).
TURN_KEY = "csm-triton-tests-turn-key-0123456789abcdef"
EXIT_TIMEOUT_S = 5
TIERS = ("unit", "engine", "server", "browser", "deploy", "gpu")
# A unit test stages no model and starts no server: these fixtures do.
NOT_UNIT_FIXTURES = {"tiny_model_dir", "triton_server", "make_serve", "server", "fault_server", "one_slot_server"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test without a tier, or a unit test that stages a model or asks for a server, is a collection
    error, so `make test-unit` never misses a test nor waits for one; a gpu test skips without CUDA."""
    untiered = [item.nodeid for item in items if not {marker.name for marker in item.iter_markers()} & set(TIERS)]
    if untiered:
        raise pytest.UsageError(f"tests without a tier marker ({', '.join(TIERS)}): {untiered}")
    slow = [item.nodeid for item in items if item.get_closest_marker("unit") and NOT_UNIT_FIXTURES & set(item.fixturenames)]
    if slow:
        raise pytest.UsageError(f"unit tests that stage a model or start a server: {slow}")
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            for item in gpu:
                item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.tiny import make_tiny

    out = tmp_path_factory.mktemp("models") / "tiny"
    make_tiny(out, seed=0)
    return out


@pytest.fixture(scope="session")
def generator(tiny_model_dir: Path) -> Generator:
    from csm_triton import load_csm_1b

    return load_csm_1b(tiny_model_dir, device="cpu", slots=SERVER_SLOTS)


@contextlib.contextmanager
def tiny_server(
    root: Path,
    tiny_model_dir: Path,
    slots: int,
    extra_args: Sequence[str] = (),
    models: Mapping[str, dict[str, str]] = {},
    extra_models: Sequence[Path] = (),
) -> Iterator[TritonServer]:
    """tritonserver on free ports serving a copy of the model repository in `root`, csm_stream on the
    tiny model with `slots` slots and TURN_KEY, other models' parameters as `models` says,
    `extra_models` beside them; `extra_args` go to tritonserver.

    Its exit timeout is EXIT_TIMEOUT_S: a request that was in flight in a stub a test killed never
    completes (python backend 24.10 cannot end it), and tritonserver waits that long for it at
    exit, 30 s by default."""
    parameters = {
        "model_dir": str(root / "no-weights-staged"),
        "tiny_model_dir": str(tiny_model_dir),
        "slots": str(slots),
        "turn_key": TURN_KEY,
    }
    repository = model_repository_with(root / "model_repository", parameters, extra_models=extra_models)
    for model, values in models.items():
        set_parameters(repository / model / "config.pbtxt", values)
    options = ServerOptions.on_free_ports(repository)
    options.extra_args.extend([f"--exit-timeout-secs={EXIT_TIMEOUT_S}", *extra_args])
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
        # Ctrl-C, then SIGKILL to the whole group if it is still there: after test_recovery's kills,
        # the requests lost with the stub hold tritonserver's exit for its exit timeout (30 s).
        server.stop(timeout_s=EXIT_TIMEOUT_S)
