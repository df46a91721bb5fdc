"""The serving loop: one thread steps the engine, another decodes audio, so that audio is sent
while frames are still being generated and a request that arrives joins the running batch at the
next frame instead of waiting for the others to finish.

Every stream has its own Mimi decoding state (a row of the StreamingDecoder), so the chunks of a
stream joined equal the one-shot decode of its codes. Callers see a stream only through its
`deliver` callback, called in order from the loop's threads; the last chunk has `finish` set.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .codec import StreamingDecoder
from .engine import Engine, EngineRequest
from .request import CHUNK_FRAMES, FIRST_CHUNK_FRAMES

logger = logging.getLogger(__name__)


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
    `prepare`, which the generation thread runs before the stream may take a slot. Its chunk sizes
    have been checked (request.check_chunking)."""

    request: EngineRequest | None
    deliver: Callable[[Chunk], None]
    decode_audio: bool = True
    first_chunk_frames: int = FIRST_CHUNK_FRAMES
    chunk_frames: int = CHUNK_FRAMES
    is_cancelled: Callable[[], bool] = lambda: False
    prepare: Callable[[], EngineRequest] | None = None
    started: threading.Event = field(default_factory=threading.Event)  # it has a slot, or has ended
    finished: threading.Event = field(default_factory=threading.Event)  # its last chunk was delivered
    request_id: int = -1
    row: int = -1  # its StreamingDecoder row while audio is being decoded
    frames: list[torch.Tensor] = field(default_factory=list)  # generated, not yet sent to the decoder
    chunks: int = 0  # chunks completed (all their frames sent to the decoder)
    chunk_sent: int = 0  # frames of the current chunk already sent to the decoder
    decoder_started: bool = False  # its first frames have been sent to the decoder
    decoding: int = 0  # frames sent to the decoder and not yet delivered
    parts: list[_DecodeJob] = field(default_factory=list)  # decoded pieces of the chunk being completed (audio thread)
    silenced: bool = False  # its receiver failed or it has been told of an error: deliver nothing more

    @property
    def next_chunk_frames(self) -> int:
        return self.first_chunk_frames if self.chunks == 0 else self.chunk_frames


@dataclass(eq=False)
class _DecodeJob:
    """Frames of a stream on their way through the decoder, which advances them pass by pass:
    a whole chunk, or a piece of one (generation sends frames as soon as a pass's worth is
    ready, so that passes find every stream's frames; the audio thread joins the pieces)."""

    stream: Stream
    codes: torch.Tensor  # [frames, 32]
    finish: str | None = None
    error: Exception | None = None
    first: bool = False  # the stream's first frames: its decoder row starts here
    first_chunk: bool = False  # part of its first chunk, which goes before all other work
    ends_chunk: bool = True  # the chunk is complete after these frames
    decoded: int = 0  # frames decoded so far
    audio: list[torch.Tensor] = field(default_factory=list)  # their samples, a tensor a pass

    @property
    def frames_left(self) -> int:
        """Frames still to decode; none for a failed chunk or a codes-only or silenced stream."""
        if not self.stream.decode_audio or self.stream.silenced or self.error is not None:
            return 0
        return len(self.codes) - self.decoded

    def samples(self) -> torch.Tensor | None:
        if not self.stream.decode_audio or self.error is not None:
            return None
        return torch.cat(self.audio) if self.audio else torch.zeros(0)


@dataclass(frozen=True)
class LoopStats:
    active_slots: int  # streams generating now
    waiting: int  # submitted, not yet given a slot (in the loop's queue or the engine's)
    streams: int  # submitted and not yet finished (waiting, generating or decoding)
    threads_alive: int


