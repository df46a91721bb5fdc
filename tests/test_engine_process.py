"""csm_stream's engine process, driven through WorkerClient as the Triton stub drives it: what it
answers, and what happens when it dies, hangs, cannot come back, or its stub dies."""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from csm_triton import GenerationRequest, Generator, Segment
from csm_triton.engine.pacing import ChunkPlan
from csm_triton.request import audio_key
from csm_triton.triton.protocol import ChunkOut, Generate, Refused, Status, WorkerSettings
from csm_triton.triton.serving import ServingConfig
from csm_triton.triton.worker_client import WorkerClient, WorkerUnavailable

pytestmark = pytest.mark.server

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class Inbox:
    """A request's handler: what the engine client hands it, in order."""

    def __init__(self) -> None:
        self.messages: queue.Queue = queue.Queue()

    def __call__(self, message: ChunkOut | Refused) -> None:
        self.messages.put((time.monotonic(), message))

    def until_last(self, timeout_s: float = 60.0) -> list:
        """Every message up to the last one (a final chunk, a refusal or a loss); then checks
        that nothing follows it."""
        received = []
        while True:
            _, message = self.messages.get(timeout=timeout_s)
            received.append(message)
            if not isinstance(message, ChunkOut) or message.finish is not None:
                break
        time.sleep(0.2)
        assert self.messages.empty(), "a message came after the last one"
        return received


def settings(tiny_model_dir: Path, **parameters: str) -> WorkerSettings:
    values = {"model_dir": "no-weights-staged", "tiny_model_dir": str(tiny_model_dir), "slots": "2", **parameters}
    return WorkerSettings(ServingConfig.from_parameters({key: {"string_value": value} for key, value in values.items()}), str(PROJECT_ROOT))


def start(tiny_model_dir: Path, gave_up: list[str], max_restarts: int = 5, **parameters: str) -> WorkerClient:
    worker = settings(tiny_model_dir, **parameters)
    client = WorkerClient(sys.executable, worker, gave_up.append, max_restarts=max_restarts, heartbeat_timeout_s=3)
    client.start()
    return client


@pytest.fixture
def client(tiny_model_dir: Path) -> Iterator[WorkerClient]:
    client = start(tiny_model_dir, [])
    yield client
    client.close()


def long_request(seed: int) -> GenerationRequest:
    return GenerationRequest("A long answer, please.", 0, max_audio_length_ms=20_000, seed=seed)


def wait_until_up(client: WorkerClient, timeout_s: float = 30.0) -> float:
    start = time.monotonic()
    while client.down is not None:
        assert time.monotonic() - start < timeout_s, client.down
        time.sleep(0.05)
    return time.monotonic() - start


def engine_pid(client: WorkerClient) -> int:
    deadline = time.monotonic() + 10
    while client.heartbeat is None:  # the first heartbeat: the engine serves
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return client._worker.process.pid


def test_answers_as_the_generator_does(client: WorkerClient, generator: Generator) -> None:
    inbox = Inbox()
    request = GenerationRequest("Across a process.", 1, max_audio_length_ms=1200, seed=4)
    client.generate(request, inbox, True, ChunkPlan(2, 5, adaptive=False))
    chunks = inbox.until_last()
    assert [len(chunk.codes) for chunk in chunks] == [2, 5, 5, 3] and chunks[-1].finish == "length"
    codes = generator.generate_codes("Across a process.", 1, [], max_audio_length_ms=1200, seed=4)
    assert (sum(len(chunk.audio) for chunk in chunks), chunks[0].codes.dtype.name) == (15 * 1920, "int32")
    assert [row for chunk in chunks for row in chunk.codes.tolist()] == codes.tolist()
    invalid = Inbox()  # within the limits (the stub's to check), but too long a prompt for the model: the worker's one check
    limits = dataclasses.replace(generator.limits, max_text_bytes=8000)
    request = GenerationRequest("Too long a prompt. " * 400, 0, seed=1)
    limits.check(request)
    client.generate(request, invalid, False, ChunkPlan(2, 12, adaptive=False))
    (refusal,) = invalid.until_last()
    assert isinstance(refusal, Refused) and refusal.status is Status.INVALID_ARG and refusal.message.startswith("prompt: ")


