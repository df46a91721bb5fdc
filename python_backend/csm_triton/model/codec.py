"""The Mimi audio codec: 24 kHz mono audio <-> 32 codebooks at 12.5 frames a second."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
import torchaudio.functional
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.modules.streaming import State, StreamingContainer
from moshi.modules.transformer import RingKVCache, StreamingMultiheadAttention
from moshi.utils import compile as moshi_compile

from csm_client.contract import SAMPLE_RATE, SAMPLES_PER_FRAME

logger = logging.getLogger(__name__)

# moshi compiles a few functions lazily unless its module-wide `_compile_disabled` flag is set,
# which its `no_compile()` context (used on the CPU) sets and restores without a lock: with Mimi
# encoding in one thread and decoding in another, one thread's exit re-enables compilation under
# the other, which then compiles mid-request (and fails without a compiler toolchain). Serving
# wants neither, so compilation stays off for good; the context then restores "off".
moshi_compile._compile_disabled = True


def resample(audio: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """audio [samples] at `sample_rate` -> at Mimi's 24 kHz. The rate must have been checked
    (RequestLimits.check_sample_rate): torchaudio's filter grows with the rates' reduced ratio."""
    if sample_rate == SAMPLE_RATE:
        return audio
    return torchaudio.functional.resample(audio, orig_freq=sample_rate, new_freq=SAMPLE_RATE)


class MimiCodec:
    """moshi's Mimi in fp32 on the model's device."""

    def __init__(self, weights: str | Path, device: torch.device, num_codebooks: int) -> None:
        self.device = device
        self.mimi = loaders.get_mimi(str(weights), device=device, num_codebooks=num_codebooks)
        self.mimi.float()

    @torch.inference_mode()
    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        """audio: [samples] at 24 kHz -> codes [frames, codebooks]."""
        return self.mimi.encode(audio.to(self.device).view(1, 1, -1))[0].T

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [frames, codebooks] -> audio [frames * 1920] at 24 kHz, on the CPU."""
        if len(codes) == 0:
            return torch.zeros(0)
        codes = in_codebook(codes.to(self.device), self.mimi.cardinality)
        return self.mimi.decode(codes.T[None])[0, 0, : len(codes) * SAMPLES_PER_FRAME].float().cpu()


def in_codebook(codes: torch.Tensor, cardinality: int) -> torch.Tensor:
    """CSM's audio vocabulary (2051) is wider than Mimi's codebooks (2048); the trained model does
    not sample the extra ids, but a sampled one must not crash the decoder: it decodes as code 0."""
    return torch.where(codes < cardinality, codes, 0)


