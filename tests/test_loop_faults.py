"""Faults injected into the serving loop's real engine, decoder and receivers: each ends the
streams it concerned with exactly one error chunk, and the others and later requests are unharmed;
a thread that cannot go on fails the loop, which then says so instead of accepting work."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from csm_triton import GenerationRequest, Generator, load_csm_1b
from csm_triton.engine.graphs import DeviceFailed
from csm_triton.engine.pacing import ChunkPlan
from csm_triton.engine.stream import Chunk, LoopFailed

pytestmark = pytest.mark.engine

SLOTS = 2


class Received:
    """Everything a stream's receiver was handed, in order."""

    def __init__(self, fail_on: Callable[[int], bool] = lambda index: False) -> None:
        self.chunks: list[Chunk] = []
        self.fail_on = fail_on  # which delivery (0, 1, ...) raises, as a closed connection would

    def __call__(self, chunk: Chunk) -> None:
        index = len(self.chunks)
        self.chunks.append(chunk)
        if self.fail_on(index):
            raise ConnectionError("the client went away")

    @property
    def finals(self) -> list[str]:
        return [chunk.finish for chunk in self.chunks if chunk.finish is not None]

    @property
    def codes(self) -> torch.Tensor:
        return torch.cat([chunk.codes for chunk in self.chunks if chunk.error is None])


@pytest.fixture
def fresh_generator(tiny_model_dir: Path) -> Iterator[Generator]:
    """A Generator of its own: faults may leave it failed."""
    generator = load_csm_1b(tiny_model_dir, device="cpu", slots=SLOTS, stall_timeout_s=1.0)
    yield generator
    generator.close(timeout_s=5)


def request(seed: int, ms: int = 2000, text: str = "Faults, injected.") -> GenerationRequest:
    return GenerationRequest(text, seed % 3, max_audio_length_ms=ms, seed=seed)


def submit(generator: Generator, seed: int, received: Received, ms: int = 2000, decode_audio: bool = True):
    return generator.submit(request(seed, ms), received, decode_audio, ChunkPlan(2, 3, adaptive=False))