def test_a_clip_sent_before_is_named_by_its_content_key(client: WorkerClient, generator: Generator) -> None:
    """The second request with a clip sends its key, not its audio, and speaks as the first; a key
    the engine process does not hold (its cache lost it) brings the clip whole, once more."""
    samples = np.random.default_rng(1).uniform(-0.5, 0.5, 4 * 1920).astype(np.float32)
    request = GenerationRequest("After a clip.", 1, [Segment(0, "A clip.", samples)], max_audio_length_ms=400, seed=2)
    expected = generator.generate_codes("After a clip.", 1, [Segment(0, "A clip.", samples)], max_audio_length_ms=400, seed=2)
    sent: list[Generate] = []
    worker = client._worker
    send = worker.send
    worker.send = lambda message: (sent.append(message), send(message))
    for _ in range(2):
        inbox = Inbox()
        client.generate(request, inbox, False, ChunkPlan(2, 12, adaptive=False))
        assert [row for chunk in inbox.until_last() for row in chunk.codes.tolist()] == expected.tolist()
    assert [message.clips for message in sent] == [(), ((0, audio_key(samples, 24_000)),)]
    assert sent[0].request.context[0].audio is not None and sent[1].request.context[0].audio is None
    other = np.random.default_rng(2).uniform(-0.5, 0.5, 4 * 1920).astype(np.float32)
    client._clips_sent[audio_key(other, 24_000)] = None  # as if sent before, to a cache that has lost it
    inbox = Inbox()
    client.generate(
        GenerationRequest("After another.", 1, [Segment(0, "Another.", other)], max_audio_length_ms=400, seed=3),
        inbox,
        False,
        ChunkPlan(2, 12, adaptive=False),
    )
    codes = [row for chunk in inbox.until_last() for row in chunk.codes.tolist()]
    assert codes == generator.generate_codes("After another.", 1, [Segment(0, "Another.", other)], max_audio_length_ms=400, seed=3).tolist()
    assert [message.clips != () for message in sent[2:]] == [True, False]  # named, refused as unknown, sent whole


def test_requests_beyond_max_waiting_are_refused_as_busy(tiny_model_dir: Path) -> None:
    client = start(tiny_model_dir, [], slots="1", max_waiting_requests="1")
    try:
        inboxes = [Inbox() for _ in range(4)]
        for seed, inbox in enumerate(inboxes):
            client.generate(long_request(seed), inbox, False, ChunkPlan(2, 12, adaptive=False))
        refused = [inbox.until_last(10) for inbox in inboxes[2:]]
        assert all(isinstance(message, Refused) and message.status is Status.BUSY for (message,) in refused)
    finally:
        client.close()
    for inbox in inboxes[:2]:  # closing cancels what runs and waits: each gets its last chunk
        assert inbox.until_last()[-1].finish == "cancelled"


def test_a_killed_engine_loses_its_requests_at_once_and_a_new_one_serves(client: WorkerClient, generator: Generator) -> None:
    inboxes = [Inbox() for _ in range(3)]
    for seed, inbox in enumerate(inboxes):
        client.generate(long_request(seed), inbox, True, ChunkPlan(2, 12, adaptive=False))
    inboxes[0].messages.put(inboxes[0].messages.get(timeout=30))  # generating: its first chunk is out
    os.kill(engine_pid(client), signal.SIGKILL)
    killed = time.monotonic()
    for inbox in inboxes:
        *_, last = inbox.until_last(10)
        assert isinstance(last, Refused) and last.status is Status.UNAVAILABLE and "killed by SIGKILL" in last.message
    with pytest.raises(WorkerUnavailable, match=r"killed by SIGKILL\); a new one is starting"):
        client.generate(long_request(9), Inbox(), True, ChunkPlan(2, 12, adaptive=False))
    assert time.monotonic() - killed < 5
    assert wait_until_up(client) < 30 and client.restarts == 1
    inbox = Inbox()
    client.generate(GenerationRequest("Back again.", 2, max_audio_length_ms=800, seed=5), inbox, False, ChunkPlan(2, 12, adaptive=False))
    codes = [row for chunk in inbox.until_last() for row in chunk.codes.tolist()]
    assert codes == generator.generate_codes("Back again.", 2, [], max_audio_length_ms=800, seed=5).tolist()


