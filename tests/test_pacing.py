"""The chunk schedule and the decoder's priorities: pacing.py's rules alone, then the serving loop
following them on the tiny model, with the loop's clock advanced by each engine step (a model
exactly that fast), so that the schedule's inputs are known."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from csm_client.contract import SAMPLES_PER_FRAME
from csm_triton import GenerationRequest, Generator
from csm_triton.engine.engine import Engine
from csm_triton.engine.pacing import ADAPTIVE, FRAME_S, PASS_FRAMES, PRESSING_S, SAFETY_S, ChunkPlan, Playback, chunk_plan, pass_jobs
from csm_triton.engine.stream import Chunk
from csm_triton.engine.streaming import ServingLoop
from csm_triton.model import checkpoint
from csm_triton.model.codec import StreamingDecoder

pytestmark = pytest.mark.engine


def test_the_first_chunk_has_its_size_whatever_the_slack() -> None:
    for slack_s in (-math.inf, -1.0, 0.0, 10.0):
        assert [ADAPTIVE.ends(0, frames, frames, slack_s, 0.05) for frames in (1, 2)] == [False, True]


def test_a_later_chunk_ends_at_a_pass_boundary_once_the_next_pass_would_come_too_late() -> None:
    frame_s = 0.05
    enough = (PASS_FRAMES + 1) * frame_s + SAFETY_S  # the next pass's frames, one for jitter, the way to the client
    assert not ADAPTIVE.ends(1, 2, 4, slack_s=enough + 0.01, frame_s=frame_s)
    assert ADAPTIVE.ends(1, 2, 4, slack_s=enough - 0.01, frame_s=frame_s)
    assert not ADAPTIVE.ends(1, 3, 5, slack_s=-5.0, frame_s=frame_s)  # between two passes: never
    assert ADAPTIVE.ends(2, 4, 8, slack_s=-5.0, frame_s=frame_s)
    assert ADAPTIVE.ends(1, 10, 12, slack_s=100.0, frame_s=frame_s)  # another pass would pass 12 frames
    assert not ADAPTIVE.ends(2, 8, 12, slack_s=100.0, frame_s=frame_s)
    assert ADAPTIVE.ends(2, 12, 16, slack_s=100.0, frame_s=frame_s)


def test_a_fixed_plan_ignores_the_slack_and_the_passes() -> None:
    fixed = ChunkPlan(2, 6, adaptive=False)
    for slack_s in (-math.inf, 0.0, 100.0):
        assert [frames for frames in range(1, 13) if fixed.ends(1, frames, frames + 2, slack_s, 0.05)] == list(range(6, 13))
    assert [ChunkPlan.whole(30).ends(0, frames, frames, -1.0, 0.05) for frames in (29, 30)] == [False, True]


def test_a_request_fixes_only_the_sizes_it_asks_for() -> None:
    assert chunk_plan(None, None, ADAPTIVE) == ADAPTIVE
    assert chunk_plan(4, None, ADAPTIVE) == ChunkPlan(4, 12, adaptive=True)
    assert chunk_plan(None, 5, ADAPTIVE) == ChunkPlan(2, 5, adaptive=False)
    assert chunk_plan(None, None, ChunkPlan(2, 12, adaptive=False)) == ChunkPlan(2, 12, adaptive=False)


def test_playback_resumes_on_a_late_chunk() -> None:
    playback = Playback()
    assert playback.slack(5.0) == -math.inf  # waiting for its first audio
    playback.add(2, at=10.0)  # plays until 10.16
    playback.add(10, at=10.1)  # queued behind it: until 10.96
    assert playback.slack(10.5) == pytest.approx(12 * FRAME_S - 0.5)
    playback.add(4, at=12.0)  # it ran out at 10.96 and resumes now
    assert playback.slack(12.0) == pytest.approx(4 * FRAME_S)


def test_a_stream_about_to_stall_is_decoded_before_one_with_much_buffered() -> None:
    # Stream 0 has seconds of audio buffered and four frames ready; stream 1 is about to stall with
    # the last two frames of its chunk: the pass is stream 1's alone, as long as its two frames.
    assert pass_jobs([4, 2], [5.0, PRESSING_S / 5]) == (2, [1])
    # A first chunk (its caller is waiting for it) goes before a stream about to stall.
    assert pass_jobs([2, 4, 4], [0.1, -math.inf, 3.0]) == (4, [1])
    # Nobody pressed: the least buffered sets the length, everyone with that many frames joins.
    assert pass_jobs([4, 2, 3], [5.0, 2.0, 1.0]) == (3, [2, 0])
    assert pass_jobs([0, 0], [0.0, 0.0]) == (0, [])


class StepClock:
    """The loop's time: `frame_s` more after each engine step."""

    def __init__(self, engine: Engine, frame_s: float) -> None:
        self.now = 0.0
        step = engine.step

        def ticking():
            results = step()
            self.now += frame_s
            return results

        engine.step = ticking

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clocked_loop(tiny_model_dir: Path, generator: Generator) -> Iterator[Callable[[float], ServingLoop]]:
    """A serving loop of its own (its own model copy, so that its caches are its own), made with
    a StepClock of the frame time asked for."""
    loops = []

    def make(frame_s: float) -> ServingLoop:
        model = checkpoint.load_model(checkpoint.resolve(tiny_model_dir), torch.device("cpu"), torch.float32)
        engine = Engine(model, slots=2)
        loops.append(ServingLoop(engine, StreamingDecoder(generator.codec, 4), 4, clock=StepClock(engine, frame_s)))
        return loops[-1]

    yield make
    for loop in loops:
        loop.close()


