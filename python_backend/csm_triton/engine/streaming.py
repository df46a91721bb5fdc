"""The serving loop: one thread generates frames, another decodes and delivers audio, so that audio
is sent while frames are still being generated and a request that arrives joins the running
batch at the next frame instead of waiting for the others to finish.

Each thread owns its state and they share nothing but messages:
- the generation thread owns the engine, the streams waiting for a slot, the decoder rows and
  each stream's progress through generation (`_Progress`). It builds the prompts that need
  Mimi's encoder, admits streams, steps the engine and sends each stream's frames to the audio
  thread (`_DecodeJob`s on a queue);
- the audio thread owns the StreamingDecoder and each stream's decoded pieces. It decodes,
  joins the pieces into the asked chunks and delivers them through the stream's `deliver`
  callback, in order, the last one with `finish` set; it tells the generation thread how many
  frames it has decoded (backpressure) and when a stream's last chunk is out (its row is free).
Additions and cancellations reach the generation thread through the same inbox.

Every stream has its own Mimi decoding state (a row of the StreamingDecoder), so the chunks of a
stream joined equal the one-shot decode of its codes.

Faults: a failed engine step, decoder pass, prompt preparation or delivery ends the streams it
concerned with an error chunk, and the loop goes on. Anything else that escapes a thread, or
MAX_CONSECUTIVE_FAILURES failed steps or passes in a row (a broken device), means the thread
cannot go on: the loop fails, every unfinished stream gets an error chunk, additions are
refused with LoopFailed, and `health()` says why. `health()` also reports a thread that has been
busy with one round for longer than `stall_timeout_s`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..model.codec import StreamingDecoder
from .engine import Engine, EngineRequest
from .graphs import DeviceFailed
from .pacing import ADAPTIVE, FRAME_S, PASS_FRAMES, ChunkPlan, Playback, Smoothed, cannot_wait, pass_jobs

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 3
STALL_TIMEOUT_S = 120.0  # longer than any one round: a whole CPU prefill or a long context encode


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


@dataclass(eq=False)
class Stream:
    """One request in the loop: what to generate, how to chunk it and where chunks go.

    A request whose prompt needs Mimi's encoder (context audio) comes without `request` and with
    `prepare`, which the generation thread runs before the stream may take a slot. It has been
    checked, its prompt's fit included (Generator._stream): the loop and the engine trust it."""

    request: EngineRequest | None
    deliver: Callable[[Chunk], None]
    decode_audio: bool = True
    chunking: ChunkPlan = ADAPTIVE
    prepare: Callable[[], EngineRequest] | None = None
    started: threading.Event = field(default_factory=threading.Event)  # it has a slot, or has ended
    finished: threading.Event = field(default_factory=threading.Event)  # its last chunk was delivered
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _ended: bool = False  # its last chunk has been handed to `deliver`

    @property
    def ended(self) -> bool:
        return self._ended

    def send(self, chunk: Chunk) -> None:
        """`deliver` the chunk unless the stream has ended: every stream gets exactly one last
        chunk and nothing after it, whichever thread ends it (the audio thread, or the thread
        that fails the loop). Raises what `deliver` raises."""
        with self._lock:
            if self._ended:
                return
            self._ended = chunk.finish is not None
            self.deliver(chunk)

    def fail(self, error: Exception) -> None:
        """End the stream with an error chunk, if its receiver still takes one."""
        try:
            self.send(Chunk(torch.zeros(0, 0, dtype=torch.long), None, "error", error))
        except Exception:
            logger.exception("delivering an error to a stream failed")


@dataclass(frozen=True)
class LoopStats:
    active_slots: int  # streams generating now
    waiting: int  # submitted, not yet given a slot (being prepared, or waiting in the loop or the engine)
    streams: int  # submitted and not yet finished (waiting, generating or decoding)
    threads_alive: int


# Messages to the generation thread.


@dataclass(frozen=True)
class _Add:
    stream: Stream


@dataclass(frozen=True)
class _Cancel:
    stream: Stream


@dataclass(frozen=True)
class _Decoded:
    stream: Stream
    frames: int


@dataclass(frozen=True)
class _Delivered:
    """A chunk has been delivered, `latency_s` after its last frame was sent to the decoder."""

    latency_s: float


@dataclass(frozen=True)
class _Released:
    """The stream's last chunk is out: its decoder row is free."""

    stream: Stream


@dataclass(frozen=True)
class _Close:
    pass


