"""CSM-1B inference: the model, the batching engine and the design document's Python API.

The names below load on first use (PEP 562), so that the torch-free modules of this package
(`config`, `request`, `serving`, ...) can be imported by the Triton models that hold no weights without
importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "GenerationRequest": "request",
    "Generator": "generator",
    "load_csm_1b": "generator",
    "Segment": "request",
    "PRESETS": "sampling",
    "preset": "sampling",
}

__all__ = ["GenerationRequest", "Generator", "PRESETS", "Segment", "load_csm_1b", "preset"]

if TYPE_CHECKING:
    from .generator import Generator, load_csm_1b
    from .request import GenerationRequest, Segment
    from .sampling import PRESETS, preset


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
