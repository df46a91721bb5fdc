"""Decoupled BLS calls from the models that hold no weights (csm, text_stream_tts) to csm_stream and
to other models, and the control protocol between those fronts and csm_stream. Imports no torch.

Each call is made and read on a thread of its own, which puts the responses on a queue, because in
python backend 24.10 a thread blocked in `exec(decoupled=True)`'s iterator is stuck: an error that
a decoupled model sends after its first response is lost (InferResponse::SaveToSharedMemory sets
the id that routes a response to its iterator only on responses without an error), so the iterator
of a callee failing mid-stream, or of csm_stream's stub process dying, never ends; and a BLS call
cannot be cancelled (no `ResponseIterator.cancel()`). Read this way, the request's own thread ends
the request when its client cancels, at its deadline, after a silence, or when told to (`abort`),
and only the reading thread is left waiting for the callee. A BLS response also arrives with its
error code set to INTERNAL whatever code was sent (python backend 24.10). So csm_stream sends
every error of a forwarded request in band, as a final response holding the ERROR and ERROR_CODE
outputs, which `DecoupledCall` asks for and raises with that code; only Triton's own errors (a full
queue, a dead stub) come as error responses, recognised by Triton's words for them.

The control protocol (csm_client/control.py: FORWARD_ID, CANCEL, PROBE) travels in BLS request
parameters (`pb_utils.InferenceRequest(parameters=...)`, read by csm_stream with
`request.parameters()`). A front forwards each request with a FORWARD_ID, and CANCELs it by that id
when its own request ends early; a CANCEL can overtake the request it names (a front sends them
from two threads), so csm_stream keeps the last ids cancelled early. A call to csm_stream that hears
nothing for a while PROBEs it, because the streams of a stub that died never end (control.py).

Control requests also carry csm_stream's required inputs, TEXT and SPEAKER, which it ignores for
them. csm_stream's execute() never waits, so a slow answer means a stuck stub.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

from csm_client.control import CANCEL, FORWARD_ID, PROBE, SILENCE_PROBE_S, STUB_DEAD, stream_model_gone

logger = logging.getLogger(__name__)

# Triton's refusal when a model's queue is full (max_queue_size).
QUEUE_FULL = "Exceeds maximum queue size"
# The outputs holding a forwarded request's error and its Triton error code's name (see above).
ERROR_OUTPUT = "ERROR"
ERROR_CODE_OUTPUT = "ERROR_CODE"
# The codes that cross by name (pb_utils.TritonError's attributes, which exist only once the stub runs).
ERROR_CODE_NAMES = ("UNKNOWN", "INTERNAL", "NOT_FOUND", "INVALID_ARG", "UNAVAILABLE", "CANCELLED")
# The end of csm's refusal past max_inflight; csm_client recognises both refusals as "server busy".
FRONT_BUSY = "requests in flight; retry later"

# How often a request waiting for a response checks its client, deadline and silence.
POLL_S = 0.1
# How long a silent call's PROBE of csm_stream may take before it is left for the next silence: a
# live stub answers at once, and a stuck one is the watch's to find (stream_watch.py).
PROBE_TIMEOUT_S = 10.0
# Forward ids cancelled before their request reached csm_stream that it keeps, the oldest dropped.
EARLY_CANCELS = 1024
FORWARD_ID_CHARS = 64  # longer ids (hostile requests) are no ids
_END = object()


class RequestFailed(Exception):
    """Ends the request with this message and Triton error code."""

    def __init__(self, message: str, code) -> None:
        super().__init__(message)
        self.code = code

    def response(self):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(self), self.code))


class TimedOut(RequestFailed):
    """The callee was silent too long, or did not finish by the deadline."""


def internal_failure(callee: str) -> Callable[[str], RequestFailed]:
    """A callee's error as INTERNAL, naming the callee: for callees other than csm_stream."""
    return lambda message: RequestFailed(f"{callee}: {message}", pb_utils.TritonError.INTERNAL)


def speech_failure(message: str, callee: str = "csm_stream") -> RequestFailed:
    """An error response on a call to csm_stream, which sends its own errors in band: Triton's
    refusal for a full queue keeps its message, so that clients read it as "server busy"."""
    if QUEUE_FULL in message or FRONT_BUSY in message:
        return RequestFailed(message, pb_utils.TritonError.UNAVAILABLE)
    if STUB_DEAD.search(message):
        return RequestFailed(f"{callee}'s process has died; retry once it has been reloaded ({message})", pb_utils.TritonError.UNAVAILABLE)
    return RequestFailed(message if message.startswith(f"{callee}") else f"{callee}: {message}", pb_utils.TritonError.INTERNAL)


@dataclass(frozen=True)
class Deadline:
    """How long a call may take in all, and how that was reckoned (for the error message)."""

    seconds: float
    reason: str


