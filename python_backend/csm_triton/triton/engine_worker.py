"""The engine process of the csm_stream model (see worker_client.py for why it is one): loads the
model and its serving loop, then serves the Triton stub's messages until told to close or until
the stub is gone.

  python -m csm_triton.triton.engine_worker <fd of its end of the socket pair> <Triton model instance name>
"""

from __future__ import annotations

import ctypes
import dataclasses
import faulthandler
import functools
import logging
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch

from ..engine.generator import Generator, load_csm_1b
from ..engine.prompt import codes_cache_bytes
from ..engine.stream import Busy, Chunk, LoopFailed, Stream
from ..model import checkpoint
from ..model.config import MIB, ModelConfig
from ..model.model import slots_within_budget
from ..request import GenerationRequest, Segment
from .protocol import (
    HEARTBEAT_S,
    Cancel,
    Channel,
    ChunkOut,
    Close,
    Generate,
    Heartbeat,
    Ready,
    Refused,
    StartFailed,
    Status,
    WorkerSettings,
)
from .serving import COMPILE, ServingConfig
from .voices import VoiceClip, read_voices

logger = logging.getLogger("csm_triton.triton.engine_worker")

PR_SET_PDEATHSIG = 1
TRIM_INTERVAL_S = 30.0


def load(settings: WorkerSettings) -> tuple[Generator, Ready]:
    """The engine as csm_stream's parameters ask for it, and what the stub needs to know of it."""
    config: ServingConfig = settings.serving
    root = Path(settings.project_root)
    weights, staged = config.weights_dir(root)
    if not staged:
        if not (weights / checkpoint.CONFIG_FILE).exists():
            raise FileNotFoundError(
                f"no model is staged: no real weights in {config.model_dir!r} and no small random-weight model in {str(weights)!r}. "
                "Stage CSM-1B with `make export` (python -m export fetch --out models/csm-1b), or the small model with "
                f"`make export-tiny` (python -m export tiny --out {weights}), or point the model_dir parameter of config.pbtxt "
                "at a staged directory."
            )
        logger.warning(
            "no real weights staged in %s: serving the small random-weight model in %s, which speaks noise. "
            "Stage CSM-1B with `make export` (python -m export fetch --out models/csm-1b), or point the "
            "model_dir parameter of config.pbtxt at a staged directory.",
            config.model_dir,
            weights,
        )
    device = _device(config, settings)
    dtype = getattr(torch, config.dtype) if config.dtype != "auto" else None
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    model_config = ModelConfig.from_json(checkpoint.resolve(weights).config)
    slots = slots_within_budget(config.slots, config.kv_cache_memory_mb, model_config, dtype)
    limits = config.request_limits(model_config)
    clips = read_voices(root / config.voices_dir, limits) if config.voices_dir else []  # before the long load: fail fast
    generator = load_csm_1b(
        weights,
        device=device,
        dtype=dtype,
        slots=slots,
        cpu_threads=config.cpu_threads or None,
        prefill_chunk=config.prefill_chunk or None,
        limits=limits,
        max_waiting=config.max_waiting_requests,
        stall_timeout_s=config.stall_timeout_s,
        compile=COMPILE[config.compile],
        codes_cache_bytes=codes_cache_bytes(config.codes_cache_mb),
        prefix_cache_bytes=config.prefix_cache_mb * MIB,
        quantize=None if config.quantize == "auto" else config.quantize,
    )
    with torch.inference_mode():  # each voice's clip encoded once, here; requests name it
        for clip in clips:
            codes = _clip_codes(generator, clip).numpy().astype(np.int32)
            generator.voices[clip.name] = Segment(clip.speaker, clip.transcript, codes=codes)
    ready = Ready(slots, device, str(weights), limits, os.getpid(), tuple(generator.voices), generator.prompts.codes_cache.max_bytes)
    return generator, ready


def _clip_codes(generator: Generator, clip: VoiceClip) -> torch.Tensor:
    return generator.prompts.audio_codes(Segment(clip.speaker, clip.transcript, clip.samples, sample_rate=clip.sample_rate))


def _device(config: ServingConfig, settings: WorkerSettings) -> str:
    """ "auto": the GPU Triton gave the instance, else the CPU."""
    if config.device != "auto":
        return config.device
    if settings.instance_kind == "GPU" and torch.cuda.is_available():
        return f"cuda:{settings.instance_device_id}"
    return "cpu"


