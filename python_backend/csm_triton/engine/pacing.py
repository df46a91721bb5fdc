"""How far a stream is ahead of its listener, and where its chunks end so that it stays ahead.

A client plays a stream's first chunk as it arrives and each later one once the audio before it
has played, or on arrival if that has run out (it stalls until then). The server keeps that clock
on its own side (`Playback`): a stream's *slack* is the audio its listener has left. The serving
loop (streaming.py) uses it four ways: where a chunk ends (here), which streams a decoder pass
serves first (`pass_jobs`), whether generation may pause for the decoder, and whether a new
request's prefill may lengthen the next step.

The adaptive schedule starts with a short chunk, for a fast first audio. A later chunk may end
where the stream has a whole number of decoder passes (PASS_FRAMES frames each: a 2-frame pass
costs the decoder almost what a 4-frame one does, so chunks cut between passes halved the
throughput of 4 streams on 2 cores), and it ends there unless its listener can wait for the next
pass's frames, one more frame time for jitter and SAFETY_S for what the server does not see (the
way to the client), or at `max_frames`. A stream ahead of its listener thus grows its chunks up
to `max_frames`, few responses and long decoder passes; one that falls behind gets chunks of one
pass, each sent as soon as it is ready. It needs no table of sizes: the frame time and the
decoder's latency it compares against are the serving loop's own measurements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from csm_client.contract import CHUNK_FRAMES, FIRST_CHUNK_FRAMES, FRAME_MS

FRAME_S = FRAME_MS / 1000
PASS_FRAMES = 4  # frames a decoder pass advances a stream by (see ServingLoop)
SAFETY_S = 0.05  # a chunk's way to the client and its jitter, which the server cannot measure
PRESSING_S = 0.5  # a listener with less audio left than this is about to stall: its decoding goes first
# A loop thread busy with one round for longer than this is taken for hung (ServingLoop.health); longer
# than any one round: a whole CPU prefill or a long context encode. Here, torch-free, for both
# the in-process API and csm_stream's ServingConfig.
STALL_TIMEOUT_S = 120.0


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

    def ends(self, chunk: int, frames: int, stream_frames: int, slack_s: float, frame_s: float) -> bool:
        """Whether chunk number `chunk` (0: the first) ends with the `frames` it has, the stream's
        `stream_frames` in all; `slack_s` is the audio its listener would have left when the chunk
        arrived if it were sent now, `frame_s` the time one more frame takes."""
        if chunk == 0:
            return frames >= self.first_frames
        if frames >= self.max_frames:
            return True
        if not self.adaptive or stream_frames % PASS_FRAMES:
            return False
        return frames + PASS_FRAMES > self.max_frames or cannot_wait(slack_s, frame_s)


def cannot_wait(slack_s: float, frame_s: float) -> bool:
    """Whether a listener with `slack_s` of audio left (when a chunk sent now would arrive) would
    run out before another pass's frames: their generation, a frame time of jitter, SAFETY_S."""
    return slack_s < (PASS_FRAMES + 1) * frame_s + SAFETY_S


ADAPTIVE = ChunkPlan()  # the default: 2 frames, then up to 12 a chunk as the slack allows


def chunk_plan(first_chunk_frames: int | None, chunk_frames: int | None, default: ChunkPlan) -> ChunkPlan:
    """A request's plan: the sizes it asks for, the default's for the rest. Asking for
    `chunk_frames` fixes every later chunk at that size."""
    return ChunkPlan(
        default.first_frames if first_chunk_frames is None else first_chunk_frames,
        default.max_frames if chunk_frames is None else chunk_frames,
        default.adaptive and chunk_frames is None,
    )


@dataclass
class Playback:
    """A stream's listener as one thread of the server sees it: when the audio it has been given
    runs out, if it plays each chunk on arrival or once the audio before it has played."""

    plays_until: float | None = None  # None before its first audio

    def add(self, frames: int, at: float) -> None:
        """`frames` of audio arrive at `at`."""
        if frames:
            self.plays_until = max(at, self.plays_until if self.plays_until is not None else at) + frames * FRAME_S

    def slack(self, now: float) -> float:
        """Seconds of audio the listener has left at `now`; minus infinity before its first audio,
        which its caller is waiting for."""
        return -math.inf if self.plays_until is None else self.plays_until - now


@dataclass
class Smoothed:
    """A measured time, exponentially smoothed; 0 until the first measurement."""

    value: float = 0.0
    measured: bool = False
    weight: float = 0.2

    def add(self, sample: float) -> None:
        self.value = sample if not self.measured else self.value + self.weight * (sample - self.value)
        self.measured = True


def pass_jobs(frames_left: Sequence[int], slack_s: Sequence[float]) -> tuple[int, list[int]]:
    """Which streams one decoder pass advances, and by how many frames, from each stream's frames
    left to decode in its next job and its listener's slack: the most pressed stream sets the
    length (at most PASS_FRAMES) and every stream with that many frames left joins, unless some
    stream is about to stall (or waits for its first audio): then the pass is theirs alone, so that
    it is as short as it can be. Returns (frames, the joining streams' indices, most pressed first)."""
    order = sorted((index for index, left in enumerate(frames_left) if left), key=lambda index: slack_s[index])
    if not order:
        return 0, []
    candidates = [index for index in order if slack_s[index] < PRESSING_S] or order
    frames = min(PASS_FRAMES, frames_left[candidates[0]])
    return frames, [index for index in candidates if frames_left[index] >= frames]
