"""Faults through a real tritonserver: a storm of cancelled streams and dropped clients leaves
nothing behind; a killed engine process ends its requests at once and csm_stream serves again by
itself; an engine that cannot be kept running unloads csm_stream, and its readiness says so (what
the Kubernetes probes ask: an unloaded model leaves tritonserver's own /v2/health/ready at 200)."""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from test_triton_stream import Streams, gauges, stream_model_processes, wait_for_idle_server

from csm_triton.tools.server import ServerOptions, TritonServer, model_repository_with
from triton_tensors import request, scalar, tensors

pytestmark = pytest.mark.server

STORM_STREAMS = 200


def serve(root: Path, tiny_model_dir: Path, max_queue_size: int | None = None, **parameters: str) -> TritonServer:
    values = {"model_dir": str(root / "none"), "tiny_model_dir": str(tiny_model_dir), "slots": "4", **parameters}
    repository = model_repository_with(root / "model_repository", values, max_queue_size=max_queue_size)
    return TritonServer(ServerOptions.on_free_ports(repository), log_file=root / "tritonserver.log").start()


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TritonServer]:
    """Room for the whole storm to wait for a slot at once, and in Triton's queue for the burst."""
    root = tmp_path_factory.mktemp("faults")
    server = serve(root, tiny_model_dir, max_queue_size=STORM_STREAMS, max_waiting_requests=str(STORM_STREAMS))
    yield server
    server.stop()


