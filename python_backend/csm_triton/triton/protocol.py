"""The messages between csm_stream's stub and its engine process, and the channel they travel on.

One module for both sides, so that the two processes cannot disagree on a message: the stub
(worker_client.py, no torch) sends WorkerSettings once, then Generate, Cancel and Close; the
engine process (engine_worker.py) answers Ready or StartFailed once, then Refused, ChunkOut and
Heartbeat. Requests are checked at the edge (the stub's serving.read_request) and trusted here.
Status crosses as a `Status` code, never as message text to be recognised again; the text is for
people. Audio and codes travel as numpy arrays, pickled by value.
"""

from __future__ import annotations

import enum
import pickle
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from ..engine.pacing import ChunkPlan
from ..request import GenerationRequest, RequestLimits

HEARTBEAT_S = 0.5  # how often the worker reports its stats and health


class Status(enum.Enum):
    """Why a request ended without all its audio; csm_stream maps each to a Triton error code."""

    INVALID_ARG = "invalid_arg"  # it can never run; the message starts with the field at fault
    BUSY = "busy"  # max_waiting_requests wait for a slot already; retry later
    UNAVAILABLE = "unavailable"  # the engine cannot serve now (failed, closing, or gone)
    INTERNAL = "internal"  # generation failed part-way
    CANCELLED = "cancelled"  # its client cancelled
    CLIP_UNKNOWN = "clip_unknown"  # a clip named by its key is not in the codes cache: the stub sends it whole


class Channel:
    """One end of the socket pair between stub and worker: whole messages, sent from any thread.

    A message is pickled with the standard pickler (multiprocessing's own would pass torch
    tensors as shared-memory handles, which only its own child processes can open), its numpy
    arrays out of band (pickle protocol 5): each goes to the socket from its own memory, and is
    read back into a buffer the unpickled array then uses, instead of being copied into the
    pickle's bytes on one side and out of them on the other."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._send_lock = threading.Lock()

    def send(self, message: Any) -> None:
        buffers: list[pickle.PickleBuffer] = []
        data = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
        with self._send_lock:
            self.connection.send_bytes(len(buffers).to_bytes(4, "little") + data)
            for buffer in buffers:
                self.connection.send_bytes(buffer.raw())

    def recv(self) -> Any:
        data = self.connection.recv_bytes()
        buffers = [self.connection.recv_bytes() for _ in range(int.from_bytes(data[:4], "little"))]
        return pickle.loads(memoryview(data)[4:], buffers=buffers)

    def poll(self, timeout_s: float) -> bool:
        return self.connection.poll(timeout_s)


# To the worker.


@dataclass(frozen=True)
class WorkerSettings:
    """What the worker needs to load the engine; `serving` is the model's ServingConfig."""

    serving: Any
    project_root: str
    instance_name: str = "csm_stream"  # Triton's model_instance_name, also in the process's command line
    instance_kind: str = "CPU"  # Triton's model_instance_kind
    instance_device_id: int = 0


@dataclass(frozen=True)
class Generate:
    """A request to run, already checked against Ready.limits; its `voice` is one of Ready.voices,
    whose clip's codes the worker holds. `clips` names context segments by index whose audio the
    stub has sent before and leaves out now, each by its content key (request.audio_key): the
    worker takes their codes from its codes cache, or refuses with Status.CLIP_UNKNOWN."""

    key: int
    request: GenerationRequest
    decode_audio: bool
    chunking: ChunkPlan
    clips: tuple[tuple[int, str], ...] = ()


@dataclass(frozen=True)
class Cancel:
    key: int


@dataclass(frozen=True)
class Close:
    pass


# From the worker.


@dataclass(frozen=True)
class Ready:
    """The engine is loaded: what the Triton model needs to know of it."""

    slots: int
    device: str
    weights: str
    limits: RequestLimits  # what the stub checks every request against, once
    pid: int = 0
    voices: tuple[str, ...] = ()  # the voice library's names; their codes stay in the worker
    codes_cache_bytes: int = 0  # the codes cache's bound; 0: no clip is ever named by its key


@dataclass(frozen=True)
class StartFailed:
    message: str


@dataclass(frozen=True)
class Refused:
    """A request that ended without audio: never started (INVALID_ARG for a prompt too long for
    the model, BUSY, UNAVAILABLE), or, made in the stub, lost with its engine process."""

    key: int
    status: Status
    message: str


@dataclass(frozen=True)
class ChunkOut:
    """One chunk of a stream, as streaming.Chunk with numpy arrays; the last has `finish` set, and
    one that ends in an error its message (finish "error": Status.INTERNAL)."""

    key: int
    codes: np.ndarray  # [frames, 32] int32
    audio: np.ndarray | None  # [frames * 1920] float32, None for a codes-only stream
    finish: str | None = None
    error: str | None = None
    context_dropped: int | None = None  # on the first chunk: the request's context segments left out (context_overflow)
    prompt_positions: int | None = None  # on the first chunk: the prompt's length


@dataclass(frozen=True)
class Heartbeat:
    loop: dict  # streaming.LoopStats as a dict
    engine: dict  # engine.EngineStats as a dict
    health: str | None  # ServingLoop.health(): None while it serves
    codes_cache: dict = field(default_factory=dict)  # prompt.CodesCache.stats()
    prefix_pool: dict = field(default_factory=dict)  # prefix_pool.PrefixPool.stats(); empty without a pool
