"""The unary front over csm_stream: each request forwarded on a thread of its own (a decoupled BLS
call, csm_triton/triton/bls.py) and answered with csm_stream's chunks joined.

Every request ends with exactly one final response, sent by its own thread: the joined audio, or
an error when csm_stream refuses or fails it, when the client cancels (CANCELLED), when the
request's deadline passes, or when csm_stream's process has died (UNAVAILABLE: the call's probe
finds it, csm_client/control.py). On the client's cancel and the deadline csm_stream is told to
stop the stream (a CANCEL control request), so that its slot is freed. At most `max_inflight`
requests are forwarded at once; past them a request is refused at once.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

from csm_client.contract import CHUNK_FRAMES, INPUTS

from . import bls
from .parameters import typed_parameters

logger = logging.getLogger("csm_triton.triton.unary")

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


@dataclass(frozen=True)
class Settings:
    """The model's `parameters` in config.pbtxt, where each is explained."""

    stream_model: str = "csm_stream"
    max_inflight: int = 64
    chunk_frames: int = CHUNK_FRAMES
    first_audio_timeout_s: float = 60.0
    max_real_time_factor: float = 20.0
    watch_interval_s: float = 2.0
    probe_timeout_s: float = 300.0
    reload_tries: int = 3
    reload_backoff_s: float = 5.0

    @classmethod
    def from_parameters(cls, parameters: dict[str, dict[str, str]]) -> Settings:
        positive = [name for name in cls.__dataclass_fields__ if name != "stream_model"]
        return cls(**typed_parameters(cls, parameters, positive))

    def deadline(self, audio_ms: int) -> bls.Deadline:
        """How long a request for `audio_ms` of audio may take in all: csm_stream's queue and first
        audio, then its audio at the slowest real-time factor expected."""
        audio_s, factor = audio_ms / 1000, self.max_real_time_factor
        reason = f"first_audio_timeout_s {self.first_audio_timeout_s:g} + {audio_s:g} s of audio x max_real_time_factor {factor:g}"
        return bls.Deadline(self.first_audio_timeout_s + audio_s * factor, reason)


class UnaryFront:
    """The requests being forwarded to csm_stream, each on a thread of its own, counted."""

    def __init__(self, settings: Settings, input_names: list[str]) -> None:
        self.settings, self.input_names = settings, input_names
        self._lock = threading.Lock()
        self._threads = 0  # forwarding threads running

    def start(self, request) -> None:
        """Forwards the request on a thread of its own, or refuses it at once past max_inflight."""
        sender = request.get_response_sender()
        limit = self.settings.max_inflight
        with self._lock:
            admitted = self._threads < limit
            self._threads += admitted
        if not admitted:
            refusal = bls.RequestFailed(f"csm: {limit} {bls.FRONT_BUSY}", pb_utils.TritonError.UNAVAILABLE)
            sender.send(refusal.response(), flags=FINAL)
            return
        try:
            threading.Thread(target=self._serve, args=(request, sender), name="csm-forward", daemon=True).start()
        except RuntimeError as error:  # no thread to be had
            self._release()
            sender.send(bls.RequestFailed(f"csm: cannot start a thread: {error}", pb_utils.TritonError.UNAVAILABLE).response(), flags=FINAL)

    def _serve(self, request, sender) -> None:
        call = None
        try:
            try:
                wanted = sorted(request.requested_output_names())
                call = self._forward(request, wanted)
                response = _joined(call, wanted)
            except bls.RequestFailed as failure:
                response = failure.response()
            except Exception as error:  # never leave a request unanswered
                logger.exception("forwarding to %s failed", self.settings.stream_model)
                message = f"csm: forwarding to {self.settings.stream_model} failed: {error}"
                response = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
            sender.send(response, flags=FINAL)
        finally:
            if call is not None:
                call.close()
            self._release()

    def _forward(self, request, wanted: list[str]) -> bls.DecoupledCall:
        inputs = [tensor for name in self.input_names if (tensor := pb_utils.get_input_tensor_by_name(request, name)) is not None]
        inputs.append(pb_utils.Tensor("CHUNK_FRAMES", np.array([[self.settings.chunk_frames]], dtype=np.int32)))
        return bls.DecoupledCall(
            self.settings.stream_model,
            inputs,
            wanted,
            is_cancelled=request.is_cancelled,
            deadline=self.settings.deadline(_audio_ms(request)),
            failure=lambda message: bls.speech_failure(message, self.settings.stream_model),
            stoppable=True,
        )

    def _release(self) -> None:
        with self._lock:
            self._threads -= 1


def _audio_ms(request) -> int:
    """The request's MAX_AUDIO_LENGTH_MS; csm_stream's default when absent or malformed (csm_stream
    then refuses a malformed one)."""
    tensor = pb_utils.get_input_tensor_by_name(request, "MAX_AUDIO_LENGTH_MS")
    if tensor is None or tensor.as_numpy().size != 1:
        return INPUTS["MAX_AUDIO_LENGTH_MS"].default
    return max(0, int(tensor.as_numpy().reshape(-1)[0]))


def _joined(call: bls.DecoupledCall, wanted: list[str]):
    """One response holding each asked output's chunks joined along the samples (frames) axis."""
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    for response in call:
        for name in wanted:
            tensor = pb_utils.get_output_tensor_by_name(response, name)
            if tensor is not None:
                chunks[name].append(tensor.as_numpy())
    outputs = [pb_utils.Tensor(name, np.concatenate(parts, axis=1)) for name, parts in chunks.items() if parts]
    return pb_utils.InferenceResponse(output_tensors=outputs)
