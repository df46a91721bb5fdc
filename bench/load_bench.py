"""Streaming load test of the csm_stream model: staggered virtual users at several concurrency levels.

At each level N virtual users each start at a random offset within --stagger-s, then send streaming
gRPC requests back to back for --duration-s (or --requests-per-user requests): a mix of short, medium
and long texts, no context, text-only context or a 1-3 s audio context, and 2-6 s of audio asked for.
Per level it reports time to first audio (TTFA), real-time factor (generation wall time / audio
duration), aggregate audio-seconds per wall second, errors, and what a listener hears: streaming
viability as VoxServe (arXiv 2602.00269) defines it (a chunk after the first is viable when the
audio received before it is at least as long as the time since the first chunk arrived; a request
is viable when all its chunks are), and the silence a player that resumes on each late chunk would
play (stall seconds). It checks the targets: at 8 streams, TTFA p95 <= 3x and audio-s per wall-s
>= 4x their values at 1 stream; with --chunking naming the server's schedule and a fixed one, at
1 stream >= 95% viable requests and at 8 streams at least the fixed schedule's share.

Starts its own tritonserver on the tiny model (CPU, 8 slots) unless --url names a running one.
Usage: python bench/load_bench.py [--concurrency 1 2 4 8] [--duration-s 30] [--chunking server 2/12]
       [--url HOST:PORT] [--json OUT] [--plot OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from csm_client import SAMPLE_RATE, Segment, request_arrays

if TYPE_CHECKING:
    from csm_triton.tools.server import TritonServer

logger = logging.getLogger("load_bench")

MODEL = "csm_stream"
TEXTS = {
    "short": ("Hi there!", "Sure, go ahead.", "Thanks a lot.", "Not today, sorry."),
    "medium": (
        "I would like to book a table for two at seven tonight.",
        "Could you tell me how long the delivery usually takes?",
        "The meeting has been moved to Thursday afternoon.",
    ),
    "long": (
        "Well, I checked the schedule twice this morning, and it looks like the last train leaves at eleven, "
        "so we should probably head out a little earlier than we planned.",
        "When we first moved here the whole street was empty, but over the years the bakery, the bookshop "
        "and that tiny cafe on the corner turned it into the busiest place in town.",
    ),
}
CONTEXT_TURNS = ("Hello, how are you doing today?", "Pretty good, thanks for asking.", "What are you up to this weekend?")
CONTEXT_KINDS = (("none", 0.4), ("text", 0.3), ("audio", 0.3))
MAX_AUDIO_MS = (2000, 3000, 4000, 5000, 6000)
WARMUP_MAX_AUDIO_MS = 1000
STREAM_TIMEOUT_S = 300.0
ERROR_BACKOFF_S = 0.5  # a failing server must not turn the users into a tight error loop
TTFA_P95_RATIO_TARGET = 3.0  # at 8 streams, at most this times the 1-stream TTFA p95
THROUGHPUT_RATIO_TARGET = 4.0  # at 8 streams, at least this times the 1-stream audio-s per wall-s
VIABLE_SHARE_TARGET = 0.95  # at 1 stream, with the server's schedule
SERVER_CHUNKING = "server"  # --chunking: the server's own schedule, no chunk sizes sent
LOG_PROBLEM = re.compile(r"^E\d{4} |Traceback|Exception|ERROR|Error:")  # tritonserver's own error lines start "E<mmdd> "
GAUGE_INTERVAL_S = 0.5  # how often the model refreshes its csm_* gauges
LOG_BENIGN = re.compile(r"CudaDriverHelper has not been initialized|Failed to initialize NVML")  # a host without GPUs


@dataclass(frozen=True)
class RequestSpec:
    """One request of the mix: how it was drawn (for the per-kind figures) and its input arrays."""

    text_length: str
    context: str
    max_audio_length_ms: int
    arrays: dict[str, np.ndarray]


@dataclass
class RequestResult:
    """What one streaming request saw; times are time.perf_counter() seconds."""

    user: int
    spec: RequestSpec
    sent: float
    end: float = 0.0
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, samples) of each non-empty AUDIO chunk
    error: str | None = None

    @property
    def audio_s(self) -> float:
        return sum(samples for _, samples in self.chunks) / SAMPLE_RATE

    @property
    def ttfa_s(self) -> float | None:
        return self.chunks[0][0] - self.sent if self.chunks else None

    @property
    def rtf(self) -> float | None:
        return (self.end - self.sent) / self.audio_s if self.chunks else None

    def underruns(self) -> tuple[int, float]:
        """(chunks that arrived after the audio before them had finished playing, seconds of silence
        that caused): playback starts when the first chunk arrives and resumes when a late one does."""
        count, silence, played_until = 0, 0.0, None
        for arrival, samples in self.chunks:
            if played_until is not None and arrival > played_until:
                count += 1
                silence += arrival - played_until
            start = arrival if played_until is None else max(arrival, played_until)
            played_until = start + samples / SAMPLE_RATE
        return count, silence

    def viable_chunks(self) -> tuple[int, int]:
        """(viable chunks, chunks after the first), by VoxServe's rule: the audio received before
        a chunk is at least as long as the time since the first chunk arrived."""
        viable, audio_s = 0, 0.0
        for index, (arrival, samples) in enumerate(self.chunks):
            viable += index > 0 and audio_s >= arrival - self.chunks[0][0]
            audio_s += samples / SAMPLE_RATE
        return viable, max(0, len(self.chunks) - 1)

    def record(self) -> dict[str, Any]:
        underruns, silence = self.underruns()
        viable, later = self.viable_chunks()
        return {
            "user": self.user,
            "text_length": self.spec.text_length,
            "context": self.spec.context,
            "max_audio_length_ms": self.spec.max_audio_length_ms,
            "ttfa_s": self.ttfa_s,
            "wall_s": self.end - self.sent,
            "audio_s": self.audio_s,
            "rtf": self.rtf,
            "chunks": [[round(arrival - self.sent, 4), samples] for arrival, samples in self.chunks],  # (s after sending, samples)
            "underruns": underruns,
            "underrun_silence_s": silence,
            "viable_chunks": viable,
            "chunks_after_the_first": later,
            "error": self.error,
        }


@dataclass
class UserRun:
    """One virtual user's requests and when it was active, for the all-users-active window."""

    started: float
    finished: float
    results: list[RequestResult]


