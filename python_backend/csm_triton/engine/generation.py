"""The serving loop's generation thread: it alone owns the engine, the streams waiting for a slot,
the decoder rows and each stream's way through generation (`Generating`). It builds the prompts
that need Mimi's encoder, admits a waiting stream only into a free slot, steps the engine and
sends each stream's frames to the audio thread."""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .engine import Engine
from .graphs import DeviceFailed
from .pacing import FRAME_S, PASS_FRAMES, Playback, Smoothed, cannot_wait
from .stream import (
    MAX_CONSECUTIVE_FAILURES,
    Add,
    Board,
    Cancel,
    Decoded,
    Frames,
    LoopFailed,
    Stream,
    ToGeneration,
)

logger = logging.getLogger(__name__)


@dataclass
class Generating:
    """A stream's state in the generation thread, from its addition until its last chunk is out."""

    request_id: int = -1  # the engine's, once it has a slot
    row: int = -1  # its StreamingDecoder row while it has one
    frames: list[torch.Tensor] = field(default_factory=list)  # generated, not yet sent to the decoder
    device_frames: list[torch.Tensor] = field(default_factory=list)  # the same on the engine's device, unless that is the host
    chunks: int = 0  # chunks completed (all their frames sent to the decoder)
    chunk_sent: int = 0  # frames of the current chunk already sent to the decoder
    decoder_started: bool = False  # its first frames have been sent to the decoder
    decoding: int = 0  # frames sent to the decoder and not yet delivered
    ended: bool = False  # its last frames have been sent to the audio thread
    generated: int = 0  # frames generated
    playback: Playback = field(default_factory=Playback)  # its listener, given its complete chunks as they should arrive
    ready_at: float = 0.0  # when it could take a slot


