"""Engine throughput and frame time, in process, on the CPU (issue 2's speed targets).

  tiny: the `export tiny` model; 8 requests in one engine vs the same 8 one after another.
  1b:   the real 1B + 100M architecture with random weights, for each quantization scheme
        (model/quantize.py), eager and compiled: batch-1 frame time against the memory-bandwidth
        floor for the bytes a frame reads, 8 concurrent vs 1, and transformers' CSM (fp32) on the
        same weights in the same run.

Audio-seconds count generated frames (80 ms each); Mimi decoding is not part of these figures.
Usage: python bench/engine_bench.py [--part tiny|1b|all] [--frames N] [--json OUT]
                                   [--quantize none,bf16,int8] [--compile eager|compiled|both]
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
from csm_triton.model.model import CSM
from csm_triton.model.quantize import quantize, weight_bytes
from export.tiny import make_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gpu_bench import prompt, random_model  # noqa: E402  (beside this script)

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


def batch(size: int, frame_count: int) -> list[Stream]:
    """`size` requests of the short text prompt, seeds 0..size-1."""
    return [prompt(CSM_1B, frame_count, seed) for seed in range(size)]


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


def read_bandwidth(gib: int = 1, repeats: int = 5) -> float:
    """Bytes a second this process reads from memory (summing a table far larger than the caches)."""
    table = torch.ones(gib << 28)
    table.sum()
    start = time.perf_counter()
    for _ in range(repeats):
        table.sum()
    return repeats * table.numel() * table.element_size() / (time.perf_counter() - start)


def frame_bytes(model: CSM) -> int:
    """Weight bytes one frame reads: the backbone and codebook-0 head once; the projection, the
    depth decoder and one codebook's head for each of the 31 decoder steps (KV caches left out:
    a few MB at these lengths)."""
    steps = model.config.audio_num_codebooks - 1
    decoder_step = weight_bytes(model.decoder) + weight_bytes(model.projection) + model.audio_head[0].nbytes
    return weight_bytes(model.backbone) + weight_bytes(model.codebook0_head) + steps * decoder_step


def bench_transformers(frames: int) -> float:
    """transformers' CSM on the same random weights (fp32, batch 1): seconds a frame."""
    model = random_model(CSM_1B, torch.device("cpu"), torch.float32)
    hf_model = build_hf_model(model.state_dict(), CSM_1B)
    del model
    with torch.inference_mode():
        request = prompt(CSM_1B, frames, 0)  # the same prompt as ours
        hf_generate(hf_model, request.tokens, request.mask, 2)  # warm-up
        start = time.perf_counter()
        hf_generate(hf_model, request.tokens, request.mask, frames)
    return (time.perf_counter() - start) / frames


def bench_scheme(scheme: str, compiled: bool, frames: int, bandwidth: float) -> dict:
    """One quantization scheme on the real 1B + 100M architecture (random weights): batch 1 and 8."""
    model = random_model(CSM_1B, torch.device("cpu"), torch.float32)
    quantize(model, scheme, torch.device("cpu"))  # as load_model does on the CPU
    load_start = time.perf_counter()
    engine = Engine(model, slots=8, compile=compiled)  # compiled: every bucket of the fixed-shape step, now
    result: dict = {"scheme": scheme, "compiled": compiled, "engine_ready_s": time.perf_counter() - load_start}
    result["frame_weight_bytes"] = frame_bytes(model)
    result["floor_s_per_frame"] = result["frame_weight_bytes"] / bandwidth
    with torch.inference_mode():
        timed_engine_run(engine, batch(1, 2))  # warm-up
        for size in (1, 8):
            wall, step = timed_engine_run(engine, batch(size, frames))
            result[f"batch{size}_wall_s"] = wall
            result[f"batch{size}_s_per_step_steady"] = step
    result["batch1_fraction_of_floor"] = result["floor_s_per_frame"] / result["batch1_s_per_step_steady"]
    result["batch1_real_time_factor"] = result["batch1_s_per_step_steady"] / (FRAME_MS / 1000)
    # Audio-seconds per wall second, 8 requests in one engine against one alone.
    result["batch8_throughput_vs_batch1"] = 8 * result["batch1_s_per_step_steady"] / result["batch8_s_per_step_steady"]
    result["batch8_fraction_of_floor"] = result["floor_s_per_frame"] / result["batch8_s_per_step_steady"]
    return result


def bench_1b(frames: int, schemes: list[str], compile_modes: list[bool]) -> dict:
    bandwidth = read_bandwidth()
    results: dict = {
        "model": "1B + 100M, random weights",
        "frames_per_request": frames,
        "threads": torch.get_num_threads(),
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "transformers_fp32_batch1_s_per_frame": bench_transformers(frames),
        "schemes": [],
    }
    runs = [(scheme, compiled) for scheme in schemes for compiled in compile_modes]
    for scheme, compiled in tqdm(runs, desc="schemes", leave=False):
        results["schemes"].append(bench_scheme(scheme, compiled, frames, bandwidth))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["tiny", "1b", "all"], default="all")
    parser.add_argument("--frames", type=int, default=None, help="frames a request (default: 50 tiny, 8 for 1b)")
    parser.add_argument("--quantize", default="none,bf16,int8", help="1b: the schemes to run, comma-separated (model/quantize.py)")
    parser.add_argument(
        "--compile",
        choices=["eager", "compiled", "both"],
        default="both",
        help="1b: the eager dynamic step, the compiled fixed-shape one, or both",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results = []
    if args.part in ("tiny", "all"):
        results.append(bench_tiny(args.frames or 50))
    if args.part in ("1b", "all"):
        compile_modes = {"eager": [False], "compiled": [True], "both": [False, True]}[args.compile]
        results.append(bench_1b(args.frames or 8, args.quantize.split(","), compile_modes))
    for result in results:
        print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