@dataclass(frozen=True)
class LoadSettings:
    """How each level's users behave; the same at every level, so levels differ only in concurrency."""

    duration_s: float | None
    requests_per_user: int | None
    stagger_s: float
    seed: int
    first_chunk_frames: int | None
    chunk_frames: int | None

    @property
    def chunking(self) -> str:
        """SERVER_CHUNKING, or the sizes sent as "FIRST/LATER"."""
        if self.first_chunk_frames is None and self.chunk_frames is None:
            return SERVER_CHUNKING
        return f"{self.first_chunk_frames}/{self.chunk_frames}"


def context_clip(rng: random.Random, seconds: float) -> np.ndarray:
    """A voice-like stand-in for a recorded turn: an amplitude-modulated tone plus noise."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2.0, 5.0) * t)
    tone = np.sin(2 * np.pi * rng.uniform(110.0, 260.0) * t)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 0.02, len(t))
    return (0.3 * envelope * tone + noise).astype(np.float32)


def make_request(rng: random.Random, settings: LoadSettings, max_audio_length_ms: int | None = None) -> RequestSpec:
    """A request drawn from the mix; the server's chunking defaults apply unless settings override them."""
    text_length = rng.choice(list(TEXTS))
    context_kind = rng.choices([kind for kind, _ in CONTEXT_KINDS], [weight for _, weight in CONTEXT_KINDS])[0]
    speaker = rng.randrange(2)
    context: list[Segment] = []
    if context_kind == "text":
        context = [Segment(speaker=(speaker + i + 1) % 2, text=text) for i, text in enumerate(CONTEXT_TURNS[: rng.randint(1, 3)])]
    elif context_kind == "audio":
        context = [Segment(speaker=1 - speaker, text=rng.choice(CONTEXT_TURNS), audio=context_clip(rng, rng.uniform(1.0, 3.0)))]
    max_ms = max_audio_length_ms or rng.choice(MAX_AUDIO_MS)
    arrays = request_arrays(
        rng.choice(TEXTS[text_length]),
        speaker,
        context,
        max_audio_length_ms=max_ms,
        seed=rng.getrandbits(31),
        first_chunk_frames=settings.first_chunk_frames,
        chunk_frames=settings.chunk_frames,
    )
    return RequestSpec(text_length, context_kind, max_ms, arrays)


