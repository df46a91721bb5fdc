"""The Mimi audio codec: 24 kHz mono audio <-> 32 codebooks at 12.5 frames a second."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchaudio.functional
from moshi.models import loaders

SAMPLE_RATE = 24_000
SAMPLES_PER_FRAME = 1920


def as_mono(audio: torch.Tensor | np.ndarray, field: str = "audio") -> torch.Tensor:
    """Accept [T], [1, T] or [T, 1]; anything with more channels is refused, never mixed down silently."""
    audio = torch.as_tensor(audio)
    if audio.dim() == 2 and 1 in audio.shape:
        audio = audio.reshape(-1)
    if audio.dim() != 1:
        raise ValueError(
            f"{field}: expected mono audio of shape [samples], got shape {list(audio.shape)} "
            "(multi-channel audio is not supported; mix it down first)"
        )
    if not audio.is_floating_point():
        raise ValueError(f"{field}: expected floating-point samples, got {audio.dtype}")
    if not torch.isfinite(audio).all():
        raise ValueError(f"{field}: samples must be finite (found NaN or infinity)")
    return audio.float()


def resample(audio: torch.Tensor, sample_rate: int, field: str = "sample_rate") -> torch.Tensor:
    if sample_rate <= 0:
        raise ValueError(f"{field}: must be a positive number of samples a second, got {sample_rate}")
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

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [frames, codebooks] -> audio [frames * 1920] at 24 kHz, on the CPU."""
        return self.decode_batch([codes])[0]

    @torch.inference_mode()
    def decode_batch(self, codes: list[torch.Tensor]) -> list[torch.Tensor]:
        """Several utterances' codes [frames, codebooks], in one Mimi pass on a GPU. Mimi is
        causal, so padding a shorter utterance at its end leaves its own samples as they are. On
        the CPU one utterance at a time is faster (8 x 4 s: 2.3 s against 2.8 s batched).

        CSM's audio vocabulary (2051) is wider than Mimi's codebooks (2048); the trained model
        does not sample the extra ids, but a sampled one must not crash the decoder: it decodes
        as code 0."""
        if self.device.type == "cpu" and len(codes) > 1:
            return [audio for utterance in codes for audio in self.decode_batch([utterance])]
        lengths = [len(c) for c in codes]
        if max(lengths, default=0) == 0:
            return [torch.zeros(0) for _ in codes]
        padded = torch.zeros(len(codes), max(lengths), codes[0].shape[1], dtype=torch.long)
        for row, utterance in enumerate(codes):
            padded[row, : len(utterance)] = utterance
        padded = padded.to(self.device)
        padded = torch.where(padded < self.mimi.cardinality, padded, 0)
        audio = self.mimi.decode(padded.transpose(1, 2))[:, 0].float().cpu()  # [B, samples]
        return [row[: length * SAMPLES_PER_FRAME] for row, length in zip(audio, lengths, strict=True)]
