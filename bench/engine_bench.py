"""Engine throughput and frame time, in process, on the CPU (issue 2's speed targets).

  tiny: the `export tiny` model; 8 requests in one engine vs the same 8 one after another.
  1b:   the real 1B + 100M architecture with random weights (fp32): batch-1 frame time against
        transformers' CSM on the same weights in the same run, and 8 concurrent vs 1.

Audio-seconds count generated frames (80 ms each); Mimi decoding is not part of these figures.
Usage: python bench/engine_bench.py [--part tiny|1b|all] [--frames N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from csm_client.contract import FRAME_MS
from csm_triton import GenerationRequest, Generator, load_csm_1b
from csm_triton.engine.engine import Engine
from csm_triton.engine.stream import Stream
from csm_triton.model.config import CSM_1B
from csm_triton.model.model import use_cpu_linear
from export.tiny import make_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gpu_bench import random_model  # noqa: E402  (beside this script)

from hf_reference import build_hf_model, hf_generate  # noqa: E402  (the independent implementation)

TEXTS = [
    "Hello from Sesame.",
    "How are you doing today?",
    "I would like to book a table for two at seven.",
    "The weather is lovely, isn't it?",
    "Could you say that once more, a little slower?",
    "Thanks, that is all I needed.",
    "Let me check and get back to you in a minute.",
    "Sure, go ahead.",
]


def requests(frames: int, count: int) -> list[GenerationRequest]:
    # On random weights an all-zero (end) frame essentially never comes: every request runs to its budget.
    return [GenerationRequest(TEXTS[i % len(TEXTS)], i % 2, topk=50, max_audio_length_ms=frames * FRAME_MS, seed=i) for i in range(count)]


def audio_seconds_per_second(generator: Generator, batch: list[GenerationRequest], together: bool) -> tuple[float, float]:
    """(audio-seconds generated per wall second, wall seconds)."""
    start = time.perf_counter()
    if together:
        codes = generator.generate_codes_batch(batch)
    else:
        codes = [generator.generate_codes_batch([request])[0] for request in tqdm(batch, desc="one after another", leave=False)]
    wall = time.perf_counter() - start
    return sum(len(c) for c in codes) * FRAME_MS / 1000 / wall, wall


def bench_tiny(frames: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        generator = load_csm_1b(make_tiny(Path(tmp) / "tiny"), device="cpu", slots=8)
    batch = requests(frames, 8)
    generator.generate_codes_batch(batch[:1])  # warm-up
    sequential, sequential_wall = audio_seconds_per_second(generator, batch, together=False)
    concurrent, concurrent_wall = audio_seconds_per_second(generator, batch, together=True)
    return {
        "model": "tiny",
        "frames_per_request": frames,
        "sequential_audio_s_per_s": sequential,
        "sequential_wall_s": sequential_wall,
        "concurrent8_audio_s_per_s": concurrent,
        "concurrent8_wall_s": concurrent_wall,
        "speedup": concurrent / sequential,
    }


def timed_engine_run(engine: Engine, batch: list[Stream]) -> tuple[float, float]:
    """(wall seconds from submission to the last frame, mean seconds of a step once all are running)."""
    start = time.perf_counter()
    for request in batch:
        engine.start(request)
    engine.step()  # prefills every request, samples their first frame
    steady_start, steps = time.perf_counter(), 0
    while engine.has_work:
        engine.step()
        steps += 1
    end = time.perf_counter()
    return end - start, (end - steady_start) / steps


def bench_1b(frames: int) -> dict:
    model = random_model(CSM_1B, torch.device("cpu"), torch.float32)
    hf_model = build_hf_model(model.state_dict(), CSM_1B)
    use_cpu_linear(model)  # as load_model does on the CPU; the weights are packed, state_dict no longer holds them
    prompt_tokens = torch.zeros(12, CSM_1B.frame_width, dtype=torch.long)
    prompt_tokens[:, -1] = torch.arange(128000, 128012)
    prompt_mask = torch.zeros_like(prompt_tokens, dtype=torch.bool)
    prompt_mask[:, -1] = True
    engine = Engine(model, slots=8)

    def batch(size: int, frame_count: int) -> list[Stream]:
        return [Stream(prompt_tokens, prompt_mask, frame_count, 0.9, 50, seed) for seed in range(size)]

    results: dict = {"model": "1B + 100M, random weights, fp32", "frames_per_request": frames}
    with torch.inference_mode():
        timed_engine_run(engine, batch(1, 2))  # warm-up
        for size in tqdm((1, 8), desc="our engine", leave=False):
            wall, step = timed_engine_run(engine, batch(size, frames))
            results[f"ours_batch{size}_wall_s"] = wall
            results[f"ours_batch{size}_s_per_frame_end_to_end"] = wall / frames
            results[f"ours_batch{size}_s_per_step_steady"] = step
        hf_generate(hf_model, prompt_tokens, prompt_mask, 2)  # warm-up
        start = time.perf_counter()
        hf_generate(hf_model, prompt_tokens, prompt_mask, frames)
        results["transformers_batch1_wall_s"] = time.perf_counter() - start
        results["transformers_batch1_s_per_frame_end_to_end"] = results["transformers_batch1_wall_s"] / frames
    # Audio-seconds per wall second, 8 requests in one engine against one request alone.
    results["batch8_throughput_vs_batch1"] = 8 * results["ours_batch1_wall_s"] / results["ours_batch8_wall_s"]
    results["batch1_vs_transformers"] = results["ours_batch1_wall_s"] / results["transformers_batch1_wall_s"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["tiny", "1b", "all"], default="all")
    parser.add_argument("--frames", type=int, default=None, help="frames a request (default: 50 tiny, 8 for 1b)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = []
    if args.part in ("tiny", "all"):
        results.append(bench_tiny(args.frames or 50))
    if args.part in ("1b", "all"):
        results.append(bench_1b(args.frames or 8))
    for result in results:
        print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