def http_status(server: TritonServer, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{server.http_url}{path}", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def codes_of(server: TritonServer, text: str, seed: int) -> np.ndarray:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    arrays = request(text, 1, SEED=scalar(seed, np.int64))
    return client.infer("csm", tensors(grpcclient, arrays), outputs=[grpcclient.InferRequestedOutput("AUDIO_CODES")]).as_numpy(
        "AUDIO_CODES"
    )[0]


def test_the_stub_holds_no_torch(fault_server: TritonServer) -> None:
    stub, engine = stream_model_processes(fault_server)
    mapped = {process: " ".join(region.path for region in process.memory_maps()) for process in (stub, engine)}
    assert "libtorch" not in mapped[stub] and "libtorch" in mapped[engine]
    assert stub.memory_info().rss < engine.memory_info().rss / 2


async def one_stream(url: str, index: int, go: asyncio.Event, cancel_after_s: float, drop_channel: bool) -> str:
    """A stream that its client cancels (or whose channel it closes) `cancel_after_s` after `go`."""
    client = grpcclient_aio.InferenceServerClient(url)
    arrays = request(f"Storm {index}.", index % 3, MAX_AUDIO_LENGTH_MS=scalar(20_000, np.int32), SEED=scalar(index, np.int64))

    async def requests():
        yield {"model_name": "csm_stream", "inputs": tensors(grpcclient_aio, arrays), "request_id": str(index)}
        await asyncio.sleep(3600)  # keep the stream open

    async def read() -> None:
        async for _result, error in client.stream_infer(requests()):
            if error is not None:
                raise error

    task = asyncio.create_task(read())
    await go.wait()
    await asyncio.sleep(cancel_after_s)
    try:
        if drop_channel:
            await client.close()  # the client goes away without a word
        else:
            task.cancel()
        await asyncio.wait([task], timeout=10)
    finally:
        task.cancel()
        await client.close()
    return "dropped" if drop_channel else "cancelled"


def test_a_storm_of_cancelled_streams_and_dropped_clients_leaves_nothing_behind(fault_server: TritonServer) -> None:
    expected = codes_of(fault_server, "Before the storm.", 1)
    wait_for_idle_server(fault_server)
    processes = stream_model_processes(fault_server)
    threads_before = [process.num_threads() for process in processes]
    memory_before = [process.memory_info().rss for process in processes]
    chooser = random.Random(10)
    plan = [(index, chooser.uniform(0.0, 3.0), chooser.random() < 0.25) for index in range(STORM_STREAMS)]

    async def storm() -> tuple[float, list[str]]:
        """Every stream open at once, then each cancelled or dropped at its own random time."""
        go = asyncio.Event()
        streams = [asyncio.create_task(one_stream(fault_server.grpc_url, *stream[:1], go, *stream[1:])) for stream in plan]
        loop, deadline, peak = asyncio.get_running_loop(), time.monotonic() + 30, 0.0
        while peak < STORM_STREAMS and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            peak = max(peak, (await loop.run_in_executor(None, gauges, fault_server)).get("csm_streams", 0))
        go.set()
        return peak, await asyncio.gather(*streams)

    peak, outcomes = asyncio.run(storm())
    assert peak == STORM_STREAMS, f"only {peak} of the streams were in csm_stream at once"
    assert sorted(set(outcomes)) == ["cancelled", "dropped"]
    values = wait_for_idle_server(fault_server, timeout_s=90)
    assert (values["csm_waiting_requests"], values["csm_active_slots"], values["csm_loop_threads"]) == (0, 0, 2)
    assert values["csm_free_slots"] == values["csm_slots"]
    assert [process.num_threads() for process in processes] == threads_before
    for process, before in zip(processes, memory_before, strict=True):
        assert process.memory_info().rss - before < 200 * 2**20
    assert np.array_equal(codes_of(fault_server, "Before the storm.", 1), expected)


def restarts(server: TritonServer) -> float:
    with urllib.request.urlopen(f"http://localhost:{server.options.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    (value,) = re.findall(r'^csm_engine_restarts_total\{model="csm_stream"\} (\S+)$', text, re.MULTILINE)
    return float(value)


def test_a_killed_engine_ends_its_requests_at_once_and_csm_stream_serves_again(fault_server: TritonServer) -> None:
    expected = codes_of(fault_server, "After the kill.", 2)
    stub, engine = stream_model_processes(fault_server)
    restarts_before = restarts(fault_server)
    streams = Streams(fault_server)
    unary: list[tuple[float, Exception | None]] = []

    def unary_call(index: int) -> None:
        client = grpcclient.InferenceServerClient(fault_server.grpc_url)
        try:
            client.infer("csm", tensors(grpcclient, request(f"Unary {index}.", 0, MAX_AUDIO_LENGTH_MS=scalar(20_000, np.int32))))
            unary.append((time.monotonic(), None))
        except Exception as error:
            unary.append((time.monotonic(), error))

    try:
        for index in range(3):
            streams.send(f"s{index}", request(f"Stream {index}.", 0, MAX_AUDIO_LENGTH_MS=scalar(20_000, np.int32)))
        callers = [threading.Thread(target=unary_call, args=(index,)) for index in range(2)]
        for caller in callers:
            caller.start()
        while not streams.received["s0"].chunks:
            streams.pump()
        time.sleep(0.5)  # everything is generating
        engine.kill()
        killed = time.monotonic()
        streams.run_until_done([f"s{index}" for index in range(3)], timeout_s=15)
        for caller in callers:
            caller.join(15)
        ended = [received.error for received in streams.received.values()] + [error for _, error in unary]
        assert len(ended) == 5 and all("the engine process exited (killed by SIGKILL)" in str(error) for error in ended), ended
        assert max(arrival for arrival, _ in unary) - killed < 5
        # csm_stream serves again by itself, in the same stub, with Triton ready all along.
        deadline = killed + 30
        while True:
            assert http_status(fault_server, "/v2/health/ready") == 200
            try:
                assert np.array_equal(codes_of(fault_server, "After the kill.", 2), expected)
                break
            except Exception:
                assert time.monotonic() < deadline, "csm_stream did not serve again within 30 s"
                time.sleep(0.5)
    finally:
        streams.close()
    assert stream_model_processes(fault_server)[0].pid == stub.pid
    deadline = time.monotonic() + 5  # the metrics reporter's interval
    while restarts(fault_server) != restarts_before + 1:
        assert time.monotonic() < deadline, f"csm_engine_restarts_total is {restarts(fault_server)}, {restarts_before} before"
        time.sleep(0.2)


def test_an_engine_that_cannot_come_back_unloads_csm_stream_and_readiness_says_so(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> None:
    server = serve(tmp_path_factory.mktemp("give-up"), tiny_model_dir, max_engine_restarts="0")
    try:
        _, engine = stream_model_processes(server)
        engine.kill()
        killed = time.monotonic()
        while http_status(server, "/v2/models/csm_stream/ready") == 200:
            assert time.monotonic() - killed < 30, "csm_stream still ready 30 s after it could no longer serve"
            time.sleep(0.2)
        assert http_status(server, "/v2/health/live") == 200
        client = grpcclient.InferenceServerClient(server.grpc_url)
        while True:  # UNLOADING while its stub finalizes, then UNAVAILABLE
            index = client.get_model_repository_index(headers=server.admin_headers("grpc"), as_json=True)["models"]
            if {model["name"]: model.get("state") for model in index}["csm_stream"] == "UNAVAILABLE":
                break
            assert time.monotonic() - killed < 30
            time.sleep(0.2)
    finally:
        server.stop()
    assert not psutil.pid_exists(engine.pid) or engine.status() == psutil.STATUS_ZOMBIE


def test_a_killed_tritonserver_leaves_none_of_the_models_processes_behind(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> None:
    """The python backend leaves its stubs running when tritonserver dies; ours are killed by
    their watches (csm_triton/triton/orphan.py), and csm_stream's engine goes with its stub."""
    server = serve(tmp_path_factory.mktemp("orphans"), tiny_model_dir)
    kinds = {"triton_python_backend_stub": "stub", "engine_worker": "engine", "csm-orphan-watch": "watch"}
    processes = {}  # the long-lived ones: a watch's subshells come and go
    for stub in psutil.Process(server.process.pid).children():
        for process in [stub, *stub.children()]:
            command = " ".join(process.cmdline())
            for marker, kind in kinds.items():
                if marker in command:
                    processes[process] = kind
    # csm and csm_stream: text_stream_tts is not loaded without its text model (server.startup_models).
    assert sorted(processes.values()) == ["engine", "stub", "stub", "watch", "watch"]
    server.process.kill()
    server.process.wait()
    gone, alive = psutil.wait_procs(list(processes), timeout=10)
    assert not alive, f"left running: {[' '.join(process.cmdline()) for process in alive]}"
