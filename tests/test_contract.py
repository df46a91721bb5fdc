"""The wire contract (client/csm_client/contract.py) is the one table of the models' tensors and
defaults: the model repository's config.pbtxt files and the gateway's field names are checked
against it here, so that none of them can drift from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from csm_client.contract import CHUNK_FRAMES, FIRST_CHUNK_FRAMES, INPUTS, OUTPUTS, STREAM_INPUTS, Tensor
from gateway.errors import TENSOR_PARAMS

MODELS = Path(__file__).parents[1] / "model_repository"
CONFIG_TYPES = {"BYTES": "TYPE_STRING", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64", "FP32": "TYPE_FP32"}
# Each model's inputs beyond the contract's, and the contract's inputs it lacks.
OWN_INPUTS = {"csm": set(), "csm_stream": set(), "text_stream_tts": {"PROMPT"}}
LACKS = {"csm": set(STREAM_INPUTS), "csm_stream": set(), "text_stream_tts": {"TEXT"}}


def model_config(model: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse((MODELS / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def declared(tensors) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {tensor.name: (model_config_pb2.DataType.Name(tensor.data_type), tuple(tensor.dims)) for tensor in tensors}


def expected(tensor: Tensor) -> tuple[str, tuple[int, ...]]:
    return CONFIG_TYPES[tensor.datatype], tensor.dims


@pytest.mark.parametrize("model", sorted(OWN_INPUTS))
def test_each_models_inputs_and_outputs_are_the_contracts(model: str) -> None:
    config = model_config(model)
    inputs = declared(config.input)
    assert set(inputs) - OWN_INPUTS[model] == set(INPUTS) - LACKS[model]
    for name in set(INPUTS) - LACKS[model]:
        assert inputs[name] == expected(INPUTS[name]), name
    optional = {tensor.name for tensor in config.input if tensor.optional}
    assert {name for name in INPUTS if not INPUTS[name].required} - LACKS[model] == optional - OWN_INPUTS[model]
    outputs = declared(config.output)
    assert {name: outputs[name] for name in OUTPUTS} == {name: expected(tensor) for name, tensor in OUTPUTS.items()}


def test_csm_streams_default_chunking_is_the_contracts() -> None:
    parameters = {key: value.string_value for key, value in model_config("csm_stream").parameters.items()}
    assert (int(parameters["first_chunk_frames"]), int(parameters["chunk_frames"])) == (FIRST_CHUNK_FRAMES, CHUNK_FRAMES)
    assert (INPUTS["FIRST_CHUNK_FRAMES"].default, INPUTS["CHUNK_FRAMES"].default) == (FIRST_CHUNK_FRAMES, CHUNK_FRAMES)


def test_the_gateway_names_a_request_parameter_for_every_input() -> None:
    """An INVALID_ARG message starts with the input at fault: the gateway maps each to its field."""
    assert set(TENSOR_PARAMS) == {*INPUTS, "prompt"}
