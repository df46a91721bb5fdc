"""Time to first audio of a conversation's turn N, N = 1..12, with and without prefix reuse
(issue 21), in one process: the real 1B + 100M architecture with random weights (or the tiny one)
and a random full-size Mimi, on the CPU or a GPU.

Each turn is a request whose context is every earlier turn (text and codes, ~4 s each: random
weights never end a turn early, so a turn is --turn-frames frames) and whose text is the next line.
Two Generators share the model, one with a prefix pool and one without; turn by turn, the one
without speaks first and is cancelled at its first audio, then the one with the pool speaks the
whole turn, whose codes join the context (reuse does not change them: tests/test_prefix_pool.py).
So the two curves come from the same requests, interleaved in one run, on one machine state;
a third request a turn, a new conversation's first turn, shows how the machine's speed drifts.
With --conversations K, K conversations speak each turn at once (the GPU row of bench/gpu_check.sh).

With --via gateway, the same through the gateway on the tiny model: two tritonservers, one with the
pool (config.pbtxt's prefix_cache_mb) and one without (0), each behind its own gateway sharing one
turn key; each turn is a streamed (sse) POST /v1/audio/speech whose context is the earlier turns
by reference alone, and its time to first audio is the client's, to the first audio event.

Usage: python bench/conversation_bench.py [--size 1b] [--quantize int8] [--device cpu] [--json OUT]
       python bench/conversation_bench.py --via gateway [--json OUT]
Smoke run: python bench/conversation_bench.py --size tiny --turns 3 --turn-frames 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from gateway_bench import gateway, triton  # noqa: E402  (beside this script)
from gpu_bench import device_name, random_codec  # noqa: E402

from csm_client.contract import FRAME_MS  # noqa: E402
from csm_triton import GenerationRequest, Generator, Segment  # noqa: E402
from csm_triton.engine.engine import Engine  # noqa: E402
from csm_triton.engine.generator import CUDA_PREFILL_CHUNK  # noqa: E402
from csm_triton.engine.pacing import ChunkPlan  # noqa: E402
from csm_triton.engine.prompt import PromptBuilder, TextTokenizer  # noqa: E402
from csm_triton.engine.stream import Chunk, Stream  # noqa: E402
from csm_triton.model.config import CSM_1B, DEFAULT_PREFIX_CACHE_MB, MIB, QUANTIZE_SCHEMES, TINY  # noqa: E402
from csm_triton.model.quantize import quantize  # noqa: E402
from export.tiny import make_tiny, random_model  # noqa: E402

logger = logging.getLogger("conversation_bench")

LINES = [
    "Hey, thanks for calling back. Do you have a minute?",
    "Sure, I was just about to head out, but go ahead.",
    "I wanted to talk about the trip next month.",
    "Right, the one to the coast. Are we still driving?",
    "That was the plan, unless the weather turns.",
    "The forecast looked fine when I checked this morning.",
    "Good. Should we leave on Friday evening or Saturday?",
    "Friday, if we can both get away from work early.",
    "I can. I'll ask about taking the afternoon off.",
    "Perfect. I'll book the place by the harbour, then.",
    "The one with the little garden? I loved that one.",
    "That's the one. I'll send you the details tonight.",
]


def speak(generator: Generator, requests: list[GenerationRequest], whole: bool) -> list[tuple[float, torch.Tensor | None]]:
    """Submit every request at once: each one's seconds to its first audio, and its codes when
    `whole` (otherwise it is cancelled at its first audio)."""
    firsts = [threading.Event() for _ in requests]
    pieces: list[list[Chunk]] = [[] for _ in requests]
    streams: list[Stream] = []

    def deliver(index: int, chunk: Chunk) -> None:
        pieces[index].append(chunk)
        if chunk.error is not None or (chunk.audio is not None and len(chunk.audio)):
            firsts[index].set()

    start = time.perf_counter()
    for index, request in enumerate(requests):
        streams.append(generator.submit(request, lambda chunk, index=index: deliver(index, chunk), chunking=ChunkPlan(first_frames=2)))
    waits = []
    for first, stream in zip(firsts, streams, strict=True):
        first.wait()
        waits.append(time.perf_counter() - start)
        if not whole:
            generator.cancel(stream)
    for stream in streams:
        stream.finished.wait()
    for chunks in pieces:
        if chunks[-1].error is not None:
            raise RuntimeError(f"generation failed: {chunks[-1].error}")
    return [(wait, torch.cat([chunk.codes for chunk in chunks]) if whole else None) for wait, chunks in zip(waits, pieces, strict=True)]


def in_process(args: argparse.Namespace) -> dict:
    """The turns' rows in one process (the module's docstring)."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = CSM_1B if args.size == "1b" else TINY
    model = random_model(config, device, dtype)
    quantize(model, args.quantize, device)
    with tempfile.TemporaryDirectory() as folder:
        codec = random_codec(device, Path(folder))
    prompts = PromptBuilder(TextTokenizer(args.tokenizer), codec, config.audio_num_codebooks, config.text_vocab_size)
    prefill_chunk = CUDA_PREFILL_CHUNK if device.type == "cuda" else None
    slots = args.conversations
    with torch.inference_mode():
        # Both engines write the model's one set of KV caches: only one of them runs at a time.
        plain = Generator(Engine(model, slots, prefill_chunk=prefill_chunk), prompts, codec)
        pooled = Generator(
            Engine(model, slots, prefill_chunk=prefill_chunk, prefix_pool_bytes=DEFAULT_PREFIX_CACHE_MB * MIB), prompts, codec
        )
    name = device_name(device)
    contexts: list[list[Segment]] = [[] for _ in range(slots)]
    rows = []
    for turn in tqdm(range(args.turns), desc="turns"):
        speaker, text = turn % 2, LINES[turn % len(LINES)]
        requests = [
            GenerationRequest(text, speaker, context, topk=50, max_audio_length_ms=args.turn_frames * FRAME_MS, seed=turn * slots + index)
            for index, context in enumerate(contexts)
        ]
        positions = len(prompts.build(text, speaker, contexts[0])[0])
        without = [wait for wait, _ in speak(plain, requests, whole=False)]
        spoken = speak(pooled, requests, whole=True)
        # A new conversation's first turn in the same window (a prompt the pool has not seen): the machine's drift.
        opening = GenerationRequest(f"({turn + 1}) {LINES[0]}", 0, topk=50, max_audio_length_ms=args.turn_frames * FRAME_MS, seed=turn)
        fresh = speak(pooled, [opening], whole=False)[0][0]
        for context, (_, codes) in zip(contexts, spoken, strict=True):
            context.append(Segment(speaker=speaker, text=text, codes=codes.numpy().astype(np.int32)))
        row = {
            "turn": turn + 1,
            "prompt_positions": positions,
            "ttfa_without_reuse_s": statistics.median(without),
            "ttfa_with_reuse_s": statistics.median(wait for wait, _ in spoken),
            "ttfa_with_reuse_max_s": max(wait for wait, _ in spoken),
            "ttfa_new_conversation_s": fresh,
        }
        rows.append(row)
        logger.info("%s", row)
    plain.close()
    pooled.close()
    return {
        "device": name,
        "torch": torch.__version__,
        "model": f"{args.size} random weights, {str(dtype).removeprefix('torch.')}, linear layers {args.quantize}",
        "conversations": args.conversations,
        "prefix_pool": pooled.engine.prefix_pool.stats(),
        "turns": rows,
    }