@dataclass(eq=False)
class _DecodeJob:
    """Frames of a stream on their way through the decoder (the audio thread's work), which
    advances them pass by pass: a whole chunk, or a piece of one (generation sends frames as soon
    as a pass's worth is ready, so that passes find every stream's frames; the audio thread joins
    the pieces)."""

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

    def samples(self) -> torch.Tensor | None:
        if not self.stream.decode_audio or self.error is not None:
            return None
        return torch.cat(self.audio) if self.audio else torch.zeros(0)


@dataclass
class _Progress:
    """A stream's way through generation: the generation thread's, from submission until its
    last chunk is out."""

    request_id: int = -1  # the engine's, once it has been given to the engine
    row: int = -1  # its StreamingDecoder row while it has one
    frames: list[torch.Tensor] = field(default_factory=list)  # generated, not yet sent to the decoder
    device_frames: list[torch.Tensor] = field(default_factory=list)  # the same on the engine's device, unless that is the host
    chunks: int = 0  # chunks completed (all their frames sent to the decoder)
    chunk_sent: int = 0  # frames of the current chunk already sent to the decoder
    decoder_started: bool = False  # its first frames have been sent to the decoder
    decoding: int = 0  # frames sent to the decoder and not yet delivered
    ended: bool = False  # its last job has been sent to the audio thread
    generated: int = 0  # frames generated
    playback: Playback = field(default_factory=Playback)  # its listener, given its complete chunks as they should arrive
    ready_at: float = 0.0  # when it could take a slot