class DecoupledCall:
    """One decoupled BLS call, started at once; iterate it for its responses. With `stoppable`, the
    callee is csm_stream: the request carries a forward id, `close` stops its stream, and after
    SILENCE_PROBE_S without a response the call PROBEs csm_stream, ending at once when its process
    has died (control.py says why nothing else would end it)."""

    def __init__(
        self,
        model: str,
        inputs: list,
        outputs: list[str],
        *,
        callee: str | None = None,
        is_cancelled: Callable[[], bool] = lambda: False,
        silence_timeout_s: float | None = None,
        deadline: Deadline | None = None,
        failure: Callable[[str], RequestFailed] | None = None,
        parameters: dict[str, str | bool] | None = None,
        stoppable: bool = False,
    ) -> None:
        self.model, self.callee = model, callee or model
        self.silence_timeout_s, self.deadline = silence_timeout_s, deadline
        self._is_cancelled = is_cancelled
        self._failure = failure or internal_failure(self.callee)
        self.forward_id = uuid.uuid4().hex if stoppable else None
        parameters = dict(parameters or {})
        if self.forward_id is not None:
            parameters[FORWARD_ID] = self.forward_id
            outputs = [*outputs, ERROR_OUTPUT, ERROR_CODE_OUTPUT]
        request = pb_utils.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=outputs, parameters=parameters)
        self._responses: queue.Queue = queue.Queue()
        self._start = self._last_response = self._last_probe = time.monotonic()
        self._ended = threading.Event()  # the callee's final response (or the refusal) has come
        threading.Thread(target=self._read, args=(request,), name=f"bls-{model}", daemon=True).start()

    def _read(self, request) -> None:
        try:
            for response in request.exec(decoupled=True):  # exec returns with the first response
                self._last_response = time.monotonic()
                self._responses.put(response)
        except Exception as error:  # refused (an unknown model, wrong tensors, ...): the request reports it
            self._responses.put(error)
        self._ended.set()
        self._responses.put(_END)

    def __iter__(self) -> Iterator:
        """The callee's responses in order, until its final one. Raises RequestFailed when the
        callee answers an error or the call was refused, when the client cancels, when `abort` is
        called, and TimedOut past the silence timeout or the deadline."""
        while True:
            self._check()
            try:
                item = self._responses.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if item is _END:
                return
            if isinstance(item, RequestFailed):  # from abort()
                raise item
            if isinstance(item, Exception):
                raise self._failure(str(item))
            if item.has_error():
                raise self._failure(item.error().message())
            error = pb_utils.get_output_tensor_by_name(item, ERROR_OUTPUT) if self.forward_id is not None else None
            if error is not None:
                raise self._in_band_failure(error, pb_utils.get_output_tensor_by_name(item, ERROR_CODE_OUTPUT))
            yield item

    def _in_band_failure(self, error, code) -> RequestFailed:
        """csm_stream's error with the code it was sent with; an internal one names csm_stream."""
        message = _text(error)
        name = _text(code) if code is not None else "INTERNAL"
        code = getattr(pb_utils.TritonError, name if name in ERROR_CODE_NAMES else "INTERNAL")
        if code == pb_utils.TritonError.INTERNAL and not message.startswith(self.callee):
            message = f"{self.callee}: {message}"
        return RequestFailed(message, code)

    def _check(self) -> None:
        if self._is_cancelled():
            raise RequestFailed("cancelled by the client", pb_utils.TritonError.CANCELLED)
        now = time.monotonic()
        if self.deadline is not None and now - self._start > self.deadline.seconds:
            raise TimedOut(
                f"{self.callee}: not finished within the deadline of {self.deadline.seconds:.1f} s ({self.deadline.reason})",
                pb_utils.TritonError.UNAVAILABLE,
            )
        silent_s = now - self._last_response
        if self.silence_timeout_s is not None and silent_s > self.silence_timeout_s:
            raise TimedOut(f"{self.callee}: sent nothing for {silent_s:.0f} s", pb_utils.TritonError.UNAVAILABLE)
        if self.forward_id is not None and min(silent_s, now - self._last_probe) > SILENCE_PROBE_S and not self._ended.is_set():
            self._last_probe = now
            try:
                answer = control(self.model, {PROBE: True}, PROBE_TIMEOUT_S)
            except TimedOut:
                return
            if stream_model_gone(answer):
                raise RequestFailed(
                    f"{self.callee}'s process died and this request was lost; retry it ({answer})", pb_utils.TritonError.UNAVAILABLE
                )

    def abort(self, failure: RequestFailed) -> None:
        """Makes the thread iterating the call raise `failure` at once (from any thread)."""
        self._responses.put(failure)

    def close(self) -> None:
        """Lets go of the call once its request has ended: forgets the client's request, which the
        reading thread may outlive, and tells csm_stream to stop a stoppable call's stream that has
        not ended (waiting for its answer at most as long as the call itself could wait)."""
        self._is_cancelled = _given_up
        # A call that failed on csm_stream's error response ends a moment later.
        if self.forward_id is None or self._ended.wait(POLL_S):
            return
        bound = self.silence_timeout_s or (self.deadline.seconds if self.deadline is not None else None)
        try:
            refused = control(self.model, {CANCEL: self.forward_id}, bound)
        except TimedOut as failure:
            refused = str(failure)
        if refused is not None:
            logger.info("could not cancel %s's stream %s: %s", self.model, self.forward_id, refused)