def test_a_hung_engine_is_killed_and_replaced(client: WorkerClient) -> None:
    inbox = Inbox()
    client.generate(long_request(1), inbox, True, ChunkPlan(2, 12, adaptive=False))
    pid = engine_pid(client)
    os.kill(pid, signal.SIGSTOP)  # frozen: no heartbeat, no chunk
    *_, last = inbox.until_last(15)
    assert isinstance(last, Refused) and last.status is Status.UNAVAILABLE and "sent nothing for" in last.message
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    wait_until_up(client)
    assert client.restarts == 1


def test_a_handler_that_blocks_holds_up_its_own_request_alone(client: WorkerClient, generator: Generator) -> None:
    """A send to a Triton client can block; while one request's handler is stuck for longer than
    the heartbeat timeout (3 s here), the engine is not taken for hung, another request runs to
    its end, and the stuck one then gets all its messages, in order."""
    release = threading.Event()
    stuck = Inbox()

    def blocking(message: ChunkOut | Refused) -> None:
        release.wait(30)
        stuck(message)

    client.generate(GenerationRequest("Held up.", 0, max_audio_length_ms=800, seed=6), blocking, False, ChunkPlan(2, 4, adaptive=False))
    other = Inbox()
    client.generate(GenerationRequest("Going on.", 1, max_audio_length_ms=800, seed=7), other, False, ChunkPlan(2, 4, adaptive=False))
    assert other.until_last()[-1].finish == "length"
    time.sleep(4)  # past the heartbeat timeout, with the first handler still blocked
    assert client.restarts == 0 and client.down is None and stuck.messages.empty()
    release.set()
    codes = [row for chunk in stuck.until_last() for row in chunk.codes.tolist()]
    assert codes == generator.generate_codes("Held up.", 0, [], max_audio_length_ms=800, seed=6).tolist()


def test_an_engine_that_cannot_be_kept_running_is_given_up(tiny_model_dir: Path) -> None:
    gave_up: list[str] = []
    client = start(tiny_model_dir, gave_up, max_restarts=0)
    try:
        os.kill(engine_pid(client), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not gave_up:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert "1 engine processes ended" in gave_up[0] and "killed by SIGKILL" in gave_up[0]
        with pytest.raises(WorkerUnavailable, match="csm_stream cannot serve"):
            client.generate(long_request(1), Inbox(), True, ChunkPlan(2, 12, adaptive=False))
    finally:
        client.close()


def test_a_load_failure_is_passed_back_with_the_workers_message(tiny_model_dir: Path) -> None:
    with pytest.raises(WorkerUnavailable, match="kv_cache_memory_mb: 1 MiB holds no slot"):
        start(tiny_model_dir, [], kv_cache_memory_mb="1")


def test_an_engine_without_a_staged_model_fails_to_start_saying_how_to_stage_one(tmp_path: Path) -> None:
    with pytest.raises(WorkerUnavailable, match=r"no model is staged: .*`make export`.*`make export-tiny`"):
        start(tmp_path / "no-tiny-model", [])


def test_the_engine_dies_with_its_stub(tiny_model_dir: Path) -> None:
    """A stub killed outright leaves no engine process holding the GPU behind it."""
    stub = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_engine_process import start
        client = start(Path({str(tiny_model_dir)!r}), [])
        print(client._worker.process.pid, flush=True)
        time.sleep(600)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", stub], stdout=subprocess.PIPE, text=True)
    try:
        engine = psutil.Process(int(process.stdout.readline()))
        assert engine.is_running()
        process.kill()
        engine.wait(timeout=10)  # raises psutil.TimeoutExpired if it lives on
    finally:
        process.kill()
        process.wait()
