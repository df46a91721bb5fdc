"""The "text_stream_tts" model: its class is csm_triton/triton/text_stream_tts.py's."""

from csm_triton.triton.text_stream_tts import TritonPythonModel

__all__ = ["TritonPythonModel"]
