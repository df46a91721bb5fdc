"""StreamingDecoder: the chunks of a stream, however cut and interleaved with other rows, join to the
one-shot Mimi decode of its codes."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import cycle
from pathlib import Path

import pytest
import torch

from csm_client.contract import SAMPLES_PER_FRAME
from csm_triton.model.codec import MimiCodec, StreamingDecoder

pytestmark = pytest.mark.engine

TOLERANCE = 1e-4
CODEBOOKS = 32


@pytest.fixture(scope="module")
def codec(tiny_model_dir: Path) -> MimiCodec:
    return MimiCodec(tiny_model_dir / "mimi.safetensors", torch.device("cpu"), CODEBOOKS)


@pytest.fixture(scope="module")
def loud_transformer_codec(tiny_model_dir: Path) -> MimiCodec:
    """The tiny Mimi with its decoder transformer's layer scales raised from moshi's init (0.01) to
    1, as in a trained model: at 0.01 a missing key changes the audio by ~1e-6, far below what the
    tolerance can see, at 1 by ~1e-3."""
    codec = MimiCodec(tiny_model_dir / "mimi.safetensors", torch.device("cpu"), CODEBOOKS)
    with torch.no_grad():
        for name, parameter in codec.mimi.decoder_transformer.named_parameters():
            if "layer_scale" in name:
                parameter.fill_(1.0)
    return codec


def random_codes(frames: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2048, (frames, CODEBOOKS), generator=torch.Generator().manual_seed(seed))


def chunks(frames: int, sizes: list[int]) -> Iterator[slice]:
    """Consecutive slices of [0, frames), cycling through sizes (the last one cut short)."""
    start = 0
    for size in cycle(sizes):
        if start >= frames:
            return
        yield slice(start, min(start + size, frames))
        start += size


def decode_in_chunks(decoder: StreamingDecoder, row: int, codes: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    return torch.cat([decoder.decode([row], codes[None, part])[0] for part in chunks(len(codes), sizes)])


def assert_matches(audio: torch.Tensor, expected: torch.Tensor) -> None:
    assert audio.dtype == torch.float32 and audio.device.type == "cpu"
    assert audio.shape == expected.shape
    difference = (audio - expected).abs().max().item()
    assert difference < TOLERANCE, f"max abs difference {difference:.3g}"


@pytest.fixture(params=[False, True], ids=["copied-rows", "masked-rows"])
def masked(request: pytest.FixtureRequest) -> bool:
    """StreamingDecoder's two ways to run some rows: on copies of their state (the CPU's), or
    all rows under moshi's execution mask (CUDA's)."""
    return request.param


@pytest.mark.parametrize("sizes", [[1], [1, 3, 5, 2], [7, 1, 20]], ids=["1", "1-3-5-2", "7-1-20"])  # 20 > FRAMES_PER_PASS
def test_chunks_join_to_the_one_shot_decode(codec: MimiCodec, sizes: list[int]) -> None:
    codes = random_codes(30, seed=1)
    audio = decode_in_chunks(StreamingDecoder(codec, 1), 0, codes, sizes)
    assert audio.shape == (30 * SAMPLES_PER_FRAME,)
    assert_matches(audio, codec.decode(codes))


def test_ids_past_mimis_codebooks_decode_as_zero(codec: MimiCodec) -> None:
    codes = random_codes(12, seed=2)
    codes[::2, 5] = 2048
    codes[1::3, 0] = 2049
    codes[4, :] = 2050
    assert_matches(decode_in_chunks(StreamingDecoder(codec, 1), 0, codes, [1, 3, 5, 2]), codec.decode(codes))


def test_rows_decoded_in_the_same_call(codec: MimiCodec, masked: bool) -> None:
    codes = torch.stack([random_codes(16, seed=3), random_codes(16, seed=4)])
    decoder = StreamingDecoder(codec, 2, masked)
    rows = [1, 0]  # not in order
    audio = torch.cat([decoder.decode(rows, codes[:, part]) for part in chunks(16, [1, 4, 3])], dim=1)
    for stream, expected in zip(audio, codes, strict=True):
        assert_matches(stream, codec.decode(expected))


def test_start_restarts_a_row(codec: MimiCodec, masked: bool) -> None:
    first, second = random_codes(6, seed=5), random_codes(12, seed=6)
    decoder = StreamingDecoder(codec, 2, masked)
    decode_in_chunks(decoder, 1, first, [2, 3])  # left mid-stream
    decoder.start([1])
    restarted = decode_in_chunks(decoder, 1, second, [1, 3, 5, 2])
    fresh = decode_in_chunks(StreamingDecoder(codec, 2, masked), 1, second, [1, 3, 5, 2])
    assert_matches(restarted, fresh)
    assert_matches(restarted, codec.decode(second))


def decode_interleaved(decoder: StreamingDecoder, codes: dict[int, torch.Tensor], sizes: dict[int, list[int]]) -> dict[int, torch.Tensor]:
    """Each row's stream in its own calls, taking turns: every row sits frozen while the others
    decode."""
    parts = {row: chunks(len(codes[row]), sizes[row]) for row in codes}
    audio: dict[int, list[torch.Tensor]] = {row: [] for row in codes}
    while parts:
        for row in list(parts):
            part = next(parts[row], None)
            if part is None:
                del parts[row]
            else:
                audio[row].append(decoder.decode([row], codes[row][None, part])[0])
    return {row: torch.cat(pieces) for row, pieces in audio.items()}


def test_rows_not_listed_keep_their_state(codec: MimiCodec, masked: bool) -> None:
    codes = {0: random_codes(12, seed=7), 2: random_codes(12, seed=8)}
    decoder = StreamingDecoder(codec, 3, masked)
    decoder.decode([1], random_codes(2, seed=9)[None])  # row 1 started, then left idle
    audio = decode_interleaved(decoder, codes, {0: [2, 1, 3], 2: [1, 4]})
    for row, expected in codes.items():
        assert_matches(audio[row], codec.decode(expected))


def test_streams_longer_than_the_decoder_transformers_context(loud_transformer_codec: MimiCodec, masked: bool) -> None:
    """Mimi's decoder transformer attends to the last 250 steps at 25 Hz (2 steps a frame): 125
    frames. Past that, moshi's own ring KV cache (250 steps) loses keys within a multi-step call
    and overwrites keys of the rows frozen in a call (audio off by 8e-4 here, from frame ~123
    on); the one-shot decode uses the same sliding window, so the streams must still match. Both
    rows decode together up to near the context, then take turns across it in small chunks."""
    codec = loud_transformer_codec
    context = codec.mimi.decoder_transformer.transformer.layers[0].self_attn.context
    together, frames = context // 2 - 10, context // 2 + 10
    codes = {0: random_codes(frames, seed=10), 1: random_codes(frames, seed=11)}
    decoder = StreamingDecoder(codec, 2, masked)
    head = torch.cat([decoder.decode([0, 1], torch.stack([codes[0], codes[1]])[:, part]) for part in chunks(together, [16])], dim=1)
    tails = decode_interleaved(decoder, {row: codes[row][together:] for row in codes}, {0: [1, 3, 5, 2], 1: [4, 1, 2]})
    for row, expected in codes.items():
        assert_matches(torch.cat([head[row], tails[row]]), codec.decode(expected))


def test_refuses_bad_rows_and_shapes(codec: MimiCodec) -> None:
    decoder = StreamingDecoder(codec, 2)
    with pytest.raises(ValueError, match="rows"):
        decoder.decode([0, 0], random_codes(2, seed=12).expand(2, -1, -1))
    with pytest.raises(ValueError, match="rows"):
        decoder.start([2])
    with pytest.raises(ValueError, match="codes"):
        decoder.decode([0], random_codes(2, seed=12))
    assert decoder.decode([], torch.zeros(0, 4, CODEBOOKS, dtype=torch.long)).shape == (0, 4 * SAMPLES_PER_FRAME)
