"""The "csm_stream" model, CSM streaming (decoupled): parses request tensors, hands each request
to the engine and sends its audio chunks as they are made. model_repository/csm_stream/1/model.py
is this class with the project root set (`TritonPythonModel.project_root`).

The engine (weights, KV caches, serving loop) runs in a child process of this stub
(worker_client.py says why); this process imports no torch. execute() only hands
requests over and returns at once: requests wait for a slot in the engine's queue, which
`max_waiting_requests` bounds. Every request ends with exactly one final response: its last
chunk, or an error (INVALID_ARG naming the field, UNAVAILABLE when busy or when the engine
process died, CANCELLED when the client cancelled). The turn key (serving.ServingConfig.signing_key)
stays in this process: it opens the context's turn references as a request is read, and signs a
completed stream's own (TURN) from the codes of the chunks it sent."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from . import bls
from .orphan import exit_with_server
from .protocol import ChunkOut, Refused, Status, WorkerSettings
from .serving import INPUTS, ServingConfig, TurnOutput, read_chunking, read_request, turn_output
from .stream_metrics import StreamMetrics
from .worker_client import WorkerClient, WorkerUnavailable

logger = logging.getLogger("csm_triton.triton")

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
METRICS_INTERVAL_S = 0.5
CANCEL_POLL_S = 0.1  # how often each running request's transport is asked whether its client left
# Triton's own message for a full queue, which clients (and the csm front) read as "server busy".
BUSY_MESSAGE = "Exceeds maximum queue size"


class TritonPythonModel:
    # The project root: relative paths in config.pbtxt parameters are taken from here. Set by the
    # model file (model_repository/csm_stream/1/model.py) from its own path.
    project_root: Path

    def initialize(self, args: dict) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <stub pid>`: every thread's stack, in the server log
        model_config = json.loads(args["model_config"])
        self.name = args["model_name"]
        self.orphan_watch = exit_with_server(self.name)  # and the engine process with this one (engine_worker.py)
        self.config = ServingConfig.from_parameters(model_config.get("parameters", {}))
        self.turn_key = self.config.signing_key()  # signs TURN and opens CONTEXT_TURN here: the engine process never needs it
        self.outputs = frozenset(output["name"] for output in model_config["output"])
        kind, device_id = args.get("model_instance_kind", "CPU"), int(args.get("model_instance_device_id", 0))
        engine_config = replace(self.config, turn_key="")
        settings = WorkerSettings(engine_config, str(self.project_root), args["model_instance_name"], kind, device_id)
        self.worker = WorkerClient(
            python=os.path.join(sys.prefix, "bin", "python3"),  # the stub's own Python: its environment has the engine's packages
            settings=settings,
            on_give_up=self._give_up,
            start_timeout_s=self.config.engine_start_timeout_s,
            max_restarts=self.config.max_engine_restarts,
            restart_window_s=self.config.engine_restart_window_s,
        )
        ready = self.worker.start()
        self.limits = ready.limits
        self.voices = ready.voices
        self.metrics = StreamMetrics(ready.slots)
        self._links: dict[int, _Link] = {}  # engine key -> the request's way out, while it runs
        self.forwarded = bls.ForwardedStreams()  # the fronts' requests, which they may cancel by forward id
        self._links_lock = threading.Lock()
        self._stopping = threading.Event()
        threading.Thread(target=self._report_forever, name="csm-metrics", daemon=True).start()
        threading.Thread(target=self._poll_cancellations, name="csm-cancellations", daemon=True).start()
        logger.info("%s ready on %s with %d slots, weights %s", self.name, ready.device, ready.slots, ready.weights)

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            control = bls.Control.of(request)
            if control.is_control:
                self._answer_control(control, sender)
                continue
            in_band = bls.errors_in_band(control, request.requested_output_names())
            try:
                self._hand_over(request, sender, control.forward_id)
            except ValueError as error:
                self.metrics.invalid_argument(error)
                _send_error(sender, pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG), in_band)
            except WorkerUnavailable as error:
                self.metrics.rejected("internal_error")
                _send_error(sender, pb_utils.TritonError(f"{self.name}: {error}", pb_utils.TritonError.UNAVAILABLE), in_band)
            except Exception as error:  # this request alone fails; the others of the call go on
                logger.exception("preparing a request failed")
                self.metrics.rejected("internal_error")
                _send_error(sender, pb_utils.TritonError(f"preparing the request failed: {error}", pb_utils.TritonError.INTERNAL), in_band)
        return None

    def _answer_control(self, control: bls.Control, sender) -> None:
        """A front's CANCEL or PROBE (csm_triton/triton/bls.py), answered at once with one final response."""
        if control.cancel is not None:
            self.forwarded.cancel(control.cancel)
            sender.send(flags=FINAL)
            return
        heartbeat = self.worker.heartbeat
        problem = "it is unloading" if self._stopping.is_set() else self.worker.down or (heartbeat and heartbeat.health)
        if problem:
            _send_error(sender, pb_utils.TritonError(f"{self.name} cannot serve: {problem}", pb_utils.TritonError.UNAVAILABLE))
            return
        sender.send(flags=FINAL)

    def _hand_over(self, request, sender, forward_id: str | None) -> None:
        arrays = {name: tensor.as_numpy() for name in INPUTS if (tensor := pb_utils.get_input_tensor_by_name(request, name)) is not None}
        generation = read_request(arrays, self.limits, self.voices, self.turn_key)
        chunking = read_chunking(arrays, self.config)
        wanted = request.requested_output_names()
        turn = turn_output(wanted, self.outputs, generation, self.turn_key)
        link = _Link(request, sender, wanted, self.metrics, self._forget, self.worker.cancel, self.forwarded, forward_id, turn)
        with self._links_lock:  # before the engine can answer: its last chunk removes the link
            try:
                key = self.worker.generate(generation, link.receive, "AUDIO" in wanted, chunking)
            except WorkerUnavailable:
                self.forwarded.finish(forward_id)
                raise
            link.key = key
            self._links[key] = link

    def _forget(self, link: _Link) -> None:
        with self._links_lock:
            self._links.pop(link.key, None)

    def _poll_cancellations(self) -> None:
        """Ask each running request's transport whether its client has gone, and tell the engine."""
        while not self._stopping.wait(CANCEL_POLL_S):
            with self._links_lock:
                links = list(self._links.values())
            for link in links:
                if link.cancel_asked():
                    self.worker.cancel(link.key)

    def _report_forever(self) -> None:
        """Pass the metrics on to Triton (stream_metrics.py)."""
        while not self._stopping.wait(METRICS_INTERVAL_S):
            try:
                self.metrics.report(self.worker.heartbeat, self.worker.restarts)
            except Exception:  # a failed metrics call must not stop the reporter
                logger.exception("reporting metrics failed")

    def _give_up(self, reason: str) -> None:
        """The engine cannot be kept running: unload this model, so that Triton's readiness says
        it cannot serve (and an orchestrator replaces the server) instead of READY."""
        logger.error("%s cannot serve (%s); unloading it", self.name, reason)
        try:
            pb_utils.unload_model(self.name)
        except Exception:
            logger.exception(
                "unloading %s failed: readiness can only report this with tritonserver's --model-control-mode=explicit; "
                "every request is refused with UNAVAILABLE meanwhile",
                self.name,
            )

    def finalize(self) -> None:
        logger.info("%s unloading", self.name)
        self._stopping.set()
        self.worker.close()


