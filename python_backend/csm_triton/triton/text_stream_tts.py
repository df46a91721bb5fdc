"""The "text_stream_tts" model (model_repository/text_stream_tts/1/model.py imports its class from
here): an LLM's answer spoken while it is being written.

For each request, PROMPT goes to the decoupled text model named in config.pbtxt (an LLM served by
vLLM's or TensorRT-LLM's Triton backend) with streaming on. Its text is cut into sentences as it
arrives (sentences.py), and each complete sentence goes to csm_stream (a decoupled BLS call,
csm_triton/triton/bls.py) with the request's SPEAKER, context and sampling inputs; csm_stream's AUDIO chunks
are sent on as they come, sentence after sentence, so the first sentence is heard before the LLM has
finished. A request that ends early (cancelled, failed) tells csm_stream to stop its sentence.

Sentences are spoken one at a time, each holding one csm_stream slot for as long as it generates;
meanwhile the LLM's text waits on its call's queue. Generation runs faster than real time on a GPU,
so the audio a client has buffered covers the next sentence's time to first audio.

Seeds: sentence i (from 0) is generated with SEED + i (wrapping in int64), so each sentence's audio
is what csm_stream gives for that sentence alone with that seed; without SEED every sentence gets a
random one. Like "csm", this model holds no weights and imports no torch.
"""

from __future__ import annotations

import codecs
import json
import logging
import threading
from dataclasses import dataclass, field

import numpy as np
import triton_python_backend_utils as pb_utils

from .bls import DecoupledCall, RequestFailed, speech_failure
from .orphan import exit_with_server
from .parameters import typed_parameters
from .sentences import SentenceSplitter

logger = logging.getLogger("csm_triton.triton.text_stream")

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# csm_stream's outputs, sent on with each chunk when asked for (CONTEXT_DROPPED: with each sentence's first).
SPEECH_OUTPUTS = ("AUDIO", "AUDIO_CODES", "CONTEXT_DROPPED")


@dataclass(frozen=True)
class Settings:
    """The model's `parameters` in config.pbtxt, where each is explained."""

    text_model: str
    text_input: str = "text_input"
    text_output: str = "text_output"
    stream_input: str = "stream"
    text_model_batched: bool = False
    # Constant inputs of the text model, without their batch dimension.
    text_model_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    speech_model: str = "csm_stream"
    max_sentence_chars: int = 150
    stream_timeout_s: float = 60.0

    @classmethod
    def from_parameters(cls, parameters: dict[str, dict[str, str]]) -> Settings:
        values = typed_parameters(cls, parameters, positive=("max_sentence_chars", "stream_timeout_s"))
        if not values.get("text_model"):
            raise ValueError("config.pbtxt parameters: text_model must name the text model")
        if "text_model_inputs" in values:
            constants = json.loads(values["text_model_inputs"])
            if not isinstance(constants, dict):
                raise ValueError("config.pbtxt parameters: text_model_inputs must be a JSON object")
            values["text_model_inputs"] = {name: _constant_input(name, value) for name, value in constants.items()}
        return cls(**values)


def _constant_input(name: str, value) -> np.ndarray:
    """A text_model_inputs value as the tensor it is sent as (see config.pbtxt)."""
    if isinstance(value, bool):
        return np.array(value)
    if isinstance(value, int):
        return np.array(value, dtype=np.int32)
    if isinstance(value, float):
        return np.array(value, dtype=np.float32)
    if isinstance(value, str):
        return np.array(value.encode("utf-8"), dtype=object)
    if isinstance(value, dict):  # vLLM's sampling_parameters is JSON text
        return np.array(json.dumps(value).encode("utf-8"), dtype=object)
    raise ValueError(f"config.pbtxt parameters: text_model_inputs[{name!r}] must be a string, object, boolean or number, got {value!r}")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.orphan_watch = exit_with_server(args["model_name"])
        model_config = json.loads(args["model_config"])
        self.settings = Settings.from_parameters(model_config.get("parameters", {}))
        # csm_stream's inputs, with PROMPT in place of TEXT: all but PROMPT and SEED are passed on
        # with every sentence as the client sent them (TEXT is the sentence, SEED its own).
        self.input_names = [tensor["name"] for tensor in model_config["input"]]

    def execute(self, requests: list) -> None:
        # One thread per request: a request streams for as long as its answer is spoken, and the
        # response sender works outside execute().
        for request in requests:
            threading.Thread(target=self._serve, args=(request,), name="text-stream-tts", daemon=True).start()
        return None

    def _serve(self, request) -> None:
        sender = request.get_response_sender()
        answer = None
        try:
            answer = SpokenAnswer(request, self.input_names, self.settings)
            answer.speak(sender)
            final = None
        except RequestFailed as failure:
            final = failure.response()
        except Exception as error:  # never leave a request unanswered
            logger.exception("text_stream_tts failed")
            final = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"text_stream_tts failed: {error}"))
        try:
            sender.send(final, flags=FINAL)
        except Exception:  # the client is gone: no one is left to answer, and csm_stream is still told to stop
            logger.exception("sending text_stream_tts's final response failed")
        finally:
            if answer is not None:
                answer.stop()