def control(model: str, parameters: dict[str, str | bool], timeout_s: float | None) -> str | None:
    """Sends one control request (CANCEL or PROBE) and waits for its answer: None for the empty final
    response, else the error it was answered with. Raises TimedOut when no answer came in `timeout_s`."""
    inputs = [
        pb_utils.Tensor("TEXT", np.array([[b""]], dtype=object)),
        pb_utils.Tensor("SPEAKER", np.zeros((1, 1), dtype=np.int32)),
    ]
    call = DecoupledCall(model, inputs, [], callee=f"{model} ({', '.join(parameters)})", silence_timeout_s=timeout_s, parameters=parameters)
    try:
        for _ in call:
            pass
    except TimedOut:
        raise
    except RequestFailed as failure:
        return str(failure)
    return None


def _given_up() -> bool:
    return True


def _text(tensor) -> str:
    return tensor.as_numpy().reshape(-1)[0].decode("utf-8", errors="replace")


def errors_in_band(control: Control, wanted: list[str]) -> bool:
    """Whether csm_stream sends this request's errors in band: a front's forwarded request that
    asks for ERROR (see above)."""
    return control.forward_id is not None and ERROR_OUTPUT in wanted


def in_band_error(error) -> object:
    """A final response that carries `error` (a pb_utils.TritonError) in the ERROR and ERROR_CODE
    outputs, for a front's BLS call, which would lose its code (or, after the first response, all
    of it) as an error response."""
    names = {getattr(pb_utils.TritonError, name): name for name in ERROR_CODE_NAMES}
    message = np.array([[error.message().encode("utf-8")]], dtype=object)
    code = np.array([[names.get(error.code(), "INTERNAL").encode()]], dtype=object)
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(ERROR_OUTPUT, message), pb_utils.Tensor(ERROR_CODE_OUTPUT, code)])


@dataclass(frozen=True)
class Control:
    """What a request to csm_stream asks of the control protocol, from its parameters."""

    forward_id: str | None = None
    cancel: str | None = None
    probe: bool = False

    @classmethod
    def of(cls, request) -> Control:
        """Reads `request.parameters()` (a JSON object). Anything malformed asks nothing: the
        request is then an ordinary one, and csm_stream checks its inputs as it checks any."""
        try:
            parameters = json.loads(request.parameters() or "{}")
        except ValueError:
            return cls()
        if not isinstance(parameters, dict):
            return cls()
        return cls(_forward_id(parameters.get(FORWARD_ID)), _forward_id(parameters.get(CANCEL)), parameters.get(PROBE) is True)

    @property
    def is_control(self) -> bool:
        """A CANCEL or PROBE, to be answered at once; not a request to generate."""
        return self.cancel is not None or self.probe


def _forward_id(value) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= FORWARD_ID_CHARS else None


class ForwardedStreams:
    """csm_stream's side of CANCEL: a stop flag for each running stream that came with a forward id.
    A CANCEL may overtake the request it names (a front sends them from two threads), so the last
    EARLY_CANCELS ids cancelled before their request came are remembered."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, threading.Event] = {}
        self._cancelled_early: deque[str] = deque(maxlen=EARLY_CANCELS)

    def start(self, forward_id: str | None) -> Callable[[], bool]:
        """Registers a stream; returns whether it has been told to stop (poll it with the client's
        own cancellation). Call `finish` with the same id when the stream has ended."""
        stop = threading.Event()
        if forward_id is None:
            return stop.is_set
        with self._lock:
            if forward_id in self._cancelled_early:
                self._cancelled_early.remove(forward_id)
                stop.set()
            self._running[forward_id] = stop
        return stop.is_set

    def finish(self, forward_id: str | None) -> None:
        if forward_id is not None:
            with self._lock:
                self._running.pop(forward_id, None)

    def cancel(self, forward_id: str) -> None:
        with self._lock:
            stop = self._running.get(forward_id)
            if stop is None:
                self._cancelled_early.append(forward_id)
            else:
                stop.set()
