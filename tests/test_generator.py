"""The design document's API: load_csm_1b, Generator.generate, Segment, seeds, presets."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from csm_client.contract import SAMPLES_PER_FRAME, STANDARD_SAMPLE_RATES
from csm_triton import GenerationRequest, Generator, Segment, load_csm_1b, preset
from csm_triton.request import RequestLimits
from triton_tensors import LONG_TEXTS

pytestmark = pytest.mark.engine


def test_generate_returns_mono_24khz_audio_of_the_generated_frames(generator: Generator) -> None:
    codes = generator.generate_codes("Hello from Sesame.", 0, [], max_audio_length_ms=800, seed=5)
    audio = generator.generate("Hello from Sesame.", 0, [], max_audio_length_ms=800, seed=5)
    assert generator.sample_rate == 24_000
    assert audio.dtype == torch.float32 and audio.dim() == 1
    assert len(audio) == len(codes) * SAMPLES_PER_FRAME
    assert torch.isfinite(audio).all() and audio.abs().max() > 0


def test_codes_are_diverse_and_in_range(generator: Generator) -> None:
    codes = generator.generate_codes("Hello from Sesame.", 0, [], max_audio_length_ms=1600, seed=1)
    assert codes.dtype == torch.long and codes.shape == (20, 32)
    assert codes.min() >= 0 and codes.max() < 2051
    assert len(codes.unique()) > 100
    assert not torch.equal(codes[0], codes[1])


def test_same_seed_same_codes_other_seed_other_codes(generator: Generator) -> None:
    first = generator.generate_codes("Same again.", 1, [], max_audio_length_ms=400, seed=42)
    assert torch.equal(first, generator.generate_codes("Same again.", 1, [], max_audio_length_ms=400, seed=42))
    assert not torch.equal(first, generator.generate_codes("Same again.", 1, [], max_audio_length_ms=400, seed=43))


def test_max_audio_length_bounds_the_frames(generator: Generator) -> None:
    assert len(generator.generate_codes("Short.", 0, [], max_audio_length_ms=250, seed=0)) == 3


def test_generate_batch_matches_one_at_a_time(generator: Generator) -> None:
    context = [Segment(speaker=0, text="Earlier turn.", audio=torch.sin(torch.arange(12_000) / 10.0) * 0.3)]
    asks = [
        GenerationRequest("First.", 0, temperature=0.7, topk=20, max_audio_length_ms=400, seed=1),
        GenerationRequest("Second one.", 1, context, temperature=1.1, topk=100, max_audio_length_ms=560, seed=2),
        GenerationRequest("Third.", 2, **preset("deterministic") | {"max_audio_length_ms": 320}, seed=3),
    ]
    codes_together = generator.generate_codes_batch(asks)
    together = generator.generate_batch(asks)
    for ask, codes, audio in zip(asks, codes_together, together, strict=True):
        arguments = (ask.text, ask.speaker, ask.context, ask.temperature, ask.topk, ask.max_audio_length_ms, ask.seed)
        assert torch.equal(codes, generator.generate_codes(*arguments))
        # One Mimi pass over the padded batch: the same samples up to float rounding.
        assert torch.allclose(audio, generator.generate(*arguments), atol=1e-5)
    assert [len(a) // SAMPLES_PER_FRAME for a in together] == [5, 7, 4]


def test_invalid_request_fails_alone_with_return_exceptions(generator: Generator) -> None:
    good = GenerationRequest("Fine.", 0, max_audio_length_ms=240, seed=1)
    too_long = GenerationRequest(LONG_TEXTS[0], 0, [Segment(1, text) for text in LONG_TEXTS[1:]], max_audio_length_ms=240, seed=1)
    outcomes = generator.generate_codes_batch([good, too_long, good], return_exceptions=True)
    assert isinstance(outcomes[1], ValueError) and "prompt" in str(outcomes[1])
    assert torch.equal(outcomes[0], outcomes[2]) and len(outcomes[0]) == 3
    with pytest.raises(ValueError, match="prompt"):
        generator.generate_codes_batch([good, too_long])


def audio_segment(index: int = 0, samples: int = 480, sample_rate: int = 24_000) -> Segment:
    return Segment(speaker=1, text=f"Turn {index}.", audio=np.zeros(samples, dtype=np.float32), sample_rate=sample_rate)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": ""}, "text: must not be empty"),
        ({"text": "x" * 4097}, "text: holds 4097 bytes of UTF-8, more than max_text_bytes 4096"),
        ({"text": "bad \ud800 surrogate"}, "text: is not valid UTF-8 text"),
        ({"speaker": -1}, r"speaker: must be in \[0, 2147483647\], got -1"),
        ({"speaker": 2.0}, "speaker: must be an integer, got 2.0"),
        ({"context": None}, "context: must be a list of Segment"),
        ({"context": [Segment(0, "Hi.")] * 33}, "context: holds 33 segments, more than max_context_segments 32"),
        (
            {"context": [Segment(0, "Hi."), Segment(0, "é" * 2049)]},
            r"context\[1\].text: holds 4098 bytes of UTF-8, more than max_context_text_bytes 4096",
        ),
        ({"context": [Segment(0, " ")]}, r"context\[0\].text: must not be empty"),
        ({"context": [Segment(-3, "Hi.")]}, r"context\[0\].speaker: must be in \[0, 2147483647\], got -3"),
        ({"context": [audio_segment(sample_rate=4000)]}, r"context\[0\].sample_rate: must be in \[8000, 48000\] Hz, got 4000"),
        ({"context": [audio_segment(sample_rate=12_007)]}, r"context\[0\].sample_rate: 12007 Hz is 12007:24000 .* such as 12000 Hz"),
        (
            # The second alone fits exactly (2045 frames and the end of audio); after the first it does not.
            {"context": [audio_segment(0), audio_segment(1, samples=2045 * 640, sample_rate=8000)]},
            r"context\[1\].audio: holds 1308800 samples at 8000 Hz, which bring the context audio to 2048 prompt positions, "
            "more than the 2046",
        ),
        ({"temperature": float("nan")}, "temperature: must be a finite number > 0"),
        ({"temperature": 0}, "temperature: must be a finite number > 0"),
        ({"temperature": "hot"}, "temperature: must be a number"),
        ({"topk": 0}, r"topk: must be in \[1, 2051\], got 0"),
        ({"topk": 2052}, r"topk: must be in \[1, 2051\], got 2052"),
        ({"max_audio_length_ms": 0}, r"max_audio_length_ms: must be in \[80, 30000\], got 0"),
        ({"max_audio_length_ms": 30_001}, r"max_audio_length_ms: must be in \[80, 30000\], got 30001"),
        ({"seed": 1.5}, "seed: must be an integer, got 1.5"),
        ({"seed": 2**63}, r"seed: must be in \[-9223372036854775808, 9223372036854775807\] \(a 64-bit integer\)"),
        ({"text": "Look <|image|>"}, "prompt: a text holds a special token outside the model's 128256-token text vocabulary"),
    ],
)
def test_bad_arguments_name_the_field(generator: Generator, kwargs: dict, message: str) -> None:
    arguments = {"text": "Hello.", "speaker": 0, "context": []} | kwargs
    with pytest.raises(ValueError, match=f"^{message}"):
        generator.generate(**arguments)


def refused_by(generator: Generator, entry_point: str, request: GenerationRequest) -> Exception:
    """The error an entry point of the in-process API gives for `request`."""
    arguments = (request.text, request.speaker, request.context, request.temperature, request.topk, request.max_audio_length_ms)
    if entry_point == "generate_batch with return_exceptions":
        outcome = generator.generate_codes_batch([request], return_exceptions=True)[0]
        assert isinstance(outcome, Exception)
        return outcome
    with pytest.raises(ValueError) as caught:
        if entry_point == "submit":
            generator.submit(request, lambda chunk: None)
        elif entry_point == "generate_streaming":
            next(generator.generate_streaming(*arguments))
        elif entry_point == "generate_async":
            asyncio.run(generator.generate_async(*arguments))
        else:
            getattr(generator, entry_point)(*arguments)
    return caught.value


@pytest.mark.parametrize(
    "entry_point", ["submit", "generate", "generate_codes", "generate_streaming", "generate_async", "generate_batch with return_exceptions"]
)
def test_every_entry_point_checks_the_limits_before_any_work(generator: Generator, entry_point: str) -> None:
    """12007 Hz would take torchaudio ~6 GB and seconds to resample: refused at once instead."""
    request = GenerationRequest("Reply.", 0, [audio_segment(samples=12_007, sample_rate=12_007)], seed=1)
    start = time.monotonic()
    error = refused_by(generator, entry_point, request)
    assert time.monotonic() - start < 5
    assert str(error).startswith("context[0].sample_rate: 12007 Hz")
    assert generator.stats().streams == 0


def test_every_standard_sample_rate_is_admitted(generator: Generator) -> None:
    for rate in STANDARD_SAMPLE_RATES:
        generator.limits.check(GenerationRequest("Reply.", 0, [audio_segment(samples=rate, sample_rate=rate)]))


def test_limits_can_be_set_at_load(generator: Generator, tiny_model_dir: Path) -> None:
    assert generator.limits == RequestLimits.for_model(generator.engine.model.config)  # the default
    strict = load_csm_1b(tiny_model_dir, device="cpu", slots=1, limits=RequestLimits(max_text_bytes=8, max_audio_length_ms=800))
    try:
        assert len(strict.generate_codes("Hi.", 0, [], max_audio_length_ms=160, seed=1)) == 2
        with pytest.raises(ValueError, match="^text: holds 9 bytes of UTF-8, more than max_text_bytes 8"):
            strict.generate_codes("Too long.", 0, [])
        with pytest.raises(ValueError, match=r"^max_audio_length_ms: must be in \[80, 800\], got 880"):
            strict.generate_codes("Hi.", 0, [], max_audio_length_ms=880)
    finally:
        strict.close()


def test_segment_accepts_both_forms_and_keeps_its_audio_at_its_own_rate() -> None:
    text_only = Segment(text="Hello, how are you?", speaker=0, is_audio=False)
    assert text_only.audio is None and not text_only.is_audio
    one_second_16k = np.sin(np.arange(16_000, dtype=np.float32) / 5)
    upstream = Segment(speaker=1, text="Fine.", audio=torch.from_numpy(one_second_16k), sample_rate=16_000)
    assert upstream.is_audio and upstream.sample_rate == 16_000  # resampled only when the prompt is built
    assert isinstance(upstream.audio, np.ndarray) and upstream.audio.dtype == np.float32
    assert np.array_equal(upstream.audio, one_second_16k)
    assert Segment(1, "Channel first.", torch.zeros(1, 480)).audio.shape == (480,)
    assert Segment(1, "Channel last.", np.zeros((480, 1))).audio.dtype == np.float32
    assert Segment(1, "Half precision.", torch.zeros(480, dtype=torch.bfloat16)).audio.dtype == np.float32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"audio": torch.zeros(2, 4800)}, "segment audio: must be mono audio .*multi-channel audio is not supported"),
        ({"audio": torch.tensor([0.0, float("nan")])}, "segment audio: has samples that are not finite"),
        ({"audio": np.array([0.0, np.inf])}, "segment audio: has samples that are not finite"),
        ({"audio": torch.zeros(480, dtype=torch.int16)}, "segment audio: must hold floating-point samples"),
        ({"audio": np.zeros(480, dtype=np.int16)}, "segment audio: must hold floating-point samples"),
        ({"is_audio": True}, "segment: is_audio=True but no audio"),
        ({"audio": torch.zeros(480), "sample_rate": 0}, "segment sample_rate: must be a positive"),
        ({"audio": torch.zeros(480), "sample_rate": 16_000.0}, "segment sample_rate: must be an integer"),
        ({"speaker": "two"}, "segment speaker: must be an integer"),
        ({"text": None}, "segment text: must be a string"),
        ({"audio": torch.zeros(0)}, "segment audio: must hold at least one sample"),
    ],
)
def test_bad_segments_are_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        Segment(**({"speaker": 0, "text": "x"} | kwargs))


def test_audio_context_is_its_codes_then_an_end_of_audio_frame(generator: Generator) -> None:
    audio = torch.sin(torch.arange(24_000) / 7.0) * 0.2
    tokens, mask = generator.prompt("Reply.", 0, [Segment(speaker=1, text="Listen.", audio=audio)])
    text_rows = mask[:, -1]
    audio_rows = mask[:, :-1].all(dim=1)
    assert torch.equal(text_rows, ~audio_rows)
    frames = int(audio_rows.sum())
    assert frames == math.ceil(24_000 / SAMPLES_PER_FRAME) + 1  # Mimi frames + the end-of-audio frame
    end_of_audio = tokens[audio_rows][-1]
    assert not end_of_audio.any()
    assert tokens[audio_rows][:-1, :-1].any()


@pytest.mark.parametrize("sample_rate", [8000, 11_025, 16_000, 24_000, 44_100, 48_000])
@pytest.mark.parametrize("seconds", [1 / 24_000, 0.08, 0.5])
def test_prompt_positions_are_known_before_resampling_and_encoding(generator: Generator, sample_rate: int, seconds: float) -> None:
    """Requests with context audio are checked at once and resampled and encoded later, on the
    prompt length counted from the sample counts and rates: it must be the built prompt's."""
    samples = max(1, round(seconds * sample_rate)) + 1  # odd counts, which resample to a fraction
    context = [audio_segment(samples=samples, sample_rate=sample_rate), Segment(speaker=0, text="Text only.")]
    context[0].audio[:] = np.random.default_rng(0).uniform(-0.5, 0.5, samples)
    tokens, _ = generator.prompt("Reply.", 0, context)
    assert generator.prompts.positions("Reply.", 0, context) == len(tokens)


