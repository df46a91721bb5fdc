"""Sampling: top-k and temperature give the distribution they promise, and noise is per row."""

from __future__ import annotations

import pytest
import torch

from csm_triton.model.sampling import PRESETS, Sampler, preset, uniform_noise

pytestmark = pytest.mark.unit

VOCAB = 2051


def draw(logits: torch.Tensor, temperature: float, topk: int, samples: int, seed: int = 7) -> torch.Tensor:
    """`samples` draws from one row of logits, each at its own frame counter."""
    sampler = Sampler(
        temperature=torch.full((samples,), temperature),
        topk=torch.full((samples,), topk),
        seeds=torch.full((samples,), seed),
        frames=torch.arange(samples),
        num_codebooks=32,
    )
    return sampler(logits.expand(samples, -1), codebook=3)


def expected_distribution(logits: torch.Tensor, temperature: float, topk: int) -> torch.Tensor:
    scaled = logits / temperature
    kept = scaled.topk(topk).indices
    filtered = torch.full_like(scaled, float("-inf"))
    filtered[kept] = scaled[kept]
    return torch.softmax(filtered, dim=-1)


def test_topk_one_is_argmax() -> None:
    logits = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(torch.full((64,), 0.9), torch.ones(64, dtype=torch.long), torch.arange(64), torch.zeros(64, dtype=torch.long), 32)
    assert torch.equal(sampler(logits, 0), logits.argmax(dim=-1))


@pytest.mark.parametrize(("temperature", "topk"), [(1.0, 2051), (0.9, 50), (0.5, 8), (1.5, 5)])
def test_frequencies_match_tempered_topk_softmax(temperature: float, topk: int) -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1)) * 2
    samples = 20_000
    counts = torch.bincount(draw(logits, temperature, topk, samples), minlength=VOCAB).double()
    expected = expected_distribution(logits, temperature, topk).double()
    # Nothing outside the top k is ever drawn.
    assert counts[expected == 0].sum() == 0
    # Pearson's chi-square over the likely tokens; the rest pooled into one cell.
    likely = expected * samples >= 5
    observed = torch.cat([counts[likely], counts[~likely].sum()[None]])
    predicted = torch.cat([expected[likely], expected[~likely].sum()[None]]) * samples
    cells = observed[predicted > 0]
    predicted = predicted[predicted > 0]
    chi_square = ((cells - predicted) ** 2 / predicted).sum().item()
    degrees = len(cells) - 1
    # Mean `degrees`, standard deviation sqrt(2 * degrees): 6 deviations is far beyond chance.
    assert chi_square < degrees + 6 * (2 * degrees) ** 0.5, (chi_square, degrees)


def test_lower_temperature_concentrates_samples() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(2)) * 2
    top = logits.argmax()
    share = {t: (draw(logits, t, VOCAB, 5000) == top).double().mean().item() for t in (0.3, 1.0, 2.0)}
    assert share[0.3] > share[1.0] > share[2.0]


def test_noise_is_uniform_and_depends_on_seed_and_counter() -> None:
    seeds = torch.tensor([0, 0, 1, -5, 2**62])
    counters = torch.tensor([0, 1, 0, 0, 0])
    noise = uniform_noise(seeds, counters, VOCAB)
    assert noise.min() > 0 and noise.max() < 1
    assert abs(noise.mean().item() - 0.5) < 0.01
    rows = {tuple(row.tolist()) for row in noise}
    assert len(rows) == 5
    assert torch.equal(noise, uniform_noise(seeds, counters, VOCAB))


def test_presets_follow_the_design_document() -> None:
    assert preset("natural") == {"temperature": 0.9, "topk": 50, "max_audio_length_ms": 10_000}
    assert 0.5 <= PRESETS["deterministic"].temperature <= 0.7 and 20 <= PRESETS["deterministic"].topk <= 50
    assert 1.0 <= PRESETS["creative"].temperature <= 1.2 and 100 <= PRESETS["creative"].topk <= 200
    with pytest.raises(ValueError, match="unknown preset 'loud'"):
        preset("loud")