class _DecoderSide(StreamingContainer):
    """Private copies of Mimi's streaming decoder-side modules (latent -> audio), so that their
    streaming state never touches the shared model."""

    def __init__(self, mimi: MimiModel) -> None:
        super().__init__()
        self.upsample = copy.deepcopy(mimi.upsample)
        self.transformer = copy.deepcopy(mimi.decoder_transformer)
        self.decoder = copy.deepcopy(mimi.decoder)
        self.requires_grad_(False)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, 512, frames] at 12.5 Hz -> audio [B, 1, frames * 1920]; what MimiModel.decode
        does after the quantizer."""
        (upsampled,) = self.transformer(self.upsample(latent))
        return self.decoder(upsampled)


class StreamingDecoder:
    """Mimi decoding state for `rows` independent streams (one per engine slot), so that audio can be sent as frames are generated.

    Uses moshi's own streaming state (`streaming_forever(rows)`): each streaming module keeps its
    causal context per batch row and `reset_streaming(mask)` clears chosen rows; a call runs only
    the rows it lists (see Cost). Mimi is causal, so the chunks of a stream joined equal `MimiCodec.decode` of all its codes.

    - Own state: moshi keeps streaming state on the modules themselves, and a streaming module
      takes its streaming path for every caller, so streaming the shared `mimi` would break an
      encode or one-shot decode running in another thread. The decoder side (upsample, decoder
      transformer, SEANet decoder: 39.9M of Mimi's 79.3M parameters, 160 MB in fp32) is copied;
      the quantizer's decode is stateless and shared.
    - Wider KV rings: moshi sizes the decoder transformer's ring KV cache to its attention
      context (250 steps at 25 Hz = 125 frames = 10 s) and writes a call's new keys before
      attending, so a call of T > 1 steps overwrites keys its own first steps still need once a
      stream is past 10 s (one Mimi frame is 2 steps). The
      rings here hold `context + 2 * FRAMES_PER_PASS - 1` steps (281), which makes every pass
      exact; a longer `decode` runs in passes of FRAMES_PER_PASS frames. State per row is about
      9.2 MB of KV ring (8 layers x 2 x 281 x 512 fp32) plus the convolutions' context.
    - Cost: on the CPU a call runs only the rows listed, on copies of their state (about 9 MB a
      row, copied in and back: a few percent of a call), so it costs the streams it has. One
      batched call beats a loop of single-row decoders: on a 2-core CPU 8 rows of 1 (4) frames
      took 101 (231) ms in one call and 670 (828) ms in a loop.
    - `masked` (default on CUDA): every call runs all rows in place, the rows not listed under
      moshi's execution mask (their state is left as it was), so that a call's shapes depend on
      its frames alone and nothing is gathered or copied back; it runs on a CUDA stream of its
      own, beside the frame step's.
    """

    FRAMES_PER_PASS = 16

    def __init__(self, codec: MimiCodec, rows: int, masked: bool | None = None) -> None:
        if rows <= 0:
            raise ValueError(f"rows: expected a positive number of streams, got {rows}")
        mimi = codec.mimi
        self.rows = rows
        self.device = codec.device
        self.masked = self.device.type == "cuda" if masked is None else masked
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._quantizer = mimi.quantizer
        self._cardinality = mimi.cardinality
        self._modules = _DecoderSide(mimi)
        steps_per_pass = self.FRAMES_PER_PASS * round(mimi.encoder_frame_rate / mimi.frame_rate)
        with torch.inference_mode():
            self._modules.streaming_forever(rows)
            for module in self._modules.modules():
                if isinstance(module, StreamingMultiheadAttention):
                    self._widen_kv_ring(module, steps_per_pass)
        logger.info("Mimi streaming decoder: %d rows, %d frames a pass, on %s", rows, self.FRAMES_PER_PASS, self.device)

    @staticmethod
    def _widen_kv_ring(attention: StreamingMultiheadAttention, steps_per_pass: int) -> None:
        """Replace moshi's ring of `context` steps (see the class docstring) by one that still holds
        every key within the context of a pass's first step while the pass writes its own."""
        state = attention._streaming_state
        assert state is not None and state.kv_cache is not None and attention.context is not None
        cache = state.kv_cache.cache  # [2, rows, heads, capacity, head_dim]
        state.kv_cache = RingKVCache(
            cache.shape[1],
            cache.shape[2],
            cache.shape[4],
            attention.context + steps_per_pass - 1,
            device=cache.device,
            dtype=cache.dtype,
        )

    def _check(self, rows: list[int]) -> None:
        if len(set(rows)) != len(rows) or not all(0 <= row < self.rows for row in rows):
            raise ValueError(f"rows: expected distinct rows in [0, {self.rows}), got {rows}")

    @torch.inference_mode()
    def start(self, rows: list[int]) -> None:
        """Begin new streams in these rows (drops whatever state they held)."""
        self._check(rows)
        if rows:
            mask = torch.zeros(self.rows, dtype=torch.bool)
            mask[rows] = True
            self._modules.reset_streaming(mask.to(self.device))

    @torch.inference_mode()
    def decode(self, rows: list[int], codes: torch.Tensor) -> torch.Tensor:
        """codes [len(rows), frames, 32] int64 (any device; ids >= 2048 decode as 0, see
        `in_codebook`) -> audio [len(rows), frames * 1920] float32 on the CPU.
        Rows not listed keep their state untouched."""
        if codes.dim() != 3 or codes.shape[0] != len(rows):
            raise ValueError(f"codes: expected shape [{len(rows)}, frames, codebooks], got {list(codes.shape)}")
        self._check(rows)
        frames = codes.shape[1]
        if not rows or frames == 0:
            return torch.zeros(len(rows), frames * SAMPLES_PER_FRAME)
        if self._stream is None:
            return self._decode(rows, codes)
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # codes made on the frame step's stream
        with torch.cuda.stream(self._stream):
            return self._decode(rows, codes)

    def _decode(self, rows: list[int], codes: torch.Tensor) -> torch.Tensor:
        index = torch.tensor(rows, device=self.device)
        codes = in_codebook(codes.to(self.device), self._cardinality).transpose(1, 2)  # [len(rows), codebooks, frames]
        if self.masked:
            every = torch.zeros(self.rows, *codes.shape[1:], dtype=codes.dtype, device=self.device)
            every[index] = codes
            listed = torch.zeros(self.rows, dtype=torch.bool, device=self.device)
            listed[index] = True
            self._modules.set_exec_mask(listed)
            return self._passes(every)[rows]
        # Only the listed rows run: copies of their state stand in for the whole, so a call costs
        # what its streams need, not what `rows` allows; their new state is copied back after.
        full = self._modules.get_streaming_state()
        listed = {name: _rows_of(state, index) for name, state in full.items()}
        self._modules.set_streaming_state(listed)
        try:
            return self._passes(codes)
        finally:
            for name, state in full.items():
                _write_back(state, listed[name], index)
            self._modules.set_streaming_state(full)

    def _passes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [rows, codebooks, frames] on the device -> audio [rows, frames * 1920] on the CPU."""
        chunks = []
        for first in range(0, codes.shape[-1], self.FRAMES_PER_PASS):
            latent = self._quantizer.decode(codes[..., first : first + self.FRAMES_PER_PASS])
            chunks.append(self._modules(latent)[:, 0].float().cpu())
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)  # the serving loop's passes are one


def _rows_of(state: State, index: torch.Tensor) -> State:
    """A streaming state for the rows `index` of `state`, all executing: copies of their per-row
    tensors."""
    rows = copy.copy(state)
    for name, value in vars(state).items():
        if _per_row(state, value):
            setattr(rows, name, value[index])
        elif isinstance(value, RingKVCache):
            ring = copy.copy(value)
            ring.cache, ring.end_offset = value.cache[:, index], value.end_offset[index]
            setattr(rows, name, ring)
    rows.batch_size = len(index)
    rows.exec_mask = torch.ones(len(index), dtype=torch.bool, device=index.device)
    return rows


def _write_back(state: State, rows: State, index: torch.Tensor) -> None:
    """Copy the rows' new state into `state`, whether moshi updated a tensor in place or replaced it."""
    for name, value in vars(state).items():
        if _per_row(state, value):
            value[index] = getattr(rows, name)
        elif isinstance(value, RingKVCache):
            ring = getattr(rows, name)
            value.cache[:, index] = ring.cache
            value.end_offset[index] = ring.end_offset
        elif not isinstance(value, torch.Tensor) and name != "batch_size":
            setattr(state, name, getattr(rows, name))


def _per_row(state: State, value: object) -> bool:
    """Whether a field of a moshi streaming state holds one entry per batch row."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == state.batch_size
