"""The csm front and its control of csm_stream in a real tritonserver (explicit model control, every
model loaded at start): CANCEL and PROBE answered at once, a client's cancellation and a deadline
passed on to csm_stream, max_inflight refusing at once, and csm_stream's process killed under
requests in flight: they end with an error and csm_stream serves again by itself."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from test_metrics import scrape, series
from test_model_control import config_with, stubs
from test_triton_stream import Streams, gauges, wait_for_idle_server
from tritonclient.utils import InferenceServerException

from conftest import tiny_server
from csm_client import CSMClient, CSMError
from csm_triton.tools.server import TritonServer
from triton_tensors import request, scalar, tensors

pytestmark = pytest.mark.server

SLOTS = 4
LONG_MS = 30_000  # the tiny model takes well over 10 s for it here: only a cancel ends it sooner
CANCELLED = series("csm_rejected_requests_total", reason="cancelled", field="")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TritonServer]:
    """The csm front's watch retries a reload 1 s apart, doubling, not 5 s (test_recovery.py keeps
    `make serve`'s defaults)."""
    explicit = ["--model-control-mode=explicit", "--load-model=*"]
    with tiny_server(
        tmp_path_factory.mktemp("front"), tiny_model_dir, SLOTS, explicit, models={"csm": {"reload_backoff_s": "1"}}
    ) as server:
        yield server


@pytest.fixture
def client(server: TritonServer) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


@contextlib.contextmanager
def csm_with(server: TritonServer, client: grpcclient.InferenceServerClient, **parameters: str) -> Iterator[None]:
    """csm loaded with some parameters changed, then again as config.pbtxt has it."""
    client.load_model("csm", config=config_with(server, "csm", **parameters), headers=server.admin_headers("grpc"))
    try:
        yield
    finally:
        client.load_model(
            "csm", config=config_with(server, "csm"), headers=server.admin_headers("grpc")
        )  # a load without a config keeps the one above


def lasting(text: str, audio_ms: int = LONG_MS) -> dict[str, np.ndarray]:
    """A request for `audio_ms` of audio."""
    return request(text, MAX_AUDIO_LENGTH_MS=scalar(audio_ms, np.int32))


