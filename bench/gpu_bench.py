"""GPU fast path (issue 5): per batch size, the frame time, real-time factor, time to first audio
and GPU memory, beside the floor computed from the bytes a frame must read and the FLOPs it must do.

The real 1B + 100M architecture with random weights (speed does not depend on weight values) and a
random full-size Mimi; every request runs a fixed number of frames (random weights never end).
- Frame time: B requests in one engine (CUDA graphs on CUDA), mean step time once all run.
- Time to first audio: with B - 1 streams generating and decoding audio in the serving loop, a
  short request's first chunk (2 frames, decoded), median of --ttfa-tries.
- Floor: max(bytes / bandwidth, FLOPs / peak) for one frame of B streams; the backbone's weights
  are read once a frame, the depth decoder's 31 times, and each stream's KV cache up to its position.

Usage: python bench/gpu_bench.py [--batches 1 8 64 256] [--frames 50] [--json OUT]
Smoke run on the CPU: python bench/gpu_bench.py --model tiny --device cpu --batches 1 2 --frames 4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from csm_client.contract import FRAME_MS
from csm_triton.engine.engine import Engine
from csm_triton.engine.generator import CUDA_PREFILL_CHUNK
from csm_triton.engine.graphs import bucket
from csm_triton.engine.pacing import ChunkPlan
from csm_triton.engine.stream import Chunk, Stream
from csm_triton.engine.streaming import ServingLoop
from csm_triton.model.codec import MimiCodec, StreamingDecoder
from csm_triton.model.config import CSM_1B, QUANTIZE_SCHEMES, TINY, ModelConfig
from csm_triton.model.quantize import quantize
from export.staging import cast_tensors
from export.tiny import random_mimi, random_model

logger = logging.getLogger("gpu_bench")

PROMPT_POSITIONS = 12  # a short text prompt
WARMUP_STEPS = 3
# (memory bandwidth in bytes/s, dense bf16 FLOP/s) by device name; --bandwidth-tbs/--tflops override.
PEAKS = {"H200": (4.8e12, 989e12), "H100": (3.35e12, 989e12)}


def random_codec(device: torch.device, folder: Path) -> MimiCodec:
    path = folder / "mimi.safetensors"
    save_file(cast_tensors(random_mimi(0).state_dict(), torch.bfloat16), path)
    return MimiCodec(path, device, num_codebooks=32)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and core count (platform.processor() is empty on Linux)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), platform.machine())
    return f"{model}, {os.cpu_count()} cores"


def prompt(config: ModelConfig, frames: int, seed: int) -> Stream:
    tokens = torch.zeros(PROMPT_POSITIONS, config.frame_width, dtype=torch.long)
    tokens[:, -1] = torch.arange(128000, 128000 + PROMPT_POSITIONS)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, -1] = True
    return Stream(tokens, mask, frames, 0.9, 50, seed)


def floor_seconds(
    config: ModelConfig, dtype: torch.dtype, batch: int, position: int, bandwidth: float, flops: float, weight_size: int | None = None
) -> dict:
    """The least time one frame can take that reads what the code reads: the weights (`weight_size`
    bytes each, default the dtype's: 1 for int8 and fp8), and the KV caches of `batch` rows up to
    `position` (the frame step's batch and length buckets)."""
    size = torch.finfo(dtype).bits // 8
    backbone, decoder = config.backbone, config.decoder

    def layer_params(t) -> int:
        attention = t.embed_dim * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim + t.num_heads * t.head_dim * t.embed_dim
        return t.num_layers * (attention + 3 * t.embed_dim * t.intermediate_dim)

    vocab = config.audio_vocab_size
    backbone_params = layer_params(backbone) + backbone.embed_dim * vocab + backbone.embed_dim * decoder.embed_dim  # + c0 head, projection
    decoder_step_params = layer_params(decoder) + decoder.embed_dim * vocab + backbone.embed_dim * decoder.embed_dim  # + a head, projection
    steps = config.audio_num_codebooks - 1
    kv_per_position = 2 * backbone.num_layers * backbone.num_kv_heads * backbone.head_dim * size
    weight_bytes = (backbone_params + steps * decoder_step_params) * (weight_size or size)
    kv_bytes = batch * position * kv_per_position
    frame_flops = batch * 2 * (backbone_params + steps * decoder_step_params)
    return {
        "weight_bytes": weight_bytes,
        "kv_bytes": kv_bytes,
        "flops": frame_flops,
        "floor_s": max((weight_bytes + kv_bytes) / bandwidth, frame_flops / flops),
    }


def frame_time(engine: Engine, config: ModelConfig, batch: int, frames: int) -> float:
    """Mean seconds of a step with `batch` requests running (each step ends with its codes on the host)."""
    for seed in range(batch):
        engine.start(prompt(config, WARMUP_STEPS + frames + 1, seed))
    for _ in range(WARMUP_STEPS):
        engine.step()
    start = time.perf_counter()
    for _ in range(frames):
        engine.step()
    elapsed = time.perf_counter() - start
    while engine.has_work:
        engine.step()
    return elapsed / frames


def time_to_first_audio(loop: ServingLoop, config: ModelConfig, background: int, tries: int, frames: int) -> float:
    """Median seconds to a short request's first decoded chunk while `background` streams run."""
    running = [loop.add(Stream(prompt(config, 100_000 // FRAME_MS, seed), lambda chunk: None)) for seed in range(background)]
    for stream in running:
        stream.started.wait()
    waits = []
    for attempt in range(tries):
        first = threading.Event()

        def deliver(chunk: Chunk, first: threading.Event = first) -> None:
            if chunk.audio is not None and len(chunk.audio):
                first.set()

        start = time.perf_counter()
        stream = loop.add(Stream(prompt(config, frames, 10_000 + attempt), deliver, chunking=ChunkPlan(first_frames=2)))
        first.wait()
        waits.append(time.perf_counter() - start)
        stream.finished.wait()
    for stream in running:
        loop.cancel(stream)
    for stream in running:
        stream.finished.wait()
    return statistics.median(waits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["1b", "tiny"], default="1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--frames", type=int, default=50, help="timed frames per batch size")
    parser.add_argument("--ttfa-tries", type=int, default=5)
    parser.add_argument("--bandwidth-tbs", type=float, help="memory bandwidth for the floor (default: by device name)")
    parser.add_argument("--tflops", type=float, help="dense bf16 TFLOP/s for the floor (default: by device name)")
    parser.add_argument("--quantize", choices=QUANTIZE_SCHEMES, default="none", help="the linear layers' scheme (model/quantize.py)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = CSM_1B if args.model == "1b" else TINY
    name = device_name(device)
    bandwidth, flops = next((peak for key, peak in PEAKS.items() if key in name), (1e12, 100e12))
    bandwidth = args.bandwidth_tbs * 1e12 if args.bandwidth_tbs else bandwidth
    flops = args.tflops * 1e12 if args.tflops else flops
    slots = max(args.batches)

    model = random_model(config, device, dtype)
    quantize(model, args.quantize, device)
    with torch.inference_mode():
        engine = Engine(model, slots, prefill_chunk=CUDA_PREFILL_CHUNK if device.type == "cuda" else None)
    results = {
        "command": "python bench/" + Path(__file__).name,
        "device": name,
        "torch": torch.__version__,
        "model": f"{args.model} random weights, {str(dtype).removeprefix('torch.')}, linear layers {args.quantize}",
        "slots": slots,
        "cuda_graphs": engine.graphs is not None and engine.graphs.capture,
        "peaks": {"bandwidth_bytes_s": bandwidth, "flops": flops},
        "levels": [],
    }
    with tempfile.TemporaryDirectory() as folder:
        codec = random_codec(device, Path(folder))
    for batch in tqdm(args.batches, desc="frame time"):
        with torch.inference_mode():
            step_s = frame_time(engine, config, batch, args.frames)
        position = PROMPT_POSITIONS + WARMUP_STEPS + args.frames // 2
        rows, length = batch, position
        if engine.graphs is not None:  # the rows and key positions the frame step reads
            rows, length = bucket(engine.graphs.batch_buckets, batch), bucket(engine.graphs.length_buckets, position + 1)
        floor = floor_seconds(config, dtype, rows, length, bandwidth, flops, 1 if args.quantize in ("int8", "fp8") else None)
        results["levels"].append({"batch": batch, "frame_ms": step_s * 1e3, "rtf": step_s * 1e3 / FRAME_MS, **floor})
    loop = ServingLoop(engine, StreamingDecoder(codec, 2 * slots), 2 * slots)
    try:
        for level in tqdm(results["levels"], desc="time to first audio"):
            level["ttfa_ms"] = 1e3 * time_to_first_audio(loop, config, level["batch"] - 1, args.ttfa_tries, frames=4)
    finally:
        loop.close()
    if device.type == "cuda":
        results["gpu_memory_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        results["kv_cache_gb"] = (
            sum(
                layer.attn.kv_cache.k.numel() * 2 * layer.attn.kv_cache.k.element_size()
                for transformer in (model.backbone, model.decoder)
                for layer in transformer.layers
            )
            / 2**30
        )
    print(f"{results['device']}, {results['model']}, CUDA graphs: {results['cuda_graphs']}")
    print("| batch | frame ms | RTF | floor ms | TTFA ms |")
    print("|---|---|---|---|---|")
    for level in results["levels"]:
        floor_ms = level["floor_s"] * 1e3
        print(f"| {level['batch']} | {level['frame_ms']:.2f} | {level['rtf']:.3f} | {floor_ms:.2f} | {level['ttfa_ms']:.0f} |")
    if "gpu_memory_peak_gb" in results:
        print(f"GPU memory peak {results['gpu_memory_peak_gb']:.1f} GiB, KV caches {results['kv_cache_gb']:.1f} GiB")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
