"""The wire contract (client/csm_client/contract.py) is the one table of the models' tensors and
defaults: the model repository's config.pbtxt files, the README's tensor tables and the gateway's
field names are checked against it here, so that none of them can drift from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from csm_client import contract
from csm_client.contract import (
    AUDIO_VOCAB_SIZE,
    CHUNK_FRAMES,
    FIRST_CHUNK_FRAMES,
    INPUTS,
    OUTPUTS,
    SAMPLES_PER_FRAME,
    STREAM_INPUTS,
    Tensor,
)
from csm_triton.request import API_NAMES, RequestLimits
from csm_triton.triton.serving import TRITON_NAMES, ServingConfig
from gateway.errors import TENSOR_PARAMS

pytestmark = pytest.mark.unit

MODELS = Path(__file__).parents[1] / "model_repository"
CONFIG_TYPES = {"BYTES": "TYPE_STRING", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64", "FP32": "TYPE_FP32"}
# Each model's inputs beyond the contract's, and the contract's inputs it lacks.
OWN_INPUTS = {"csm": set(), "csm_stream": set(), "text_stream_tts": {"PROMPT"}}
LACKS = {"csm": set(STREAM_INPUTS), "csm_stream": set(), "text_stream_tts": {"TEXT"}}
# The contract's outputs a model lacks: a sentence of text_stream_tts is no turn of its own.
LACKS_OUTPUTS = {"csm": set(), "csm_stream": set(), "text_stream_tts": {"TURN"}}


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
    own = {name: tensor for name, tensor in OUTPUTS.items() if name not in LACKS_OUTPUTS[model]}
    assert {name: outputs.get(name) for name in own} == {name: expected(tensor) for name, tensor in own.items()}
    assert not LACKS_OUTPUTS[model] & set(outputs)


def test_csm_streams_default_chunking_is_the_contracts() -> None:
    parameters = {key: value.string_value for key, value in model_config("csm_stream").parameters.items()}
    assert (int(parameters["first_chunk_frames"]), int(parameters["chunk_frames"])) == (FIRST_CHUNK_FRAMES, CHUNK_FRAMES)
    assert (INPUTS["FIRST_CHUNK_FRAMES"].default, INPUTS["CHUNK_FRAMES"].default) == (FIRST_CHUNK_FRAMES, CHUNK_FRAMES)


def test_the_gateway_names_a_request_parameter_for_every_input() -> None:
    """An INVALID_ARG message starts with the input at fault: the gateway maps each to its field."""
    assert set(TENSOR_PARAMS) == {*INPUTS, "prompt"}


README = Path(__file__).parents[1] / "README.md"
# The default column's words for an input without a default value: the server's behaviour when it is absent.
NO_DEFAULT = {"none", "random", "all 0"}


def readme_tables() -> dict[str, dict[str, list[str]]]:
    """The tables of the README's "Tensors of the `csm` and `csm_stream` models" section, by their
    first header (input, parameter, output): each row's cells by its first cell's names, backticks dropped."""
    section = README.read_text().split("## Tensors of the `csm` and `csm_stream` models", 1)[1].split("\n## ", 1)[0]
    tables: dict[str, dict[str, list[str]]] = {}
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if not cells[0].startswith("`"):
            rows = tables.setdefault(cells[0], {})
            continue
        for name in re.findall(r"`([^`]+)`", cells[0]):
            rows[name] = cells[1:]
    return tables


def readme_dims(shape: str) -> tuple[int, ...]:
    """A shape as the README writes it ("[1, n]", "[1, frames, 32]") -> config.pbtxt's dims after
    the batch dimension, a word (a count that varies) read as -1."""
    batch, *dims = shape.strip("[]").split(", ")
    assert batch == "1", shape
    return tuple(int(dim) if dim.isdigit() else -1 for dim in dims)


def test_the_readmes_input_table_is_the_contracts() -> None:
    inputs = readme_tables()["input"]
    assert list(inputs) and set(inputs) == set(INPUTS)
    for name, (datatype, shape, default, meaning) in inputs.items():
        tensor = INPUTS[name]
        assert (datatype, readme_dims(shape)) == (tensor.datatype, tensor.dims), name
        if tensor.required:
            assert default == "required", name
        elif tensor.default is None:
            assert default in NO_DEFAULT, name
        else:
            assert re.search(rf"(?<![\d.]){re.escape(str(tensor.default))}(?![\d.])", default), name
        if name in STREAM_INPUTS:
            assert meaning.startswith("`csm_stream` only"), name


def test_the_readmes_input_bounds_are_the_contracts() -> None:
    """Each input's least value, and the audio vocabulary's bound on TOPK and on context codes."""
    inputs = readme_tables()["input"]
    ranges = {
        "TOPK": f"{INPUTS['TOPK'].least}..{AUDIO_VOCAB_SIZE}",
        "CONTEXT_CODES": f"[{INPUTS['CONTEXT_CODES'].least}, {AUDIO_VOCAB_SIZE - 1}]",
    }
    for name, tensor in INPUTS.items():
        if tensor.least is None:
            continue
        meaning = inputs[name][-1]
        if name in ranges:
            assert ranges[name] in meaning, name
        else:
            assert f">= {tensor.least}" in meaning or f"{tensor.least}..`" in meaning, name


def test_the_readmes_parameter_defaults_are_the_contracts() -> None:
    """The request limits' defaults: csm_stream's config.pbtxt parameters of the contract's constants' names."""
    parameters = readme_tables()["parameter"]
    assert set(parameters) == set(RequestLimits.parameters())
    for name, (default, _) in parameters.items():
        assert getattr(contract, name.upper()) in [int(value) for value in re.findall(r"^\d+|(?<=, )\d+", default)], name


def test_the_readmes_output_table_is_the_contracts() -> None:
    """The contract's outputs (checked against csm_stream's config.pbtxt above), and csm_stream's own
    (ERROR, ERROR_CODE) as its config.pbtxt declares them."""
    outputs = readme_tables()["output"]
    stream_outputs = declared(model_config("csm_stream").output)
    assert set(outputs) == set(stream_outputs)
    for name, (datatype, shape, _) in outputs.items():
        assert (CONFIG_TYPES[datatype], readme_dims(shape)) == stream_outputs[name], name
    assert f"{SAMPLES_PER_FRAME} samples per generated frame" in outputs["AUDIO"][-1]


def config_parameters(model: str) -> dict[str, dict[str, str]]:
    """A model's config.pbtxt parameters, as Triton gives them to its model."""
    return {key: {"string_value": value.string_value} for key, value in model_config(model).parameters.items()}


def test_csm_streams_parameters_are_its_settings_defaults() -> None:
    """Every parameter csm_stream's config.pbtxt sets (the stall timeout, the engine's start and
    restart limits, the request limits ...) is ServingConfig's default, defined there once; the
    staged model's directory alone is the deployment's."""
    config = ServingConfig.from_parameters(config_parameters("csm_stream"))
    assert config == ServingConfig(model_dir=config.model_dir)


def test_the_field_name_tables_name_the_same_fields_by_the_contracts_inputs() -> None:
    """request.API_NAMES and serving.TRITON_NAMES name one set of request fields, the first by the
    field itself and the second by one of the contract's inputs; a segment's field names its segment."""
    assert set(API_NAMES) == set(TRITON_NAMES)
    for field, label in TRITON_NAMES.items():
        assert label.split(":", 1)[0] in INPUTS, field
        assert API_NAMES[field].startswith(field.split(".")[0]), field
        if "{index}" in label:
            assert "{index}" in API_NAMES[field], field
