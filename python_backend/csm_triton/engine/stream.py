"""A stream and the messages about it: the one record of a request in the serving loop, what it
delivers, and what the loop's two threads tell each other of it (they share nothing else)."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .pacing import ADAPTIVE, ChunkPlan

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 3  # failed engine steps, or decoder passes, in a row that fail the loop (a broken device)


class LoopFailed(RuntimeError):
    """The loop can no longer serve: a thread failed or it has been closed."""


class Busy(RuntimeError):
    """As many streams as the loop allows are waiting for a slot already; retry later."""


@dataclass(frozen=True)
class Chunk:
    """Consecutive frames of one stream: their codes and, if asked for, their audio."""

    codes: torch.Tensor  # [frames, 32] int64 on the CPU
    audio: torch.Tensor | None  # [frames * 1920] float32 at 24 kHz, None for a codes-only stream
    finish: str | None = None  # on the last chunk: "eos", "length", "cancelled" or "error"
    error: Exception | None = None  # why a stream ended with "error"
    context_dropped: int | None = None  # on a stream's first chunk: its Stream.context_dropped
    prompt_positions: int | None = None  # on a stream's first chunk: its prompt's length (time to first audio by it)


@dataclass(eq=False)
class Stream:
    """A request in the engine process, and its only record there: the prompt and sampling its
    slot reads (it is the engine's `SlotRequest`), how its chunks are cut, where they go, and
    whether it has started and finished.

    A request whose prompt needs Mimi's encoder (context audio) comes without `tokens` and `mask`
    and with `prepare`, which the generation thread runs (it returns them) before the stream may
    take a slot. It has been checked, its prompt's fit included (Generator.stream): the loop and
    the engine trust it."""

    tokens: torch.Tensor | None  # [T, 33] int64 prompt frames; None until prepared
    mask: torch.Tensor | None  # [T, 33] bool
    max_frames: int
    temperature: float
    topk: int
    seed: int
    deliver: Callable[[Chunk], None] | None = field(default=None, repr=False)  # None: a stream that only the engine runs (a bench)
    decode_audio: bool = True
    chunking: ChunkPlan = ADAPTIVE
    prepare: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)
    context_dropped: int = 0  # the request's context segments left out so that its prompt fits (context_overflow)
    started: threading.Event = field(default_factory=threading.Event)  # it has a slot, or has ended
    finished: threading.Event = field(default_factory=threading.Event)  # its last chunk was delivered
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _ended: bool = False  # its last chunk has been handed to `deliver`
    _sent: bool = False  # its first chunk has been handed to `deliver`

    @property
    def prepared(self) -> bool:
        return self.tokens is not None

    @property
    def ended(self) -> bool:
        return self._ended

    def send(self, chunk: Chunk) -> None:
        """`deliver` the chunk unless the stream has ended: every stream gets exactly one last
        chunk and nothing after it, whichever thread ends it (the audio thread, or the thread
        that fails the loop). The first chunk carries `context_dropped` and the prompt's length, so that a receiver that
        holds only the chunks (the engine process's stub) learns it before any audio. Raises what
        `deliver` raises."""
        with self._lock:
            if self._ended:
                return
            if not self._sent:
                positions = None if self.tokens is None else len(self.tokens)
                chunk = dataclasses.replace(chunk, context_dropped=self.context_dropped, prompt_positions=positions)
                self._sent = True
            self._ended = chunk.finish is not None
            self.deliver(chunk)

    def fail(self, error: Exception) -> None:
        """End the stream with an error chunk, if its receiver still takes one."""
        try:
            self.send(Chunk(torch.zeros(0, 0, dtype=torch.long), None, "error", error))
        except Exception:
            logger.exception("delivering an error to a stream failed")


# Messages to the audio thread.


@dataclass(eq=False)
class Frames:
    """Frames of a stream from the generation thread to the audio thread, which advances them
    pass by pass: a whole chunk, or a piece of one (generation sends frames as soon as a pass's
    worth is ready, so that passes find every stream's frames; the audio thread joins the
    pieces)."""

    stream: Stream
    codes: torch.Tensor  # [frames, 32] on the host
    device_codes: torch.Tensor | None = None  # the same on the engine's device, which the decoder shares
    row: int = -1  # the stream's decoder row; -1 for a stream that never had a slot
    finish: str | None = None
    error: Exception | None = None
    first: bool = False  # the stream's first frames: its decoder row starts here
    ends_chunk: bool = True  # the chunk is complete after these frames
    sent_at: float = 0.0  # when generation sent them
    decoded: int = 0  # frames decoded so far
    audio: list[torch.Tensor] = field(default_factory=list)  # their samples, a tensor a pass

    @property
    def frames_left(self) -> int:
        """Frames still to decode; none for a failed chunk or a codes-only or ended stream."""
        if not self.stream.decode_audio or self.stream.ended or self.error is not None:
            return 0
        return len(self.codes) - self.decoded


# Messages to the generation thread.


@dataclass(frozen=True)
class Add:
    stream: Stream


@dataclass(frozen=True)
class Cancel:
    stream: Stream


@dataclass(frozen=True)
class Decoded:
    """The audio thread has decoded and passed on `frames` of the stream; `latency_s` (when they
    completed a chunk, delivered) since its last frame was sent to the decoder; `released` once
    its last chunk is out and its decoder row free."""

    stream: Stream
    frames: int
    latency_s: float | None = None
    released: bool = False


ToGeneration = Add | Cancel | Decoded | None  # None: close, cancelling every stream


class Board:
    """What the threads and the loop's callers share, under one condition: the generation
    thread's inbox, the unfinished streams, the counts that stats() and admission read, each
    thread's busy time, and the loop's end."""

    def __init__(self, slots: int) -> None:
        self.wake = threading.Condition()
        self.inbox: deque[ToGeneration] = deque()
        self.streams: set[Stream] = set()  # added, last chunk not yet delivered
        # Counted together by the generation thread, so that their difference is right even while
        # it admits streams: a waiting stream that takes a free slot changes both.
        self.waiting = 0
        self.free_slots = slots
        self.adds_taken = 0  # additions the generation thread has taken and not yet counted
        self.busy_since: dict[str, float | None] = {"generation": None, "audio": None}
        self.closing = False
        self.failure: LoopFailed | None = None

    def post(self, message: ToGeneration) -> None:
        """Hand a message to the generation thread."""
        with self.wake:
            self.inbox.append(message)
            self.wake.notify_all()

    def waiting_count(self) -> int:
        """Streams without a slot yet (with `wake` held): those the generation thread last
        counted, those it has taken since, and the additions still in its inbox."""
        return self.waiting + self.adds_taken + sum(isinstance(message, Add) for message in self.inbox)

    def busy(self, name: str, since: float | None) -> None:
        with self.wake:
            self.busy_since[name] = since
