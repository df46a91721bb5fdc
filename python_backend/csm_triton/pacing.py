"""How far a stream is ahead of its listener, and where its chunks end so that it stays ahead.

A client plays a stream's first chunk as it arrives and the rest back to back; it stalls when a
chunk arrives after the audio before it has finished playing. The server keeps that clock on its
own side from the times it delivers each chunk (`Playback`): a stream's *slack* is the audio its
listener has left. The serving loop (streaming.py) uses it four ways: where a chunk ends (here),
which streams a decoder pass serves first (`pass_jobs`), whether generation may pause for the
decoder, and whether a new request's prefill may lengthen the next step.

The adaptive schedule starts with a short chunk, for a fast first audio, and ends each later chunk
as soon as one more frame would bring it in too late: when the slack it would arrive with if it
were sent now is under two frame times (the frame it would wait for, and one for jitter). A stream
ahead of its listener thus grows its chunks up to `max_frames`, few responses and long decoder
passes; one falling behind gets short chunks (never shorter than the first), each sent as soon as
it is ready. It needs no table of sizes: the frame time and the decoder's latency it compares
against are the loop's own measurements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .request import CHUNK_FRAMES, FIRST_CHUNK_FRAMES, FRAME_MS

FRAME_S = FRAME_MS / 1000
PRESSING_S = 0.5  # a listener with less audio left than this is about to stall: its decoding goes first


@dataclass(frozen=True)
class ChunkPlan:
    """How a stream's frames are cut into chunks: `first_frames`, then up to `max_frames` a chunk
    as its slack allows (adaptive), or exactly `max_frames` a chunk (fixed, as a client that sends
    CHUNK_FRAMES asks)."""

    first_frames: int = FIRST_CHUNK_FRAMES
    max_frames: int = CHUNK_FRAMES
    adaptive: bool = True

    @classmethod
    def whole(cls, frames: int) -> ChunkPlan:
        """All of a stream of at most `frames` frames in one chunk."""
        return cls(frames, frames, adaptive=False)

    def ends(self, chunk: int, frames: int, slack_s: float, frame_s: float) -> bool:
        """Whether chunk number `chunk` (0: the first) ends with the `frames` it has; `slack_s` is
        the audio its listener would have left when it arrived if it were sent now, `frame_s` the
        time one more frame takes."""
        if chunk == 0:
            return frames >= self.first_frames
        if frames >= self.max_frames:
            return True
        return self.adaptive and frames >= self.first_frames and slack_s < 2 * frame_s


def chunk_plan(first_chunk_frames: int | None, chunk_frames: int | None, default: ChunkPlan) -> ChunkPlan:
    """A request's plan: the sizes it asks for, the default's for the rest. Asking for
    `chunk_frames` fixes every later chunk at that size."""
    return ChunkPlan(
        default.first_frames if first_chunk_frames is None else first_chunk_frames,
        default.max_frames if chunk_frames is None else chunk_frames,
        default.adaptive and chunk_frames is None,
    )


ADAPTIVE = ChunkPlan()  # the default: 2 frames, then up to 12 a chunk as the slack allows


@dataclass
class Playback:
    """A stream's listener as one thread of the server sees it: playing from `started_at`, the
    time its first audio was delivered, `frames` frames of audio in all."""

    started_at: float | None = None
    frames: int = 0

    def add(self, frames: int, at: float) -> None:
        if self.started_at is None and frames:
            self.started_at = at
        self.frames += frames

    def slack(self, now: float) -> float:
        """Seconds of audio the listener has left at `now`; minus infinity before its first audio,
        which its caller is waiting for."""
        if self.started_at is None:
            return -math.inf
        return self.started_at + self.frames * FRAME_S - now


@dataclass
class Smoothed:
    """A measured time, exponentially smoothed; 0 until the first measurement."""

    value: float = 0.0
    measured: bool = False
    weight: float = 0.2

    def add(self, sample: float) -> None:
        self.value = sample if not self.measured else self.value + self.weight * (sample - self.value)
        self.measured = True


def pass_jobs(frames_left: Sequence[int], slack_s: Sequence[float], pass_frames: int) -> tuple[int, list[int]]:
    """Which streams one decoder pass advances, and by how many frames, from each stream's frames
    left to decode in its next job and its listener's slack: the most pressed stream sets the
    length (at most `pass_frames`) and every stream with that many frames left joins, unless some
    stream is about to stall (or waits for its first audio): then the pass is theirs alone, so that
    it is as short as it can be. Returns (frames, the joining streams' indices, most pressed first)."""
    order = sorted((index for index, left in enumerate(frames_left) if left), key=lambda index: slack_s[index])
    if not order:
        return 0, []
    candidates = [index for index in order if slack_s[index] < PRESSING_S] or order
    frames = min(pass_frames, frames_left[candidates[0]])
    return frames, [index for index in candidates if frames_left[index] >= frames]
