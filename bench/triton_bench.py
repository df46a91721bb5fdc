"""Unary serving overhead and concurrency through a real tritonserver (issue 3's speed targets).

  overhead:    one gRPC request end to end against the in-process `generate` of the same request.
  concurrency: audio-seconds per wall second with 8 concurrent gRPC clients against 1 client.

Starts its own server on the tiny model (CPU).
Usage: python bench/triton_bench.py [--frames N] [--rounds N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from csm_client import CSMClient
from csm_client.contract import FRAME_MS, SAMPLE_RATE
from csm_triton import load_csm_1b
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


def audio_seconds_per_second(url: str, clients: int, requests_each: int, frames: int) -> float:
    """Each client sends its requests one after another; all clients at once."""

    def client_run(index: int) -> float:
        with CSMClient(url) as client:
            audio = [client.generate(TEXT, index % 2, max_audio_length_ms=frames * FRAME_MS, seed=index)[0] for _ in range(requests_each)]
        return sum(len(a) for a in audio) / SAMPLE_RATE

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        audio_seconds = sum(pool.map(client_run, range(clients)))
    return audio_seconds / (time.perf_counter() - start)


def run(url: str, model_dir: Path, frames: int, rounds: int) -> dict:
    generator = load_csm_1b(model_dir, device="cpu", slots=8)
    max_ms = frames * FRAME_MS
    in_process = median_seconds(lambda: generator.generate(TEXT, 0, [], max_audio_length_ms=max_ms, seed=1), rounds, "in process")
    with CSMClient(url) as client:
        unary = median_seconds(lambda: client.generate(TEXT, 0, max_audio_length_ms=max_ms, seed=1), rounds, "gRPC unary")
    one = audio_seconds_per_second(url, clients=1, requests_each=2, frames=frames)
    eight = audio_seconds_per_second(url, clients=8, requests_each=2, frames=frames)
    return {
        "frames_per_request": frames,
        "in_process_generate_s": in_process,
        "grpc_unary_s": unary,
        "grpc_over_in_process": unary / in_process,
        "one_client_audio_s_per_s": one,
        "eight_clients_audio_s_per_s": eight,
        "eight_over_one": eight / one,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=50, help="frames a request (80 ms each)")
    parser.add_argument("--rounds", type=int, default=5, help="timed repetitions of the unary comparison")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny(Path(tmp) / "tiny")
        repository = model_repository_with(Path(tmp) / "model_repository", {"model_dir": f"{tmp}/none", "tiny_model_dir": str(model_dir)})
        server = TritonServer(ServerOptions.on_free_ports(repository), Path(tmp) / "server.log").start()
        try:
            results = run(server.grpc_url, model_dir, args.frames, args.rounds)
        finally:
            server.stop()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
