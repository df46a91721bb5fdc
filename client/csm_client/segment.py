"""Conversation segments on the client side, and their packing into the model's context tensors.

Kept free of the model stack (no csm_triton, torch only imported when resampling is needed), so
the client installs with numpy and tritonclient alone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24_000  # Mimi's rate: the server's AUDIO output and the rate context audio is resampled to


@dataclass
class Segment:
    """One turn of the conversation: its speaker, its text and, optionally, its audio.

    Same fields and forms as the server's `csm_triton.Segment`: the design document's
    `Segment(text=..., speaker=..., is_audio=False)` and Sesame's
    `Segment(speaker=..., text=..., audio=samples, sample_rate=16_000)`. Audio (a 1-D numpy
    array or torch tensor) is kept as mono float32 numpy at its own rate; the server resamples.
    """

    speaker: int
    text: str
    audio: Any = None
    is_audio: bool | None = None
    sample_rate: int = SAMPLE_RATE

    def __post_init__(self) -> None:
        if self.is_audio is None:
            self.is_audio = self.audio is not None
        if self.is_audio and self.audio is None:
            raise ValueError("segment: is_audio=True but no audio was given")
        if not self.is_audio and self.audio is not None:
            raise ValueError("segment: audio was given with is_audio=False")
        if self.audio is not None:
            self.audio = mono_float32(self.audio, "segment audio")


def mono_float32(audio: Any, field: str = "audio") -> np.ndarray:
    """Accept [T], [1, T] or [T, 1] floating-point samples (numpy or torch); anything with more
    channels is refused rather than mixed down silently."""
    if hasattr(audio, "detach"):  # a torch tensor, told apart without importing torch
        if not audio.is_floating_point():
            raise ValueError(f"{field}: expected floating-point samples, got {audio.dtype}")
        audio = audio.detach().float().cpu().numpy()
    audio = np.asarray(audio)
    if audio.ndim == 2 and 1 in audio.shape:
        audio = audio.reshape(-1)
    if audio.ndim != 1:
        raise ValueError(
            f"{field}: expected mono audio of shape [samples], got shape {list(audio.shape)} "
            "(multi-channel audio is not supported; mix it down first)"
        )
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"{field}: expected floating-point samples, got {audio.dtype}")
    if not np.isfinite(audio).all():
        raise ValueError(f"{field}: samples must be finite (found NaN or infinity)")
    return audio.astype(np.float32, copy=False)


def resample(audio: np.ndarray, sample_rate: int, new_rate: int) -> np.ndarray:
    """torchaudio's resampler, the one the server uses, so a segment resampled here is encoded
    exactly as it would be in process."""
    try:
        import torch
        import torchaudio.functional
    except ImportError as error:
        raise RuntimeError(
            "context audio segments have different sample rates; resampling them to one rate needs torch and "
            "torchaudio (pip install torch torchaudio), or resample them yourself before the request"
        ) from error
    return torchaudio.functional.resample(torch.from_numpy(audio), orig_freq=sample_rate, new_freq=new_rate).numpy()


def context_arrays(context: Sequence[Any]) -> dict[str, np.ndarray]:
    """Context segments (ours, the server's `csm_triton.Segment`, or anything with `.speaker`,
    `.text`, `.audio` and `.sample_rate`) -> the CONTEXT_* input arrays of one request, each with
    its batch dimension of 1. Empty context -> no arrays; text-only context -> no audio arrays."""
    if not context:
        return {}
    texts, speakers, clips, rates = [], [], [], []
    for index, segment in enumerate(context):
        field = f"context[{index}]"
        if not isinstance(segment.text, str):
            raise ValueError(f"{field}.text: must be a string, got {type(segment.text).__name__}")
        audio = getattr(segment, "audio", None)
        if audio is not None:
            audio = mono_float32(audio, f"{field}.audio")
            if len(audio) == 0:
                raise ValueError(f"{field}.audio: is empty; leave audio=None for a text-only segment")
        texts.append(segment.text.encode("utf-8"))
        speakers.append(segment.speaker)
        clips.append(audio)
        rates.append(int(getattr(segment, "sample_rate", SAMPLE_RATE)))
    arrays = {
        "CONTEXT_TEXT": np.array([texts], dtype=np.object_),
        "CONTEXT_SPEAKER": np.array([speakers], dtype=np.int32),
    }
    audio_rates = {rate for rate, clip in zip(rates, clips, strict=True) if clip is not None}
    if not audio_rates:
        return arrays
    # One CONTEXT_SAMPLE_RATE covers all segments: differing rates are brought to Mimi's here.
    if len(audio_rates) > 1:
        logger.info("context audio at %s Hz: resampling to %d Hz", sorted(audio_rates), SAMPLE_RATE)
        clips = [
            resample(clip, rate, SAMPLE_RATE) if clip is not None and rate != SAMPLE_RATE else clip
            for clip, rate in zip(clips, rates, strict=True)
        ]
        audio_rates = {SAMPLE_RATE}
    present = [clip for clip in clips if clip is not None]
    arrays["CONTEXT_AUDIO"] = np.concatenate(present)[None]  # [1, total_samples]
    arrays["CONTEXT_AUDIO_LENGTHS"] = np.array([[0 if clip is None else len(clip) for clip in clips]], dtype=np.int32)
    arrays["CONTEXT_SAMPLE_RATE"] = np.array([[audio_rates.pop()]], dtype=np.int32)
    return arrays