class ServingLoop:
    """Owns an Engine and a StreamingDecoder and the two threads that drive them.

    Decoder rows are twice the engine's slots, so a finished stream's last audio can still be
    decoding while its slot already generates the next request. On the CPU each thread runs
    torch with `cpu_threads` intra-op threads (default: half the cores), so that generating and
    decoding share the cores instead of oversubscribing them: on 2 cores, one thread each made
    8 concurrent tiny-model requests 4.4x as productive as one, against 3.8x with two each.

    Generation hands frames to the decoder as soon as a stream has DECODE_PASS_FRAMES of them (or
    its chunk is complete), and the decoder advances every stream together, that many frames a
    call, first chunks before anything else: a new stream's first audio waits for at most one
    pass of the others, and passes find most streams' frames ready. Four frames a row cost no more
    a frame than twelve at eight rows, while a call's cost grows little with its rows (2-core
    CPU, full-size Mimi: the mean pass went from 3 rows to most of 8, and 8 streams from 2.8 to
    3.2 audio-seconds a second)."""

    DECODE_PASS_FRAMES = 4

    def __init__(self, engine: Engine, decoder: StreamingDecoder, decoder_rows: int, cpu_threads: int | None = None) -> None:
        self.engine = engine
        self.decoder = decoder
        # The cores this process may run on (a container's cpuset), not the host's; a CFS quota
        # (a Kubernetes CPU limit) is not seen here: set cpu_threads under one.
        self.cpu_threads = cpu_threads or max(1, len(os.sched_getaffinity(0)) // 2)
        self._free_rows = list(range(decoder_rows))
        self._preparing: deque[Stream] = deque()  # for the generation thread to build their prompts
        self._waiting: deque[Stream] = deque()  # ready for a slot
        self._running: dict[int, Stream] = {}  # engine request id -> stream
        self._unfinished = 0
        self._wake = threading.Condition()
        self._jobs: queue.Queue[_DecodeJob | None] = queue.Queue()  # the audio thread's work; None stops it
        self._backlog: dict[int, deque[_DecodeJob]] = {}  # id(stream) -> its chunks at the decoder, oldest stream first
        self._closed = False
        self._threads = [
            threading.Thread(target=self._generate_forever, name="csm-generate", daemon=True),
            threading.Thread(target=self._decode_forever, name="csm-decode", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, stream: Stream) -> Stream:
        """Queue a stream; raises ValueError (naming the field) if it can never run. A stream to
        prepare must have been checked by the caller (`Engine.check_fields`)."""
        if stream.request is not None:
            self.engine.check(stream.request)
        with self._wake:
            if self._closed:
                raise RuntimeError("the serving loop is closed")
            self._unfinished += 1
            (self._waiting if stream.request is not None else self._preparing).append(stream)
            self._wake.notify_all()
        return stream

    def cancel(self, stream: Stream) -> None:
        """Stop a stream; it ends with a "cancelled" chunk within a step."""
        with self._wake:
            for queued in (self._preparing, self._waiting):
                if stream in queued:
                    queued.remove(stream)
                    self._jobs.put(_DecodeJob(stream, _no_codes(self.engine), finish="cancelled"))
                    return
            if stream.request_id >= 0:
                self.engine.cancel(stream.request_id)

    def stats(self) -> LoopStats:
        with self._wake:
            starting = sum(not stream.started.is_set() for stream in self._running.values())
            waiting = len(self._preparing) + len(self._waiting) + starting
            return LoopStats(self.engine.active_slots, waiting, self._unfinished, sum(t.is_alive() for t in self._threads))

    def close(self) -> None:
        """Cancel everything, let the last chunks out, and stop the threads."""
        for stream in self._unfinished_streams():
            self.cancel(stream)
        with self._wake:
            self._wake.wait_for(lambda: self._unfinished == 0, timeout=30)
            self._closed = True
            self._wake.notify_all()
        self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=30)

    # The generation thread.

    def _use_cpu_threads(self) -> None:
        if self.engine.device.type == "cpu":
            torch.set_num_threads(self.cpu_threads)  # OpenMP keeps this per calling thread

    # Each thread's work between two waits is a method of its own: a local left over from the
    # last round would keep a finished stream, and with it Triton's request and response sender,
    # alive while the thread waits, and Triton unloads the model only once every one is gone.

    def _generate_forever(self) -> None:
        self._use_cpu_threads()
        while self._generate_round():
            pass

    def _generate_round(self) -> bool:
        """Wait for work, prepare one new stream's prompt, admit waiting streams, step the engine
        once; False once closed."""
        with self._wake:
            self._wake.wait_for(lambda: self._closed or self._preparing or self._can_step())
            if self._closed:
                return False
        self._prepare_next()
        with self._wake:
            if not self._can_step():
                return True
            while self._admissible():
                self._start(self._waiting.popleft())
        self._poll_cancellations()
        try:
            results = self.engine.step()
        except Exception as error:  # a failed step ends the streams in it, not the loop
            logger.exception("engine step failed")
            with self._wake:
                for request_id, stream in list(self._running.items()):
                    self.engine.cancel(request_id)
                    self._end(stream, "error", error)
            return True
        with self._wake:
            for result in results:
                stream = self._running.get(result.request_id)
                if stream is None:
                    continue
                stream.started.set()
                if result.codes is not None:
                    stream.frames.append(result.codes)
                if result.finish is not None:
                    self._end(stream, result.finish)
                elif stream.chunk_sent + len(stream.frames) >= stream.next_chunk_frames:
                    self._send(stream, ends_chunk=True)
                elif len(stream.frames) >= self.DECODE_PASS_FRAMES:
                    self._send(stream, ends_chunk=False)
        return True

    def _poll_cancellations(self) -> None:
        """Ask every stream's transport whether its receiver has gone, once a step."""
        for stream in self._unfinished_streams():
            if _cancelled(stream):
                self.cancel(stream)

    def _unfinished_streams(self) -> list[Stream]:
        """Those that can still be cancelled: preparing, waiting or generating."""
        with self._wake:
            return [*self._preparing, *self._waiting, *self._running.values()]

    def _prepare_next(self) -> None:
        """Build the prompt of the oldest stream that needs one (its context audio encoded here:
        this thread has time to spare while the decoder is behind, the audio thread has none, and
        a third thread would only compete for the same cores), then queue it for a slot. It stays
        listed, and cancellable, while its prompt is built."""
        with self._wake:
            if not self._preparing:
                return
            stream = self._preparing[0]
        try:
            with torch.inference_mode():
                request = stream.prepare()
            self.engine.check(request)
        except Exception as error:
            logger.exception("preparing a request failed")
            request, failure = None, error
        with self._wake:
            if stream not in self._preparing:  # cancelled meanwhile: its last chunk is queued
                return
            self._preparing.remove(stream)
            if request is None:
                self._jobs.put(_DecodeJob(stream, _no_codes(self.engine), finish="error", error=failure))
                return
            stream.request = request
            self._waiting.append(stream)
            self._wake.notify_all()

    def _can_step(self) -> bool:
        return bool(self._admissible() or self._running) and not self._decoder_behind()

    def _decoder_behind(self) -> bool:
        """Whether some stream has more than two chunks waiting for the decoder. Generation then
        waits, since running ahead of the decoder would only queue audio and take the cores the
        decoder needs; but never while a stream has yet to send its first chunk, which is what
        its caller is waiting for (a step costs about the same for one stream as for all)."""
        streams = self._running.values()
        if any(stream.chunks == 0 for stream in streams):
            return False
        return any(stream.decode_audio and stream.decoding > 2 * stream.chunk_frames for stream in streams)

    def _admissible(self) -> bool:
        return bool(self._waiting) and bool(self._free_rows)

    def _start(self, stream: Stream) -> None:
        stream.row = min(self._free_rows)  # the lowest rows: the decoder runs only the span in use
        self._free_rows.remove(stream.row)
        stream.request_id = self.engine.submit(stream.request)
        self._running[stream.request_id] = stream

    def _send(self, stream: Stream, ends_chunk: bool, finish: str | None = None, error: Exception | None = None) -> None:
        codes = torch.stack(stream.frames) if stream.frames else _no_codes(self.engine)
        first, first_chunk = not stream.decoder_started, stream.chunks == 0
        self._jobs.put(_DecodeJob(stream, codes, finish, error, first, first_chunk, ends_chunk))
        stream.decoder_started = True
        stream.decoding += len(codes)
        stream.frames = []
        if ends_chunk:
            stream.chunks += 1
            stream.chunk_sent = 0
        else:
            stream.chunk_sent += len(codes)

    def _end(self, stream: Stream, finish: str, error: Exception | None = None) -> None:
        del self._running[stream.request_id]
        stream.started.set()
        self._send(stream, True, finish, error)

    # The decode thread.

    def _decode_forever(self) -> None:
        self._use_cpu_threads()
        while self._decode_round():
            pass

    def _decode_round(self) -> bool:
        """Take the queued jobs, deliver what is decoded, run one decoder pass; False once closed."""
        if not self._take_jobs(block=not self._backlog):
            return False
        self._deliver_ready()
        frames, jobs = self._next_pass()
        if jobs:
            self._run_pass(frames, jobs)
            self._deliver_ready()
        return True

    def _take_jobs(self, block: bool) -> bool:
        """Move the queued jobs to each stream's backlog; False once closed."""
        jobs = [self._jobs.get()] if block else []
        while not self._jobs.empty():
            jobs.append(self._jobs.get_nowait())
        if None in jobs:
            return False
        starting = [job for job in jobs if job.first and job.stream.row >= 0 and job.stream.decode_audio]
        try:
            self.decoder.start([job.stream.row for job in starting])
        except Exception as error:  # these streams fail; the thread goes on
            logger.exception("starting decoder rows failed")
            for job in starting:
                job.error = error
        for job in jobs:
            self._backlog.setdefault(id(job.stream), deque()).append(job)
        return True

    def _next_pass(self) -> tuple[int, list[_DecodeJob]]:
        """The jobs to advance by one decoder call, and by how many frames. First chunks go
        before all others; otherwise the oldest job sets the pass length and every job with
        that many frames left joins it."""
        heads = [backlog[0] for backlog in self._backlog.values()]
        candidates = [job for job in heads if job.first_chunk] or heads
        if not candidates:
            return 0, []
        frames = min(self.DECODE_PASS_FRAMES, candidates[0].frames_left)
        return frames, [job for job in candidates if job.frames_left >= frames]

    @torch.inference_mode()
    def _run_pass(self, frames: int, jobs: list[_DecodeJob]) -> None:
        codes = torch.stack([job.codes[job.decoded : job.decoded + frames] for job in jobs])
        try:
            audio = self.decoder.decode([job.stream.row for job in jobs], codes)
        except Exception as error:
            logger.exception("audio decode failed")
            for job in jobs:
                job.error = error
            return
        for job, samples in zip(jobs, audio, strict=True):
            job.audio.append(samples)
            job.decoded += frames

    def _deliver_ready(self) -> None:
        """Deliver, in each stream's order, every chunk that needs no more decoding."""
        for key, backlog in list(self._backlog.items()):
            while backlog and not backlog[0].frames_left:
                self._deliver(backlog.popleft())
            if not backlog:
                del self._backlog[key]

    def _deliver(self, job: _DecodeJob) -> None:
        """Pass a decoded job on: kept until its chunk is complete, then delivered as one chunk."""
        stream = job.stream
        with self._wake:
            stream.decoding -= len(job.codes)
            self._wake.notify_all()
        stream.parts.append(job)
        if not job.ends_chunk and job.error is None:
            return
        chunk, stream.parts = _chunk_of(stream.parts), []
        if not stream.silenced:
            try:
                stream.deliver(chunk)
            except Exception:  # the receiver is gone (a closed connection)
                logger.exception("delivering a chunk failed; cancelling the stream")
                stream.silenced = True
        if job.finish is None and (stream.silenced or job.error is not None):
            stream.silenced = True  # an error chunk was the receiver's last
            self.cancel(stream)
        if job.finish is not None:
            with self._wake:
                if stream.row >= 0:
                    self._free_rows.append(stream.row)
                    stream.row = -1
                self._unfinished -= 1
                self._wake.notify_all()
            stream.started.set()
            stream.finished.set()


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


def _cancelled(stream: Stream) -> bool:
    try:
        return stream.is_cancelled()
    except Exception:  # asking the transport failed: the receiver is gone
        logger.exception("checking for cancellation failed; cancelling the stream")
        return True