class GenerationThread:
    """Chunks end where each stream's ChunkPlan says (pacing.py), from the listener's slack as this
    thread sees it: the audio of the chunks it has sent, each arriving the decoder's measured
    latency after it was sent, against the frame time it measures. It hands a stream's frames to
    the decoder at each of its pass boundaries (every PASS_FRAMES frames) and at its chunks' ends."""

    def __init__(
        self, engine: Engine, board: Board, to_audio: queue.Queue[Frames | None], decoder_rows: int, clock: Callable[[], float]
    ) -> None:
        self.engine = engine
        self.board = board
        self.to_audio = to_audio
        self.clock = clock
        self._free_rows = list(range(decoder_rows))
        self._preparing: deque[Stream] = deque()  # for this thread to build their prompts
        self._waiting: deque[Stream] = deque()  # ready for a slot
        self._running: dict[int, Stream] = {}  # engine request id -> stream in a slot
        self._streams: dict[Stream, Generating] = {}
        self._step_failures = 0
        self._frame_s = Smoothed()  # a round that steps the engine
        self._latency = Smoothed()  # from a chunk's last frame sent to the decoder to its delivery

    # Each round is a method of its own: a local left over from the last round would keep a
    # finished stream, and with it Triton's request and response sender, alive while the thread
    # waits, and Triton unloads the model only once every one is gone.

    def round(self) -> bool:
        """Wait for work, take the inbox, prepare one new stream's prompt, admit waiting streams,
        step the engine once; False once closed and done, or failed."""
        board = self.board
        with board.wake:
            board.wake.wait_for(lambda: board.failure is not None or board.inbox or self._preparing or self._can_step())
            if board.failure is not None:
                return False
            messages, board.inbox = board.inbox, deque()
            board.adds_taken = sum(isinstance(message, Add) for message in messages)
            board.busy_since["generation"] = time.monotonic()
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
        board.busy("generation", None)
        if board.closing and not self._streams:
            self.to_audio.put(None)
            return False
        return True

    def _handle(self, message: ToGeneration) -> None:
        match message:
            case Add(stream):
                self._streams[stream] = Generating(ready_at=self.clock())
                (self._waiting if stream.prepared else self._preparing).append(stream)
            case Cancel(stream):
                self._cancel(stream)
            case Decoded(stream, frames, latency_s, released):
                state = self._streams[stream]
                state.decoding -= frames
                if latency_s is not None:
                    self._latency.add(latency_s)
                if released:
                    del self._streams[stream]
                    if state.row >= 0:
                        self._free_rows.append(state.row)
            case None:
                for stream in list(self._streams):
                    self._cancel(stream)

    def _cancel(self, stream: Stream) -> None:
        state = self._streams.get(stream)
        if state is None or state.ended:
            return
        for queued in (self._preparing, self._waiting):
            if stream in queued:
                queued.remove(stream)
                self._end(stream, "cancelled")
                return
        self.engine.cancel(state.request_id)

    def _publish(self) -> None:
        """Count, for stats() and admission, the streams that have no slot yet and the free slots."""
        with self.board.wake:
            self.board.waiting = len(self._preparing) + len(self._waiting)
            self.board.free_slots = self.engine.free_slots
            self.board.adds_taken = 0

    def _prepare_next(self) -> None:
        """Build the prompt of the oldest stream that needs one (its context audio encoded here:
        this thread has time to spare while the decoder is behind, the audio thread has none, and
        a third thread would only compete for the same cores), then queue it for a slot."""
        if not self._preparing:
            return
        stream = self._preparing.popleft()
        try:
            with torch.inference_mode():
                stream.tokens, stream.mask = stream.prepare()
        except Exception as error:
            logger.exception("preparing a request failed")
            self._end(stream, "error", error)
            return
        stream.prepare = None  # it holds the request's context audio, which is no longer needed
        self._streams[stream].ready_at = self.clock()
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
        running = [(stream, self._streams[stream]) for stream in self._running.values()]
        if any(state.chunks == 0 or self._starved(state, now) for _, state in running):
            return False
        return any(stream.decode_audio and state.decoding > 2 * stream.chunking.max_frames for stream, state in running)

    def _starved(self, state: Generating, now: float) -> bool:
        """Its listener is about to run out (the same test as a chunk's end) and the decoder holds
        less than a pass of its frames: only generation can keep it playing."""
        return state.decoding < PASS_FRAMES and cannot_wait(self._slack(state, now), self._frame_s.value)

    def _slack(self, state: Generating, now: float) -> float:
        """The audio the stream's listener would have left when a chunk sent now arrived."""
        return state.playback.slack(now + self._latency.value)

    def _admissible(self) -> bool:
        """A stream waits and the engine has a free slot (and the decoder a free row) for it."""
        return bool(self._waiting) and bool(self._free_rows) and self.engine.free_slots > 0

    def _admission_waits(self) -> bool:
        """Whether the next waiting stream stays out of the engine for this step: while a running
        stream is about to stall for want of frames, since a new prompt's prefill would lengthen
        the step it needs, but for one frame's playback time at most, so that a new request's
        first audio is never held for long."""
        now = self.clock()
        if now - self._streams[self._waiting[0]].ready_at >= FRAME_S:
            return False
        return any(self._starved(self._streams[stream], now) for stream in self._running.values() if self._streams[stream].chunks)

    def _start(self, stream: Stream) -> None:
        state = self._streams[stream]
        state.row = min(self._free_rows)  # the lowest rows: the decoder runs only the span in use
        self._free_rows.remove(state.row)
        state.request_id = self.engine.start(stream)
        self._running[state.request_id] = stream
        stream.started.set()

    def _step(self) -> None:
        """One engine step; its frames go to the audio thread. A failed step ends the streams it
        ran, and the engine goes on without them; a failure the engine cannot go on after fails the
        loop first, which ends every stream, so that `health()` says why before any stream ends."""
        try:
            results = self.engine.step()
        except Exception as error:
            logger.exception("engine step failed")
            self._step_failures += 1
            if isinstance(error, DeviceFailed):  # nothing more can run on this device
                raise LoopFailed(f"the device failed: {error}") from error
            if self._step_failures >= MAX_CONSECUTIVE_FAILURES:
                raise LoopFailed(f"{self._step_failures} engine steps in a row failed, the last with {error!r}") from error
            for request_id in self.engine.abort():
                self._end(self._running[request_id], "error", error)
            return
        self._step_failures = 0
        now = self.clock()
        for result in results:
            stream = self._running.get(result.request_id)
            if stream is None:
                continue
            state = self._streams[stream]
            if result.codes is not None:
                state.frames.append(result.codes)
                if stream.decode_audio and result.device_codes is not None:
                    state.device_frames.append(result.device_codes)
                state.generated += 1
            chunk_frames = state.chunk_sent + len(state.frames)
            if result.finish is not None:
                self._end(stream, result.finish)
            elif stream.chunking.ends(state.chunks, chunk_frames, state.generated, self._slack(state, now), self._frame_s.value):
                self._send(stream, ends_chunk=True)
            elif state.generated % PASS_FRAMES == 0:  # a pass boundary: every 4 frames hold one
                self._send(stream, ends_chunk=False)

    def _send(self, stream: Stream, ends_chunk: bool, finish: str | None = None, error: Exception | None = None) -> None:
        state = self._streams[stream]
        codes = torch.stack(state.frames) if state.frames else torch.zeros(0, self.engine.num_codebooks, dtype=torch.long)
        device_codes = torch.stack(state.device_frames) if state.device_frames else None
        first, now = not state.decoder_started, self.clock()
        self.to_audio.put(Frames(stream, codes, device_codes, state.row, finish, error, first, ends_chunk, now))
        state.decoder_started = True
        state.decoding += len(codes)
        state.frames, state.device_frames = [], []
        if ends_chunk:
            state.playback.add(state.chunk_sent + len(codes), now + self._latency.value)
            state.chunks += 1
            state.chunk_sent = 0
        else:
            state.chunk_sent += len(codes)

    def _end(self, stream: Stream, finish: str, error: Exception | None = None) -> None:
        """Send the stream's last frames; it leaves the engine's bookkeeping here."""
        state = self._streams[stream]
        self._running.pop(state.request_id, None)
        state.ended = True
        stream.started.set()
        self._send(stream, True, finish, error)
