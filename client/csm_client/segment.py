"""Conversation segments on the client side: their packing into the model's context tensors.

The segments are the server's own `csm_triton.Segment` (csm_triton.request is torch-free, numpy
only), so the client installs with numpy and tritonclient alone; torch is imported only when
resampling is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from csm_triton.model.config import SAMPLE_RATE
from csm_triton.request import Segment as Segment  # the client's segments are the server's
from csm_triton.request import code_frames, mono_samples

logger = logging.getLogger(__name__)


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
    """Context segments (`Segment`s, or anything with `.speaker`, `.text`, `.audio` and
    `.sample_rate`, and optionally `.codes`: the AUDIO_CODES the server returned for that turn,
    [frames, 32], sent instead of its audio and never encoded) -> the CONTEXT_* input arrays of one
    request, each with its batch dimension of 1. Empty context -> no arrays; text-only context -> no
    audio arrays; no codes -> no codes arrays."""
    if not context:
        return {}
    texts, speakers, clips, rates, codes = [], [], [], [], []
    for index, segment in enumerate(context):
        field = f"context[{index}]"
        if not isinstance(segment.text, str):
            raise ValueError(f"{field}.text: must be a string, got {type(segment.text).__name__}")
        audio = getattr(segment, "audio", None)
        if audio is not None:
            audio = mono_samples(audio, f"{field}.audio:")
            if len(audio) == 0:
                raise ValueError(f"{field}.audio: is empty; leave audio=None for a text-only segment")
        frames = getattr(segment, "codes", None)
        if frames is not None:
            if audio is not None:
                raise ValueError(f"{field}: holds both audio and codes; send one of them")
            frames = code_frames(frames, f"{field}.codes:")
            if len(frames) and (frames.min() < 0 or frames.max() > np.iinfo(np.int32).max):  # INT32, never wrapped
                raise ValueError(f"{field}.codes: codes must be >= 0 and fit 32 bits, got {frames.min()} to {frames.max()}")
        codes.append(frames)
        texts.append(segment.text.encode("utf-8"))
        speakers.append(segment.speaker)
        clips.append(audio)
        rates.append(int(getattr(segment, "sample_rate", SAMPLE_RATE)))
    arrays = {
        "CONTEXT_TEXT": np.array([texts], dtype=np.object_),
        "CONTEXT_SPEAKER": np.array([speakers], dtype=np.int32),
    }
    if any(frames is not None for frames in codes):
        arrays["CONTEXT_CODES"] = np.concatenate([frames.reshape(-1) for frames in codes if frames is not None]).astype(np.int32)[None]
        arrays["CONTEXT_CODES_LENGTHS"] = np.array([[0 if frames is None else len(frames) for frames in codes]], dtype=np.int32)
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
