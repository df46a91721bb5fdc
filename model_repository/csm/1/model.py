"""The unary "csm" model: forwards each request to the streaming model that holds the weights
(a decoupled BLS call) and answers with its chunks joined. It imports no torch and holds no
weights, so unary and streaming requests share one copy of the model and one running batch."""

from __future__ import annotations

import json
import logging
import re
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

logger = logging.getLogger("csm_triton.triton.unary")

# A BLS response arrives with its error code set to INTERNAL whatever the code sent (python
# backend 24.10), so the code is recovered from the message: csm_stream's invalid-argument
# messages start with the field they name ("TOPK: ...", "CONTEXT_TEXT: segment 1 ...", "prompt: ...").
INVALID_FIELD = re.compile(r"^(prompt|[A-Z_]+(, [A-Z_]+)*): ")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        model_config = json.loads(args["model_config"])
        self.stream_model = model_config["parameters"]["stream_model"]["string_value"]
        self.input_names = [tensor["name"] for tensor in model_config["input"]]

    def execute(self, requests: list) -> None:
        # One thread per request, so that a request arriving now joins the running batch instead of
        # waiting behind the requests before it (the response sender works outside execute()).
        for request in requests:
            threading.Thread(target=self._forward, args=(request,), name="csm-unary", daemon=True).start()
        return None

    def _forward(self, request) -> None:
        sender = request.get_response_sender()
        try:
            response = self._joined_response(request)
        except Exception as error:  # never leave a request unanswered
            logger.exception("forwarding to %s failed", self.stream_model)
            response = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.stream_model}: {error}"))
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _joined_response(self, request):
        wanted = sorted(request.requested_output_names())
        inputs = [tensor for name in self.input_names if (tensor := pb_utils.get_input_tensor_by_name(request, name)) is not None]
        forwarded = pb_utils.InferenceRequest(model_name=self.stream_model, inputs=inputs, requested_output_names=wanted)
        chunks: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
        for response in forwarded.exec(decoupled=True):
            if response.has_error():
                message = response.error().message()
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, _error_code(message)))
            for name in wanted:
                tensor = pb_utils.get_output_tensor_by_name(response, name)
                if tensor is not None:
                    chunks[name].append(tensor.as_numpy())
        outputs = [pb_utils.Tensor(name, np.concatenate(parts, axis=1)) for name, parts in chunks.items() if parts]
        return pb_utils.InferenceResponse(output_tensors=outputs)


def _error_code(message: str):
    if INVALID_FIELD.match(message):
        return pb_utils.TritonError.INVALID_ARG
    if "Exceeds maximum queue size" in message:
        return pb_utils.TritonError.UNAVAILABLE
    return pb_utils.TritonError.INTERNAL