def speak_via(http: httpx.Client, url: str, turn: int, references: list[str], frames: int, whole: bool) -> tuple[float, str | None]:
    """One turn through a gateway, streamed as sse: seconds to its first audio event, and the
    turn's reference when `whole` (otherwise the stream is closed there, which cancels it)."""
    body = {
        "model": "csm-1b", "input": LINES[turn % len(LINES)], "voice": "alloy", "response_format": "pcm", "stream_format": "sse",
        "seed": turn, "max_audio_length_ms": frames * FRAME_MS, "context": [{"ref": reference} for reference in references],
    }  # fmt: skip
    start, first = time.perf_counter(), None
    with http.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line.removeprefix("data: "))
            if event["type"] == "speech.audio.delta" and first is None:
                first = time.perf_counter() - start
                if not whole:
                    return first, None
            if event["type"] == "speech.audio.done":
                return first, event["turn"]
    raise RuntimeError("the stream ended without its done event")


def via_gateway(args: argparse.Namespace) -> dict:
    """The turns' rows through two gateways on the tiny model (the module's docstring)."""
    env = {"CSM_GATEWAY_TURN_KEY": "conversation-bench-turn-key-" + "0" * 16}
    rows, references = [], []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        make_tiny(root / "tiny", seed=0)
        urls, servers = {}, {}
        for name, megabytes in (("without", "0"), ("with", str(DEFAULT_PREFIX_CACHE_MB))):
            servers[name] = stack.enter_context(triton(root / name, root / "tiny", slots=2, parameters={"prefix_cache_mb": megabytes}))
            urls[name] = stack.enter_context(gateway(servers[name].grpc_url, env))
        http = stack.enter_context(httpx.Client(timeout=600))
        for url in urls.values():  # warm-up: each server's first request pays for its lazy set-up
            speak_via(http, url, 0, [], 2, whole=True)
        for turn in tqdm(range(args.turns), desc="turns"):
            # Each turn spoken whole on both (nothing left running beside the next), in alternating order.
            spoken = {}
            for name in sorted(urls, reverse=turn % 2 == 1):
                spoken[name] = speak_via(http, urls[name], turn, references, args.turn_frames, whole=True)
            references.append(spoken["with"][1])  # both the same: the same codes, signed with the same key
            rows.append({"turn": turn + 1, "ttfa_without_reuse_s": spoken["without"][0], "ttfa_with_reuse_s": spoken["with"][0]})
            logger.info("%s", rows[-1])
        metrics = httpx.get(f"http://localhost:{servers['with'].options.metrics_port}/metrics", timeout=10).text
    pool = {name: float(value) for name, value in re.findall(r"^(csm_prefix_pool_\w+)\{[^}]*\} (\S+)$", metrics, re.MULTILINE)}
    return {
        "device": device_name(torch.device("cpu")),
        "model": "tiny (export tiny), through the gateway",
        "prefix_pool": pool,
        "turns": rows,
    }


