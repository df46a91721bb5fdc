"""Shared fixtures: one staged tiny model (what `python -m export tiny` makes) and its Generator."""

from __future__ import annotations

from pathlib import Path

import pytest

from csm_triton import Generator, load_csm_1b
from export.tiny import make_tiny


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny"
    make_tiny(out, seed=0)
    return out


@pytest.fixture(scope="session")
def generator(tiny_model_dir: Path) -> Generator:
    return load_csm_1b(tiny_model_dir, device="cpu", slots=4)