def infer(server: TritonServer, arrays: dict[str, np.ndarray]) -> tuple[float, object]:
    """A csm request: (seconds it took, its codes or the InferenceServerException)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    start = time.monotonic()
    try:
        result = client.infer("csm", tensors(grpcclient, arrays), outputs=[grpcclient.InferRequestedOutput("AUDIO_CODES")])
        return time.monotonic() - start, result.as_numpy("AUDIO_CODES")[0]
    except InferenceServerException as error:
        return time.monotonic() - start, error
    finally:
        client.close()


def wait_for_streams(server: TritonServer, count: int, timeout_s: float = 30.0) -> None:
    """Until csm_stream has `count` streams (its metrics lag by up to a second: the engine's
    heartbeat, then the stub's metrics reporter, each every 0.5 s)."""
    deadline = time.monotonic() + timeout_s
    while gauges(server).get("csm_streams", 0) < count:
        assert time.monotonic() < deadline, f"csm_stream never had {count} streams: {gauges(server)}"
        time.sleep(0.2)


def test_probe_and_cancel_are_answered_at_once_with_one_final_response(server: TritonServer) -> None:
    streams = Streams(server)
    try:
        streams.send("long", lasting("Cancel me by my forward id."), {"csm_forward_id": "f1"})
        while not streams.received["long"].chunks:
            streams.pump()
        streams.send("probe", request(""), {"csm_probe": True})
        streams.send("cancel", request(""), {"csm_cancel": "f1"})
        streams.run_until_done(["probe", "cancel", "long"], timeout_s=30)
        for name in ("probe", "cancel"):
            answer = streams.received[name]
            assert answer.error is None and answer.responses == 1 and not answer.chunks
            assert answer.arrivals == [] and time.monotonic() - answer.start < 10
        long = streams.received["long"]
        assert long.error is None and len(long.audio) < LONG_MS * 24  # ended well before its 30 s of audio
        # A CANCEL that overtakes the request it names stops it all the same.
        streams.send("early cancel", request(""), {"csm_cancel": "f2"})
        streams.run_until_done(["early cancel"])
        streams.send("late", lasting("Too late."), {"csm_forward_id": "f2"})
        streams.run_until_done(["late"], timeout_s=30)
        assert len(streams.received["late"].chunks) <= 2
        time.sleep(1)  # nothing more comes for the control requests
        assert streams.events.empty() and streams.received["probe"].responses == streams.received["cancel"].responses == 1
    finally:
        streams.close()
    wait_for_idle_server(server)


def test_a_cancelled_request_stops_its_generation_and_another_finishes(server: TritonServer) -> None:
    [front] = stubs(server, "csm")
    threads_before = front.num_threads()
    before = scrape(server)

    async def run() -> tuple[float, np.ndarray]:
        client = grpcclient_aio.InferenceServerClient(server.grpc_url)
        try:
            outputs = [grpcclient_aio.InferRequestedOutput("AUDIO_CODES")]
            doomed = asyncio.create_task(client.infer("csm", tensors(grpcclient_aio, lasting("Cancel me."))))
            # Long enough to be seen beside the other: csm_stream's gauges lag by up to a second.
            other = asyncio.create_task(client.infer("csm", tensors(grpcclient_aio, lasting("I finish.", 4000)), outputs=outputs))
            await asyncio.to_thread(wait_for_streams, server, 2)
            doomed.cancel()
            cancelled_at = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await doomed
            return cancelled_at, (await other).as_numpy("AUDIO_CODES")[0]
        finally:
            await client.close()

    cancelled_at, codes = asyncio.run(run())
    assert codes.shape == (50, 32)
    wait_for_idle_server(server, timeout_s=10)
    assert time.monotonic() - cancelled_at < 10  # generation alone would have gone on for many seconds more
    time.sleep(1)  # the metrics reporter's interval
    assert scrape(server)[CANCELLED] - before.get(CANCELLED, 0) == 1
    # The call's reading thread ended with csm_stream's final response (probes come and go meanwhile).
    deadline = time.monotonic() + 10
    while front.num_threads() > threads_before + 1:
        assert time.monotonic() < deadline, f"csm has {front.num_threads()} threads, {threads_before} before"
        time.sleep(0.2)


def test_a_request_past_its_deadline_ends_unavailable_and_its_stream_is_cancelled(
    server: TritonServer, client: grpcclient.InferenceServerClient
) -> None:
    before = scrape(server)
    with csm_with(server, client, first_audio_timeout_s="2", max_real_time_factor="0.05"):
        seconds, outcome = infer(server, lasting("A long answer."))
        ended = time.monotonic()
    assert isinstance(outcome, InferenceServerException) and outcome.status() == "StatusCode.UNAVAILABLE"
    assert "not finished within the deadline of 3.5 s" in outcome.message()
    assert "first_audio_timeout_s 2 + 30 s of audio x max_real_time_factor 0.05" in outcome.message()
    assert 3.5 <= seconds < 15
    wait_for_idle_server(server, timeout_s=10)
    assert time.monotonic() - ended < 10
    time.sleep(1)
    assert scrape(server)[CANCELLED] - before.get(CANCELLED, 0) == 1


def test_past_max_inflight_a_request_is_refused_at_once(server: TritonServer, client: grpcclient.InferenceServerClient) -> None:
    with csm_with(server, client, max_inflight="2"), ThreadPoolExecutor(2) as pool:
        first = [pool.submit(infer, server, lasting(f"In flight {index}.", 4000)) for index in range(2)]
        wait_for_streams(server, 2)
        start = time.monotonic()
        with CSMClient(server.grpc_url) as csm, pytest.raises(CSMError) as refused:
            csm.generate("One too many.", 0, max_audio_length_ms=400)
        assert time.monotonic() - start < 2
        assert refused.value.busy and refused.value.status == "StatusCode.UNAVAILABLE"
        assert refused.value.message == "server busy: csm: 2 requests in flight; retry later"
        for future in first:
            _, codes = future.result(timeout=60)
            assert isinstance(codes, np.ndarray) and codes.shape == (50, 32)


def seeded_codes(server: TritonServer) -> object:
    return infer(server, request("Same seed, same codes."))[1]


def test_a_killed_csm_stream_fails_the_requests_in_flight_and_serves_again(
    server: TritonServer, client: grpcclient.InferenceServerClient
) -> None:
    before = seeded_codes(server)
    assert isinstance(before, np.ndarray)
    [stub] = stubs(server, "csm_stream")
    with ThreadPoolExecutor(3) as pool:
        in_flight: list[Future] = [pool.submit(infer, server, lasting(f"Lost {index}.")) for index in range(3)]
        wait_for_streams(server, 3)
        stub.kill()
        killed = time.monotonic()
        outcomes = [future.result(timeout=60) for future in in_flight]
        errored_s = time.monotonic() - killed
    for _, outcome in outcomes:
        assert isinstance(outcome, InferenceServerException) and outcome.status() == "StatusCode.UNAVAILABLE"
        assert "csm_stream's process died and this request was lost; retry it" in outcome.message()
    assert errored_s < 15, f"the requests in flight ended {errored_s:.1f} s after the kill"

    while not isinstance(after := seeded_codes(server), np.ndarray):
        assert re.search("process has died|not ready|unknown model", after.message()), after
        assert time.monotonic() - killed < 60, "csm_stream did not serve again"
        time.sleep(0.5)
    served_s = time.monotonic() - killed
    assert np.array_equal(after, before)
    assert [process.pid for process in stubs(server, "csm_stream")] != [stub.pid]
    assert client.is_server_ready() and client.is_model_ready("csm_stream")
    print(f"in flight ended {errored_s:.1f} s after the kill; csm_stream served again after {served_s:.1f} s")


def test_a_csm_stream_that_cannot_be_reloaded_is_unloaded_and_the_server_is_not_ready(
    server: TritonServer, client: grpcclient.InferenceServerClient
) -> None:
    config = server.options.model_repository / "csm_stream" / "config.pbtxt"
    text = config.read_text()
    config.write_text(text.replace('"kv_cache_memory_mb", value: { string_value: "0"', '"kv_cache_memory_mb", value: { string_value: "1"'))
    try:
        [stub] = stubs(server, "csm_stream")
        stub.kill()
        killed = time.monotonic()
        while client.is_server_ready():
            assert time.monotonic() - killed < 120, "the server stayed ready with csm_stream dead"
            time.sleep(0.5)
        assert not client.is_model_ready("csm_stream") and client.is_server_live()
        # Not ready from the first failed load on (it unloaded csm_stream), and so it stays.
        while "could not be reloaded in 3 tries: unloading it" not in Path(server.log_file).read_text():
            assert not client.is_server_ready() and not client.is_model_ready("csm_stream")
            assert time.monotonic() - killed < 120, "the watch did not give up"
            time.sleep(0.5)
        assert "reloading csm_stream: unload, then load (try 3 of 3)" in Path(server.log_file).read_text()
        assert not client.is_server_ready()
    finally:
        config.write_text(text)
    client.load_model("csm_stream", headers=server.admin_headers("grpc"))
    assert client.is_server_ready()