def infer_inputs(module: ModuleType, arrays: dict[str, np.ndarray]) -> list:
    """The InferInput list of a request's arrays, for a tritonclient protocol module (grpc, http or their .aio)."""
    inputs = []
    for name, array in arrays.items():
        infer_input = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs


async def stream_request(client: grpcclient.InferenceServerClient, spec: RequestSpec, user: int) -> RequestResult:
    """One request on its own gRPC stream, timing every AUDIO chunk until the final response."""
    inputs = infer_inputs(grpcclient, spec.arrays)

    async def one_request():
        yield {"model_name": MODEL, "inputs": inputs, "outputs": [grpcclient.InferRequestedOutput("AUDIO")]}

    result = RequestResult(user, spec, sent=time.perf_counter())
    responses = None
    try:
        responses = client.stream_infer(one_request(), stream_timeout=STREAM_TIMEOUT_S)
        async for response, error in responses:
            now = time.perf_counter()
            if error is not None:
                result.error = error.message()
                break
            audio = response.as_numpy("AUDIO")
            if audio is not None and audio.size:
                result.chunks.append((now, audio.size))
            if response.get_response().parameters["triton_final_response"].bool_param:
                break
        else:
            result.error = "the stream ended without a final response"
    except (InferenceServerException, grpc.RpcError, OSError) as error:
        result.error = f"{type(error).__name__}: {error}"
    finally:
        if responses is not None:
            responses.cancel()  # closes the call if we stopped reading before the server did
    result.end = time.perf_counter()
    return result


async def virtual_user(
    url: str, user: int, settings: LoadSettings, start_at: float, deadline: float, on_result: Callable[[RequestResult], None]
) -> UserRun:
    """Waits for its staggered start, then sends requests back to back until the deadline or its count.
    A user draws the same request sequence at every level, so levels differ only in concurrency."""
    rng = random.Random(f"{settings.seed}-user-{user}")
    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    client = grpcclient.InferenceServerClient(url)
    run = UserRun(time.perf_counter(), 0.0, [])
    try:
        while time.perf_counter() < deadline and (settings.requests_per_user is None or len(run.results) < settings.requests_per_user):
            result = await stream_request(client, make_request(rng, settings), user)
            run.results.append(result)
            on_result(result)
            if result.error is not None:
                await asyncio.sleep(ERROR_BACKOFF_S)
    finally:
        await client.close()
    run.finished = time.perf_counter()
    return run


def percentiles(values: list[float], qs: tuple[int, ...]) -> dict[str, float | None]:
    """None where there is nothing to rank, rather than failing a level that had only errors."""
    return {f"p{q}": float(np.percentile(values, q)) if values else None for q in qs}