class _Server:
    """Starts the stub's requests on the Generator and sends their chunks back."""

    def __init__(self, channel: Channel, generator: Generator) -> None:
        self.channel, self.generator = channel, generator
        self._lock = threading.Lock()
        self._streams: dict[int, Stream] = {}  # key -> stream, until its last chunk is sent
        self._served_since_trim = False
        self._trimmed = time.monotonic()  # when the heap was last handed back

    def send(self, message: object) -> None:
        self.channel.send(message)

    def serve(self) -> None:
        """The stub's messages, until Close or until the stub is gone."""
        threading.Thread(target=self._report_forever, name="csm-heartbeat", daemon=True).start()
        while True:
            try:
                message = self.channel.recv()
            except (EOFError, OSError):
                logger.error("the Triton stub is gone; exiting")
                return
            match message:
                case Generate():
                    self._generate(message)
                case Cancel(key):
                    with self._lock:
                        stream = self._streams.get(key)
                    if stream is not None:
                        self.generator.cancel(stream)
                case Close():
                    self.generator.close()
                    return

    def _generate(self, message: Generate) -> None:
        deliver = functools.partial(self._deliver, message.key)
        request = self._with_cached_clips(message)
        if request is None:
            self.send(Refused(message.key, Status.CLIP_UNKNOWN, "a context clip named by its key is not in the codes cache"))
            return
        try:
            stream = self.generator.start_checked(request, deliver, message.decode_audio, message.chunking)
        except ValueError as error:
            self.send(Refused(message.key, Status.INVALID_ARG, str(error)))
            return
        except Busy as error:
            self.send(Refused(message.key, Status.BUSY, str(error)))
            return
        except LoopFailed as error:
            self.send(Refused(message.key, Status.UNAVAILABLE, str(error)))
            return
        except Exception as error:  # this request alone fails
            logger.exception("starting a request failed")
            self.send(Refused(message.key, Status.UNAVAILABLE, f"starting the request failed: {error!r}"))
            return
        with self._lock:
            if not stream.ended:  # else its last chunk is out already
                self._streams[message.key] = stream
            self._served_since_trim = True

    def _with_cached_clips(self, message: Generate) -> GenerationRequest | None:
        """The request with each clip the stub named by its key as the codes the cache holds for
        it (used as they are, like codes a request sends), or None when one is not held."""
        if not message.clips:
            return message.request
        context = list(message.request.context)
        for index, key in message.clips:
            codes = self.generator.prompts.codes_cache.get(key)
            if codes is None:
                return None
            context[index] = Segment(context[index].speaker, context[index].text, codes=codes)
        return dataclasses.replace(message.request, context=context)

    def _deliver(self, key: int, chunk: Chunk) -> None:
        """On the serving loop's threads: raises when the stub cannot be reached, which ends the
        stream (the loop's failed-send path)."""
        codes = chunk.codes.numpy().astype(np.int32)
        audio = chunk.audio.numpy() if chunk.audio is not None else None
        error = None if chunk.error is None else str(chunk.error)
        if chunk.finish is not None:
            with self._lock:
                self._streams.pop(key, None)
        self.send(ChunkOut(key, codes, audio, chunk.finish, error, chunk.context_dropped, chunk.prompt_positions))

    def _report_forever(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            loop, engine = self.generator.stats(), self.generator.engine.stats
            try:
                codes_cache = self.generator.prompts.codes_cache.stats()
                pool = self.generator.engine.prefix_pool
                prefix_pool = pool.stats() if pool is not None else {}
                health = self.generator.health()
                self.send(Heartbeat(dataclasses.asdict(loop), dataclasses.asdict(engine), health, codes_cache, prefix_pool))
            except OSError:
                return
            idle = loop.streams == 0 and self._served_since_trim
            if idle or (loop.streams and time.monotonic() - self._trimmed > TRIM_INTERVAL_S):
                self._served_since_trim, self._trimmed = False, time.monotonic()
                _return_free_memory()


def _return_free_memory() -> None:
    """Hand the heap that requests freed back to the kernel: when the engine goes idle, and every
    TRIM_INTERVAL_S while it is busy. glibc keeps it otherwise (an arena per thread that
    allocated): 150-300 MB of RSS that nothing uses, after a burst of 200 requests or between two
    trims under 8 streams, which the OOM killer and a container's memory limit count all the
    same; RSS then wanders by as much, hiding any real growth. With it, RSS after each of 8 bursts
    settled (1537, 1544, 1547 ... 1560, 1560 MB). A trim under load takes 20-30 ms (2-core CPU)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _die_with_parent() -> None:
    """The stub is this process's parent; when it dies (killed), this process must not live on
    holding the GPU for requests nobody will read."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        logger.warning("prctl(PR_SET_PDEATHSIG) is not available; the engine exits when the stub's socket closes")


def main() -> int:
    channel = Channel(Connection(int(sys.argv[1])))
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the stub closes us
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: every thread's stack, in the server log
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s engine[{os.getpid()}] %(name)s: %(message)s")
    settings = channel.recv()
    try:
        generator, ready = load(settings)
    except Exception as error:
        logger.exception("loading the engine failed")
        message = str(error) if isinstance(error, ValueError) else "".join(traceback.format_exception_only(error)).strip()
        channel.send(StartFailed(message))
        return 1
    channel.send(ready)
    _Server(channel, generator).serve()
    return 0


if __name__ == "__main__":
    # os._exit: torch's and moshi's threads must not hold the exit once the work is done.
    code = main()
    logging.shutdown()
    os._exit(code)
