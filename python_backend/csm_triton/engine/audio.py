"""The serving loop's audio thread: it alone owns the StreamingDecoder and each stream's decoding
and delivery (`Decoding`). It decodes the frames the generation thread sends, joins them into the
asked chunks and delivers them through the stream's `deliver` callback, in order, the last one
with `finish` set; it tells the generation thread what it has decoded and delivered (backpressure,
latency) and when a stream's last chunk is out (its decoder row is free)."""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..model.codec import StreamingDecoder
from .pacing import Playback, pass_jobs
from .stream import MAX_CONSECUTIVE_FAILURES, Board, Cancel, Chunk, Decoded, Frames, LoopFailed, Stream

logger = logging.getLogger(__name__)


@dataclass
class Decoding:
    """A stream's state in the audio thread, from its first frames until its last chunk is out."""

    backlog: deque[Frames] = field(default_factory=deque)  # at the decoder, oldest first
    parts: list[Frames] = field(default_factory=list)  # decoded pieces of the chunk being completed
    playback: Playback = field(default_factory=Playback)  # what its listener has been given


class AudioThread:
    """Decodes every stream together, PASS_FRAMES frames a call, first chunks before anything
    else: a new stream's first audio waits for at most one pass of the others, and passes find
    most streams' frames ready. Four frames a row cost no more a frame than twelve at eight rows,
    while a call's cost grows little with its rows (2-core CPU, full-size Mimi: the mean pass went
    from 3 rows to most of 8, and 8 streams from 2.8 to 3.2 audio-seconds a second). Passes serve
    the streams closest to a stall first (pacing.pass_jobs), by this thread's own count of what
    it has delivered."""

    def __init__(self, decoder: StreamingDecoder, board: Board, clock: Callable[[], float]) -> None:
        self.decoder = decoder
        self.board = board
        self.clock = clock
        self.inbox: queue.Queue[Frames | None] = queue.Queue()  # None stops it
        self._streams: dict[Stream, Decoding] = {}
        self._pass_failures = 0

    def round(self) -> bool:
        """Take the sent frames, deliver what is decoded, run one decoder pass; False once told to stop."""
        if not self._take(block=not any(state.backlog for state in self._streams.values())):
            return False
        self.board.busy("audio", time.monotonic())
        self._deliver_ready()
        frames, jobs = self._next_pass()
        if jobs:
            self._run_pass(frames, jobs)
            self._deliver_ready()
        self.board.busy("audio", None)
        return True

    def _take(self, block: bool) -> bool:
        """Move the sent frames to each stream's backlog; False once told to stop."""
        sent = [self.inbox.get()] if block else []
        while not self.inbox.empty():
            sent.append(self.inbox.get_nowait())
        if None in sent:
            return False
        starting = [frames for frames in sent if frames.first and frames.row >= 0 and frames.stream.decode_audio]
        try:
            self.decoder.start([frames.row for frames in starting])
        except Exception as error:  # these streams fail; the thread goes on
            logger.exception("starting decoder rows failed")
            for frames in starting:
                frames.error = error
        for frames in sent:
            self._streams.setdefault(frames.stream, Decoding()).backlog.append(frames)
        return True

    def _next_pass(self) -> tuple[int, list[Frames]]:
        """The frames to advance by one decoder call, and by how many (pacing.pass_jobs): a
        stream's first chunk or one whose listener is about to run out first."""
        now = self.clock()
        heads = [(state.backlog[0], state.playback.slack(now)) for state in self._streams.values() if state.backlog]
        count, chosen = pass_jobs([head.frames_left for head, _ in heads], [slack for _, slack in heads])
        return count, [heads[index][0] for index in chosen]

    @torch.inference_mode()
    def _run_pass(self, count: int, jobs: list[Frames]) -> None:
        # The codes where the engine made them: on a GPU they never leave it on their way to Mimi.
        sources = [job.codes if job.device_codes is None else job.device_codes for job in jobs]
        codes = torch.stack([source[job.decoded : job.decoded + count] for job, source in zip(jobs, sources, strict=True)])
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
            job.decoded += count

    def _deliver_ready(self) -> None:
        """Deliver, in each stream's order, every chunk that needs no more decoding."""
        for stream, state in list(self._streams.items()):
            while state.backlog and not state.backlog[0].frames_left:
                self._deliver(stream, state, state.backlog.popleft())

    def _deliver(self, stream: Stream, state: Decoding, frames: Frames) -> None:
        """Pass decoded frames on: kept until their chunk is complete, then delivered as one chunk.
        A chunk the receiver fails to take, or one that carries an error, is the stream's last:
        its generation is cancelled, and its own last frames only free its row."""
        state.parts.append(frames)
        if not frames.ends_chunk and frames.error is None:
            self.board.post(Decoded(stream, len(frames.codes)))
            return
        chunk = _chunk_of(state.parts)
        state.parts = []
        try:
            stream.send(chunk)
        except Exception as error:  # the receiver is gone (a closed connection)
            logger.exception("delivering a chunk failed; ending the stream")
            stream.fail(error)
        now = self.clock()
        state.playback.add(len(chunk.codes), now)
        if frames.finish is None and stream.ended:
            self.board.post(Cancel(stream))
        released = frames.finish is not None
        if released:
            del self._streams[stream]
            stream.started.set()
            stream.finished.set()
            with self.board.wake:
                self.board.streams.discard(stream)
        self.board.post(Decoded(stream, len(frames.codes), now - frames.sent_at, released))


def _chunk_of(parts: list[Frames]) -> Chunk:
    """One chunk from the decoded frames that complete it; the last says how it ends."""
    last = parts[-1]
    codes = torch.cat([part.codes for part in parts])
    if last.error is not None:
        return Chunk(codes, None, "error", last.error)
    if not last.stream.decode_audio:
        return Chunk(codes, None, last.finish)
    pieces = [piece for part in parts for piece in part.audio]  # a tensor a decoder pass: joined in one copy
    return Chunk(codes, torch.cat(pieces) if pieces else torch.zeros(0), last.finish)