def summarize(concurrency: int, runs: list[UserRun]) -> dict[str, Any]:
    """One level's figures. Throughput counts the audio that arrived while all N users were active
    (from the last user's start to the first user's last completion), so ramp-up and drain do not
    dilute it; it falls back to the whole level when that window is empty."""
    results = [result for run in runs for result in run.results]
    ok = [result for result in results if result.error is None]
    window_start, window_end = max(run.started for run in runs), min(run.finished for run in runs)
    if window_end <= window_start:
        window_start, window_end = min(run.started for run in runs), max(run.finished for run in runs)
    window_audio_s = sum(samples for result in results for arrival, samples in result.chunks if window_start <= arrival <= window_end)
    underruns = [result.underruns() for result in ok]
    viability = [result.viable_chunks() for result in ok if len(result.chunks) > 1]  # VoxServe's: a one-chunk request cannot stall
    by_context = {
        kind: percentiles([r.ttfa_s for r in ok if r.spec.context == kind and r.ttfa_s is not None], (50,))["p50"]
        for kind, _ in CONTEXT_KINDS
    }
    return {
        "concurrency": concurrency,
        "requests_completed": len(ok),
        "errors": len(results) - len(ok),
        "error_messages": Counter(result.error for result in results if result.error is not None).most_common(5),
        "empty_responses": sum(1 for result in ok if not result.chunks),
        "ttfa_s": percentiles([r.ttfa_s for r in ok if r.ttfa_s is not None], (50, 95, 99)),
        "ttfa_p50_s_by_context": by_context,
        "rtf": percentiles([r.rtf for r in ok if r.rtf is not None], (50, 95)),
        "audio_s_total": sum(result.audio_s for result in ok),
        "throughput_window_s": window_end - window_start,
        "audio_s_per_wall_s": window_audio_s / SAMPLE_RATE / (window_end - window_start),
        "underruns_total": sum(count for count, _ in underruns),
        "requests_with_underruns": sum(1 for count, _ in underruns if count),
        "underruns_per_request_max": max((count for count, _ in underruns), default=0),
        "underrun_silence_s_total": sum(silence for _, silence in underruns),
        "stall_s_per_request": {"mean": float(np.mean([s for _, s in underruns])) if underruns else None}
        | percentiles([silence for _, silence in underruns], (95,)),
        "viable_requests_share": sum(viable == later for viable, later in viability) / len(viability) if viability else None,
        "viable_chunks_share": sum(v for v, _ in viability) / max(1, sum(later for _, later in viability)) if viability else None,
        "requests": [result.record() for result in results],
    }


async def run_level(url: str, concurrency: int, settings: LoadSettings) -> dict[str, Any]:
    offsets = random.Random(f"{settings.seed}-offsets-{concurrency}").random
    start = time.perf_counter()
    deadline = start + settings.stagger_s + settings.duration_s if settings.duration_s is not None else math.inf
    total = concurrency * settings.requests_per_user if settings.requests_per_user is not None else None
    errors = 0
    with tqdm(total=total, desc=f"{settings.chunking}, {concurrency} stream{'s' if concurrency > 1 else ''}", unit="req") as bar:

        def on_result(result: RequestResult) -> None:
            nonlocal errors
            errors += result.error is not None
            bar.set_postfix(errors=errors, refresh=False)
            bar.update()

        runs = await asyncio.gather(
            *(virtual_user(url, user, settings, start + offsets() * settings.stagger_s, deadline, on_result) for user in range(concurrency))
        )
    level = {"chunking": settings.chunking} | summarize(concurrency, list(runs))
    for message, count in level["error_messages"]:
        logger.warning("%d streams: %d x %s", concurrency, count, message)
    return level


async def warm_up(url: str, requests: int, settings: LoadSettings) -> None:
    """Short concurrent requests of every kind first, so the first level does not pay for lazy initialisation."""
    rng = random.Random(f"{settings.seed}-warmup")
    client = grpcclient.InferenceServerClient(url)
    try:
        if not await client.is_model_ready(MODEL):
            raise RuntimeError(f"{MODEL} is not ready at {url}")
        specs = [make_request(rng, settings, WARMUP_MAX_AUDIO_MS) for _ in range(requests)]
        results = await asyncio.gather(*(stream_request(client, spec, -1) for spec in specs))
    finally:
        await client.close()
    for result in results:
        if result.error is not None:
            logger.warning("warm-up request failed: %s", result.error)


