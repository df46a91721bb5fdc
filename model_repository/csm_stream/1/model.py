"""The "csm_stream" model: csm_triton/triton/csm_stream.py's class, with relative paths in
config.pbtxt's parameters taken from the project root, where this file is
model_repository/csm_stream/1/model.py."""

from pathlib import Path

from csm_triton.triton import csm_stream


class TritonPythonModel(csm_stream.TritonPythonModel):
    project_root = Path(__file__).resolve().parents[3]
