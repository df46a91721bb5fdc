"""csm_stream's own Prometheus metrics (csm_triton/triton/stream_metrics.py): the real
server's metrics port is scraped before and after requests whose frame counts are known from the
in-process generator, and every metric must have moved by exactly what those requests did.

The tests share the session's server: the metrics are cumulative, so differences between two
scrapes taken while the server is idle need no clean slate, and a second server would cost
another model load on a shared 2-core machine."""

from __future__ import annotations

import dataclasses
import re
import time
import urllib.request
from collections import Counter

import numpy as np
import pytest
from test_triton_stream import Streams, wait_for_idle_server

from conftest import SERVER_SLOTS
from csm_client.contract import FRAME_MS, SAMPLE_RATE, SAMPLES_PER_FRAME
from csm_triton import GenerationRequest, Generator, Segment
from csm_triton.engine.prefix_pool import BLOCK_POSITIONS, block_bytes
from csm_triton.model.config import DEFAULT_PREFIX_CACHE_MB, MIB
from csm_triton.tools.server import TritonServer
from triton_tensors import long_prompt, request, scalar, vector

pytestmark = pytest.mark.server

FRAME_S = FRAME_MS / 1000
REPORT_INTERVAL_S = 0.5  # METRICS_INTERVAL_S of csm_triton/triton/csm_stream.py
OPENER = 7341  # a speaker no other test uses: every prompt's first block is BOS and "[speaker]", shared by the others


def series(name: str, **labels: str) -> str:
    """The key of one of csm_stream's series in `scrape`'s result."""
    return name + "{" + ",".join(f'{key}="{value}"' for key, value in sorted({"model": "csm_stream", **labels}.items())) + "}"


def scrape(server: TritonServer) -> dict[str, float]:
    """Every sample on the metrics port, keyed by name and labels in sorted order."""
    with urllib.request.urlopen(f"http://localhost:{server.options.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for name, labels, value in re.findall(r"^(\w+)(?:\{(.*)\})? (\S+)$", text, re.MULTILINE):
        pairs = sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels))
        samples[name + "{" + ",".join(f'{key}="{value}"' for key, value in pairs) + "}"] = float(value)
    return samples


def settled(server: TritonServer, timeout_s: float = 30.0) -> dict[str, float]:
    """A scrape once the server is idle and the model has reported everything: the reporter
    passes records on every REPORT_INTERVAL_S, so two scrapes further apart that agree are final."""
    wait_for_idle_server(server, timeout_s)
    deadline = time.monotonic() + timeout_s
    last = scrape(server)
    while True:
        time.sleep(2 * REPORT_INTERVAL_S)
        now = scrape(server)
        if {k: v for k, v in now.items() if k.startswith("csm_")} == {k: v for k, v in last.items() if k.startswith("csm_")}:
            return now
        assert time.monotonic() < deadline, "csm_stream's metrics kept changing on an idle server"
        last = now


def moved(before: dict[str, float], after: dict[str, float], key: str) -> float:
    assert key in after, f"{key} is not exported"
    return after[key] - before.get(key, 0.0)


