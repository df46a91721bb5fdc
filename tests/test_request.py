"""The one validation layer: Triton's input arrays read by `read_request` / `read_chunking`, and
every bound of `RequestLimits`, each refused with a message that starts with the input's name.
No model is loaded; `serving` and `request` import without torch."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest

from csm_client.contract import INPUTS, MAX_RESAMPLING_FILTER, STANDARD_SAMPLE_RATES, resampling_filter_elements
from csm_client.turns import open_turn, sign_turn
from csm_triton.engine.pacing import ChunkPlan
from csm_triton.model.config import TINY
from csm_triton.request import API_NAMES, GenerationRequest, RequestLimits, Segment, audio_positions
from csm_triton.tools.server import PROJECT_ROOT
from csm_triton.triton.serving import ServingConfig, read_chunking, read_request, turn_output
from triton_tensors import request, scalar, vector

pytestmark = pytest.mark.unit

LIMITS = RequestLimits.for_model(TINY)
CONFIG = ServingConfig()
# A voice library as the engine process names it to the stub (its clips' codes stay in the engine process).
VOICES = ("narrator",)
KEY = b"the turn key of these tests, 32+ bytes"  # csm_stream's turn_key
# An earlier turn's reference (TURN), 3 frames of codes.
TURN_CODES = (np.arange(3 * 32) * 7 % 2051).reshape(3, 32)
REFERENCE = sign_turn(KEY, "By reference.", 2, TURN_CODES).encode()


def every_input() -> dict[str, np.ndarray]:
    """A valid request that gives every input: a text-only, an audio, a codes and a by-reference
    context segment (the last cut to the 2 frames of 160 ms played)."""
    return request(
        "Every input.",
        1,
        CONTEXT_TEXT=vector([b"Before.", b"With audio.", b"With codes.", b""], object),
        CONTEXT_SPEAKER=vector([0, 1, 0, 0], np.int32),
        CONTEXT_AUDIO=vector(np.zeros(1600, dtype=np.float32), np.float32),
        CONTEXT_AUDIO_LENGTHS=vector([0, 1600, 0, 0], np.int32),
        CONTEXT_SAMPLE_RATE=scalar(16_000, np.int32),
        CONTEXT_CODES=vector(np.arange(64) * 32, np.int32),
        CONTEXT_CODES_LENGTHS=vector([0, 0, 2, 0], np.int32),
        CONTEXT_TURN=vector([b"", b"", b"", REFERENCE], object),
        CONTEXT_PLAYED_MS=vector([-1, -1, -1, 160], np.int32),
        TEMPERATURE=scalar(0.7, np.float32),
        TOPK=scalar(20, np.int32),
        FIRST_CHUNK_FRAMES=scalar(1, np.int32),
        CHUNK_FRAMES=scalar(4, np.int32),
        VOICE=np.array([[b"narrator"]], dtype=object),
        CONTEXT_OVERFLOW=np.array([[b"drop_oldest"]], dtype=object),
        CONTEXT_PINNED=scalar(1, np.int32),
    )


def with_audio(samples: int, sample_rate: int, **extra: np.ndarray) -> dict[str, np.ndarray]:
    """A request with one context segment of `samples` samples at `sample_rate`."""
    context = {
        "CONTEXT_TEXT": vector([b"a"], object),
        "CONTEXT_SPEAKER": vector([0], np.int32),
        "CONTEXT_AUDIO": vector(np.zeros(samples, dtype=np.float32), np.float32),
        "CONTEXT_AUDIO_LENGTHS": vector([samples], np.int32),
        "CONTEXT_SAMPLE_RATE": scalar(sample_rate, np.int32),
    }
    return request(**context | extra)


def summary(generation: GenerationRequest) -> tuple:
    """A request's fields, its segments' audio as lists (numpy arrays do not compare as one value)."""
    context = [
        (s.speaker, s.text, s.sample_rate, None if s.audio is None else s.audio.tolist(), None if s.codes is None else s.codes.tolist())
        for s in generation.context
    ]
    return (
        generation.text,
        generation.speaker,
        context,
        generation.temperature,
        generation.topk,
        generation.max_audio_length_ms,
        generation.seed,
        generation.voice,
        generation.context_overflow,
        generation.context_pinned,
    )


def refused(arrays: dict[str, np.ndarray], message: str, limits: RequestLimits = LIMITS, key: bytes | None = KEY) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        read_request(arrays, limits, VOICES, key)


def test_every_input_is_read() -> None:
    generation = read_request(every_input(), LIMITS, VOICES, KEY)
    assert (generation.text, generation.speaker, generation.temperature, generation.topk) == ("Every input.", 1, pytest.approx(0.7), 20)
    assert (generation.max_audio_length_ms, generation.seed) == (400, 3)
    assert [(s.speaker, s.text, s.audio is None, s.codes is None) for s in generation.context] == [
        (0, "Before.", True, True),
        (1, "With audio.", False, True),
        (0, "With codes.", True, False),
        (2, "By reference.", True, False),
    ]
    assert generation.voice == "narrator"  # by name: the engine process puts its clip first (test_generator)
    assert (generation.context_overflow, generation.context_pinned) == ("drop_oldest", 1)
    assert generation.context[1].sample_rate == 16_000 and generation.context[1].audio.shape == (1600,)  # not resampled
    assert generation.context[2].codes.tolist() == (np.arange(64) * 32).reshape(2, 32).tolist()  # frame by frame, as sent
    assert generation.context[3].codes.tolist() == TURN_CODES[:2].tolist()  # 160 ms played: 2 frames
    assert read_chunking(every_input(), CONFIG) == ChunkPlan(1, 4, adaptive=False)


def test_optional_inputs_take_their_defaults() -> None:
    arrays = request()
    del arrays["MAX_AUDIO_LENGTH_MS"], arrays["SEED"]
    generation = read_request(arrays, LIMITS)
    assert (generation.temperature, generation.topk, generation.max_audio_length_ms, generation.seed, generation.context) == (
        0.9,
        50,
        10_000,
        None,
        [],
    )
    assert (generation.context_overflow, generation.context_pinned) == ("refuse", 0)
    assert read_chunking(arrays, CONFIG) == ChunkPlan(2, 12, adaptive=True)  # the config's, adaptive
    assert read_chunking(arrays, dataclasses.replace(CONFIG, chunk_schedule="fixed")) == ChunkPlan(2, 12, adaptive=False)
    only_first = request(FIRST_CHUNK_FRAMES=scalar(4, np.int32))
    assert read_chunking(only_first, CONFIG) == ChunkPlan(4, 12, adaptive=True)  # later chunks still adaptive
    assert read_request(arrays, RequestLimits(max_audio_length_ms=800)).max_audio_length_ms == 800


def test_inputs_without_the_batch_dimension_are_read() -> None:
    arrays = {name: array.reshape(-1) for name, array in every_input().items()}
    assert summary(read_request(arrays, LIMITS, VOICES, KEY)) == summary(read_request(every_input(), LIMITS, VOICES, KEY))


WRONG_DTYPES = {"BYTES": np.int32, "INT32": np.int64, "FP32": np.float64, "INT64": np.int32}


@pytest.mark.parametrize("name", list(INPUTS))
def test_a_wrong_datatype_is_refused_naming_the_input(name: str) -> None:
    arrays = every_input()
    arrays[name] = np.zeros(arrays[name].shape, dtype=WRONG_DTYPES[INPUTS[name].datatype])
    refused(arrays, f"{name}: expected {INPUTS[name].datatype} ")
    if name in ("FIRST_CHUNK_FRAMES", "CHUNK_FRAMES"):
        with pytest.raises(ValueError, match=f"^{name}: expected INT32 "):
            read_chunking(arrays, CONFIG)


@pytest.mark.parametrize("name", list(INPUTS))
@pytest.mark.parametrize("shape", ["extra dimension", "batch of two", "no dimension"])
def test_a_wrong_rank_or_shape_is_refused_naming_the_input(name: str, shape: str) -> None:
    arrays = every_input()
    array = arrays[name]
    arrays[name] = {"extra dimension": array[None], "batch of two": np.concatenate([array, array]), "no dimension": array.reshape(-1)[0]}[
        shape
    ]
    refused(arrays, f"{name}: expected ")


def test_bytes_elements_must_be_bytes() -> None:
    refused(request(TEXT=np.array([["text"]], dtype=object)), "TEXT: expected BYTES elements, got str")
    refused(request(CONTEXT_TEXT=np.array([[b"a", 7]], dtype=object)), "CONTEXT_TEXT: expected BYTES elements, got int")


def test_an_unknown_input_is_refused() -> None:
    refused(request(STYLE=scalar(1, np.int32)), "STYLE: not an input of this model")


@pytest.mark.parametrize("name", ["TEXT", "SPEAKER"])
def test_required_inputs(name: str) -> None:
    refused(request(**{name: None}), f"{name}: required input is missing")


def test_invalid_utf8_names_the_input_and_segment() -> None:
    refused(request(b"\xff\xfe bad"), r"TEXT: is not valid UTF-8 \(invalid start byte at byte 0\)")
    arrays = request(CONTEXT_TEXT=vector([b"fine", b"bad \xc3"], object), CONTEXT_SPEAKER=vector([0, 1], np.int32))
    refused(arrays, "CONTEXT_TEXT: segment 1 is not valid UTF-8")


# Each limit, at its bound and just past it.


def test_max_request_bytes_is_checked_before_any_value_naming_the_largest_input() -> None:
    arrays = request(b"\xff" * 500, CONTEXT_TEXT=vector([b"x" * 420], object), CONTEXT_SPEAKER=vector([0], np.int32))
    # TEXT 500, CONTEXT_TEXT 420, SEED 8, SPEAKER, CONTEXT_SPEAKER and MAX_AUDIO_LENGTH_MS 4 each: 940 bytes
    message = "TEXT: the request's inputs take 940 bytes, more than max_request_bytes 939; TEXT is the largest, 500 bytes"
    refused(arrays, message, RequestLimits(max_request_bytes=939))  # before its invalid UTF-8 is seen
    refused(arrays, r"TEXT: is not valid UTF-8", RequestLimits(max_request_bytes=940))
    refused(
        with_audio(8_400_000, 48_000),
        r"CONTEXT_AUDIO: the request's inputs take 33600\d+ bytes, more than max_request_bytes 33554432; CONTEXT_AUDIO is the largest",
    )


def test_max_request_bytes_admits_the_longest_audio_that_fits_at_48_khz() -> None:
    samples = LIMITS.max_context_samples(48_000)
    assert samples == 2045 * 1920 * 2
    assert len(read_request(with_audio(samples, 48_000), LIMITS).context[0].audio) == samples


def test_max_text_bytes() -> None:
    assert read_request(request("é" * 2048), LIMITS).text == "é" * 2048
    refused(request("é" * 2048 + "!"), "TEXT: holds 4097 bytes of UTF-8, more than max_text_bytes 4096")
    refused(request(" \n"), "TEXT: must not be empty")


def test_max_context_segments() -> None:
    def segments(count: int) -> dict[str, np.ndarray]:
        return request(CONTEXT_TEXT=vector([b"turn"] * count, object), CONTEXT_SPEAKER=vector([0] * count, np.int32))

    assert len(read_request(segments(32), LIMITS).context) == 32
    refused(segments(33), "CONTEXT_TEXT: holds 33 segments, more than max_context_segments 32")


def test_max_context_text_bytes() -> None:
    texts = [b"a", b"b", b"c" * 5000]
    arrays = request(CONTEXT_TEXT=vector(texts, object), CONTEXT_SPEAKER=vector([0, 1, 0], np.int32))
    refused(arrays, "CONTEXT_TEXT: segment 2 holds 5000 bytes of UTF-8, more than max_context_text_bytes 4096")
    refused(request(CONTEXT_TEXT=vector([b""], object), CONTEXT_SPEAKER=vector([0], np.int32)), "CONTEXT_TEXT: segment 0 must not be empty")
    assert read_request(with_audio(10, 24_000, CONTEXT_TEXT=vector([b""], object)), LIMITS).context[0].text == ""  # audio alone


@pytest.mark.parametrize(("sample_rate", "admitted"), [(7999, False), (8000, True), (48_000, True), (48_001, False), (1_000_000, False)])
def test_the_context_sample_rate_range(sample_rate: int, admitted: bool) -> None:
    if admitted:
        assert read_request(with_audio(100, sample_rate), LIMITS).context[0].sample_rate == sample_rate
    else:
        refused(with_audio(100, sample_rate), rf"CONTEXT_SAMPLE_RATE: must be in \[8000, 48000\] Hz, got {sample_rate}")


def test_a_sample_rate_whose_resampling_filter_is_huge_is_refused_with_a_standard_rate_to_use() -> None:
    refused(
        with_audio(100, 12_007),
        r"CONTEXT_SAMPLE_RATE: 12007 Hz is 12007:24000 to Mimi's 24000 Hz, whose resampling filter would take 288,504,000 elements "
        r"\(at most 1,000,000: .*\); resample the audio to a standard rate such as 12000 Hz first",
    )
    refused(with_audio(100, 44_101), "CONTEXT_SAMPLE_RATE: 44101 Hz .* such as 44100 Hz first")
    for rate in STANDARD_SAMPLE_RATES:
        assert resampling_filter_elements(rate) <= 51_520 < MAX_RESAMPLING_FILTER
        read_request(with_audio(rate, rate), LIMITS)


@pytest.mark.parametrize("sample_rate", [8000, 8235, 11_025, 12_007, 44_100, 48_000])
def test_the_filter_size_is_the_one_torchaudio_builds(sample_rate: int) -> None:
    from torchaudio.functional.functional import _get_sinc_resample_kernel

    gcd = math.gcd(sample_rate, 24_000)
    if resampling_filter_elements(sample_rate) > 10 * MAX_RESAMPLING_FILTER:
        pytest.skip("building it is what the limit prevents")
    kernel, _ = _get_sinc_resample_kernel(sample_rate, 24_000, gcd)
    assert kernel.numel() == resampling_filter_elements(sample_rate)


@pytest.mark.parametrize("sample_rate", [8000, 11_025, 16_000, 24_000, 44_100, 48_000])
def test_context_audio_must_fit_the_prompt_at_its_rate(sample_rate: int) -> None:
    most = LIMITS.max_context_samples(sample_rate)
    assert audio_positions(most, sample_rate) == 2046 < audio_positions(most + sample_rate // 1000, sample_rate)
    assert len(read_request(with_audio(most, sample_rate), LIMITS).context[0].audio) == most
    refused(
        with_audio(most + sample_rate // 1000, sample_rate),
        rf"CONTEXT_AUDIO: segment 0 holds {most + sample_rate // 1000} samples at {sample_rate} Hz, which bring the context "
        rf"audio to 2047 prompt positions, more than the 2046 that fit the model's 2048; at {sample_rate} Hz at most {most} samples fit",
    )


def test_context_audio_counts_every_segment() -> None:
    lengths = [1023 * 1920, 1022 * 1920]  # 1024 and 1023 positions: each fits alone, not both
    arrays = request(
        CONTEXT_TEXT=vector([b"a", b"b"], object),
        CONTEXT_SPEAKER=vector([0, 1], np.int32),
        CONTEXT_AUDIO=vector(np.zeros(sum(lengths), dtype=np.float32), np.float32),
        CONTEXT_AUDIO_LENGTHS=vector(lengths, np.int32),
    )
    refused(arrays, "CONTEXT_AUDIO: segment 1 holds 1962240 samples at 24000 Hz, which bring the context audio to 2047 prompt positions")


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_temperature(value: float) -> None:
    refused(request(TEMPERATURE=scalar(value, np.float32)), f"TEMPERATURE: must be a finite number > 0, got {value}")


def test_topk() -> None:
    for topk in (1, 2051):
        assert read_request(request(TOPK=scalar(topk, np.int32)), LIMITS).topk == topk
    for topk in (0, 2052, -(2**31)):
        refused(request(TOPK=scalar(topk, np.int32)), rf"TOPK: must be in \[1, 2051\], got {topk}")


def test_max_audio_length_ms() -> None:
    for ms in (80, 30_000):
        assert read_request(request(MAX_AUDIO_LENGTH_MS=scalar(ms, np.int32)), LIMITS).max_audio_length_ms == ms
    for ms in (79, 30_001, 2**31 - 1):
        refused(request(MAX_AUDIO_LENGTH_MS=scalar(ms, np.int32)), rf"MAX_AUDIO_LENGTH_MS: must be in \[80, 30000\], got {ms}")


def test_speakers() -> None:
    assert read_request(request(speaker=2**31 - 1), LIMITS).speaker == 2**31 - 1
    refused(request(speaker=-1), r"SPEAKER: must be in \[0, 2147483647\], got -1")
    arrays = request(CONTEXT_TEXT=vector([b"a", b"b"], object), CONTEXT_SPEAKER=vector([0, -5], np.int32))
    refused(arrays, r"CONTEXT_SPEAKER: segment 1 must be in \[0, 2147483647\], got -5")


def test_seeds_of_64_bits() -> None:
    for seed in (-(2**63), 2**63 - 1):
        assert read_request(request(SEED=scalar(seed, np.int64)), LIMITS).seed == seed
    with pytest.raises(ValueError, match=r"^seed: must be in \[-9223372036854775808, 9223372036854775807\] \(a 64-bit integer\), got"):
        LIMITS.check(GenerationRequest("Hi.", 0, seed=2**63))


def test_chunk_frames() -> None:
    sizes = request(FIRST_CHUNK_FRAMES=scalar(375, np.int32), CHUNK_FRAMES=scalar(1, np.int32))
    assert read_chunking(sizes, CONFIG) == ChunkPlan(375, 1, adaptive=False)
    for name in ("FIRST_CHUNK_FRAMES", "CHUNK_FRAMES"):
        for frames in (0, 376):
            with pytest.raises(ValueError, match=rf"^{name}: must be in \[1, 375\] frames of 80 ms, got {frames}"):
                read_chunking(request(**{name: scalar(frames, np.int32)}), CONFIG)
    assert ServingConfig.from_parameters({"chunk_schedule": {"string_value": "fixed"}}).chunk_plan() == ChunkPlan(2, 12, adaptive=False)
    with pytest.raises(ValueError, match='^chunk_schedule: must be "adaptive" or "fixed", got \'steady\''):
        ServingConfig.from_parameters({"chunk_schedule": {"string_value": "steady"}})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"CONTEXT_TEXT": vector([b"a", b"b"], object), "CONTEXT_SPEAKER": vector([0], np.int32)},
            "CONTEXT_TEXT, CONTEXT_SPEAKER, CONTEXT_AUDIO_LENGTHS: one entry per context segment, got 2, 1 and 2",
        ),
        (
            {
                "CONTEXT_TEXT": vector([b"a"], object),
                "CONTEXT_SPEAKER": vector([0], np.int32),
                "CONTEXT_AUDIO_LENGTHS": vector([-1], np.int32),
            },
            "CONTEXT_AUDIO_LENGTHS: sample counts must be >= 0",
        ),
        (
            {
                "CONTEXT_TEXT": vector([b"a"], object),
                "CONTEXT_SPEAKER": vector([0], np.int32),
                "CONTEXT_AUDIO": vector(np.zeros(100), np.float32),
                "CONTEXT_AUDIO_LENGTHS": vector([90], np.int32),
            },
            "CONTEXT_AUDIO_LENGTHS: sums to 90 samples but CONTEXT_AUDIO holds 100",
        ),
        (
            {
                "CONTEXT_TEXT": vector([b"a"], object),
                "CONTEXT_SPEAKER": vector([0], np.int32),
                "CONTEXT_AUDIO": vector([0.0, math.nan], np.float32),
                "CONTEXT_AUDIO_LENGTHS": vector([2], np.int32),
            },
            r"CONTEXT_AUDIO: has samples that are not finite \(NaN or infinity\)",
        ),
        (
            {"CONTEXT_AUDIO_LENGTHS": vector([2**31 - 1, 2**31 - 1], np.int32)},
            "CONTEXT_TEXT, CONTEXT_SPEAKER, CONTEXT_AUDIO_LENGTHS: one entry per context segment, got 0, 0 and 2",
        ),
    ],
    ids=["lengths differ", "negative length", "lengths do not sum", "NaN audio", "lengths alone"],
)
def test_the_context_arrays_must_agree(extra: dict, message: str) -> None:
    refused(request(**extra), message)


def with_codes(frames: list[int], codes: np.ndarray | None = None, **extra: np.ndarray) -> dict[str, np.ndarray]:
    """A request with one context segment a count of `frames`, each given that many frames of codes."""
    values = np.zeros(sum(frames) * 32, dtype=np.int32) if codes is None else codes
    context = {
        "CONTEXT_TEXT": vector([b"a"] * len(frames), object),
        "CONTEXT_SPEAKER": vector([0] * len(frames), np.int32),
        "CONTEXT_CODES": vector(values, np.int32),
        "CONTEXT_CODES_LENGTHS": vector(frames, np.int32),
    }
    return request(**context | extra)


def test_context_codes_become_segments_with_codes_and_no_audio() -> None:
    values = np.arange(5 * 32, dtype=np.int32) % 2051
    generation = read_request(with_codes([2, 0, 3], values), LIMITS)
    codes = [None if s.codes is None else s.codes.tolist() for s in generation.context]
    assert codes == [values[:64].reshape(2, 32).tolist(), None, values[64:].reshape(3, 32).tolist()]
    assert all(s.audio is None and s.is_audio == (s.codes is not None) for s in generation.context)
    arrays = with_codes([1])
    context = read_request(arrays, LIMITS).context[0].codes
    arrays["CONTEXT_CODES"][0, 0] = 7  # a copy: the input tensor may be gone when the prompt is built
    assert context[0, 0] == 0


def test_context_codes_values_are_below_the_audio_vocabulary() -> None:
    highest = np.full(32, 2050, dtype=np.int32)
    assert read_request(with_codes([1], highest), LIMITS).context[0].codes.max() == 2050  # sampled ids >= 2048 are codes too
    refused(with_codes([1], highest + 1), r"CONTEXT_CODES: segment 0 codes must be in \[0, 2050\], got 2051")
    negative = np.zeros(64, dtype=np.int32)
    negative[40] = -1
    arrays = with_codes([1, 0, 2], np.concatenate([np.zeros(32, np.int32), negative]))
    refused(arrays, r"CONTEXT_CODES: segment 2 codes must be in \[0, 2050\], got -1")


def test_context_codes_must_fit_the_prompt_before_any_is_read() -> None:
    # 2045 frames and the end-of-audio frame: the 2046 positions of the tiny model's prompt
    assert len(read_request(with_codes([2045]), LIMITS).context[0].codes) == 2045
    refused(with_codes([2046]), "CONTEXT_CODES_LENGTHS: 2046 frames of context codes take 2047 prompt positions, more than the 2046")
    # counted from the lengths alone, before CONTEXT_CODES is read: a huge count with no codes
    refused(with_codes([2**31 - 1, 2**31 - 1], np.zeros(0, np.int32)), "CONTEXT_CODES_LENGTHS: .* prompt positions, more than the 2046")
    # codes and audio together: each segment's positions count
    arrays = with_audio(1920 * 1000, 24_000) | {
        "CONTEXT_TEXT": vector([b"a", b"b"], object),
        "CONTEXT_SPEAKER": vector([0, 0], np.int32),
        "CONTEXT_AUDIO_LENGTHS": vector([1920 * 1000, 0], np.int32),
        "CONTEXT_CODES": vector(np.zeros(1045 * 32), np.int32),
        "CONTEXT_CODES_LENGTHS": vector([0, 1045], np.int32),
    }
    refused(arrays, "CONTEXT_CODES: segment 1 holds 1045 frames, which bring the context audio to 2047 prompt positions")


def test_under_drop_oldest_context_codes_must_fit_the_prompt_each_alone() -> None:
    """The engine leaves out the oldest segments until the rest fit (test_context_overflow.py)."""
    drop = {"CONTEXT_OVERFLOW": np.array([[b"drop_oldest"]], dtype=object)}
    refused(with_codes([1500, 1500]), "CONTEXT_CODES_LENGTHS: 3000 frames of context codes take 3002 prompt positions, more than the 2046")
    assert [len(s.codes) for s in read_request(with_codes([1500, 1500], **drop), LIMITS).context] == [1500, 1500]
    refused(with_codes([10, 2046], **drop), "CONTEXT_CODES_LENGTHS: 2046 frames of context codes take 2047 prompt positions")
    refused(with_codes([2**31 - 1, 2**31 - 1], np.zeros(0, np.int32), **drop), "CONTEXT_CODES_LENGTHS: .* prompt positions, more than")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"CONTEXT_OVERFLOW": np.array([[b"newest"]], dtype=object)}, "CONTEXT_OVERFLOW: must be 'refuse' or 'drop_oldest', got 'newest'"),
        ({"CONTEXT_OVERFLOW": np.array([[b""]], dtype=object)}, "CONTEXT_OVERFLOW: must be 'refuse' or 'drop_oldest', got ''"),
        ({"CONTEXT_OVERFLOW": np.array([[b"\xff"]], dtype=object)}, "CONTEXT_OVERFLOW: is not valid UTF-8"),
        ({"CONTEXT_PINNED": scalar(2, np.int32)}, r"CONTEXT_PINNED: must be in \[0, 1\], at most the number of context .*got 2"),
        ({"CONTEXT_PINNED": scalar(-1, np.int32)}, r"CONTEXT_PINNED: must be in \[0, 1\], .*got -1"),
    ],
    ids=["unknown mode", "empty mode", "invalid UTF-8", "more pinned than segments", "negative"],
)
def test_the_overflow_inputs_are_checked_naming_the_input(extra: dict, message: str) -> None:
    refused(with_codes([1]) | extra, message)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"CONTEXT_CODES_LENGTHS": vector([1, 1], np.int32)}, r"CONTEXT_CODES_LENGTHS: one entry per context segment \(1\), got 2"),
        ({"CONTEXT_CODES_LENGTHS": vector([-1], np.int32)}, r"CONTEXT_CODES_LENGTHS: frame counts must be >= 0, got \[-1\]"),
        (
            {"CONTEXT_CODES": vector(np.zeros(33), np.int32)},
            r"CONTEXT_CODES_LENGTHS: sums to 1 frames \(32 codes of 32 codebooks\) but CONTEXT_CODES holds 33",
        ),
        ({"CONTEXT_CODES": vector(np.zeros(32), np.int32), "CONTEXT_CODES_LENGTHS": None}, "CONTEXT_CODES_LENGTHS: sums to 0 frames"),
        (
            {"CONTEXT_AUDIO": vector(np.zeros(10), np.float32), "CONTEXT_AUDIO_LENGTHS": vector([10], np.int32)},
            r"CONTEXT_CODES_LENGTHS: segment 0 has both codes and audio \(CONTEXT_AUDIO_LENGTHS\)",
        ),
    ],
    ids=["lengths differ", "negative length", "lengths do not sum", "codes without lengths", "codes and audio"],
)
def test_the_context_codes_arrays_must_agree(extra: dict, message: str) -> None:
    refused({name: array for name, array in (with_codes([1]) | extra).items() if array is not None}, message)


def voice(name: bytes) -> np.ndarray:
    return np.array([[name]], dtype=object)


def test_a_voice_is_a_name_of_the_library_never_a_path() -> None:
    generation = read_request(request(VOICE=voice(b"narrator")), LIMITS, VOICES)
    assert (generation.voice, generation.context) == ("narrator", [])
    for name in (b"nobody", b"../narrator", b"/etc/passwd", b"narrator ", b""):
        refused(request(VOICE=voice(name)), f"VOICE: no voice {re.escape(repr(name.decode()))} in the voice library; its voices: narrator")
    with pytest.raises(ValueError, match="^VOICE: no voice 'narrator' in the voice library; its voices: none: this server's voices_dir"):
        read_request(request(VOICE=voice(b"narrator")), LIMITS)
    refused(request(VOICE=voice(b"\xff")), "VOICE: is not valid UTF-8")
    refused(request(VOICE=scalar(1, np.int32)), "VOICE: expected BYTES")


def test_a_voice_takes_a_context_segment_and_leaves_the_segments_numbered_as_sent() -> None:
    texts = {"CONTEXT_TEXT": vector([b"a", b"c" * 5000], object), "CONTEXT_SPEAKER": vector([0, 1], np.int32)}
    refused(request(VOICE=voice(b"narrator"), **texts), "CONTEXT_TEXT: segment 1 holds 5000 bytes")
    full = {"CONTEXT_TEXT": vector([b"turn"] * 32, object), "CONTEXT_SPEAKER": vector([0] * 32, np.int32)}
    assert len(read_request(request(**full), LIMITS, VOICES).context) == 32
    refused(request(VOICE=voice(b"narrator"), **full), "VOICE: its clip and 32 context segments exceed max_context_segments 32")


def test_in_process_segments_with_codes() -> None:
    codes = np.ones((3, 32), dtype=np.int64)
    segment = Segment(0, "", codes=codes)
    assert segment.is_audio and segment.audio is None and segment.codes is codes  # empty text: the turn has audio
    LIMITS.check(GenerationRequest("Hi.", 0, [segment]))
    with pytest.raises(ValueError, match="^segment: both audio and codes were given"):
        Segment(0, "a", audio=np.zeros(10, np.float32), codes=codes)
    with pytest.raises(ValueError, match="^segment codes: must be Mimi codes of shape \\[frames, codebooks\\], got shape \\[96\\]"):
        Segment(0, "a", codes=codes.reshape(-1))
    with pytest.raises(ValueError, match="^segment codes: must hold integer codes, got float32"):
        Segment(0, "a", codes=codes.astype(np.float32))
    with pytest.raises(ValueError, match="^segment codes: must hold at least one frame"):
        Segment(0, "a", codes=codes[:0])
    with pytest.raises(ValueError, match="^segment: codes given with is_audio=False"):
        Segment(0, "a", codes=codes, is_audio=False)
    with pytest.raises(ValueError, match=r"^context\[0\].codes: must be Mimi codes of shape \[frames, 32\], got shape \[3, 31\]"):
        LIMITS.check(GenerationRequest("Hi.", 0, [Segment(0, "a", codes=codes[:, :31])]))
    with pytest.raises(ValueError, match=r"^context\[0\].codes: codes must be in \[0, 2050\], got 4096"):
        LIMITS.check(GenerationRequest("Hi.", 0, [Segment(0, "a", codes=codes * 4096)]))


def test_in_process_names_for_the_same_checks() -> None:
    context = [Segment(0, "a"), Segment(1, "b"), Segment(0, "c" * 5000)]
    with pytest.raises(ValueError, match="^context\\[2\\].text: holds 5000 bytes of UTF-8, more than max_context_text_bytes 4096"):
        LIMITS.check(GenerationRequest("Hi.", 0, context))
    with pytest.raises(ValueError, match=r"^topk: must be in \[1, 2051\], got 0"):
        LIMITS.check(GenerationRequest("Hi.", 0, topk=0), API_NAMES)


def test_request_types_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="^text: must be a string, got bytes"):
        GenerationRequest(b"Hi.", 0)
    with pytest.raises(ValueError, match="^topk: must be an integer, got 5.0"):
        GenerationRequest("Hi.", 0, topk=5.0)
    with pytest.raises(ValueError, match="^context: must be a list of Segment"):
        GenerationRequest("Hi.", 0, ["Hello."])


def test_limits_come_from_the_model_and_refuse_bad_parameters() -> None:
    assert (LIMITS.max_positions, LIMITS.audio_vocab_size) == (TINY.backbone.max_seq_len, TINY.audio_vocab_size)
    with pytest.raises(ValueError, match="^max_text_bytes: must be a positive integer, got 0"):
        RequestLimits(max_text_bytes=0)
    with pytest.raises(ValueError, match="^min_context_sample_rate: 16000 is above max_context_sample_rate 8000"):
        RequestLimits(min_context_sample_rate=16_000, max_context_sample_rate=8000)


def test_every_limit_is_a_config_pbtxt_parameter_with_the_default() -> None:
    text = (PROJECT_ROOT / "model_repository" / "csm_stream" / "config.pbtxt").read_text()
    parameters = dict(re.findall(r'\{ key: "(\w+)", value: \{ string_value: "([^"]*)" \} \}', text))
    config = ServingConfig.from_parameters({key: {"string_value": value} for key, value in parameters.items()})
    assert config.request_limits(TINY) == LIMITS
    assert set(RequestLimits.parameters()) <= set(parameters)


def test_limit_parameters_are_read_from_config_pbtxt() -> None:
    config = ServingConfig.from_parameters({"max_text_bytes": {"string_value": "10"}, "max_context_sample_rate": {"string_value": "16000"}})
    limits = config.request_limits(TINY)
    assert (limits.max_text_bytes, limits.max_context_sample_rate, limits.max_request_bytes) == (10, 16_000, 32 << 20)
    with pytest.raises(ValueError, match="^max_request_bytes: must be a positive integer, got 0"):
        ServingConfig.from_parameters({"max_request_bytes": {"string_value": "0"}})
    assert ServingConfig.from_parameters({"codes_cache_mb": {"string_value": "0"}}).codes_cache_mb == 0  # no cache
    with pytest.raises(ValueError, match="^codes_cache_mb: must be >= 0"):
        ServingConfig.from_parameters({"codes_cache_mb": {"string_value": "-1"}})
    with pytest.raises(ValueError, match=r"^chunk_frames: must be in \[1, 10\] frames of 80 ms, got 12"):
        ServingConfig.from_parameters({"max_audio_length_ms": {"string_value": "800"}})


# Turns by reference (CONTEXT_TURN, CONTEXT_PLAYED_MS) and a stream's own (TURN).


def by_reference(*references: bytes, played_ms: list[int] | None = None, **extra: np.ndarray) -> dict[str, np.ndarray]:
    """A request whose context is a text-only segment, then one turn by reference per `references`."""
    count = len(references)
    context = {
        "CONTEXT_TEXT": vector([b"Before.", *[b""] * count], object),
        "CONTEXT_SPEAKER": vector([0] * (count + 1), np.int32),
        "CONTEXT_TURN": vector([b"", *references], object),
        "CONTEXT_PLAYED_MS": vector([-1, *(played_ms or [-1] * count)], np.int32),
    }
    return request(**context | extra)


def test_a_turn_by_reference_is_its_text_speaker_and_codes_cut_where_it_was_played() -> None:
    segment = read_request(by_reference(REFERENCE), LIMITS, turn_key=KEY).context[1]
    assert (segment.speaker, segment.text, segment.audio) == (2, "By reference.", None)
    assert segment.codes.tolist() == TURN_CODES.tolist()
    for played_ms, frames in ((0, 0), (79, 0), (80, 1), (239, 2), (2**31 - 1, 3)):
        segment = read_request(by_reference(REFERENCE, played_ms=[played_ms]), LIMITS, turn_key=KEY).context[1]
        assert (0 if segment.codes is None else len(segment.codes), segment.text) == (frames, "By reference."), played_ms  # 0: text alone


def altered(reference: bytes) -> bytes:
    """The reference with one character of its payload changed."""
    return reference[:20] + (b"A" if reference[20:21] != b"A" else b"B") + reference[21:]


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        (sign_turn(b"another key of 32 or more bytes!!", "By reference.", 2, TURN_CODES).encode(), "its signature does not match"),
        (altered(REFERENCE), "its signature does not match"),
        (REFERENCE[:-3], "is no turn reference"),
        (b"hello", r"is not a turn reference \(one starts with 'csm1.'\)"),
        (b"csm1.\xff\xfe." + b"A" * 43, "is no turn reference"),
        (b"csm1." + b"A" * 100_000, "is 100005 characters, longer than any turn reference"),
    ],
    ids=["forged", "altered", "cut short", "garbage", "not UTF-8", "too long"],
)
def test_a_bad_reference_is_refused_naming_context_turn_and_its_segment(reference: bytes, message: str) -> None:
    refused(by_reference(REFERENCE, reference), f"CONTEXT_TURN: segment 2: {message}")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"CONTEXT_TEXT": vector([b"Before.", b"Said."], object)}, "CONTEXT_TURN: segment 1 is a turn by reference, which carries its own"),
        (
            {"CONTEXT_CODES": vector(np.zeros(32), np.int32), "CONTEXT_CODES_LENGTHS": vector([0, 1], np.int32)},
            "CONTEXT_TURN: segment 1 is a turn by reference",
        ),
        ({"CONTEXT_TURN": vector([b"", REFERENCE, b""], object)}, r"CONTEXT_TURN: one entry per context segment \(2\), got 3"),
        ({"CONTEXT_PLAYED_MS": vector([-1], np.int32)}, r"CONTEXT_PLAYED_MS: one entry per context segment \(2\), got 1"),
        ({"CONTEXT_PLAYED_MS": vector([-1, -2], np.int32)}, r"CONTEXT_PLAYED_MS: milliseconds must be >= 0, or -1 for a whole turn"),
        ({"CONTEXT_PLAYED_MS": vector([0, -1], np.int32)}, r"CONTEXT_PLAYED_MS: segment 0 is no turn by reference \(CONTEXT_TURN\)"),
    ],
    ids=["with text", "with codes", "more references", "fewer played", "below -1", "played without a reference"],
)
def test_the_reference_arrays_must_agree(extra: dict, message: str) -> None:
    refused(by_reference(REFERENCE, **extra), message)


NO_KEY = "turn references are off on this server: set csm_stream's turn_key parameter or CSM_TURN_KEY"
# csm_stream's outputs: what Triton asks for on behalf of a request that names none.
OUTPUTS = ("AUDIO", "AUDIO_CODES", "CONTEXT_DROPPED", "TURN", "ERROR", "ERROR_CODE")


def test_without_a_turn_key_turn_references_are_refused_and_everything_else_served() -> None:
    refused(by_reference(REFERENCE), f"CONTEXT_TURN: {NO_KEY}", key=None)
    generation = read_request(request("Now."), LIMITS)
    with pytest.raises(ValueError, match=f"^TURN: {NO_KEY}"):
        turn_output(["AUDIO", "TURN"], OUTPUTS, generation, None)
    assert turn_output(OUTPUTS, OUTPUTS, generation, None) is None  # a request that names no output: all the rest
    assert turn_output(["AUDIO"], OUTPUTS, generation, None) is None


def test_turn_is_the_requests_text_and_speaker_and_every_code_sent() -> None:
    generation = read_request(request("Now.", 4), LIMITS)
    assert turn_output(["AUDIO", "AUDIO_CODES"], OUTPUTS, generation, KEY) is None  # only when asked for
    for wanted in (["TURN"], OUTPUTS):
        turn = turn_output(wanted, OUTPUTS, generation, KEY)
        for chunk in (TURN_CODES[:1], TURN_CODES[1:], TURN_CODES[:0]):
            turn.add(chunk)
        record = open_turn(KEY, turn.tensor()[0, 0].decode())
        assert (record.text, record.speaker, record.codes.tolist()) == ("Now.", 4, TURN_CODES.tolist())
    silent = turn_output(["TURN"], OUTPUTS, generation, KEY)  # a turn that made no frame
    assert open_turn(KEY, silent.tensor()[0, 0].decode()).codes.shape == (0, 32)


def test_the_turn_key_is_the_parameter_or_csm_turn_key_and_never_made_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CSM_TURN_KEY", raising=False)
    assert ServingConfig().signing_key() is None
    assert ServingConfig.from_parameters({"turn_key": {"string_value": "k" * 32}}).signing_key() == b"k" * 32
    with pytest.raises(ValueError, match=r"^turn_key: must be at least 32 characters \(openssl rand -hex 32\), got 5$"):
        ServingConfig(turn_key="short").signing_key()
    with pytest.raises(ValueError, match="^turn_key: a turn reference holds at most 30000 ms of audio and 4096 bytes of text"):
        ServingConfig(turn_key="k" * 32, max_audio_length_ms=60_000).signing_key()
    monkeypatch.setenv("CSM_TURN_KEY", "e" * 40)
    assert ServingConfig(turn_key="k" * 32).signing_key() == b"e" * 40
    monkeypatch.setenv("CSM_TURN_KEY", "e" * 8)
    with pytest.raises(ValueError, match=r"^turn_key: must be at least 32 characters .*got 8 \(from CSM_TURN_KEY\)"):
        ServingConfig(turn_key="k" * 32).signing_key()