class _Link:
    """A request's way out to its client, which also measures what the client gets and when.
    Exactly one final response goes out, whatever happens; then the Triton request and its
    response sender are let go of (the python backend unloads the model only once every one of
    them is gone)."""

    def __init__(
        self,
        request,
        sender,
        wanted: list[str],
        metrics: StreamMetrics,
        forget,
        cancel,
        forwarded: bls.ForwardedStreams,
        forward_id: str | None,
        turn: TurnOutput | None,
    ) -> None:
        self._request, self._sender, self._wanted, self._turn = request, sender, wanted, turn
        self._forwarded, self._forward_id = forwarded, forward_id
        self._stopped = forwarded.start(forward_id)  # a front's CANCEL for this request
        self._errors_in_band = bls.errors_in_band(bls.Control(forward_id), wanted)
        self._metrics, self._forget, self._cancel = metrics, forget, cancel
        self.key = -1
        self._start = time.monotonic()  # csm_stream took the request; Triton's queue time is not known here
        self._frames = 0  # sent so far
        self._prompt_positions: int | None = None  # from the first chunk
        self._responses_sent = 0
        self._cancel_asked = False
        self._lock = threading.Lock()

    def cancel_asked(self) -> bool:
        """Whether the client has cancelled (or gone) and the engine is still to be told. Asked
        under the lock that the final response is sent under: the python backend deletes a
        request's response factory with its final response, and `is_cancelled()` after that
        reads freed memory in tritonserver, which crashed it (SIGSEGV in
        TRITONBACKEND_ResponseFactoryIsCancelled, seen after 8 minutes of bench/soak.py)."""
        with self._lock:
            request = self._request
            if self._cancel_asked or request is None:
                return False
            try:
                self._cancel_asked = self._stopped() or request.is_cancelled()
            except Exception:  # asking failed: the request is gone
                logger.exception("checking for cancellation failed")
                self._cancel_asked = True
            return self._cancel_asked

    def receive(self, message: ChunkOut | Refused) -> None:
        """The engine process's message for this request (on one of the worker client's delivery threads)."""
        match message:
            case Refused(status=Status.INVALID_ARG, message=text):
                self._metrics.invalid_argument(ValueError(text))
                self._end(pb_utils.TritonError(text, pb_utils.TritonError.INVALID_ARG))
            case Refused(status=Status.BUSY, message=text):
                busy = f"{BUSY_MESSAGE}: {text} (max_waiting_requests); retry later"
                self._end(pb_utils.TritonError(busy, pb_utils.TritonError.UNAVAILABLE))
            case Refused(message=text):
                self._metrics.rejected("internal_error")
                self._end(pb_utils.TritonError(f"csm_stream: {text}", pb_utils.TritonError.UNAVAILABLE))
            case ChunkOut(error=str(text)):
                self._metrics.rejected("internal_error")
                self._end(pb_utils.TritonError(f"generation failed: {text}", pb_utils.TritonError.INTERNAL))
            case ChunkOut(finish="cancelled"):
                self._metrics.rejected("cancelled")
                self._end(pb_utils.TritonError("cancelled", pb_utils.TritonError.CANCELLED))
            case ChunkOut():
                self._send_chunk(message)

    def _send_chunk(self, chunk: ChunkOut) -> None:
        outputs = []
        if "AUDIO" in self._wanted:
            outputs.append(pb_utils.Tensor("AUDIO", chunk.audio[None]))
        if "AUDIO_CODES" in self._wanted:
            outputs.append(pb_utils.Tensor("AUDIO_CODES", chunk.codes[None]))
        if "CONTEXT_DROPPED" in self._wanted and chunk.context_dropped is not None:  # the first response
            outputs.append(pb_utils.Tensor("CONTEXT_DROPPED", np.array([[chunk.context_dropped]], dtype=np.int32)))
        if self._turn is not None:
            self._turn.add(chunk.codes)
            if chunk.finish is not None:  # completed: a cancelled or failed stream never gets here
                try:
                    outputs.append(pb_utils.Tensor("TURN", self._turn.tensor()))
                except ValueError as error:  # a turn no reference holds (ServingConfig.signing_key rules it out): still one final response
                    self._metrics.rejected("internal_error")
                    self._end(pb_utils.TritonError(f"signing the turn failed: {error}", pb_utils.TritonError.INTERNAL))
                    return
        response = pb_utils.InferenceResponse(output_tensors=outputs)
        if chunk.finish is not None:
            self._end(response=response)
            self._measure(chunk, last=True)
            return
        with self._lock:
            sender = self._sender
            if sender is None:
                return
            try:
                sender.send(response)
                self._responses_sent += 1
            except Exception as error:  # the client has gone: end the request here, and its generation
                logger.warning("sending a chunk failed (%s); ending the request", error)
                self._metrics.rejected("cancelled")
                self._end_locked(response=None, error=pb_utils.TritonError(f"sending a response failed: {error}"))
                self._cancel(self.key)
                return
        self._measure(chunk, last=False)

    def _end(self, error=None, response=None) -> None:
        with self._lock:
            self._end_locked(response, error)

    def _end_locked(self, response, error) -> None:
        """Send the final response, once; later calls do nothing."""
        sender, self._sender, self._request = self._sender, None, None
        if sender is None:
            return
        try:
            if error is not None and self._errors_in_band:
                response = bls.in_band_error(error)
            elif error is not None:
                response = pb_utils.InferenceResponse(error=error)
            sender.send(response, flags=FINAL) if response is not None else sender.send(flags=FINAL)
        except Exception:
            logger.exception("sending the final response failed")
        self._forwarded.finish(self._forward_id)
        self._forget(self)

    def _measure(self, chunk: ChunkOut, last: bool) -> None:
        """Record a chunk that has just been sent."""
        elapsed_s = time.monotonic() - self._start
        frames = len(chunk.codes)
        if chunk.prompt_positions is not None:
            self._prompt_positions = chunk.prompt_positions
        if frames and not self._frames:
            self._metrics.first_audio(elapsed_s, self._prompt_positions)
        self._frames += frames
        self._metrics.audio_sent(frames)
        if last and self._frames:
            self._metrics.finished(elapsed_s, self._frames)


def _send_error(sender, error, in_band: bool = False) -> None:
    """The request's one final response: `error` (a pb_utils.TritonError), in band for a front's BLS call."""
    response = bls.in_band_error(error) if in_band else pb_utils.InferenceResponse(error=error)
    sender.send(response, flags=FINAL)
