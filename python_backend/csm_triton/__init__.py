"""CSM-1B inference: the model, the batching engine, the Triton side and the design document's
Python API.

One subpackage a layer, each importing only those below it:

- `model`: hyperparameters and audio facts, the transformer, sampling, checkpoints, Mimi.
- `request`: the request contract (the request record, every bound on it); torch-free.
- `engine`: slots, frame graphs, prompts, pacing, the serving loop and the Python API (`Generator`).
- `triton`: what the python-backend models of model_repository/ run, csm_stream's engine process.
- `tools`: starting tritonserver, packing an environment; outside the runtime.

The names below load on first use (PEP 562), so that the torch-free modules of this package
(`model.config`, `request`, `triton.serving`, ...) can be imported by the Triton models that hold
no weights without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "GenerationRequest": "request",
    "Generator": "engine.generator",
    "load_csm_1b": "engine.generator",
    "Segment": "request",
    "PRESETS": "model.sampling",
    "preset": "model.sampling",
}

__all__ = ["GenerationRequest", "Generator", "PRESETS", "Segment", "load_csm_1b", "preset"]

if TYPE_CHECKING:
    from .engine.generator import Generator, load_csm_1b
    from .model.sampling import PRESETS, preset
    from .request import GenerationRequest, Segment


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