class ServingLoop:
    """Owns an Engine and a StreamingDecoder and the two threads that drive them.

    Decoder rows are twice the engine's slots, so a finished stream's last audio can still be
    decoding while its slot already generates the next request. On the CPU each thread runs
    torch with `cpu_threads` intra-op threads (default: half the cores), so that generating and
    decoding share the cores instead of oversubscribing them: on 2 cores, one thread each made
    8 concurrent tiny-model requests 4.4x as productive as one, against 3.8x with two each.

    Generation hands a stream's frames to the decoder at each of its pass boundaries (every
    PASS_FRAMES frames it has generated) and at its chunks' ends, and the decoder advances every stream together, that many frames a
    call, first chunks before anything else: a new stream's first audio waits for at most one
    pass of the others, and passes find most streams' frames ready. Four frames a row cost no more
    a frame than twelve at eight rows, while a call's cost grows little with its rows (2-core
    CPU, full-size Mimi: the mean pass went from 3 rows to most of 8, and 8 streams from 2.8 to
    3.2 audio-seconds a second).

    Chunks end where each stream's ChunkPlan says (pacing.py), from the listener's slack as the
    generation thread sees it: the audio of the chunks it has sent, each arriving the decoder's
    measured latency after it was sent, against the frame time it measures. Decoder passes serve
    the streams closest to a stall first (pacing.pass_jobs), by the audio thread's own count of
    what it has delivered. `clock` is the loop's time (tests may give it another).

    At most `max_waiting` streams (None: any number) may wait for a slot beyond those that a free
    slot takes at once; `add` refuses more with Busy."""

    def __init__(
        self,
        engine: Engine,
        decoder: StreamingDecoder,
        decoder_rows: int,
        cpu_threads: int | None = None,
        max_waiting: int | None = None,
        stall_timeout_s: float = STALL_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.decoder = decoder
        # The cores this process may run on (a container's cpuset), not the host's; a CFS quota
        # (a Kubernetes CPU limit) is not seen here: set cpu_threads under one.
        self.cpu_threads = cpu_threads or max(1, len(os.sched_getaffinity(0)) // 2)
        self.max_waiting = max_waiting
        self.stall_timeout_s = stall_timeout_s
        self.clock = clock
        # Shared, under _wake: the generation thread's inbox, the unfinished streams, what the
        # generation thread publishes for stats(), each thread's busy time, and the loop's end.
        self._wake = threading.Condition()
        self._inbox: deque[_Add | _Cancel | _Decoded | _Delivered | _Released | _Close] = deque()
        self._streams: set[Stream] = set()  # submitted, last chunk not yet delivered
        # Counted together by the generation thread, so that their difference is right even while
        # it admits streams: a waiting stream that takes a free slot changes both.
        self._waiting_published = 0
        self._free_published = engine.num_slots
        self._adds_taken = 0  # additions the generation thread has taken and not yet counted
        self._busy_since: dict[str, float | None] = {"generation": None, "audio": None}
        self._closing = False
        self._failure: LoopFailed | None = None
        # The generation thread's own.
        self._free_rows = list(range(decoder_rows))
        self._preparing: deque[Stream] = deque()  # for the generation thread to build their prompts
        self._waiting: deque[Stream] = deque()  # ready for a slot
        self._running: dict[int, Stream] = {}  # engine request id -> stream in a slot
        self._progress: dict[Stream, _Progress] = {}
        self._step_failures = 0
        self._frame_s = Smoothed()  # a round that steps the engine
        self._latency = Smoothed()  # from a chunk's last frame sent to the decoder to its delivery
        # The audio thread's own.
        self._jobs: queue.Queue[_DecodeJob | None] = queue.Queue()  # its work; None stops it
        self._backlog: dict[Stream, deque[_DecodeJob]] = {}  # each stream's jobs at the decoder, oldest stream first
        self._parts: dict[Stream, list[_DecodeJob]] = {}  # decoded pieces of the chunk being completed
        self._playback: dict[Stream, Playback] = {}  # what each stream's listener has been given
        self._pass_failures = 0
        self._threads = [
            threading.Thread(target=self._run, args=("generation", self._generate_round), name="csm-generate", daemon=True),
            threading.Thread(target=self._run, args=("audio", self._decode_round), name="csm-decode", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def add(self, stream: Stream) -> Stream:
        """Queue a checked stream; raises Busy when `max_waiting` streams wait already,
        LoopFailed once the loop cannot serve."""
        with self._wake:
            if self._failure is not None:
                raise self._failure
            if self._closing:
                raise LoopFailed("the serving loop is closed")
            if self.max_waiting is not None and self._waiting_count() + 1 - self._free_published > self.max_waiting:
                raise Busy(f"{self.max_waiting} requests are waiting for a slot already")
            self._streams.add(stream)
            self._post(_Add(stream))
        return stream

    def cancel(self, stream: Stream) -> None:
        """Stop a stream; it ends with a "cancelled" chunk within a step."""
        with self._wake:
            self._post(_Cancel(stream))

    def stats(self) -> LoopStats:
        with self._wake:
            return LoopStats(self.engine.active_slots, self._waiting_count(), len(self._streams), sum(t.is_alive() for t in self._threads))

    def health(self) -> str | None:
        """None while the loop serves; otherwise why it cannot."""
        with self._wake:
            if self._failure is not None:
                return str(self._failure)
            busy = dict(self._busy_since)
        for thread in self._threads:
            if not thread.is_alive() and not self._closing:
                return f"the serving loop's thread {thread.name} is not running"
        now = time.monotonic()
        for name, since in busy.items():
            if since is not None and now - since > self.stall_timeout_s:
                limit = self.stall_timeout_s
                return f"the serving loop's {name} thread has been busy with one round for {now - since:.0f} s (stall_timeout_s {limit:g})"
        return None

    def close(self, timeout_s: float = 30.0) -> None:
        """Cancel everything, let the last chunks out, and stop the threads."""
        with self._wake:
            self._closing = True
            self._post(_Close())
        for thread in self._threads:
            thread.join(timeout=timeout_s)

    def _post(self, message: _Add | _Cancel | _Decoded | _Delivered | _Released | _Close) -> None:
        """Hand a message to the generation thread (with _wake held)."""
        self._inbox.append(message)
        self._wake.notify_all()

    def _waiting_count(self) -> int:
        """Streams without a slot yet (with _wake held): those the generation thread last counted,
        those it has taken since, and the additions still in its inbox."""
        pending = sum(isinstance(message, _Add) for message in self._inbox)
        return self._waiting_published + self._adds_taken + pending

    # Both threads.

    def _run(self, name: str, round_: Callable[[], bool]) -> None:
        """A thread's life: rounds until it is told to stop; what escapes a round fails the loop."""
        try:
            if self.engine.device.type == "cpu":
                torch.set_num_threads(self.cpu_threads)  # OpenMP keeps this per calling thread
            elif self.engine.device.type == "cuda":  # the current device is per thread too: graphs replay on its stream
                torch.cuda.set_device(self.engine.device)
            while round_():
                pass
        except Exception as error:
            logger.exception("the serving loop's %s thread failed", name)
            self._fail(error if isinstance(error, LoopFailed) else LoopFailed(f"the serving loop's {name} thread failed: {error!r}"))

    def _fail(self, failure: LoopFailed) -> None:
        """The loop cannot go on: every unfinished stream ends with the error, the threads stop."""
        with self._wake:
            if self._failure is None:
                self._failure = failure
            streams = list(self._streams)
            self._wake.notify_all()
        self._jobs.put(None)
        for stream in streams:
            stream.fail(failure)
            stream.started.set()
            stream.finished.set()
        with self._wake:
            self._streams.difference_update(streams)

    def _busy(self, name: str, busy: bool) -> None:
        with self._wake:
            self._busy_since[name] = time.monotonic() if busy else None

    # The generation thread. Each round is a method of its own: a local left over from the last
    # round would keep a finished stream, and with it Triton's request and response sender, alive
    # while the thread waits, and Triton unloads the model only once every one is gone.

    def _generate_round(self) -> bool:
        """Wait for work, take the inbox, prepare one new stream's prompt, admit waiting streams,
        step the engine once; False once closed and done, or failed."""
        with self._wake:
            self._wake.wait_for(lambda: self._failure is not None or self._inbox or self._preparing or self._can_step())
            if self._failure is not None:
                return False
            messages, self._inbox = self._inbox, deque()
            self._adds_taken = sum(isinstance(message, _Add) for message in messages)
            self._busy_since["generation"] = time.monotonic()
        began = self.clock()
        for message in messages:
            self._handle(message)
        self._prepare_next()
        if self._can_step():
            while self._admissible() and not self._admission_waits():
                self._start(self._waiting.popleft())
            self._publish()  # before the step: the admitted streams' `started` is set already
            self._step()
            self._frame_s.add(self.clock() - began)
        self._publish()
        self._busy("generation", False)
        if self._closing and not self._progress:
            self._jobs.put(None)
            return False
        return True

    def _handle(self, message: _Add | _Cancel | _Decoded | _Delivered | _Released | _Close) -> None:
        match message:
            case _Add(stream):
                self._progress[stream] = _Progress(ready_at=self.clock())
                (self._waiting if stream.request is not None else self._preparing).append(stream)
            case _Cancel(stream):
                self._cancel(stream)
            case _Decoded(stream, frames):
                if stream in self._progress:
                    self._progress[stream].decoding -= frames
            case _Delivered(latency_s):
                self._latency.add(latency_s)
            case _Released(stream):
                progress = self._progress.pop(stream)
                if progress.row >= 0:
                    self._free_rows.append(progress.row)
            case _Close():
                for stream in list(self._progress):
                    self._cancel(stream)

    def _cancel(self, stream: Stream) -> None:
        progress = self._progress.get(stream)
        if progress is None or progress.ended:
            return
        for queued in (self._preparing, self._waiting):
            if stream in queued:
                queued.remove(stream)
                self._end(stream, "cancelled")
                return
        self.engine.cancel(progress.request_id)

    def _publish(self) -> None:
        """Count, for stats(), the streams that have no slot yet."""
        with self._wake:
            self._waiting_published = len(self._preparing) + len(self._waiting)
            self._free_published = self.engine.num_slots - self.engine.active_slots
            self._adds_taken = 0

    def _prepare_next(self) -> None:
        """Build the prompt of the oldest stream that needs one (its context audio encoded here:
        this thread has time to spare while the decoder is behind, the audio thread has none, and
        a third thread would only compete for the same cores), then queue it for a slot."""
        if not self._preparing:
            return
        stream = self._preparing.popleft()
        try:
            with torch.inference_mode():
                request = stream.prepare()
        except Exception as error:
            logger.exception("preparing a request failed")
            self._end(stream, "error", error)
            return
        stream.request = request
        self._progress[stream].ready_at = self.clock()
        self._waiting.append(stream)

    def _can_step(self) -> bool:
        return bool(self._admissible() or self._running) and not self._decoder_behind()

    def _decoder_behind(self) -> bool:
        """Whether some stream has more than two chunks waiting for the decoder. Generation then
        waits, since running ahead of the decoder would only queue audio and take the cores the
        decoder needs; but never while a stream has yet to send its first chunk, which is what
        its caller is waiting for (a step costs about the same for one stream as for all), nor
        while one is about to stall for want of frames."""
        now = self.clock()
        running = [(stream, self._progress[stream]) for stream in self._running.values()]
        if any(progress.chunks == 0 or self._starved(progress, now) for _, progress in running):
            return False
        return any(stream.decode_audio and progress.decoding > 2 * stream.chunking.max_frames for stream, progress in running)

    def _starved(self, progress: _Progress, now: float) -> bool:
        """Its listener is about to run out (the same test as a chunk's end) and the decoder holds
        less than a pass of its frames: only generation can keep it playing."""
        return progress.decoding < PASS_FRAMES and cannot_wait(self._slack(progress, now), self._frame_s.value)

    def _slack(self, progress: _Progress, now: float) -> float:
        """The audio the stream's listener would have left when a chunk sent now arrived."""
        return progress.playback.slack(now + self._latency.value)

    def _admissible(self) -> bool:
        """A stream waits and the engine has a free slot (and the decoder a free row) for it."""
        return bool(self._waiting) and bool(self._free_rows) and self.engine.free_slots > 0

    def _admission_waits(self) -> bool:
        """Whether the next waiting stream stays out of the engine for this step: while a running
        stream is about to stall for want of frames, since a new prompt's prefill would lengthen
        the step it needs, but for one frame's playback time at most, so that a new request's
        first audio is never held for long."""
        now = self.clock()
        if now - self._progress[self._waiting[0]].ready_at >= FRAME_S:
            return False
        return any(self._starved(self._progress[stream], now) for stream in self._running.values() if self._progress[stream].chunks)

    def _start(self, stream: Stream) -> None:
        progress = self._progress[stream]
        progress.row = min(self._free_rows)  # the lowest rows: the decoder runs only the span in use
        self._free_rows.remove(progress.row)
        progress.request_id = self.engine.start(stream.request)
        self._running[progress.request_id] = stream
        stream.started.set()

    def _step(self) -> None:
        """One engine step; its frames go to the streams' decoder jobs. A failed step ends the
        streams it ran, and the engine goes on without them."""
        try:
            results = self.engine.step()
        except Exception as error:
            logger.exception("engine step failed")
            for request_id in self.engine.abort():
                self._end(self._running[request_id], "error", error)
            self._step_failures += 1
            if isinstance(error, DeviceFailed):  # nothing more can run on this device
                raise LoopFailed(f"the device failed: {error}") from error
            if self._step_failures >= MAX_CONSECUTIVE_FAILURES:
                raise LoopFailed(f"{self._step_failures} engine steps in a row failed, the last with {error!r}") from error
            return
        self._step_failures = 0
        now = self.clock()
        for result in results:
            stream = self._running.get(result.request_id)
            if stream is None:
                continue
            stream.started.set()
            progress = self._progress[stream]
            if result.codes is not None:
                progress.frames.append(result.codes)
                if stream.decode_audio and result.device_codes is not None:
                    progress.device_frames.append(result.device_codes)
                progress.generated += 1
            chunk_frames = progress.chunk_sent + len(progress.frames)
            if result.finish is not None:
                self._end(stream, result.finish)
            elif stream.chunking.ends(progress.chunks, chunk_frames, progress.generated, self._slack(progress, now), self._frame_s.value):
                self._send(stream, ends_chunk=True)
            elif progress.generated % PASS_FRAMES == 0:  # a pass boundary: every 4 frames hold one
                self._send(stream, ends_chunk=False)

    def _send(self, stream: Stream, ends_chunk: bool, finish: str | None = None, error: Exception | None = None) -> None:
        progress = self._progress[stream]
        codes = torch.stack(progress.frames) if progress.frames else _no_codes(self.engine)
        device_codes = torch.stack(progress.device_frames) if progress.device_frames else None
        first, now = not progress.decoder_started, self.clock()
        self._jobs.put(_DecodeJob(stream, codes, device_codes, progress.row, finish, error, first, ends_chunk, now))
        progress.decoder_started = True
        progress.decoding += len(codes)
        progress.frames, progress.device_frames = [], []
        if ends_chunk:
            progress.playback.add(progress.chunk_sent + len(codes), now + self._latency.value)
            progress.chunks += 1
            progress.chunk_sent = 0
        else:
            progress.chunk_sent += len(codes)

    def _end(self, stream: Stream, finish: str, error: Exception | None = None) -> None:
        """Send the stream's last job; it leaves the engine's bookkeeping here."""
        progress = self._progress[stream]
        self._running.pop(progress.request_id, None)
        progress.ended = True
        stream.started.set()
        self._send(stream, True, finish, error)

    # The audio thread.

    def _decode_round(self) -> bool:
        """Take the queued jobs, deliver what is decoded, run one decoder pass; False once told to stop."""
        if not self._take_jobs(block=not self._backlog):
            return False
        self._busy("audio", True)
        self._deliver_ready()
        frames, jobs = self._next_pass()
        if jobs:
            self._run_pass(frames, jobs)
            self._deliver_ready()
        self._busy("audio", False)
        return True

    def _take_jobs(self, block: bool) -> bool:
        """Move the queued jobs to each stream's backlog; False once told to stop."""
        jobs = [self._jobs.get()] if block else []
        while not self._jobs.empty():
            jobs.append(self._jobs.get_nowait())
        if None in jobs:
            return False
        starting = [job for job in jobs if job.first and job.row >= 0 and job.stream.decode_audio]
        try:
            self.decoder.start([job.row for job in starting])
        except Exception as error:  # these streams fail; the thread goes on
            logger.exception("starting decoder rows failed")
            for job in starting:
                job.error = error
        for job in jobs:
            self._backlog.setdefault(job.stream, deque()).append(job)
        return True

    def _next_pass(self) -> tuple[int, list[_DecodeJob]]:
        """The jobs to advance by one decoder call, and by how many frames (pacing.pass_jobs): a
        stream's first chunk or one whose listener is about to run out first."""
        now = self.clock()
        heads = [backlog[0] for backlog in self._backlog.values()]
        slack = [self._playback.get(job.stream, Playback()).slack(now) for job in heads]
        frames, chosen = pass_jobs([job.frames_left for job in heads], slack)
        return frames, [heads[index] for index in chosen]

    @torch.inference_mode()
    def _run_pass(self, frames: int, jobs: list[_DecodeJob]) -> None:
        # The codes where the engine made them: on a GPU they never leave it on their way to Mimi.
        sources = [job.codes if job.device_codes is None else job.device_codes for job in jobs]
        codes = torch.stack([source[job.decoded : job.decoded + frames] for job, source in zip(jobs, sources, strict=True)])
        try:
            audio = self.decoder.decode([job.row for job in jobs], codes)
        except Exception as error:
            logger.exception("audio decode failed")
            for job in jobs:
                job.error = error
            self._pass_failures += 1
            if self._pass_failures >= MAX_CONSECUTIVE_FAILURES:
                raise LoopFailed(f"{self._pass_failures} decoder passes in a row failed, the last with {error!r}") from error
            return
        self._pass_failures = 0
        for job, samples in zip(jobs, audio, strict=True):
            job.audio.append(samples)
            job.decoded += frames

    def _deliver_ready(self) -> None:
        """Deliver, in each stream's order, every chunk that needs no more decoding."""
        for stream, backlog in list(self._backlog.items()):
            while backlog and not backlog[0].frames_left:
                self._deliver(backlog.popleft())
            if not backlog:
                del self._backlog[stream]

    def _deliver(self, job: _DecodeJob) -> None:
        """Pass a decoded job on: kept until its chunk is complete, then delivered as one chunk.
        A chunk the receiver fails to take, or one that carries an error, is the stream's last:
        its generation is cancelled, and its own last job only frees its row."""
        stream = job.stream
        with self._wake:
            self._post(_Decoded(stream, len(job.codes)))
        parts = self._parts.setdefault(stream, [])
        parts.append(job)
        if not job.ends_chunk and job.error is None:
            return
        chunk = _chunk_of(parts)
        del self._parts[stream]
        try:
            stream.send(chunk)
        except Exception as error:  # the receiver is gone (a closed connection)
            logger.exception("delivering a chunk failed; ending the stream")
            stream.fail(error)
        now = self.clock()
        self._playback.setdefault(stream, Playback()).add(len(chunk.codes), now)
        with self._wake:
            self._post(_Delivered(now - job.sent_at))
        if job.finish is None and stream.ended:
            self.cancel(stream)
        if job.finish is not None:
            del self._playback[stream]
            stream.started.set()
            stream.finished.set()
            with self._wake:
                self._streams.discard(stream)
                self._post(_Released(stream))


def _chunk_of(parts: list[_DecodeJob]) -> Chunk:
    """One chunk from the decoded jobs that complete it; the last one says how it ends."""
    last = parts[-1]
    codes = torch.cat([part.codes for part in parts])
    if last.error is not None:
        return Chunk(codes, None, "error", last.error)
    audio = torch.cat([part.samples() for part in parts]) if last.stream.decode_audio else None
    return Chunk(codes, audio, last.finish)


def _no_codes(engine: Engine) -> torch.Tensor:
    return torch.zeros(0, engine.num_codebooks, dtype=torch.long)
