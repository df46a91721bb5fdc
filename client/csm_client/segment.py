"""Conversation segments: the record of one turn, shared by the client and the server's in-process
API (csm_triton.request imports it), a turn by reference (`TurnRef`, for a server's csm_stream to
open), and their packing into the model's context tensors.

Numpy only, so the client installs with numpy and tritonclient alone; torch is imported only when
resampling is needed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .contract import INPUTS, INT32_MAX, SAMPLE_RATE

logger = logging.getLogger(__name__)


def whole_number(value: Any, label: str) -> int:
    """An int (a numpy integer too, never a bool) as a Python int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{label} must be an integer, got {value!r}")
    return int(value)


def mono_samples(audio: Any, label: str) -> np.ndarray:
    """[T], [1, T] or [T, 1] finite floating-point samples, a numpy array or a torch tensor on any
    device (converted without importing torch), as contiguous float32 numpy [T] (not copied
    when it is that already). More channels are refused, never mixed down silently."""
    if hasattr(audio, "detach"):
        if not audio.is_floating_point():
            raise ValueError(f"{label} must hold floating-point samples, got {audio.dtype}")
        audio = audio.detach().float().cpu().numpy()
    audio = np.asarray(audio)
    if audio.ndim == 2 and 1 in audio.shape:
        audio = audio.reshape(-1)
    if audio.ndim != 1:
        raise ValueError(
            f"{label} must be mono audio of shape [samples], got shape {list(audio.shape)} "
            "(multi-channel audio is not supported; mix it down first)"
        )
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"{label} must hold floating-point samples, got {audio.dtype}")
    if not np.isfinite(audio).all():
        raise ValueError(f"{label} has samples that are not finite (NaN or infinity)")
    return np.ascontiguousarray(audio, dtype=np.float32)


def code_frames(codes: Any, label: str) -> np.ndarray:
    """Mimi codes [frames, codebooks] of integers, a numpy array or a torch tensor on any device
    (converted without importing torch), as numpy (not copied when it is one already). Their
    values and codebook count are the request limits' to check (RequestLimits.check)."""
    if hasattr(codes, "detach"):
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"{label} must be Mimi codes of shape [frames, codebooks], got shape {list(codes.shape)}")
    if codes.dtype == np.bool_ or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{label} must hold integer codes, got {codes.dtype}")
    if not len(codes):
        raise ValueError(f"{label} must hold at least one frame; leave codes=None for a segment without them")
    return codes


@dataclass
class Segment:
    """One turn of the conversation: its speaker, its text and, optionally, its audio or the Mimi
    codes of its audio.

    Both the design document's form, `Segment(text=..., speaker=..., is_audio=False)`, and
    Sesame's, `Segment(speaker=..., text=..., audio=tensor)`, are accepted. Audio (numpy or torch)
    is kept as float32 numpy at its own `sample_rate` (default 24 kHz): it is resampled to Mimi's
    rate only when the prompt is built, once the request has been checked. `codes` ([frames, 32]
    integers, e.g. the AUDIO_CODES the server returned for that turn) stand for the audio and are
    used as they are, never encoded; a segment holds audio or codes, not both.
    """

    speaker: int
    text: str
    audio: Any = None  # np.ndarray [samples] float32 once constructed
    is_audio: bool | None = None
    sample_rate: int = SAMPLE_RATE
    codes: Any = None  # np.ndarray [frames, 32] of integers once constructed

    def __post_init__(self) -> None:
        if self.audio is not None and self.codes is not None:
            raise ValueError("segment: both audio and codes were given; a segment holds one of them")
        has_audio = self.audio is not None or self.codes is not None
        if self.is_audio is None:
            self.is_audio = has_audio
        if self.is_audio and not has_audio:
            raise ValueError("segment: is_audio=True but no audio was given")
        if not self.is_audio and has_audio:
            raise ValueError(f"segment: {'audio' if self.audio is not None else 'codes'} given with is_audio=False")
        if self.codes is not None:
            self.codes = code_frames(self.codes, "segment codes:")
        self.speaker = whole_number(self.speaker, "segment speaker:")
        if not isinstance(self.text, str):
            raise ValueError(f"segment text: must be a string, got {type(self.text).__name__}")
        self.sample_rate = whole_number(self.sample_rate, "segment sample_rate:")
        if self.sample_rate < 1:
            raise ValueError(f"segment sample_rate: must be a positive number of samples a second, got {self.sample_rate}")
        if self.audio is not None:
            self.audio = mono_samples(self.audio, "segment audio:")
            if not len(self.audio):
                raise ValueError("segment audio: must hold at least one sample; leave audio=None for a text-only segment")


@dataclass(frozen=True)
class TurnRef:
    """An earlier turn named by its reference (`TurnChunk.turn` of a stream asked `with_reference`,
    or the gateway's `turn`), which carries its text, speaker and codes: the request sends this
    string in their place, and csm_stream opens it with its turn key. `played_ms`: how much of the
    turn was played before it was stopped (its first floor(played_ms / 80) frames enter the
    prompt); None: all of it."""

    ref: str
    played_ms: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ref, str) or not self.ref:
            raise ValueError(f"turn ref: must be a turn reference string, got {self.ref!r:.80}")
        if self.played_ms is not None and not 0 <= whole_number(self.played_ms, "turn played_ms:") <= INT32_MAX:
            raise ValueError(f"turn played_ms: must be in [0, {INT32_MAX}], got {self.played_ms}")


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
    [frames, 32], sent instead of its audio and never encoded; or `TurnRef`s) -> the CONTEXT_*
    input arrays of one request, each with its batch dimension of 1. Empty context -> no arrays;
    text-only context -> no audio arrays; no codes -> no codes arrays; no TurnRef -> no
    CONTEXT_TURN nor CONTEXT_PLAYED_MS (a server without a turn key refuses them)."""
    if not context:
        return {}
    texts, speakers, clips, rates, codes, references, played = [], [], [], [], [], [], []
    for index, segment in enumerate(context):
        field = f"context[{index}]"
        if isinstance(segment, TurnRef):  # its text, speaker and codes are the reference's own
            texts.append(b"")
            speakers.append(0)
            clips.append(None)
            codes.append(None)
            rates.append(SAMPLE_RATE)
            references.append(segment.ref.encode("utf-8"))
            played.append(-1 if segment.played_ms is None else segment.played_ms)
            continue
        references.append(b"")
        played.append(-1)
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
            least, most = INPUTS["CONTEXT_CODES"].least, INPUTS["CONTEXT_CODES"].most
            if len(frames) and (frames.min() < least or frames.max() > most):  # INT32, never wrapped
                raise ValueError(f"{field}.codes: codes must be >= {least} and fit 32 bits, got {frames.min()} to {frames.max()}")
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
    if any(references):
        arrays["CONTEXT_TURN"] = np.array([references], dtype=np.object_)
        arrays["CONTEXT_PLAYED_MS"] = np.array([played], dtype=np.int32)
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