def streamed_chunks(loop: ServingLoop, generator: Generator, request: GenerationRequest, chunking: ChunkPlan) -> list[Chunk]:
    chunks: list[Chunk] = []
    stream = loop.add(generator.stream(request, chunks.append, True, chunking))
    assert stream.finished.wait(60)
    assert chunks[-1].finish == "length"
    return chunks


@pytest.mark.parametrize(
    ("frame_s", "expected"),
    [(0.001, [2, 10, 12, 12, 12, 2]), (0.2, [2, 2, *[4] * 11, 2])],
    ids=["far faster than real time", "slower than real time"],
)
def test_the_adaptive_schedule_follows_the_measured_frame_time(
    clocked_loop, generator: Generator, frame_s: float, expected: list[int]
) -> None:
    """A model far ahead of its listener gets the largest chunks at once (the second ends at the
    last pass boundary within 12 frames); one that cannot keep up gets one pass a chunk, each sent as
    soon as it is ready. Joined, they are still the one-shot decode."""
    request = GenerationRequest("Paced by the clock.", 0, max_audio_length_ms=4000, seed=11)
    chunks = streamed_chunks(clocked_loop(frame_s), generator, request, ADAPTIVE)
    assert [len(chunk.codes) for chunk in chunks] == expected
    codes = generator.generate_codes(request.text, 0, [], max_audio_length_ms=4000, seed=11)
    assert torch.equal(torch.cat([chunk.codes for chunk in chunks]), codes)
    audio = torch.cat([chunk.audio for chunk in chunks])
    assert len(audio) == 50 * SAMPLES_PER_FRAME
    assert (audio - generator.codec.decode(codes)).abs().max() < 1e-4


def test_fixed_sizes_are_honoured_whatever_the_clock(clocked_loop, generator: Generator) -> None:
    request = GenerationRequest("Cut as asked.", 1, max_audio_length_ms=2400, seed=12)
    sizes = [len(chunk.codes) for chunk in streamed_chunks(clocked_loop(0.2), generator, request, ChunkPlan(3, 7, adaptive=False))]
    assert sizes == [3, 7, 7, 7, 6]
