"""A stand-in for an LLM behind vLLM's Triton backend, for the tests of text_stream_tts: it
"generates" its prompt, word by word, at a known pace.

With `stream` true each word of `text_input` (with the space before it, as an LLM's tokens come)
is its own response, sent `word_delay_ms` after the previous one; without it the whole text is one
response at the end, as vLLM does. `word_delay_ms` comes from the vLLM-style JSON input
`sampling_parameters` (default 0), so a test can tell whether the caller passed it. The word FAIL
ends the request with an error in its place, after the words before it: an LLM failing mid-stream.
"""

from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
FAIL_WORD = "FAIL"


class TritonPythonModel:
    def execute(self, requests: list) -> None:
        # One thread per request, so that requests stream side by side, as an LLM's do.
        for request in requests:
            threading.Thread(target=self._generate, args=(request,), name="fake-llm", daemon=True).start()
        return None

    def _generate(self, request) -> None:
        sender = request.get_response_sender()
        prompt = _scalar(request, "text_input", b"").decode("utf-8")
        stream = bool(_scalar(request, "stream", False))
        delay_s = json.loads(_scalar(request, "sampling_parameters", b"{}")).get("word_delay_ms", 0) / 1000
        for index, word in enumerate(re.findall(r"\s*\S+", prompt)):
            time.sleep(delay_s)
            if word.strip() == FAIL_WORD:
                error = pb_utils.TritonError(f"fake_llm failed after {index} words, as asked")
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
                return
            if stream:
                sender.send(_text_response(word))
        sender.send(None if stream else _text_response(prompt), flags=FINAL)


def _scalar(request, name: str, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)[0]


def _text_response(text: str):
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=object))])
