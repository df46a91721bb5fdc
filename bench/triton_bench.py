"""Unary serving overhead and concurrency through a real tritonserver (issue 3's speed targets).

  overhead:    one gRPC request end to end against the in-process `generate` of the same request.
  concurrency: audio-seconds per wall second with 8 concurrent gRPC clients against 1 client.
  streams:     audio-seconds per wall second of 4 and of 8 streams at once, through Triton against the
               same streaming requests in process (issue 19: within 10%).

Starts its own server on the tiny model (CPU).
Usage: python bench/triton_bench.py [--frames N] [--rounds N] [--stream-requests N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sized
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from csm_client import CSMClient
from csm_client.contract import FRAME_MS, SAMPLE_RATE
from csm_triton import Generator, load_csm_1b
from csm_triton.tools.server import ServerOptions, TritonServer, model_repository_with
from export.tiny import make_tiny

TEXT = "I would like to book a table for two at seven."


def median_seconds(call, rounds: int, label: str) -> float:
    call()  # warm-up
    times = []
    for _ in tqdm(range(rounds), desc=label, leave=False):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def audio_seconds_per_second(speak: Callable[[int], Iterable[Sized]], streams: int, requests_each: int) -> float:
    """`streams` callers at once, each making `requests_each` requests one after another; `speak(index)`
    makes caller `index`'s request and yields its audio (one piece, or a stream's chunks)."""

    def caller(index: int) -> float:
        return sum(len(piece) for _ in range(requests_each) for piece in speak(index)) / SAMPLE_RATE

    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        audio_seconds = sum(pool.map(caller, range(streams)))
    return audio_seconds / (time.perf_counter() - start)


def streams_side_by_side(url: str, generator: Generator, max_ms: int, streams: int, requests_each: int) -> dict:
    """The same streaming requests at `streams` at once, in process and through Triton, one after the
    other. Each caller makes `requests_each` requests back to back: with few, the last stream's tail,
    when the other slots are idle, weighs on the figure."""
    in_process = audio_seconds_per_second(
        lambda index: generator.generate_streaming(TEXT, index % 2, [], max_audio_length_ms=max_ms, seed=index), streams, requests_each
    )
    clients = [CSMClient(url) for _ in range(streams)]
    try:
        through_triton = audio_seconds_per_second(
            lambda index: clients[index].stream(TEXT, index % 2, max_audio_length_ms=max_ms, seed=index), streams, requests_each
        )
    finally:
        for client in clients:
            client.close()
    return {
        "in_process_audio_s_per_s": in_process,
        "triton_audio_s_per_s": through_triton,
        "triton_over_in_process": through_triton / in_process,
    }


def run(url: str, model_dir: Path, frames: int, rounds: int, stream_requests: int) -> dict:
    generator = load_csm_1b(model_dir, device="cpu", slots=8)
    max_ms = frames * FRAME_MS
    in_process = median_seconds(lambda: generator.generate(TEXT, 0, [], max_audio_length_ms=max_ms, seed=1), rounds, "in process")
    unary_clients = [CSMClient(url) for _ in range(8)]
    try:
        unary = median_seconds(lambda: unary_clients[0].generate(TEXT, 0, max_audio_length_ms=max_ms, seed=1), rounds, "gRPC unary")

        def speak_unary(index: int) -> list:
            return [unary_clients[index].generate(TEXT, index % 2, max_audio_length_ms=max_ms, seed=index)[0]]

        one = audio_seconds_per_second(speak_unary, 1, 2)
        eight = audio_seconds_per_second(speak_unary, 8, 2)
    finally:
        for client in unary_clients:
            client.close()
    streams = {
        str(count): streams_side_by_side(url, generator, max_ms, count, stream_requests)
        for count in tqdm((4, 8), desc="streams", leave=False)
    }
    return {
        "frames_per_request": frames,
        "stream_requests_each": stream_requests,
        "in_process_generate_s": in_process,
        "grpc_unary_s": unary,
        "grpc_over_in_process": unary / in_process,
        "one_client_audio_s_per_s": one,
        "eight_clients_audio_s_per_s": eight,
        "eight_over_one": eight / one,
        "streams": streams,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=50, help="frames a request (80 ms each)")
    parser.add_argument("--rounds", type=int, default=5, help="timed repetitions of the unary comparison")
    parser.add_argument("--stream-requests", type=int, default=6, help="requests each caller makes back to back in the streams part")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny(Path(tmp) / "tiny")
        repository = model_repository_with(Path(tmp) / "model_repository", {"model_dir": f"{tmp}/none", "tiny_model_dir": str(model_dir)})
        server = TritonServer(ServerOptions.on_free_ports(repository), Path(tmp) / "server.log").start()
        try:
            results = run(server.grpc_url, model_dir, args.frames, args.rounds, args.stream_requests)
        finally:
            server.stop()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