class SpokenAnswer:
    """One request: its inputs, the text model's stream, and the sentences spoken from it."""

    def __init__(self, request, input_names: list[str], settings: Settings) -> None:
        self.request, self.settings = request, settings
        # Copies: the arrays outlive the BLS requests they are sent with, one per sentence.
        arrays = {}
        for name in input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                arrays[name] = np.array(tensor.as_numpy())
        self.prompt = _prompt(arrays.pop("PROMPT"))
        self.seed = int(_single(arrays.pop("SEED"), "SEED")) if "SEED" in arrays else None
        self.speech_inputs = arrays
        self.wanted = request.requested_output_names()
        self.sentences = 0
        self._calls: list[DecoupledCall] = []

    def speak(self, sender) -> None:
        """Sends the audio chunks of every sentence of the text model's answer, in order; raises
        RequestFailed when the request is to end with an error."""
        settings = self.settings
        splitter = SentenceSplitter(settings.max_sentence_chars)
        # UTF-8 incrementally: a character may be split between two responses.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        callee = f"text_model '{settings.text_model}'"
        for response in self._call(settings.text_model, self._text_inputs(), [settings.text_output], callee=callee):
            tensor = pb_utils.get_output_tensor_by_name(response, settings.text_output)
            if tensor is not None:
                for sentence in splitter.feed(decoder.decode(tensor.as_numpy().reshape(-1)[0])):  # [n] completions: the first
                    self._speak(sentence, sender)
        for sentence in splitter.feed(decoder.decode(b"", final=True)) + splitter.finish():
            self._speak(sentence, sender)

    def stop(self) -> None:
        """After the final response: lets go of the calls still running, telling csm_stream to stop
        the sentence being spoken (see DecoupledCall.close; the text model runs to its end), and of
        the request, so that the python backend can release it."""
        for call in self._calls:
            call.close()
        self._calls.clear()
        self.request = None

    def _text_inputs(self) -> list:
        settings = self.settings
        shape = (1, 1) if settings.text_model_batched else (1,)
        arrays = {settings.text_input: np.array(self.prompt.encode("utf-8"), dtype=object)}
        if settings.stream_input:
            arrays[settings.stream_input] = np.array(True)
        arrays.update(settings.text_model_inputs)
        return [pb_utils.Tensor(name, array.reshape(shape)) for name, array in arrays.items()]

    def _speak(self, sentence: str, sender) -> None:
        """Sends the audio chunks of one sentence as csm_stream makes them."""
        text = np.array([[sentence.encode("utf-8")]], dtype=object)
        inputs = [pb_utils.Tensor("TEXT", text), *(pb_utils.Tensor(name, array) for name, array in self.speech_inputs.items())]
        if self.seed is not None:
            inputs.append(pb_utils.Tensor("SEED", np.array([[sentence_seed(self.seed, self.sentences)]], dtype=np.int64)))
        self.sentences += 1
        speech_model = self.settings.speech_model
        # AUDIO also when only TEXT is asked for: it is what tells the chunks apart.
        forwarded = [name for name in SPEECH_OUTPUTS if name in self.wanted] or ["AUDIO"]
        call = self._call(speech_model, inputs, forwarded, failure=lambda message: speech_failure(message, speech_model), stoppable=True)
        for response in call:
            tensors = {name: pb_utils.get_output_tensor_by_name(response, name) for name in forwarded}
            chunk = {name: tensor.as_numpy() for name, tensor in tensors.items() if tensor is not None}
            if not any(array.size for array in chunk.values()):
                continue  # csm_stream's last chunk may hold no frames
            outputs = [pb_utils.Tensor(name, array) for name, array in chunk.items() if name in self.wanted]
            if "TEXT" in self.wanted:
                outputs.append(pb_utils.Tensor("TEXT", text))
            sender.send(pb_utils.InferenceResponse(output_tensors=outputs))
        self._calls.remove(call)

    def _call(self, model: str, inputs: list, outputs: list[str], **options) -> DecoupledCall:
        """A call to `model` that ends this request when its client cancels or the callee goes
        silent; `options` are DecoupledCall's."""
        if self.request.is_cancelled():  # no new call for a request already given up
            raise RequestFailed("cancelled by the client", pb_utils.TritonError.CANCELLED)
        call = DecoupledCall(
            model, inputs, outputs, is_cancelled=self.request.is_cancelled, silence_timeout_s=self.settings.stream_timeout_s, **options
        )
        self._calls.append(call)
        return call


def sentence_seed(seed: int, index: int) -> int:
    """The seed of sentence `index`: SEED + index, wrapped into int64 like the tensor it goes in."""
    return (seed + index + 2**63) % 2**64 - 2**63


def _single(array: np.ndarray, name: str):
    if array.size != 1:
        raise RequestFailed(f"{name}: expected one value per request, got shape {list(array.shape)}", pb_utils.TritonError.INVALID_ARG)
    return array.reshape(-1)[0]


def _prompt(array: np.ndarray) -> str:
    value = _single(array, "PROMPT")
    try:
        prompt = value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestFailed(f"PROMPT: not valid UTF-8 ({error.reason} at byte {error.start})", pb_utils.TritonError.INVALID_ARG) from error
    if not prompt.strip():
        raise RequestFailed("PROMPT: must not be empty", pb_utils.TritonError.INVALID_ARG)
    return prompt
