"""Triton python-backend adapter for CSM: parses request tensors, runs every request of an
`execute` call in the engine together, and builds one response per request."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from csm_triton import load_csm_1b
from csm_triton.serving import INPUTS, ServingConfig, parse_request

logger = logging.getLogger("csm_triton.triton")

# The project root: relative paths in config.pbtxt parameters are taken from here.
PROJECT_ROOT = Path(__file__).resolve().parents[3]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        model_config = json.loads(args["model_config"])
        self.config = ServingConfig.from_parameters(model_config.get("parameters", {}))
        device = self._device(args)
        weights, staged = self.config.weights_dir(PROJECT_ROOT)
        if not staged:
            logger.warning(
                "no real weights staged in %s: serving the small random-weight model in %s, which speaks noise. "
                "Stage CSM-1B with `make export` (python -m export fetch --out models/csm-1b), or point the "
                "model_dir parameter of config.pbtxt at a staged directory.",
                self.config.model_dir,
                weights,
            )
            if not (weights / "config.json").exists():
                from export.tiny import make_tiny

                make_tiny(weights)
        dtype = None if self.config.dtype == "auto" else getattr(torch, self.config.dtype)
        self.generator = load_csm_1b(weights, device=device, dtype=dtype, slots=self.config.slots)
        logger.info("csm ready on %s with %d slots, weights %s", device, self.config.slots, weights)

    def _device(self, args: dict) -> str:
        if self.config.device != "auto":
            return self.config.device
        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            return f"cuda:{args['model_instance_device_id']}"
        return "cpu"

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        parsed, indices = [], []
        for index, request in enumerate(requests):
            try:
                arrays = {
                    name: tensor.as_numpy() for name in INPUTS if (tensor := pb_utils.get_input_tensor_by_name(request, name)) is not None
                }
                parsed.append(parse_request(arrays, self.config, self.generator.engine.vocab_size))
                indices.append(index)
            except ValueError as error:
                responses[index] = self._error(error)
        outcomes = self.generator.generate_codes_batch(parsed, return_exceptions=True)
        generated = {}
        for index, outcome in zip(indices, outcomes, strict=True):
            if isinstance(outcome, Exception):
                responses[index] = self._error(outcome)
            else:
                generated[index] = outcome
        speaking = [index for index in generated if "AUDIO" in requests[index].requested_output_names()]
        audio = dict(zip(speaking, self.generator.codec.decode_batch([generated[i] for i in speaking]), strict=True))
        for index, codes in generated.items():
            outputs = [pb_utils.Tensor("AUDIO_CODES", codes.numpy().astype(np.int32)[None])]
            if index in audio:
                outputs.append(pb_utils.Tensor("AUDIO", audio[index].numpy()[None]))
            responses[index] = pb_utils.InferenceResponse(output_tensors=outputs)
        return responses

    @staticmethod
    def _error(error: Exception):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))

    def finalize(self) -> None:
        logger.info("csm unloading")