async def sweep(url: str, levels: list[int], schedules: list[LoadSettings], warmup: int) -> list[dict[str, Any]]:
    """Every level with each chunk schedule in turn, after one warm-up."""
    await warm_up(url, warmup, schedules[0])
    return [await run_level(url, concurrency, settings) for settings in schedules for concurrency in levels]


def check_targets(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """The 8-stream targets against the 1-stream figures of one chunk schedule; None where the
    sweep lacks either level."""
    by_level = {level["concurrency"]: level for level in levels}
    one, eight = by_level.get(1), by_level.get(8)
    if one is None or eight is None or not one["ttfa_s"]["p95"] or not one["audio_s_per_wall_s"] or eight["ttfa_s"]["p95"] is None:
        return {"ttfa_p95_ratio": None, "throughput_ratio": None, "ttfa_met": None, "throughput_met": None}
    ttfa_ratio = eight["ttfa_s"]["p95"] / one["ttfa_s"]["p95"]
    throughput_ratio = eight["audio_s_per_wall_s"] / one["audio_s_per_wall_s"]
    return {
        "ttfa_p95_ratio": ttfa_ratio,
        "ttfa_target": f"<= {TTFA_P95_RATIO_TARGET}x",
        "ttfa_met": ttfa_ratio <= TTFA_P95_RATIO_TARGET,
        "throughput_ratio": throughput_ratio,
        "throughput_target": f">= {THROUGHPUT_RATIO_TARGET}x",
        "throughput_met": throughput_ratio >= THROUGHPUT_RATIO_TARGET,
    }


def check_viability(levels: list[dict[str, Any]]) -> dict[str, Any]:
    """The server's schedule against a fixed one run beside it: at 1 stream at least
    VIABLE_SHARE_TARGET of requests viable, with a TTFA p95 no worse; at 8 streams a viable share
    at least as high. None where the sweep lacks a level or a second schedule."""
    by_key = {(level["chunking"], level["concurrency"]): level for level in levels}
    fixed = next((level["chunking"] for level in levels if level["chunking"] != SERVER_CHUNKING), None)
    checks: dict[str, Any] = {"fixed_schedule": fixed}
    one = by_key.get((SERVER_CHUNKING, 1))
    if one is not None and one["viable_requests_share"] is not None:
        checks["viable_share_1"] = one["viable_requests_share"]
        checks["viable_share_1_met"] = one["viable_requests_share"] >= VIABLE_SHARE_TARGET
    for streams in (1, 8):
        server, other = by_key.get((SERVER_CHUNKING, streams)), by_key.get((fixed, streams))
        if server is None or other is None or server["viable_requests_share"] is None or other["viable_requests_share"] is None:
            continue
        checks[f"viable_share_{streams}_vs_fixed"] = [server["viable_requests_share"], other["viable_requests_share"]]
        checks[f"ttfa_p95_{streams}_vs_fixed"] = [server["ttfa_s"]["p95"], other["ttfa_s"]["p95"]]
    return checks


def run_perf_analyzer(url: str, concurrency: int, workdir: Path) -> dict[str, Any]:
    """perf_analyzer's own streaming measurement at one level, for comparison with ours. Its binary
    ships in NVIDIA's tritonserver SDK container; the PyPI `perf-analyzer` 0.1.0 wheel is an empty
    placeholder (a hello() function, no binary), so elsewhere this is skipped."""
    binary = shutil.which("perf_analyzer")
    if binary is None:
        return {"status": "skipped", "reason": "no perf_analyzer binary on the PATH (the PyPI perf-analyzer 0.1.0 wheel is a placeholder)"}
    data = workdir / "perf_analyzer_input.json"
    request = {"TEXT": [TEXTS["medium"][0]], "SPEAKER": [0], "MAX_AUDIO_LENGTH_MS": [3000]}
    data.write_text(json.dumps({"data": [request]}))
    argv = [binary, "-m", MODEL, "-u", url, "-i", "grpc", "--streaming", f"--concurrency-range={concurrency}", f"--input-data={data}"]
    logger.info("running %s", " ".join(argv))
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "command": " ".join(argv), "reason": "timed out after 600 s"}
    lines = [line.strip() for line in completed.stdout.splitlines() if line.strip().startswith("Concurrency:")]
    return {
        "status": "ok" if completed.returncode == 0 and lines else "failed",
        "command": " ".join(argv),
        "output_line": lines[-1] if lines else None,
        "output_tail": (completed.stdout + completed.stderr)[-2000:],
    }