def test_metrics_move_by_what_the_requests_did(triton_server: TritonServer, generator: Generator) -> None:
    asks = {"m1": ("Counting frames.", 0, 1200, 21), "m2": ("And seconds of audio.", 1, 2000, 22)}
    before = settled(triton_server)
    streams = Streams(triton_server)
    try:
        for name, (text, speaker, max_ms, seed) in asks.items():
            extra = {"MAX_AUDIO_LENGTH_MS": scalar(max_ms, np.int32), "SEED": scalar(seed, np.int64), "CHUNK_FRAMES": scalar(6, np.int32)}
            streams.send(name, request(text, speaker, **extra))
        streams.send("bad", request(TOPK=scalar(0, np.int32)))
        streams.send("long", long_prompt())  # refused by the engine
        streams.run_until_done([*asks, "bad", "long"])
    finally:
        streams.close()
    after = settled(triton_server)

    frames = {
        name: len(generator.generate_codes(text, speaker, [], max_audio_length_ms=max_ms, seed=seed))
        for name, (text, speaker, max_ms, seed) in asks.items()
    }
    received = streams.received
    assert "TOPK: must be in [1, 2051], got 0" in str(received["bad"].error)
    assert "prompt: " in str(received["long"].error)
    for name in asks:
        assert received[name].error is None and len(received[name].audio) == frames[name] * SAMPLES_PER_FRAME
    total = sum(frames.values())
    assert moved(before, after, series("csm_frames_total")) == total
    assert moved(before, after, series("csm_audio_seconds_total")) == pytest.approx(total * FRAME_S, abs=1e-9)

    # Measured in the server from when it took the request: never later than the client saw it.
    assert moved(before, after, series("csm_time_to_first_audio_seconds_count")) == 2
    assert moved(before, after, series("csm_time_to_first_audio_seconds_bucket", le="+Inf")) == 2
    assert 0 < moved(before, after, series("csm_time_to_first_audio_seconds_sum")) <= sum(received[n].arrivals[0] for n in asks)
    assert moved(before, after, series("csm_real_time_factor_count")) == 2
    client_rtf = sum(received[n].arrivals[-1] / (frames[n] * FRAME_S) for n in asks)
    assert 0 < moved(before, after, series("csm_real_time_factor_sum")) <= client_rtf

    for field in ("TOPK", "prompt"):
        assert moved(before, after, series("csm_rejected_requests_total", reason="invalid_argument", field=field)) == 1
    for reason in ("cancelled", "internal_error"):
        assert moved(before, after, series("csm_rejected_requests_total", reason=reason, field="")) == 0

    # Each request takes one slot for each of its frames, and one more if it ends on an
    # end-of-audio frame; the two ran side by side, so some steps had both.
    slot_steps, steps = (moved(before, after, series(name)) for name in ("csm_engine_slot_steps_total", "csm_engine_steps_total"))
    assert total <= slot_steps <= total + len(asks)
    assert max(frames.values()) <= steps < slot_steps

    assert after[series("csm_slots")] == after[series("csm_free_slots")] == SERVER_SLOTS
    assert after[series("csm_active_slots")] == after[series("csm_waiting_requests")] == after[series("csm_streams")] == 0
    assert all('model="csm_stream"' in key for key in after if key.startswith("csm_"))


def test_the_codes_cache_counts_its_hits_misses_and_bytes(triton_server: TritonServer) -> None:
    """A clip sent twice is encoded once (a miss, then a hit); a turn sent as codes touches the cache not at all."""
    clip = np.random.default_rng(5).uniform(-0.5, 0.5, 3 * SAMPLES_PER_FRAME).astype(np.float32)  # 3 frames
    with_clip = request(
        CONTEXT_TEXT=vector([b"a"], object),
        CONTEXT_SPEAKER=vector([0], np.int32),
        CONTEXT_AUDIO=vector(clip, np.float32),
        CONTEXT_AUDIO_LENGTHS=vector([len(clip)], np.int32),
    )
    with_codes = request(
        CONTEXT_TEXT=vector([b"a"], object),
        CONTEXT_SPEAKER=vector([0], np.int32),
        CONTEXT_CODES=vector(np.zeros(3 * 32), np.int32),
        CONTEXT_CODES_LENGTHS=vector([3], np.int32),
    )
    before = settled(triton_server)
    streams = Streams(triton_server)
    try:
        for name, arrays in (("first", with_clip), ("again", with_clip), ("codes", with_codes)):
            streams.send(name, arrays)
            streams.run_until_done([name])
    finally:
        streams.close()
    after = settled(triton_server)
    assert all(streams.received[name].error is None for name in ("first", "again", "codes"))
    assert moved(before, after, series("csm_codes_cache_misses_total")) == 1
    assert moved(before, after, series("csm_codes_cache_hits_total")) == 1
    assert moved(before, after, series("csm_codes_cache_clips")) == 1
    assert moved(before, after, series("csm_codes_cache_bytes")) == 3 * 32 * 2  # int16 codes
    assert after[series("csm_codes_cache_max_bytes")] == 64 << 20  # config.pbtxt's codes_cache_mb


def test_a_cancelled_stream_counts_as_cancelled_with_the_audio_it_was_sent(triton_server: TritonServer) -> None:
    before = settled(triton_server)
    streams = Streams(triton_server)
    streams.send("c", request("Cancel me halfway.", 0, MAX_AUDIO_LENGTH_MS=scalar(20_000, np.int32)))
    while not streams.received["c"].chunks:
        streams.pump()
    streams.cancel("c")
    streams.close()
    after = settled(triton_server)

    assert moved(before, after, series("csm_rejected_requests_total", reason="cancelled", field="")) == 1
    assert moved(before, after, series("csm_time_to_first_audio_seconds_count")) == 1
    assert moved(before, after, series("csm_real_time_factor_count")) == 0  # it never finished
    # The server may have sent a chunk or two more before it saw the cancellation.
    received_s = len(streams.received["c"].audio) / SAMPLE_RATE
    sent_s = moved(before, after, series("csm_audio_seconds_total"))
    assert received_s <= sent_s + 1e-9
    assert sent_s <= moved(before, after, series("csm_frames_total")) * FRAME_S + 1e-9 < 20


