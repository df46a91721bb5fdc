"""The speech gateway's cost over direct gRPC streaming (issue 13's speed targets), on a real
tritonserver with the tiny model (CPU) and the gateway in its own process (`python -m gateway`):

  first byte:  time to the first audio byte, p50 over N requests one after another: the gateway's
               POST /v1/audio/speech (pcm) against the same request streamed straight to csm_stream.
  throughput:  seconds of audio per wall second with 8 concurrent streams, each client sending its
               requests one after another, through the gateway and straight over gRPC.
  conversation: time to first audio of the fifth turn of a conversation whose four earlier turns
               carry 3 s of audio each, with csm_stream's codes cache and on a server without it
               (CSM_CODES_CACHE_MB=0).

Usage: python bench/gateway_bench.py [--requests 20] [--frames 25] [--streams 8] [--rounds 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from csm_client import CSMClient, Segment
from csm_client.contract import FRAME_MS, SAMPLE_RATE
from csm_triton.tools.server import ServerOptions, TritonServer, model_repository_with
from export.tiny import make_tiny

TEXT = "I would like to book a table for two at seven."


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def triton(
    root: Path, model: Path, slots: int, env: dict[str, str] | None = None, parameters: dict[str, str] | None = None
) -> Iterator[TritonServer]:
    parameters = {"model_dir": str(root / "none"), "tiny_model_dir": str(model), "slots": str(slots), **(parameters or {})}
    options = ServerOptions.on_free_ports(model_repository_with(root / "model_repository", parameters))
    saved = dict(os.environ)
    os.environ.update(env or {})  # the server's processes inherit it
    try:
        server = TritonServer(options, log_file=root / "tritonserver.log").start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def gateway(grpc_url: str, env: dict[str, str] | None = None) -> Iterator[str]:
    port = free_port()
    command = [sys.executable, "-m", "gateway", "--triton-url", grpc_url, "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the gateway did not become healthy")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def via_gateway(http: httpx.Client, url: str, seed: int, max_ms: int) -> tuple[float, float]:
    """(seconds to the first audio byte, seconds of audio) of one streamed request through the
    gateway, on a kept-alive connection as an application's client (the openai package's) keeps one:
    a new httpx.Client a request would add its own set-up (an SSL context, a TCP connection), ~30 ms here."""
    body = {"model": "csm-1b", "input": TEXT, "voice": "alloy", "response_format": "pcm", "seed": seed, "max_audio_length_ms": max_ms}
    start = time.perf_counter()
    first, size = None, 0
    with http.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
        response.raise_for_status()
        for piece in response.iter_raw():
            first = first or time.perf_counter() - start
            size += len(piece)
    return first, size / 2 / SAMPLE_RATE


def direct(client: CSMClient, seed: int, max_ms: int, context: list | None = None) -> tuple[float, float]:
    """The same straight to csm_stream over gRPC streaming."""
    start = time.perf_counter()
    first, samples = None, 0
    for chunk in client.stream(TEXT, 0, context or [], seed=seed, max_audio_length_ms=max_ms):
        first = first or time.perf_counter() - start
        samples += len(chunk)
    return first, samples / SAMPLE_RATE


def p50_first_byte(calls: dict, requests: int) -> dict[str, float]:
    """p50 of each way's first-byte time; the ways take turns, request by request, so that a load
    from outside (a shared machine) weighs on both alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call(10_000)  # warm-up
    for seed in range(requests):
        for name, call in calls.items():
            times[name].append(call(seed)[0])
    return {name: statistics.median(values) for name, values in times.items()}


def throughput(calls: dict, streams: int, each: int, rounds: int) -> dict[str, float]:
    """Each way's median over `rounds` of the audio seconds per wall second of `streams` concurrent
    clients, each sending `each` requests one after another; the ways take turns, round by round."""
    results: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            with ThreadPoolExecutor(streams) as pool:
                audio = sum(pool.map(lambda index, call=call: sum(call(index * each + n)[1] for n in range(each)), range(streams)))
            results[name].append(audio / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in results.items()}


def conversation(server: TritonServer, rounds: int) -> dict:
    """Time to first audio of turn 5 (4 earlier turns of 3 s audio each), direct over gRPC:
    the first request (every turn encoded unless cached) and the p50 of `rounds` more."""
    with CSMClient(server.grpc_url) as client:
        turns = [np.concatenate(list(client.stream(f"Earlier turn {i}.", i % 2, seed=100 + i, max_audio_length_ms=3000))) for i in range(4)]
        context = [Segment(speaker=i % 2, text=f"Earlier turn {i}.", audio=audio) for i, audio in enumerate(turns)]
        first = direct(client, 1, 800, context)[0]
        later = statistics.median(direct(client, 2 + n, 800, context)[0] for n in range(rounds))
    return {"first_request_s": first, "p50_later_s": later, "context_audio_s": sum(len(t) for t in turns) / SAMPLE_RATE}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--frames", type=int, default=25, help="frames (80 ms) a request")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--each", type=int, default=3, help="requests each concurrent stream sends")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds of each way, taking turns")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    max_ms = args.frames * FRAME_MS
    results: dict = {"frames": args.frames, "requests": args.requests, "streams": args.streams, "rounds": args.rounds}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tiny(root / "tiny", seed=0)
        with triton(root / "cached", root / "tiny", slots=args.streams) as server, gateway(server.grpc_url) as url:
            with CSMClient(server.grpc_url) as client, httpx.Client(timeout=600) as http:
                p50 = p50_first_byte(
                    {"direct": lambda seed: direct(client, seed, max_ms), "gateway": lambda seed: via_gateway(http, url, seed, max_ms)},
                    args.requests,
                )
            results["first_byte_direct_p50_s"], results["first_byte_gateway_p50_s"] = p50["direct"], p50["gateway"]

            def direct_stream(seed: int) -> tuple[float, float]:
                with CSMClient(server.grpc_url) as own:  # one client per thread: tritonclient's are not thread-safe
                    return direct(own, seed, max_ms)

            def gateway_stream(seed: int) -> tuple[float, float]:
                with httpx.Client(timeout=600) as http:
                    return via_gateway(http, url, seed, max_ms)

            rates = throughput({"direct": direct_stream, "gateway": gateway_stream}, args.streams, args.each, args.rounds)
            results["throughput_direct_audio_s_per_s"], results["throughput_gateway_audio_s_per_s"] = rates["direct"], rates["gateway"]
            results["conversation_cached"] = conversation(server, rounds=5)
        with triton(root / "uncached", root / "tiny", slots=args.streams, env={"CSM_CODES_CACHE_MB": "0"}) as server:
            results["conversation_no_cache"] = conversation(server, rounds=5)
    results["first_byte_overhead_ms"] = 1000 * (results["first_byte_gateway_p50_s"] - results["first_byte_direct_p50_s"])
    results["throughput_ratio"] = results["throughput_gateway_audio_s_per_s"] / results["throughput_direct_audio_s_per_s"]
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