def server_log_problems(log_file: Path, limit: int = 20) -> list[str]:
    """Lines of the server's log that look like failures: worth a look even when no request failed."""
    if not log_file.exists():
        return []
    lines = log_file.read_text(errors="replace").splitlines()
    return [line for line in lines if LOG_PROBLEM.search(line) and not LOG_BENIGN.search(line)][:limit]


def server_gauges(metrics_url: str) -> dict[str, float]:
    """The model's csm_* gauges once the sweep is over: streams still counted on an idle server are
    requests it lost track of."""
    time.sleep(2 * GAUGE_INTERVAL_S)
    try:
        with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError as error:
        logger.warning("cannot read the server's metrics at %s: %s", metrics_url, error)
        return {}
    return {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("csm_")}


def table(levels: list[dict[str, Any]]) -> str:
    """A Markdown table, pasted as it is into docs/benchmarks.md."""

    def number(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    def percent(share: float | None) -> str:
        return "-" if share is None else f"{100 * share:.0f}%"

    header = (
        "| chunks | streams | requests | errors | TTFA p50 / p95 / p99 (s) | RTF p50 / p95 | audio-s per wall-s "
        "| viable requests (chunks) | stall s per request mean / p95 |"
    )
    rows = [header, "|---|---|---|---|---|---|---|---|---|"]
    for level in levels:
        ttfa, rtf, stall = level["ttfa_s"], level["rtf"], level["stall_s_per_request"]
        rows.append(
            f"| {level['chunking']} | {level['concurrency']} | {level['requests_completed']} | {level['errors']} "
            f"| {number(ttfa['p50'])} / {number(ttfa['p95'])} / {number(ttfa['p99'])} "
            f"| {number(rtf['p50'])} / {number(rtf['p95'])} | {number(level['audio_s_per_wall_s'])} "
            f"| {percent(level['viable_requests_share'])} ({percent(level['viable_chunks_share'])}) "
            f"| {number(stall['mean'])} / {number(stall['p95'])} |"
        )
    return "\n".join(rows)


def target_lines(chunking: str, targets: dict[str, Any]) -> list[str]:
    if targets["ttfa_met"] is None:
        return [f"{chunking}: targets not evaluated (the sweep needs levels 1 and 8 with audio at both)"]
    return [
        f"{chunking}: TTFA p95 at 8 streams / 1 stream: {targets['ttfa_p95_ratio']:.2f}x "
        f"(target {targets['ttfa_target']}): {'met' if targets['ttfa_met'] else 'NOT met'}",
        f"{chunking}: audio-s per wall-s at 8 streams / 1 stream: {targets['throughput_ratio']:.2f}x "
        f"(target {targets['throughput_target']}): {'met' if targets['throughput_met'] else 'NOT met'}",
    ]


def viability_lines(checks: dict[str, Any]) -> list[str]:
    lines = []
    if "viable_share_1" in checks:
        lines.append(
            f"{SERVER_CHUNKING}: viable requests at 1 stream {100 * checks['viable_share_1']:.0f}% "
            f"(target >= {100 * VIABLE_SHARE_TARGET:.0f}%): {'met' if checks['viable_share_1_met'] else 'NOT met'}"
        )
    for streams in (1, 8):
        if f"viable_share_{streams}_vs_fixed" in checks:
            (ours, fixed), (ttfa_ours, ttfa_fixed) = checks[f"viable_share_{streams}_vs_fixed"], checks[f"ttfa_p95_{streams}_vs_fixed"]
            lines.append(
                f"{streams} stream(s): viable {100 * ours:.0f}% ({SERVER_CHUNKING}) vs {100 * fixed:.0f}% ({checks['fixed_schedule']}), "
                f"TTFA p95 {ttfa_ours:.2f} s vs {ttfa_fixed:.2f} s"
            )
    return lines


def plot(levels: list[dict[str, Any]], out: Path) -> None:
    """TTFA, throughput and viable requests against concurrency, a line per chunk schedule; the
    dashed line is where every stream just keeps up."""
    import matplotlib  # here, not at the top: the headless Agg backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, throughput, viable) = plt.subplots(1, 3, figsize=(15, 4))
    for chunking in dict.fromkeys(level["chunking"] for level in levels):
        ours = [level for level in levels if level["chunking"] == chunking]
        streams = [level["concurrency"] for level in ours]
        for q in ("p50", "p95"):
            latency.plot(streams, [level["ttfa_s"][q] for level in ours], marker="o", label=f"{chunking} TTFA {q}")
        throughput.plot(streams, [level["audio_s_per_wall_s"] for level in ours], marker="o", label=chunking)
        viable.plot(streams, [100 * (level["viable_requests_share"] or 0) for level in ours], marker="o", label=chunking)
    streams = sorted({level["concurrency"] for level in levels})
    throughput.plot(streams, streams, linestyle="--", color="grey", label="every stream real time")
    latency.set(xlabel="concurrent streams", ylabel="seconds", title="time to first audio", xticks=streams)
    throughput.set(xlabel="concurrent streams", ylabel="audio-s per wall-s", title="aggregate throughput", xticks=streams)
    viable.set(xlabel="concurrent streams", ylabel="% of requests", title="viable requests (no stall)", xticks=streams)
    for axes in (latency, throughput, viable):
        axes.set_ylim(bottom=0)
        axes.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def start_server(workdir: Path, log_file: Path, slots: int) -> TritonServer:
    """tritonserver on a freshly made tiny model (CPU), as bench/triton_bench.py does."""
    # Imported here: csm_triton pulls in torch, which a load generator pointed at --url does not need.
    from csm_triton.tools.server import ServerOptions, TritonServer, model_repository_with
    from export.tiny import make_tiny

    model_dir = make_tiny(workdir / "tiny")
    parameters = {"model_dir": f"{workdir}/none", "tiny_model_dir": str(model_dir), "slots": str(slots)}
    repository = model_repository_with(workdir / "model_repository", parameters)
    logger.info("starting tritonserver (tiny model, %d slots); its log: %s", slots, log_file)
    return TritonServer(ServerOptions.on_free_ports(repository), log_file).start()


def chunking_sizes(value: str) -> tuple[int | None, int | None]:
    """--chunking's value: (FIRST_CHUNK_FRAMES, CHUNK_FRAMES) to send, None for the server's."""
    if value == SERVER_CHUNKING:
        return None, None
    first, _, later = value.partition("/")
    try:
        return int(first), int(later)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected "{SERVER_CHUNKING}" or FIRST/LATER frames such as 2/12, got {value!r}') from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8], help="levels of concurrent streams")
    parser.add_argument("--duration-s", type=float, default=30.0, help="seconds each user sends for, after the stagger window")
    parser.add_argument("--requests-per-user", type=int, help="instead of --duration-s: requests each user sends")
    parser.add_argument("--stagger-s", type=float, default=4.0, help="users start at uniform random offsets within this")
    parser.add_argument("--warmup", type=int, help="short requests sent before the sweep (default: the largest level)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the request mix, the offsets and the generation seeds")
    parser.add_argument(
        "--chunking",
        type=chunking_sizes,
        nargs="+",
        default=[(None, None)],
        help=f'chunk schedules to sweep in turn: "{SERVER_CHUNKING}" (send no sizes) or FIRST/LATER frames to send, e.g. 2/12',
    )
    parser.add_argument("--url", help="gRPC host:port of a running server (default: start one on the tiny model)")
    parser.add_argument("--slots", type=int, default=8, help="engine slots of the server this script starts")
    parser.add_argument("--server-log", type=Path, default=Path(tempfile.gettempdir()) / "csm-load-bench-server.log")
    parser.add_argument("--perf-analyzer-concurrency", type=int, default=1, help="level for perf_analyzer --streaming; 0 skips it")
    parser.add_argument("--json", type=Path, default=Path("docs/load_bench.json"), help="results (with every request's figures)")
    parser.add_argument("--plot", type=Path, default=Path("docs/load_bench.png"), help="TTFA, throughput and viability against concurrency")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    duration_s = None if args.requests_per_user else args.duration_s
    settings = LoadSettings(duration_s, args.requests_per_user, args.stagger_s, args.seed, None, None)
    schedules = [dataclasses.replace(settings, first_chunk_frames=first, chunk_frames=later) for first, later in args.chunking]
    levels_wanted = sorted(set(args.concurrency))
    warmup = args.warmup if args.warmup is not None else max(levels_wanted)
    with tempfile.TemporaryDirectory() as tmp, logging_redirect_tqdm():
        server = None if args.url else start_server(Path(tmp), args.server_log, args.slots)
        url = args.url or server.grpc_url
        try:
            levels = asyncio.run(sweep(url, levels_wanted, schedules, warmup))
            perf_analyzer = (
                run_perf_analyzer(url, args.perf_analyzer_concurrency, Path(tmp))
                if args.perf_analyzer_concurrency > 0
                else {"status": "skipped", "reason": "--perf-analyzer-concurrency 0"}
            )
            gauges = {} if server is None else server_gauges(f"localhost:{server.options.metrics_port}")
        finally:
            if server is not None:
                server.stop()
    targets = {
        schedule.chunking: check_targets([level for level in levels if level["chunking"] == schedule.chunking]) for schedule in schedules
    }
    viability = check_viability(levels)
    results = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version()},
        "server": args.url or f"started here: tiny model, CPU, {args.slots} slots",
        "settings": {**vars(settings), "levels": levels_wanted, "warmup_requests": warmup},
        "chunking": [schedule.chunking for schedule in schedules],
        "targets": targets,
        "viability": viability,
        "perf_analyzer": perf_analyzer,
        "server_gauges_after_sweep": gauges,
        "server_log_problems": [] if args.url else server_log_problems(args.server_log),
        "levels": levels,
    }
    print(table(levels))
    for chunking, checks in targets.items():
        for line in target_lines(chunking, checks):
            print(line)
    for line in viability_lines(viability):
        print(line)
    if perf_analyzer["status"] != "ok":
        print(f"perf_analyzer: {perf_analyzer['status']} ({perf_analyzer.get('reason', 'see the JSON')})")
    else:
        print(f"perf_analyzer: {perf_analyzer['output_line']}")
    if gauges.get("csm_streams"):
        logger.warning("the idle server still counts %d streams after the sweep: %s", gauges["csm_streams"], gauges)
    for line in results["server_log_problems"]:
        logger.warning("server log: %s", line)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(levels, args.plot)
    logger.info("wrote %s and %s", args.json, args.plot)


if __name__ == "__main__":
    main()
