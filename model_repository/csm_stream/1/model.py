"""Triton python-backend adapter for CSM, streaming (decoupled): parses request tensors, hands
each request to the generator's serving loop and sends its audio chunks as they are made.

execute() returns once every request it was given has a slot: the requests beyond the slots wait
in Triton's queue, where max_queue_size bounds them."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from csm_metrics import StreamMetrics  # beside this file: the stub puts the model directory on sys.path

from csm_triton import bls, checkpoint, load_csm_1b
from csm_triton.config import ModelConfig
from csm_triton.serving import INPUTS, ServingConfig, parse_chunking, parse_request
from csm_triton.streaming import Chunk

logger = logging.getLogger("csm_triton.triton")

# The project root: relative paths in config.pbtxt parameters are taken from here.
PROJECT_ROOT = Path(__file__).resolve().parents[3]
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
METRICS_INTERVAL_S = 0.5


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <stub pid>`: every thread's stack, in the server log
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
        dtype = self._dtype(device)
        slots = self.config.kv_cache_slots(ModelConfig.from_json(checkpoint.resolve(weights).config), dtype)
        self.generator = load_csm_1b(
            weights,
            device=device,
            dtype=dtype,
            slots=slots,
            cpu_threads=self.config.cpu_threads or None,
            prefill_chunk=self.config.prefill_chunk or None,
        )
        self.metrics = StreamMetrics(slots)
        self.forwarded = bls.ForwardedStreams()
        self._start_reporter()
        logger.info("csm_stream ready on %s with %d slots, weights %s", device, slots, weights)

    def _device(self, args: dict) -> str:
        if self.config.device != "auto":
            return self.config.device
        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            return f"cuda:{args['model_instance_device_id']}"
        return "cpu"

    def _dtype(self, device: str) -> torch.dtype:
        """The weights' and KV caches' dtype, resolved here (as load_csm_1b would: bfloat16 on CUDA,
        float32 on the CPU) because the KV-cache budget depends on it."""
        if self.config.dtype != "auto":
            return getattr(torch, self.config.dtype)
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32

    def execute(self, requests: list) -> None:
        streams = []
        for request in requests:
            sender = request.get_response_sender()
            control = bls.Control.of(request)
            if control.is_control:
                self._answer_control(control, sender)
                continue
            try:
                arrays = {
                    name: tensor.as_numpy() for name in INPUTS if (tensor := pb_utils.get_input_tensor_by_name(request, name)) is not None
                }
                generation = parse_request(arrays, self.config, self.generator.engine.vocab_size)
                first_chunk_frames, chunk_frames = parse_chunking(arrays, self.config)
                wanted = request.requested_output_names()
                link = _Link(request, sender, wanted, self.metrics, self.forwarded, control.forward_id)
                streams.append(
                    self.generator.submit(generation, link.deliver, "AUDIO" in wanted, first_chunk_frames, chunk_frames, link.is_cancelled)
                )
            except ValueError as error:
                self.forwarded.finish(control.forward_id)
                self.metrics.invalid_argument(error)
                error_response = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG))
                sender.send(error_response, flags=FINAL)
            except Exception as error:  # this request alone fails; the others of the call go on
                logger.exception("preparing a request failed")
                self.forwarded.finish(control.forward_id)
                self.metrics.rejected("internal_error")
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"preparing the request failed: {error}")), flags=FINAL)
        for stream in streams:
            stream.started.wait()
        return None

    def _answer_control(self, control: bls.Control, sender) -> None:
        """A front's CANCEL or PROBE (csm_triton/bls.py), answered at once with one final response."""
        if control.cancel is not None:
            self.forwarded.cancel(control.cancel)
            sender.send(flags=FINAL)
            return
        alive = self.generator.stats().threads_alive
        problem = "it is unloading" if self._stopping.is_set() else f"its serving loop has stopped ({alive} of 2 threads alive)"
        if self._stopping.is_set() or alive < 2:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"csm_stream cannot serve: {problem}")), flags=FINAL)
            return
        sender.send(flags=FINAL)

    def _start_reporter(self) -> None:
        """A thread that passes the metrics on to Triton (csm_metrics.py), and notices when the
        server has died under us."""
        self._stopping = threading.Event()
        server = os.getppid()

        def report_forever() -> None:
            while not self._stopping.wait(METRICS_INTERVAL_S):
                if os.getppid() != server:
                    # tritonserver died without unloading us: a stub left running would keep
                    # generating (and holding the GPU) for requests nobody will read.
                    logger.error("tritonserver (pid %d) is gone; exiting", server)
                    os._exit(1)
                try:
                    self.metrics.report(self.generator.stats(), self.generator.engine.stats)
                except Exception:  # a failed metrics call must not stop the watchdog
                    logger.exception("reporting metrics failed")

        self._reporter = threading.Thread(target=report_forever, name="csm-metrics", daemon=True)
        self._reporter.start()

    def finalize(self) -> None:
        logger.info("csm_stream unloading")
        self._stopping.set()
        self.generator.close()


class _Link:
    """A request's way out to its client, which also measures what the client gets and when. It
    lets go of the Triton request and its response sender with the final response: the python
    backend unloads the model only once every one of them is gone, so a finished stream that
    something still holds must not hold them."""

    def __init__(
        self, request, sender, wanted: list[str], metrics: StreamMetrics, forwarded: bls.ForwardedStreams, forward_id: str | None
    ) -> None:
        self._request, self._sender, self._wanted = request, sender, wanted
        self._metrics = metrics
        self._forwarded, self._forward_id = forwarded, forward_id
        self._stopped = forwarded.start(forward_id)  # a front's CANCEL for this stream
        self._start = time.monotonic()  # csm_stream took the request; Triton's queue time is not known here
        self._frames = 0  # sent so far

    def deliver(self, chunk: Chunk) -> None:
        sender = self._sender
        if chunk.finish is not None:  # the last chunk, an error's included
            self._request = self._sender = None
            self._forwarded.finish(self._forward_id)
        if sender is None:
            return
        try:
            _send_chunk(sender, self._wanted, chunk)
        except Exception:  # the client has gone; the loop cancels the stream and sends it nothing more
            self._metrics.rejected("cancelled")
            raise
        self._measure(chunk, time.monotonic() - self._start)

    def _measure(self, chunk: Chunk, elapsed_s: float) -> None:
        """Record a chunk that has just been sent (errors and cancellations send no audio)."""
        if chunk.error is not None:
            self._metrics.rejected("internal_error")
            return
        if chunk.finish == "cancelled":
            self._metrics.rejected("cancelled")
            return
        frames = len(chunk.codes)
        if frames and not self._frames:
            self._metrics.first_audio(elapsed_s)
        self._frames += frames
        self._metrics.audio_sent(frames)
        if chunk.finish is not None and self._frames:
            self._metrics.finished(elapsed_s, self._frames)

    def is_cancelled(self) -> bool:
        request = self._request
        return request is not None and (self._stopped() or request.is_cancelled())


def _send_chunk(sender, wanted: list[str], chunk: Chunk) -> None:
    if chunk.error is not None:
        sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generation failed: {chunk.error}")), flags=FINAL)
        return
    if chunk.finish == "cancelled":
        sender.send(flags=FINAL)
        return
    outputs = []
    if "AUDIO" in wanted:
        outputs.append(pb_utils.Tensor("AUDIO", chunk.audio.numpy()[None]))
    if "AUDIO_CODES" in wanted:
        outputs.append(pb_utils.Tensor("AUDIO_CODES", chunk.codes.numpy().astype(np.int32)[None]))
    sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL if chunk.finish is not None else 0)