def plot(results: dict, path: Path) -> None:
    """Both curves, time to first audio against the turn, into a PNG."""
    import matplotlib  # here, not at the top: the headless Agg backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = [row["turn"] for row in results["turns"]]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    curves = (
        ("ttfa_without_reuse_s", "without prefix reuse", "-"),
        ("ttfa_with_reuse_s", "with prefix reuse", "-"),
        ("ttfa_new_conversation_s", "a new conversation's first turn (drift)", ":"),
    )
    for key, label, style in curves:
        if key in results["turns"][0]:
            axes.plot(turns, [row[key] for row in results["turns"]], style, marker="o", label=label)
    axes.set(xlabel="turn", ylabel="time to first audio (s)", title=f"{results['model']}\n{results['device']}", ylim=(0, None))
    axes.title.set_fontsize(9)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--via", choices=["engine", "gateway"], default="engine", help="in process, or through the gateway (tiny)")
    parser.add_argument("--size", choices=["1b", "tiny"], default="1b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quantize", choices=QUANTIZE_SCHEMES, default="none", help="the linear layers' scheme (model/quantize.py)")
    parser.add_argument("--turns", type=int, default=len(LINES))
    parser.add_argument("--turn-frames", type=int, default=50, help="frames of each turn (50: 4 s)")
    parser.add_argument("--conversations", type=int, default=1, help="conversations speaking each turn at once")
    parser.add_argument("--tokenizer", type=Path, default=Path("models/tiny/tokenizer.json"), help="a Llama-3.2 tokenizer.json")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, help="and draw both curves into this PNG")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results = via_gateway(args) if args.via == "gateway" else in_process(args)
    rows = results["turns"]
    results = {
        "command": "python bench/" + Path(__file__).name + " " + " ".join(sys.argv[1:]),
        "turn_frames": args.turn_frames,
        **results,
        "turn_n_over_turn_1_with_reuse": rows[-1]["ttfa_with_reuse_s"] / rows[0]["ttfa_with_reuse_s"],
        "turn_n_over_turn_1_without_reuse": rows[-1]["ttfa_without_reuse_s"] / rows[0]["ttfa_without_reuse_s"],
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
