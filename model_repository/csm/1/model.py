"""The unary "csm" model: its class is csm_triton/triton/csm.py's."""

from csm_triton.triton.csm import TritonPythonModel

__all__ = ["TritonPythonModel"]
