"""The serving loop in process: streaming and async generation, requests joining a running batch,
cancellation, and nothing left behind."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from csm_client.contract import SAMPLE_RATE, SAMPLES_PER_FRAME
from csm_triton import GenerationRequest, Generator, Segment
from csm_triton.engine.stream import Chunk
from triton_tensors import chunk_sizes

pytestmark = pytest.mark.engine


def wait_until_idle(generator: Generator, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (stats := generator.stats()).streams or stats.active_slots:
        assert time.monotonic() < deadline, f"the loop did not go idle: {stats}"
        time.sleep(0.02)


def test_streamed_chunks_join_to_the_one_shot_audio(generator: Generator) -> None:
    chunks = list(
        generator.generate_streaming("Stream this, please.", 1, [], max_audio_length_ms=2400, seed=7, first_chunk_frames=2, chunk_frames=5)
    )
    codes = generator.generate_codes("Stream this, please.", 1, [], max_audio_length_ms=2400, seed=7)
    assert len(codes) == 30
    assert [len(c) // SAMPLES_PER_FRAME for c in chunks] == chunk_sizes(30, 2, 5)
    one_shot = generator.codec.decode(codes)
    assert (torch.cat(chunks) - one_shot).abs().max() < 1e-4


def test_generate_async_runs_requests_together(generator: Generator) -> None:
    async def speak_all() -> list[torch.Tensor]:
        return await asyncio.gather(*(generator.generate_async(f"Caller {i}.", i, [], max_audio_length_ms=800, seed=i) for i in range(3)))

    for index, audio in enumerate(asyncio.run(speak_all())):
        expected = generator.generate(f"Caller {index}.", index, [], max_audio_length_ms=800, seed=index)
        assert (audio - expected).abs().max() < 1e-4


def test_cancelling_an_async_task_stops_its_generation(generator: Generator) -> None:
    async def cancel_midway() -> None:
        task = asyncio.create_task(generator.generate_async("A long one.", 0, [], max_audio_length_ms=20_000, seed=1))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    frames_before = generator.engine.stats.frames
    asyncio.run(cancel_midway())
    wait_until_idle(generator)
    assert generator.engine.stats.frames - frames_before < 100  # of the 250 it asked for


def test_a_request_joins_a_running_one_and_finishes_first(generator: Generator) -> None:
    finished: dict[str, float] = {}
    first_audio: dict[str, float] = {}

    def deliver_for(name: str, start: float):
        def deliver(chunk: Chunk) -> None:
            first_audio.setdefault(name, time.monotonic() - start)
            if chunk.finish is not None:
                finished[name] = time.monotonic()

        return deliver

    start = time.monotonic()
    long = generator.submit(GenerationRequest("A long story.", 0, max_audio_length_ms=4000, seed=1), deliver_for("long", start))
    long.started.wait()
    time.sleep(0.2)
    joined_at = time.monotonic()
    short = generator.submit(GenerationRequest("Short.", 1, max_audio_length_ms=400, seed=2), deliver_for("short", joined_at))
    short.finished.wait(30)
    long.finished.wait(60)
    assert finished["short"] < finished["long"]
    # The short request's first audio came while the long one was still generating.
    assert joined_at + first_audio["short"] < finished["long"]


def test_closing_a_stream_early_cancels_it_within_two_frames(generator: Generator) -> None:
    chunks = generator.generate_streaming("Never mind.", 0, [], max_audio_length_ms=20_000, seed=3, first_chunk_frames=1, chunk_frames=1)
    next(chunks)
    frames_before = generator.engine.stats.frames
    chunks.close()
    wait_until_idle(generator)
    # One step may already be running when the cancel arrives, and one more may start before it is seen.
    assert generator.engine.stats.frames - frames_before <= 2


def test_a_hundred_cancelled_requests_leave_nothing_behind(generator: Generator) -> None:
    wait_until_idle(generator)
    threads_before = threading.active_count()
    for index in range(100):
        stream = generator.submit(GenerationRequest("Cancel me.", index % 3, max_audio_length_ms=10_000, seed=index), lambda chunk: None)
        if index % 2:
            stream.started.wait()
        generator.cancel(stream)
    wait_until_idle(generator, timeout_s=60)
    stats = generator.stats()
    assert (stats.active_slots, stats.waiting, stats.streams, stats.threads_alive) == (0, 0, 0, 2)
    assert threading.active_count() == threads_before
    # The slots are usable: a request after all that generates as before.
    assert len(generator.generate_codes("Still here.", 0, [], max_audio_length_ms=400, seed=9)) == 5


def test_context_audio_is_encoded_in_the_loop_and_such_requests_cancel_cleanly(generator: Generator) -> None:
    wait_until_idle(generator)
    context = [Segment(speaker=1, text="Listen.", audio=torch.rand(10 * SAMPLE_RATE) - 0.5)]
    chunks: list[list[Chunk]] = [[], [], []]
    streams = [
        generator.submit(GenerationRequest("Reply.", 0, context, max_audio_length_ms=10_000, seed=index), chunks[index].append)
        for index in range(3)
    ]
    # submit() returned before encoding 30 s of audio: the prompts are built by the loop, one a round.
    assert not streams[-1].prepared
    assert generator.stats().waiting == 3
    for stream in streams:
        generator.cancel(stream)
    wait_until_idle(generator, timeout_s=30)
    assert [[chunk.finish for chunk in received] for received in chunks] == [["cancelled"]] * 3
    assert all(chunk.error is None for received in chunks for chunk in received)


def test_invalid_streaming_chunk_sizes_are_refused(generator: Generator) -> None:
    with pytest.raises(ValueError, match=r"^chunk_frames: must be in \[1, 375\] frames of 80 ms, got 0"):
        generator.generate_streaming("Hi.", 0, [], chunk_frames=0)


def test_requests_beyond_the_slots_count_as_waiting(generator: Generator) -> None:
    wait_until_idle(generator)
    """The loop holds the streams waiting for a slot, admits one only into a free slot, and a
    waiting stream cancelled ends "cancelled" without a frame."""
    slots = generator.engine.num_slots
    chunks: list[list[Chunk]] = [[] for _ in range(slots + 2)]
    streams = [
        generator.submit(GenerationRequest("Queue up.", 0, max_audio_length_ms=20_000, seed=index), chunks[index].append)
        for index in range(slots + 2)
    ]
    try:
        deadline = time.monotonic() + 30
        while sum(stream.started.is_set() for stream in streams) < slots:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        stats = generator.stats()
        assert (stats.active_slots, stats.waiting, stats.streams) == (slots, 2, slots + 2)
    finally:
        for stream in streams:
            generator.cancel(stream)
    wait_until_idle(generator)
    for waited in chunks[slots:]:
        assert [(chunk.finish, len(chunk.codes)) for chunk in waited] == [("cancelled", 0)]
