"""CSM-1B inference: the model, the batching engine and the design document's Python API."""

from .generator import GenerationRequest, Generator, load_csm_1b
from .prompt import Segment
from .sampling import PRESETS, preset

__all__ = ["GenerationRequest", "Generator", "PRESETS", "Segment", "load_csm_1b", "preset"]