def test_the_engine_counts_every_slot_of_every_step(generator: Generator) -> None:
    """The occupancy counters' source, in process: requests prefilled together, stepped by hand
    (the serving loop steps only its own streams)."""
    engine = generator.engine
    asks = [GenerationRequest(text, 0, max_audio_length_ms=max_ms, seed=5) for text, max_ms in (("One.", 400), ("Two and three.", 960))]
    before = dataclasses.replace(engine.stats)
    frames = {engine.start(generator.stream(ask)): 0 for ask in asks}
    ended_on_eos = set()
    while engine.has_work:
        for result in engine.step():
            frames[result.request_id] += result.codes is not None
            if result.finish == "eos":
                ended_on_eos.add(result.request_id)
    assert engine.stats.frames - before.frames == sum(frames.values())
    assert engine.stats.slot_steps - before.slot_steps == sum(frames.values()) + len(ended_on_eos)
    assert engine.stats.steps - before.steps == max(count + (rid in ended_on_eos) for rid, count in frames.items())


def test_the_prefix_pool_counts_a_conversations_reuse(triton_server: TritonServer, generator: Generator) -> None:
    """A turn, then the next with that turn's reply as codes: a miss, then a hit that reused the
    whole history the first left in the pool (up to its last whole block); the pool's bytes, and
    each turn's time to first audio under its prompt's length range."""
    opening = "A first line long enough for a few blocks of the pool, spoken once."
    first_text, reply_text, max_ms = "Then a reply to it.", "And a second turn after that reply.", 1200
    first = request(first_text, 1, CONTEXT_TEXT=vector([opening.encode()], object), CONTEXT_SPEAKER=vector([OPENER], np.int32),
                    MAX_AUDIO_LENGTH_MS=scalar(max_ms, np.int32))  # fmt: skip
    before = settled(triton_server)
    streams = Streams(triton_server)
    try:
        streams.send("first", first)
        streams.run_until_done(["first"])
        codes = np.concatenate(streams.received["first"].codes)
        second = request(
            reply_text, 0,
            CONTEXT_TEXT=vector([opening.encode(), first_text.encode()], object), CONTEXT_SPEAKER=vector([OPENER, 1], np.int32),
            CONTEXT_CODES=vector(codes.reshape(-1), np.int32), CONTEXT_CODES_LENGTHS=vector([0, len(codes)], np.int32),
        )  # fmt: skip
        streams.send("second", second)
        streams.run_until_done(["second"])
    finally:
        streams.close()
    after = settled(triton_server)
    assert all(streams.received[name].error is None for name in ("first", "second"))

    context = [Segment(OPENER, opening)]
    first_positions = len(generator.prompt(first_text, 1, context)[0])
    context.append(Segment(1, first_text, codes=codes))
    second_positions = len(generator.prompt(reply_text, 0, context)[0])
    fed = len(codes) - (len(codes) == max_ms // FRAME_MS)  # a turn cut by its length never fed its last frame back
    assert moved(before, after, series("csm_prefix_pool_misses_total")) == 1
    assert moved(before, after, series("csm_prefix_pool_hits_total")) == 1
    reused = min((first_positions + fed) // BLOCK_POSITIONS * BLOCK_POSITIONS, second_positions - 1)
    assert moved(before, after, series("csm_prefix_pool_positions_reused_total")) == reused
    block = block_bytes(generator.engine.model.config, generator.engine.model.audio_head.dtype)
    stored = moved(before, after, series("csm_prefix_pool_bytes"))
    assert stored >= (first_positions + fed) // BLOCK_POSITIONS * block and stored % block == 0
    assert after[series("csm_prefix_pool_bytes")] <= after[series("csm_prefix_pool_max_bytes")]
    assert after[series("csm_prefix_pool_max_bytes")] == DEFAULT_PREFIX_CACHE_MB * MIB // block * block  # config.pbtxt's prefix_cache_mb

    family = "csm_time_to_first_audio_by_prompt_seconds_count"
    leasts = sorted(int(value) for value in re.findall(family + r'\{.*prompt_positions="(\d+)"', "\n".join(after)))
    assert leasts[0] == 0 and len(leasts) > 2
    ranges = Counter(max(least for least in leasts if least <= positions) for positions in (first_positions, second_positions))
    for least in leasts:
        key = series(family, prompt_positions=str(least))
        assert moved(before, after, key) == ranges[least]
