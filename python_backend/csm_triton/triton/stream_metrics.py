"""The csm_stream model's own Prometheus metrics, which Triton serves beside its nv_* metrics.

The threads that serve requests only record what happened, under a lock: every pb_utils metric
call is a round trip to the tritonserver process, so the reporter thread passes the records on,
with the engine's running totals and the serving loop's gauges, a few times a second.

Every series carries model="csm_stream". All metrics of one family must have the same label
names: tritonserver 2.51 aborts (boost lock_exception) on a second set, so `field` is "" on the
rejections that have none.
"""

from __future__ import annotations

import re
import threading

import triton_python_backend_utils as pb_utils

from csm_client.contract import FRAME_MS

from .protocol import Heartbeat
from .serving import INPUTS

MODEL = {"model": "csm_stream"}
FRAME_S = FRAME_MS / 1000
TTFA_BUCKETS_S = [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0]
# Time to first audio by the prompt's length: the label's values, each the least length of its range.
PROMPT_RANGES = (0, 128, 256, 512, 1024)
RTF_BUCKETS = [0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0]
# invalid_argument's `field`: the names that the checks' messages start with (an input's, or
# "prompt" for one the model cannot take). Anything else is "other", so that a label never takes
# an unbounded set of values from request data.
FIELDS = frozenset({*INPUTS, "prompt"})

_GAUGES = {
    "active_slots": "Engine slots generating now",
    "free_slots": "Engine slots free for a new request",
    "slots": "Engine slots of this instance (the slots parameter, or fewer under kv_cache_memory_mb)",
    "waiting_requests": "Requests accepted and waiting for a slot",
    "streams": "Requests accepted and not yet finished (waiting, generating or sending audio)",
    "loop_threads": "Serving-loop threads alive (2 when healthy; 0 while the engine process restarts)",
}
_ENGINE_COUNTERS = {
    "frames": ("csm_frames_total", "Frames (80 ms of audio each) generated, those of requests cancelled later included"),
    "steps": ("csm_engine_steps_total", "Engine steps (one frame for every slot in the batch)"),
    "slot_steps": ("csm_engine_slot_steps_total", "Slots sampled, summed over engine steps"),
}
# The engine's codes cache (prompt.CodesCache.stats()): running totals, and what it holds now.
_CACHE_COUNTERS = {
    "hits": ("csm_codes_cache_hits_total", "Context audio clips whose Mimi codes the codes cache held (not encoded again)"),
    "misses": ("csm_codes_cache_misses_total", "Context audio clips Mimi-encoded (not in the codes cache)"),
}
_CACHE_GAUGES = {
    "bytes": ("csm_codes_cache_bytes", "Bytes of Mimi codes the codes cache holds"),
    "clips": ("csm_codes_cache_clips", "Context audio clips whose codes the codes cache holds"),
    "max_bytes": ("csm_codes_cache_max_bytes", "The codes cache's bound in bytes (codes_cache_mb; 0: no cache)"),
}
# The engine's prefix pool (prefix_pool.PrefixPool.stats()): running totals, and what it holds now.
_POOL_COUNTERS = {
    "hits": ("csm_prefix_pool_hits_total", "Prompts whose beginning the prefix pool held (copied, not prefilled)"),
    "misses": ("csm_prefix_pool_misses_total", "Prompts the prefix pool held no beginning of"),
    "positions_reused": ("csm_prefix_pool_positions_reused_total", "Prompt positions copied from the prefix pool instead of prefilled"),
    "blocks_evicted": ("csm_prefix_pool_evictions_total", "Blocks of keys and values the prefix pool dropped, least recently used first"),
}
_POOL_GAUGES = {
    "bytes": ("csm_prefix_pool_bytes", "Bytes of keys and values the prefix pool holds"),
    "max_bytes": ("csm_prefix_pool_max_bytes", "The prefix pool's bound in bytes (prefix_cache_mb; 0: no pool)"),
}


