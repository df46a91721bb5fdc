"""csm_stream's cache of context audio's Mimi codes (csm_triton/engine/prompt.py): keyed by content,
bounded in bytes with the least recently used clip out, and used by the prompt builder so that a
clip sent again is not encoded again. A counting stand-in codec: no model is loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from csm_triton.engine.prompt import CodesCache, PromptBuilder, codes_cache_bytes
from csm_triton.request import Segment, audio_key

pytestmark = pytest.mark.unit


class CountingCodec:
    def __init__(self) -> None:
        self.calls = 0

    def encode(self, audio: torch.Tensor) -> torch.Tensor:  # [samples] -> [frames, 32]
        self.calls += 1
        frames = max(1, len(audio) // 1920)
        return (torch.arange(frames * 32).view(frames, 32) + len(audio)) % 2048


def clip(seed: int, samples: int = 3840) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.5, 0.5, samples).astype(np.float32)


def test_the_key_is_the_content_and_rate() -> None:
    a = clip(0)
    assert audio_key(a, 24_000) == audio_key(a.copy(), 24_000)
    assert audio_key(a, 24_000) != audio_key(a, 16_000) and audio_key(a, 24_000) != audio_key(clip(1), 24_000)


def test_a_clip_is_encoded_once_and_its_codes_are_what_encoding_gives() -> None:
    codec = CountingCodec()
    builder = PromptBuilder(None, codec, num_codebooks=32, text_vocab_size=128_256)
    first = [builder._audio_frames(Segment(speaker=0, text="a", audio=clip(seed))) for seed in range(3)]
    again = [builder._audio_frames(Segment(speaker=0, text="a", audio=clip(seed))) for seed in range(3)]
    assert codec.calls == 3 and builder.codes_cache.hits == 3 and builder.codes_cache.misses == 3
    for (tokens, mask), (tokens_again, mask_again) in zip(first, again, strict=True):
        assert torch.equal(tokens, tokens_again) and torch.equal(mask, mask_again)
    expected = CountingCodec().encode(torch.from_numpy(clip(0)))
    assert torch.equal(first[0][0][:-1, :-1], expected) and not first[0][0][-1].any()  # then the end-of-audio frame


def test_the_cache_is_bounded_in_bytes_least_recently_used_out() -> None:
    entry = torch.zeros(10, 32, dtype=torch.int16)  # 640 bytes
    cache = CodesCache(max_bytes=3 * 640)
    for key in "abc":
        cache.put(key, entry)
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", entry)
    assert cache.get("b") is None and all(cache.get(key) is not None for key in "acd")
    assert len(cache) == 3 and cache.bytes == 3 * 640
    cache.put("huge", torch.zeros(100, 32, dtype=torch.int16))  # larger than the whole bound: not kept
    assert cache.get("huge") is None and len(cache) == 3


def test_a_cache_of_no_bytes_encodes_every_time() -> None:
    codec = CountingCodec()
    builder = PromptBuilder(None, codec, 32, 128_256, codes_cache=CodesCache(max_bytes=0))
    for _ in range(2):
        builder._audio_frames(Segment(speaker=0, text="a", audio=clip(0)))
    assert codec.calls == 2


class FixedTokenizer:
    def encode(self, text: str, speaker: int) -> list[int]:
        return [1, 2 + speaker, 3]


def test_a_segment_with_codes_is_used_as_it_is_never_encoded() -> None:
    codec = CountingCodec()
    builder = PromptBuilder(FixedTokenizer(), codec, 32, 128_256)
    codes = np.random.default_rng(0).integers(0, 2051, (4, 32)).astype(np.int32)  # ids >= 2048 too, as sampled
    tokens, mask = builder.build("Now.", 1, [Segment(speaker=0, text="Then.", codes=codes)])
    assert codec.calls == 0 and builder.codes_cache.misses == 0 and len(builder.codes_cache) == 0
    assert len(tokens) == builder.positions("Now.", 1, [Segment(speaker=0, text="Then.", codes=codes)]) == 3 + 4 + 1 + 3
    assert torch.equal(tokens[3:7, :32], torch.from_numpy(codes).long()) and tokens.dtype == torch.long
    assert mask[3:8, :32].all() and not mask[3:8, 32].any() and not tokens[7].any()  # then the end-of-audio frame
    # the same frames as the audio those codes came from would make, had it been encoded to them
    key = audio_key(clip(5, 4 * 1920), 24_000)
    builder.codes_cache.put(key, torch.from_numpy(codes).to(torch.int16))
    from_audio, audio_mask = builder.build("Now.", 1, [Segment(speaker=0, text="Then.", audio=clip(5, 4 * 1920))])
    assert torch.equal(from_audio, tokens) and torch.equal(audio_mask, mask) and codec.calls == 0


def test_the_bound_is_the_parameter_unless_the_environment_overrides_it(monkeypatch) -> None:
    monkeypatch.delenv("CSM_CODES_CACHE_MB", raising=False)
    assert codes_cache_bytes(3) == 3 << 20 and CodesCache().max_bytes == 64 << 20
    monkeypatch.setenv("CSM_CODES_CACHE_MB", "0")
    assert codes_cache_bytes(3) == 0 and CodesCache().max_bytes == 0
    monkeypatch.delenv("CSM_CODES_CACHE_MB")
    with pytest.raises(ValueError, match="^codes_cache_mb: must be >= 0"):
        codes_cache_bytes(-1)


def test_stats_are_the_totals_and_what_is_held() -> None:
    codec = CountingCodec()
    builder = PromptBuilder(None, codec, 32, 128_256, codes_cache=CodesCache(max_bytes=1 << 20))
    for seed in (0, 1, 0):
        builder._audio_frames(Segment(speaker=0, text="a", audio=clip(seed)))
    assert builder.codes_cache.stats() == {"hits": 1, "misses": 2, "bytes": 2 * 2 * 32 * 2, "clips": 2, "max_bytes": 1 << 20}