def wait_idle(generator: Generator, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (stats := generator.stats()).streams or stats.active_slots:
        assert time.monotonic() < deadline, stats
        time.sleep(0.02)


def expected_codes(generator: Generator, seed: int, ms: int = 2000) -> torch.Tensor:
    return generator.generate_codes("Faults, injected.", seed % 3, [], max_audio_length_ms=ms, seed=seed)


class FailOnce:
    """Wraps a method so that its call number `when` raises, once."""

    def __init__(self, method: Callable, when: int = 0) -> None:
        self.method, self.when, self.calls = method, when, 0
        self.lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self.lock:
            call, self.calls = self.calls, self.calls + 1
        if call == self.when:
            raise RuntimeError("injected fault")
        return self.method(*args, **kwargs)


def test_a_failed_engine_step_ends_the_streams_it_ran_and_the_next_ones_run(fresh_generator: Generator) -> None:
    generator = fresh_generator
    reference = {seed: expected_codes(generator, seed) for seed in (1, 2, 3)}
    running = [Received(), Received()]
    streams = [submit(generator, seed, received) for seed, received in zip((1, 2), running, strict=True)]
    for stream in streams:
        stream.started.wait(10)
    generator.engine.step = FailOnce(generator.engine.step)  # the next step fails
    waiting = Received()
    submit(generator, 3, waiting)  # no slot is free: it waits, and is not in the failed step
    wait_idle(generator)
    for received in running:
        assert received.finals == ["error"] and "injected fault" in str(received.chunks[-1].error)
    assert waiting.finals == ["length"] and torch.equal(waiting.codes, reference[3])
    assert generator.health() is None
    assert torch.equal(expected_codes(generator, 1), reference[1])


def test_a_failed_decoder_pass_ends_its_streams_and_not_a_codes_only_one(fresh_generator: Generator) -> None:
    generator = fresh_generator
    reference = expected_codes(generator, 5)
    generator.loop.decoder.decode = FailOnce(generator.loop.decoder.decode, when=1)  # its second pass
    with_audio, codes_only = Received(), Received()
    submit(generator, 4, with_audio)
    submit(generator, 5, codes_only, decode_audio=False)
    wait_idle(generator)
    assert with_audio.finals == ["error"] and "injected fault" in str(with_audio.chunks[-1].error)
    assert len(with_audio.chunks) == 2  # its first chunk, then the error: nothing after
    assert codes_only.finals == ["length"] and torch.equal(codes_only.codes, reference)
    # A later request with audio decodes as ever: the one-shot decode of its codes.
    audio = generator.generate("Faults, injected.", 1, [], max_audio_length_ms=800, seed=6)
    codes = generator.generate_codes("Faults, injected.", 1, [], max_audio_length_ms=800, seed=6)
    assert (audio - generator.codec.decode(codes)).abs().max() < 1e-4
    assert generator.health() is None


def test_a_failed_send_ends_that_stream_with_one_error_and_stops_its_generation(fresh_generator: Generator) -> None:
    generator = fresh_generator
    reference = expected_codes(generator, 8, ms=1200)
    victim, bystander = Received(fail_on=lambda index: index == 1), Received()
    submit(generator, 7, victim, ms=20_000)
    submit(generator, 8, bystander, ms=1200)
    wait_idle(generator)
    # The chunk that failed, then one error chunk saying why; nothing after it.
    assert [chunk.finish for chunk in victim.chunks] == [None, None, "error"]
    assert isinstance(victim.chunks[-1].error, ConnectionError)
    assert sum(len(chunk.codes) for chunk in victim.chunks) < 20  # of the 250 frames it asked for
    assert bystander.finals == ["length"] and torch.equal(bystander.codes, reference)


def test_a_thread_that_cannot_go_on_fails_every_stream_once_and_the_loop_says_so(fresh_generator: Generator) -> None:
    generator = fresh_generator
    first = Received()
    submit(generator, 1, first, ms=20_000).started.wait(10)
    # An error where none is expected (admitting a request) leaves the generation thread's
    # state unknown: it must not go on.
    generator.engine.start = FailOnce(generator.engine.start)
    second = Received()
    submit(generator, 2, second)
    deadline = time.monotonic() + 10
    while generator.health() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert "generation thread failed" in generator.health()
    for received in (first, second):
        deadline = time.monotonic() + 10
        while not received.finals:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.2)  # nothing may follow the last chunk
        assert received.finals == ["error"] and isinstance(received.chunks[-1].error, LoopFailed)
    with pytest.raises(LoopFailed, match="generation thread failed"):
        submit(generator, 3, Received())
    assert generator.stats().streams == 0


def test_engine_steps_failing_again_and_again_fail_the_loop(fresh_generator: Generator) -> None:
    generator = fresh_generator

    def broken_forward(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    generator.engine.model.backbone_forward = broken_forward  # a device gone bad: every step fails
    for seed in range(3):
        received = Received()
        submit(generator, seed, received).finished.wait(10)
        assert received.finals == ["error"]
    # The third failure fails the loop, which ends its stream: health says so by then.
    assert "illegal memory access" in generator.health()
    with pytest.raises(LoopFailed, match="3 engine steps in a row failed"):
        submit(generator, 3, Received())


def test_a_device_failure_fails_the_loop_at_once(fresh_generator: Generator) -> None:
    """A CUDA error under a graph replay (graphs.DeviceFailed) leaves nothing on the device
    usable: the first one fails the loop, so that the engine process is replaced."""
    generator = fresh_generator

    def failed_replay():
        raise DeviceFailed("the frame step failed on cuda:0: CUDA error: an illegal memory access was encountered")

    generator.engine.step = failed_replay
    received = Received()
    submit(generator, 1, received).finished.wait(10)
    assert received.finals == ["error"]
    assert "the device failed" in generator.health()
    with pytest.raises(LoopFailed, match="the device failed"):
        submit(generator, 2, Received())


def test_a_stalled_thread_is_reported(fresh_generator: Generator) -> None:
    generator = fresh_generator
    step, release = generator.engine.step, threading.Event()

    def slow_step():
        release.wait(10)
        return step()

    generator.engine.step = slow_step
    stream = submit(generator, 1, Received(), ms=400)
    deadline = time.monotonic() + 10
    while generator.health() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "generation thread has been busy with one round" in generator.health()
    release.set()
    stream.finished.wait(10)
    assert generator.health() is None