class StreamMetrics:
    """The families and their series, and what the request threads recorded since the last report."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._families: list[pb_utils.MetricFamily] = []
        gauge, counter, histogram = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.HISTOGRAM
        self._gauges = {name: self._family(f"csm_{name}", text, gauge).Metric(labels=MODEL) for name, text in _GAUGES.items()}
        self._engine_counters = {
            field: self._family(name, text, counter).Metric(labels=MODEL) for field, (name, text) in _ENGINE_COUNTERS.items()
        }
        self._caches = {
            "codes_cache": _CacheSeries(self, _CACHE_COUNTERS, _CACHE_GAUGES),
            "prefix_pool": _CacheSeries(self, _POOL_COUNTERS, _POOL_GAUGES),
        }
        self._restarts = self._family(
            "csm_engine_restarts_total", "Engine processes started again after the one before died, hung or could not serve", counter
        ).Metric(labels=MODEL)
        self._restarts_reported = 0
        self._audio_seconds = self._family("csm_audio_seconds_total", "Seconds of audio sent to clients", counter).Metric(labels=MODEL)
        self._ttfa = self._family(
            "csm_time_to_first_audio_seconds",
            "Seconds from csm_stream taking a request (after Triton's queue) to sending its first audio",
            histogram,
        ).Metric(labels=MODEL, buckets=TTFA_BUCKETS_S)
        by_prompt = self._family(
            "csm_time_to_first_audio_by_prompt_seconds",
            "Time to first audio by the prompt's length in positions (context and text): prompt_positions is the least of its range",
            histogram,
        )
        self._ttfa_by_prompt = {
            least: by_prompt.Metric(labels={**MODEL, "prompt_positions": str(least)}, buckets=TTFA_BUCKETS_S) for least in PROMPT_RANGES
        }
        self._rtf = self._family(
            "csm_real_time_factor",
            "Per finished request: seconds from taking it to its last audio, over the seconds of audio it got",
            histogram,
        ).Metric(labels=MODEL, buckets=RTF_BUCKETS)
        self._rejected_family = self._family(
            "csm_rejected_requests_total",
            "Requests that ended without all their audio, by reason (and for invalid_argument, the input at fault)",
            counter,
        )
        self._rejected: dict[tuple[str, str], pb_utils.Metric] = {}
        for reason in ("internal_error", "cancelled"):  # present from the start, so that rate() sees their first increase
            self._rejected_series(reason, "")
        self._gauges["slots"].set(slots)

        self._lock = threading.Lock()
        self._audio_frames = 0
        self._first_audio_s: list[tuple[float, int | None]] = []
        self._real_time_factors: list[float] = []
        self._rejections: list[tuple[str, str]] = []
        self._engine_reported = dict.fromkeys(_ENGINE_COUNTERS, 0)  # the engine's totals at the last report

    # Recording: any thread, no call to Triton.

    def audio_sent(self, frames: int) -> None:
        with self._lock:
            self._audio_frames += frames

    def first_audio(self, seconds: float, prompt_positions: int | None) -> None:
        with self._lock:
            self._first_audio_s.append((seconds, prompt_positions))

    def finished(self, seconds: float, frames: int) -> None:
        """A request that got all its audio: `frames` frames in `seconds` since it was taken."""
        with self._lock:
            self._real_time_factors.append(seconds / (frames * FRAME_S))

    def rejected(self, reason: str, field: str = "") -> None:
        with self._lock:
            self._rejections.append((reason, field))

    def invalid_argument(self, error: ValueError) -> None:
        """A request refused as invalid; by convention its message starts with the input's name."""
        name = re.match(r"\w*", str(error)).group()
        self.rejected("invalid_argument", name if name in FIELDS else "other")

    # Reporting: the reporter thread only.

    def report(self, heartbeat: Heartbeat | None, restarts: int) -> None:
        """Pass on what was recorded since the last report, the engine's totals and the gauges
        (from the engine's latest heartbeat; None while no engine runs)."""
        with self._lock:
            frames, self._audio_frames = self._audio_frames, 0
            first_audio_s, self._first_audio_s = self._first_audio_s, []
            real_time_factors, self._real_time_factors = self._real_time_factors, []
            rejections, self._rejections = self._rejections, []
        if frames:
            self._audio_seconds.increment(frames * FRAME_S)
        for seconds, positions in first_audio_s:
            self._ttfa.observe(seconds)
            if positions is not None:
                self._ttfa_by_prompt[max(least for least in PROMPT_RANGES if least <= positions)].observe(seconds)
        for factor in real_time_factors:
            self._rtf.observe(factor)
        for reason, field in rejections:
            self._rejected_series(reason, field).increment(1)
        if restarts > self._restarts_reported:  # a new engine process, whose totals start from 0
            self._restarts.increment(restarts - self._restarts_reported)
            self._restarts_reported = restarts
            self._engine_reported = dict.fromkeys(_ENGINE_COUNTERS, 0)
            for series in self._caches.values():
                series.restart()
        loop = heartbeat.loop if heartbeat is not None else {"active_slots": 0, "waiting": 0, "streams": 0, "threads_alive": 0}
        if heartbeat is not None:
            for field, counter in self._engine_counters.items():
                total = heartbeat.engine[field]
                if total > self._engine_reported[field]:
                    counter.increment(total - self._engine_reported[field])
                    self._engine_reported[field] = total
            for name, series in self._caches.items():
                series.report(getattr(heartbeat, name))
        self._gauges["active_slots"].set(loop["active_slots"])
        self._gauges["free_slots"].set(self.slots - loop["active_slots"])
        self._gauges["waiting_requests"].set(loop["waiting"])
        self._gauges["streams"].set(loop["streams"])
        self._gauges["loop_threads"].set(loop["threads_alive"])

    def _family(self, name: str, description: str, kind: int) -> pb_utils.MetricFamily:
        family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        self._families.append(family)  # families must outlive their series: Triton drops a series whose family is gone
        return family

    def _rejected_series(self, reason: str, field: str) -> pb_utils.Metric:
        key = (reason, field)
        if key not in self._rejected:
            self._rejected[key] = self._rejected_family.Metric(labels={**MODEL, "reason": reason, "field": field})
        return self._rejected[key]


class _CacheSeries:
    """One of the engine's caches as counters (its running totals, passed on as increments) and
    gauges (what it holds now), from the stats() dict the heartbeat carries."""

    def __init__(self, metrics: StreamMetrics, counters: dict[str, tuple[str, str]], gauges: dict[str, tuple[str, str]]) -> None:
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self._counters = {field: metrics._family(name, text, counter).Metric(labels=MODEL) for field, (name, text) in counters.items()}
        self._gauges = {field: metrics._family(name, text, gauge).Metric(labels=MODEL) for field, (name, text) in gauges.items()}
        self._reported = dict.fromkeys(counters, 0)  # the totals at the last report

    def restart(self) -> None:
        """A new engine process, whose totals start from 0."""
        self._reported = dict.fromkeys(self._reported, 0)

    def report(self, stats: dict) -> None:
        for field, counter in self._counters.items():
            total = stats.get(field, 0)
            if total > self._reported[field]:
                counter.increment(total - self._reported[field])
                self._reported[field] = total
        for field, gauge in self._gauges.items():
            if field in stats:
                gauge.set(stats[field])
