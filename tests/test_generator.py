"""The design document's API: load_csm_1b, Generator.generate, Segment, seeds, presets."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from csm_triton import GenerationRequest, Generator, Segment, load_csm_1b, preset
from csm_triton.codec import SAMPLES_PER_FRAME


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
    too_long = GenerationRequest("word " * 2100, 0, max_audio_length_ms=240, seed=1)
    outcomes = generator.generate_codes_batch([good, too_long, good], return_exceptions=True)
    assert isinstance(outcomes[1], ValueError) and "prompt" in str(outcomes[1])
    assert torch.equal(outcomes[0], outcomes[2]) and len(outcomes[0]) == 3
    with pytest.raises(ValueError, match="prompt"):
        generator.generate_codes_batch([good, too_long])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"text": ""}, "text: must not be empty"),
        ({"speaker": -1}, "speaker: must be an integer >= 0"),
        ({"temperature": float("nan")}, "temperature: must be a finite number > 0"),
        ({"temperature": 0}, "temperature: must be a finite number > 0"),
        ({"topk": 0}, "topk: must be an integer >= 1"),
        ({"max_audio_length_ms": 0}, "max_audio_length_ms: must be an integer >= 80"),
        ({"seed": 1.5}, "seed: must be an integer or None"),
        ({"text": "Look <|image|>"}, "text: contains a special token outside the model's 128256-token text vocabulary"),
    ],
)
def test_bad_arguments_name_the_field(generator: Generator, kwargs: dict, message: str) -> None:
    arguments = {"text": "Hello.", "speaker": 0, "context": []} | kwargs
    with pytest.raises(ValueError, match=message):
        generator.generate(**arguments)


def test_segment_accepts_both_forms_and_resamples() -> None:
    text_only = Segment(text="Hello, how are you?", speaker=0, is_audio=False)
    assert text_only.audio is None and not text_only.is_audio
    one_second_16k = np.sin(np.arange(16_000, dtype=np.float32) / 5)
    upstream = Segment(speaker=1, text="Fine.", audio=torch.from_numpy(one_second_16k), sample_rate=16_000)
    assert upstream.is_audio and upstream.sample_rate == 24_000
    assert upstream.audio.shape == (24_000,)
    assert Segment(1, "Channel first.", torch.zeros(1, 480)).audio.shape == (480,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"audio": torch.zeros(2, 4800)}, "multi-channel audio is not supported"),
        ({"audio": torch.tensor([0.0, float("nan")])}, "must be finite"),
        ({"is_audio": True}, "is_audio=True but no audio"),
        ({"audio": torch.zeros(480), "sample_rate": 0}, "sample_rate: must be a positive"),
        ({"speaker": -2}, "segment speaker"),
        ({"audio": torch.zeros(0)}, "at least one sample"),
    ],
)
def test_bad_segments_are_clear_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
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


@pytest.mark.parametrize("samples", [1, 1919, 1921, 24_000])
def test_prompt_positions_are_known_before_encoding(generator: Generator, samples: int) -> None:
    """Requests with context audio are checked at once and encoded later, on the prompt length
    computed from the sample counts: it must be the built prompt's."""
    context = [Segment(speaker=1, text="Listen.", audio=torch.rand(samples) - 0.5), Segment(speaker=0, text="Text only.")]
    tokens, _ = generator.prompt("Reply.", 0, context)
    assert generator.prompts.positions("Reply.", 0, context) == len(tokens)


def test_a_too_long_audio_context_is_refused_at_submit(generator: Generator) -> None:
    context = [Segment(speaker=1, text="Long.", audio=torch.zeros(2000 * SAMPLES_PER_FRAME))]
    with pytest.raises(ValueError, match="^prompt: .* exceed the model's 2048-position limit"):
        generator.submit(GenerationRequest("Reply.", 0, context), lambda chunk: None)


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