def test_a_too_long_audio_context_is_refused_at_submit(generator: Generator) -> None:
    context = [Segment(speaker=1, text="Long.", audio=torch.zeros(2000 * SAMPLES_PER_FRAME))]
    with pytest.raises(ValueError, match="^prompt: .* exceed the model's 2048-position limit"):
        generator.submit(GenerationRequest("Reply.", 0, context), lambda chunk: None)


def test_a_voice_is_named_and_its_clip_goes_first_in_the_context(generator: Generator) -> None:
    clip = Segment(2, "The narrator's clip.", codes=np.full((3, 32), 7, dtype=np.int32))
    generator.voices["narrator"] = clip
    try:
        named = GenerationRequest("Hi.", 2, [Segment(0, "Before.")], max_audio_length_ms=400, seed=3, voice="narrator")
        expected = generator.generate_codes("Hi.", 2, [clip, Segment(0, "Before.")], max_audio_length_ms=400, seed=3)
        assert generator.generate_codes_batch([named])[0].tolist() == expected.tolist()
        with pytest.raises(ValueError, match="^voice: no voice 'nobody' in the voice library; its voices: narrator"):
            generator.submit(GenerationRequest("Hi.", 2, voice="nobody"), lambda chunk: None)
        with pytest.raises(ValueError, match="^context: holds 33 segments, more than max_context_segments 32"):
            generator.submit(GenerationRequest("Hi.", 2, [Segment(0, "Hi.")] * 32, voice="narrator"), lambda chunk: None)
    finally:
        del generator.voices["narrator"]


def test_tokenizer_uses_the_speaker_template_with_bos_and_eos(generator: Generator) -> None:
    tokens, mask = generator.prompt("Hello", 0, [])
    assert tokens[:, -1].tolist() == [128000, 58, 15, 60, 9906, 128001]  # <|begin_of_text|> [ 0 ] Hello <|end_of_text|>
    assert mask[:, -1].all() and not mask[:, :-1].any()
    assert generator.prompt("Hello", 12, [])[0][:, -1].tolist() == [128000, 58, 717, 60, 9906, 128001]


def test_load_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere.*python -m export"):
        load_csm_1b(tmp_path / "nowhere", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device='cpu'"):
            load_csm_1b(tmp_path, device="cuda")
