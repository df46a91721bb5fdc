"""The decoupled "csm_stream" model in a real tritonserver over gRPC streaming: chunks as frames
are generated, requests joining a running batch, cancellation, and a bounded queue."""

from __future__ import annotations

import functools
import queue
import re
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from csm_client.contract import SAMPLES_PER_FRAME
from csm_triton import Generator
from csm_triton.tools.server import ServerOptions, TritonServer, model_repository_with
from triton_tensors import chunk_sizes, request, scalar, tensors, vector

pytestmark = pytest.mark.server

STREAM_MODEL = "csm_stream"


@dataclass
class Received:
    """What one stream got: the audio chunks with their arrival times, or an error."""

    start: float
    chunks: list[np.ndarray] = field(default_factory=list)
    codes: list[np.ndarray] = field(default_factory=list)  # each chunk's AUDIO_CODES [frames, 32]
    arrivals: list[float] = field(default_factory=list)
    error: Exception | None = None
    done: bool = False
    responses: int = 0  # errors included

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.chunks)


class Streams:
    """Streaming requests, each on its own gRPC stream (Triton's stream errors carry no request
    id), with their responses gathered in one queue in arrival order."""

    def __init__(self, server: TritonServer) -> None:
        self.url = server.grpc_url
        self.events: queue.Queue = queue.Queue()
        self.clients: dict[str, grpcclient.InferenceServerClient] = {}
        self.received: dict[str, Received] = {}

    def send(self, request_id: str, arrays: dict[str, np.ndarray], parameters: dict[str, str | bool] | None = None) -> None:
        """Starts a request; `parameters` are its Triton request parameters (csm_triton/triton/bls.py's control protocol)."""
        client = self.clients[request_id] = grpcclient.InferenceServerClient(self.url)
        client.start_stream(callback=functools.partial(self._on_response, request_id))
        self.received[request_id] = Received(time.monotonic())
        client.async_stream_infer(
            STREAM_MODEL, tensors(grpcclient, arrays), request_id=request_id, enable_empty_final_response=True, parameters=parameters
        )

    def _on_response(self, request_id: str, result, error) -> None:
        self.events.put((request_id, time.monotonic(), result, error))

    def pump(self, timeout_s: float = 60.0) -> tuple[str, Received]:
        """Wait for the next response; returns (request id, what that request has so far)."""
        request_id, arrival, result, error = self.events.get(timeout=timeout_s)
        received = self.received[request_id]
        received.responses += 1
        if error is not None:
            received.error, received.done = error, True
            return request_id, received
        codes = result.as_numpy("AUDIO_CODES")
        if codes is not None:
            received.codes.append(codes[0])
        audio = result.as_numpy("AUDIO")
        if audio is not None:
            received.chunks.append(audio[0])
            received.arrivals.append(arrival - received.start)
        received.done = result.get_response().parameters["triton_final_response"].bool_param
        return request_id, received

    def run_until_done(self, request_ids: list[str], timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not all(self.received[r].done for r in request_ids):
            self.pump(timeout_s=max(0.1, deadline - time.monotonic()))

    def cancel(self, request_id: str) -> None:
        self.clients.pop(request_id).stop_stream(cancel_requests=True)

    def close(self) -> None:
        """Cancel the requests still running. (Cancelling the stream of a request that Triton
        refused for a full queue leaves tritonserver 2.51 unable to unload the model at exit.)"""
        for request_id, client in self.clients.items():
            client.stop_stream(cancel_requests=not self.received[request_id].done)
            client.close()
        self.clients.clear()


@pytest.fixture
def streaming(triton_server: TritonServer) -> Iterator[Streams]:
    streams = Streams(triton_server)
    yield streams
    streams.close()


def gauges(server: TritonServer) -> dict[str, float]:
    with urllib.request.urlopen(f"http://localhost:{server.options.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {name: float(value) for name, value in re.findall(r'^(csm_\w+)\{model="csm_stream"\} (\S+)$', text, re.MULTILINE)}


def wait_for_idle_server(server: TritonServer, timeout_s: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        values = gauges(server)
        if values.get("csm_streams") == 0 and values.get("csm_active_slots") == 0:
            return values
        assert time.monotonic() < deadline, f"the server did not go idle: {values}"
        time.sleep(0.25)


def stream_model_processes(server: TritonServer) -> tuple[psutil.Process, psutil.Process]:
    """csm_stream's python-backend stub (requests and response senders) and its engine process
    (the serving loop, weights and caches), the stub's child beside its orphan watch."""
    for child in psutil.Process(server.process.pid).children():
        if "csm_stream" in " ".join(child.cmdline()):
            (engine,) = [process for process in child.children() if "engine_worker" in " ".join(process.cmdline())]
            return child, engine
    raise AssertionError("no python-backend stub process for csm_stream")


def test_chunks_arrive_as_frames_are_generated_and_join_to_the_unary_audio(
    triton_server: TritonServer, streaming: Streams, generator: Generator
) -> None:
    arrays = request(
        "Streaming from Triton.",
        1,
        MAX_AUDIO_LENGTH_MS=scalar(3200, np.int32),
        FIRST_CHUNK_FRAMES=scalar(2, np.int32),
        CHUNK_FRAMES=scalar(6, np.int32),
    )
    streaming.send("s", arrays)
    streaming.run_until_done(["s"])
    received = streaming.received["s"]
    assert received.error is None
    # Independent of the server's chunking: Mimi's one-shot decode of the same codes in process.
    codes = generator.generate_codes("Streaming from Triton.", 1, [], max_audio_length_ms=3200, seed=3)
    sizes = [len(chunk) // SAMPLES_PER_FRAME for chunk in received.chunks if len(chunk)]
    assert sizes == chunk_sizes(len(codes), 2, 6) and len(sizes) >= 3
    assert received.arrivals[0] < received.arrivals[-1] / 2  # the first audio came long before the last was generated
    assert np.abs(received.audio - generator.codec.decode(codes).numpy()).max() < 1e-4
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    unary = client.infer("csm", tensors(grpcclient, request("Streaming from Triton.", 1, MAX_AUDIO_LENGTH_MS=scalar(3200, np.int32))))
    assert np.abs(received.audio - unary.as_numpy("AUDIO")[0]).max() < 1e-4


def test_by_default_chunks_start_short_and_end_on_decoder_passes(streaming: Streams, generator: Generator) -> None:
    """No chunk sizes sent: the adaptive schedule (csm_triton/engine/pacing.py). The first chunk holds 2
    frames; each later one ends where the stream has a whole number of 4-frame decoder passes (the
    fixed 2/12 cut would end at 14 frames), holds at most 12, and the chunks join to the one-shot decode."""
    streaming.send("a", request("Paced for its listener.", 0, MAX_AUDIO_LENGTH_MS=scalar(4000, np.int32)))
    streaming.run_until_done(["a"])
    received = streaming.received["a"]
    assert received.error is None
    codes = generator.generate_codes("Paced for its listener.", 0, [], max_audio_length_ms=4000, seed=3)
    sizes = [len(chunk) // SAMPLES_PER_FRAME for chunk in received.chunks if len(chunk)]
    assert sizes[0] == 2 and max(sizes) <= 12 and sum(sizes) == len(codes)
    assert all(sum(sizes[: index + 1]) % 4 == 0 for index in range(1, len(sizes) - 1)), sizes
    assert np.abs(received.audio - generator.codec.decode(codes).numpy()).max() < 1e-4


def test_a_short_request_joins_a_long_one_and_finishes_first(streaming: Streams) -> None:
    streaming.send("long", request("A long answer to a long question.", 0, MAX_AUDIO_LENGTH_MS=scalar(6000, np.int32)))
    while not streaming.received["long"].chunks:
        streaming.pump()
    streaming.send("short", request("Yes.", 1, MAX_AUDIO_LENGTH_MS=scalar(400, np.int32)))
    finished = []
    while len(finished) < 2:
        request_id, received = streaming.pump()
        assert received.error is None
        if received.done:
            finished.append(request_id)
    long, short = streaming.received["long"], streaming.received["short"]
    assert finished == ["short", "long"]
    long_left_when_short_came = long.arrivals[-1] - (short.start - long.start)
    assert short.arrivals[0] < long_left_when_short_came / 3


def test_cancelled_streams_free_their_slots_and_leave_nothing_behind(triton_server: TritonServer, generator: Generator) -> None:
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    client.infer("csm", tensors(grpcclient, request("Warm up.", 0)))  # torch's worker threads start on first use
    wait_for_idle_server(triton_server)
    processes = stream_model_processes(triton_server)
    threads_before = [process.num_threads() for process in processes]
    memory_before = [process.memory_info().rss for process in processes]
    streams = Streams(triton_server)
    for index in range(100):
        name = f"c{index}"
        streams.send(name, request("Cancel me.", index % 3, MAX_AUDIO_LENGTH_MS=scalar(20_000, np.int32), SEED=scalar(index, np.int64)))
        if index % 10 == 0:  # some after their audio has started, the rest at once
            while not streams.received[name].chunks:
                streams.pump()
        streams.cancel(name)
    streams.close()
    values = wait_for_idle_server(triton_server, timeout_s=60)
    assert values["csm_waiting_requests"] == 0 and values["csm_loop_threads"] == 2
    assert [process.num_threads() for process in processes] == threads_before
    for process, before in zip(processes, memory_before, strict=True):
        assert process.memory_info().rss - before < 200 * 2**20
    # The slots are free: a new request runs and gives the same codes as in process.
    codes = client.infer("csm", tensors(grpcclient, request("After the storm.", 2))).as_numpy("AUDIO_CODES")[0]
    assert np.array_equal(codes, generator.generate_codes("After the storm.", 2, [], max_audio_length_ms=400, seed=3).numpy())


def test_invalid_chunk_sizes_fail_alone(streaming: Streams) -> None:
    streaming.send("bad", request(CHUNK_FRAMES=scalar(0, np.int32)))
    streaming.send("good", request("Fine.", 0))
    streaming.run_until_done(["bad", "good"])
    assert "CHUNK_FRAMES: must be in [1, 375] frames of 80 ms, got 0" in str(streaming.received["bad"].error)
    assert streaming.received["good"].error is None and len(streaming.received["good"].audio) == 5 * SAMPLES_PER_FRAME


def with_context_audio(samples: int, sample_rate: int) -> dict[str, np.ndarray]:
    return request(
        CONTEXT_TEXT=vector([b"Earlier."], object),
        CONTEXT_SPEAKER=vector([1], np.int32),
        CONTEXT_AUDIO=vector(np.zeros(samples), np.float32),
        CONTEXT_AUDIO_LENGTHS=vector([samples], np.int32),
        CONTEXT_SAMPLE_RATE=scalar(sample_rate, np.int32),
    )


@pytest.mark.parametrize(
    ("samples", "sample_rate", "message"),
    [
        # Four samples at 12007 Hz once took 10 s and 4.9 GB: torchaudio's filter for 12007:24000.
        (4, 12_007, "CONTEXT_SAMPLE_RATE: 12007 Hz is 12007:24000 to Mimi's 24000 Hz, whose resampling filter would take"),
        (4, 1_000_000, r"CONTEXT_SAMPLE_RATE: must be in [8000, 48000] Hz, got 1000000"),
        (2045 * 640 + 8, 8000, "CONTEXT_AUDIO: segment 0 holds 1308808 samples at 8000 Hz, which bring the context audio to 2047"),
    ],
    ids=["12007 Hz", "1 MHz", "longer than the prompt at 8 kHz"],
)
def test_costly_context_audio_is_refused_at_once_in_bounded_memory(
    triton_server: TritonServer, samples: int, sample_rate: int, message: str
) -> None:
    """Refused before it is resampled, unary and streaming, and the model's processes barely grow."""
    processes = stream_model_processes(triton_server)
    memory_before = [process.memory_info().rss for process in processes]
    arrays = with_context_audio(samples, sample_rate)
    start = time.monotonic()
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("csm", tensors(grpcclient, arrays))
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT" and message in caught.value.message()
    streams = Streams(triton_server)
    try:
        streams.send("costly", arrays)
        streams.run_until_done(["costly"], timeout_s=30)
    finally:
        streams.close()
    assert message in str(streams.received["costly"].error)
    assert time.monotonic() - start < 10  # both answers; the resampling alone took 10 s
    for process, before in zip(processes, memory_before, strict=True):
        assert process.memory_info().rss - before < 100 * 2**20


@pytest.fixture(scope="module")
def one_slot_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TritonServer]:
    """A server with one slot and room for one request waiting for it."""
    root = tmp_path_factory.mktemp("one-slot")
    parameters = {"model_dir": str(root / "none"), "tiny_model_dir": str(tiny_model_dir), "slots": "1", "max_waiting_requests": "1"}
    repository = model_repository_with(root / "model_repository", parameters)
    server = TritonServer(ServerOptions.on_free_ports(repository), log_file=root / "tritonserver.log").start()
    yield server
    server.stop()


def test_a_full_queue_answers_server_busy_at_once(one_slot_server: TritonServer) -> None:
    streaming = Streams(one_slot_server)
    try:
        for index in range(14):
            streaming.send(f"r{index}", request(f"Caller {index}.", 0, MAX_AUDIO_LENGTH_MS=scalar(8000, np.int32)))
        rejected = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                request_id, received = streaming.pump(timeout_s=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                break
            if received.error is not None:
                rejected.append((request_id, time.monotonic() - received.start, str(received.error)))
        assert len(rejected) == 12, "one request generates, one waits for its slot, the others are refused"
        for _, seconds, message in rejected:
            assert "Exceeds maximum queue size" in message and "max_waiting_requests" in message
            assert seconds < 2.0
    finally:
        streaming.close()
    assert grpcclient.InferenceServerClient(one_slot_server.grpc_url).is_server_ready()
    wait_for_idle_server(one_slot_server, timeout_s=60)
