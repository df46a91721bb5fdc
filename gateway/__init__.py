"""An OpenAI-compatible speech API (FastAPI) in front of Triton's `csm_stream` model: no torch and
no model here, only gRPC streams to Triton, audio encoding and HTTP. `python -m gateway` runs it."""

from .app import create_app
from .config import GatewayConfig

__all__ = ["GatewayConfig", "create_app"]
