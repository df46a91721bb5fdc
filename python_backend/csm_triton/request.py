"""What one request to CSM is, and every bound on it, checked before any work is done on it.

The contract layer: the facts it shares with callers outside the server (audio constants, default
chunking and limits, the Segment record) come from the light client's distribution
(csm_client.contract and .segment); it imports only them and the model's config, and both the engine
and the Triton side import it. Torch-free (numpy only), so that `triton/serving.py`, which reads
Triton's input arrays, uses it without torch. The Triton models and the in-process API share one
set of checks (`RequestLimits.check`); `names` says how the caller's API names each field, so that
every message starts with the name the caller used (`TOPK: ...` over Triton, `topk: ...` in
process) and says the allowed range.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from csm_client.contract import (
    AUDIO_NUM_CODEBOOKS,
    AUDIO_VOCAB_SIZE,
    CONTEXT_OVERFLOW_MODES,
    FRAME_MS,
    INPUTS,
    INT64_MAX,
    INT64_MIN,
    MAX_AUDIO_LENGTH_MS,
    MAX_CONTEXT_SAMPLE_RATE,
    MAX_CONTEXT_SEGMENTS,
    MAX_CONTEXT_TEXT_BYTES,
    MAX_REQUEST_BYTES,
    MAX_TEXT_BYTES,
    MIN_CONTEXT_SAMPLE_RATE,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    check_range,
    check_sample_rate,
)
from csm_client.segment import Segment, whole_number

from .model.config import ModelConfig

# How each field is named by the in-process API (GenerationRequest's and Segment's fields): the
# words a message about it starts with. serving.TRITON_NAMES names the same fields as Triton inputs.
API_NAMES: Mapping[str, str] = {
    "text": "text:",
    "speaker": "speaker:",
    "context": "context:",
    "context.text": "context[{index}].text:",
    "context.speaker": "context[{index}].speaker:",
    "context.audio": "context[{index}].audio:",
    "context.sample_rate": "context[{index}].sample_rate:",
    "context.codes": "context[{index}].codes:",
    "temperature": "temperature:",
    "topk": "topk:",
    "max_audio_length_ms": "max_audio_length_ms:",
    "seed": "seed:",
    "first_chunk_frames": "first_chunk_frames:",
    "chunk_frames": "chunk_frames:",
    "voice": "voice:",
    "context_overflow": "context_overflow:",
    "context_pinned": "context_pinned:",
}


def audio_key(samples: np.ndarray, sample_rate: int) -> str:
    """A clip's content key: sha256 of its float32 samples and rate. The engine's codes cache holds
    a clip's Mimi codes by it, and csm_stream's stub names a clip it has sent before by it."""
    digest = hashlib.sha256(np.ascontiguousarray(samples, dtype=np.float32).tobytes())
    digest.update(int(sample_rate).to_bytes(4, "little"))
    return digest.hexdigest()


def frames_of(samples: int) -> int:
    """Mimi frames that encoding `samples` samples at 24 kHz makes (it pads the last frame)."""
    return -(-samples // SAMPLES_PER_FRAME)


def resampled_length(samples: int, sample_rate: int) -> int:
    """Samples that torchaudio's resampling of `samples` samples at `sample_rate` to 24 kHz makes."""
    return -(-samples * SAMPLE_RATE // sample_rate)


def audio_positions(samples: int, sample_rate: int) -> int:
    """Prompt positions of a context segment's audio, known from its sample count alone: its Mimi
    frames after resampling, and the end-of-audio frame."""
    return frames_of(resampled_length(samples, sample_rate)) + 1


def real_number(value: Any, label: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{label} must be a number, got {value!r}")
    return float(value)


@dataclass
class GenerationRequest:
    """One utterance to speak, with the design document's parameters and defaults. Construction
    checks types only; `RequestLimits.check` checks the values."""

    text: str
    speaker: int
    context: list[Segment] = field(default_factory=list)
    temperature: float = INPUTS["TEMPERATURE"].default
    topk: int = INPUTS["TOPK"].default
    max_audio_length_ms: int = INPUTS["MAX_AUDIO_LENGTH_MS"].default
    seed: int | None = None
    # A voice of the serving Generator's library (Generator.voices), by name: its clip's codes,
    # encoded once, go before `context`. Never the clip itself, so it is never sent or hashed again.
    voice: str | None = None
    # A context too long for the prompt: refused ("refuse"), or its oldest segments dropped until it
    # fits ("drop_oldest"), all but the first `context_pinned` (and the voice's clip), which stay.
    context_overflow: str = INPUTS["CONTEXT_OVERFLOW"].default
    context_pinned: int = INPUTS["CONTEXT_PINNED"].default

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise ValueError(f"text: must be a string, got {type(self.text).__name__}")
        self.speaker = whole_number(self.speaker, "speaker:")
        if not isinstance(self.context, (list, tuple)) or not all(isinstance(segment, Segment) for segment in self.context):
            raise ValueError(f"context: must be a list of Segment, got {self.context!r:.80}")
        self.context = list(self.context)
        self.temperature = real_number(self.temperature, "temperature:")
        self.topk = whole_number(self.topk, "topk:")
        self.max_audio_length_ms = whole_number(self.max_audio_length_ms, "max_audio_length_ms:")
        if self.seed is not None:
            self.seed = whole_number(self.seed, "seed:")
        if self.voice is not None and not isinstance(self.voice, str):
            raise ValueError(f"voice: must be a voice's name, got {type(self.voice).__name__}")
        if not isinstance(self.context_overflow, str):
            raise ValueError(f"context_overflow: must be a string, got {type(self.context_overflow).__name__}")
        self.context_pinned = whole_number(self.context_pinned, "context_pinned:")

    @property
    def max_frames(self) -> int:
        return self.max_audio_length_ms // FRAME_MS


def check_input_range(value: int, input_name: str, high: int, label: str, unit: str = "") -> None:
    """`value` from the input's least value (the contract's) to `high`."""
    check_range(value, INPUTS[input_name].least, high, label, unit)


def _label(names: Mapping[str, str], name: str, index: int | None = None) -> str:
    return names[name].format(index=index)


def check_chunking(first_chunk_frames: int, chunk_frames: int, max_audio_length_ms: int, names: Mapping[str, str] = API_NAMES) -> None:
    """A stream's chunk sizes: from one frame to the longest audio a request may ask for."""
    most = max_audio_length_ms // FRAME_MS
    for name, frames in (("first_chunk_frames", first_chunk_frames), ("chunk_frames", chunk_frames)):
        check_input_range(whole_number(frames, names[name]), name.upper(), most, names[name], f" frames of {FRAME_MS} ms")


# RequestLimits fields that are facts of the model, not deployment parameters.
MODEL_FACTS = ("max_positions", "audio_vocab_size", "audio_num_codebooks")


@dataclass(frozen=True)
class RequestLimits:
    """Every bound on a request. The model's facts come from its config (`for_model`); the rest
    are csm_stream's config.pbtxt parameters of the same names."""

    max_positions: int = 2048  # the backbone's max_seq_len: prompt and frames together
    audio_vocab_size: int = AUDIO_VOCAB_SIZE  # TOPK's upper bound; context codes are below it
    audio_num_codebooks: int = AUDIO_NUM_CODEBOOKS  # the codes of a context segment's frame
    max_text_bytes: int = MAX_TEXT_BYTES
    max_context_segments: int = MAX_CONTEXT_SEGMENTS
    max_context_text_bytes: int = MAX_CONTEXT_TEXT_BYTES
    min_context_sample_rate: int = MIN_CONTEXT_SAMPLE_RATE
    max_context_sample_rate: int = MAX_CONTEXT_SAMPLE_RATE
    max_request_bytes: int = MAX_REQUEST_BYTES
    max_audio_length_ms: int = MAX_AUDIO_LENGTH_MS

    def __post_init__(self) -> None:
        for limit in fields(self):
            value = getattr(self, limit.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{limit.name}: must be a positive integer, got {value!r}")
        if self.min_context_sample_rate > self.max_context_sample_rate:
            raise ValueError(
                f"min_context_sample_rate: {self.min_context_sample_rate} is above max_context_sample_rate {self.max_context_sample_rate}"
            )
        if self.max_audio_length_ms < FRAME_MS:
            raise ValueError(f"max_audio_length_ms: must be at least one frame ({FRAME_MS} ms), got {self.max_audio_length_ms}")

    @classmethod
    def for_model(cls, model: ModelConfig, **parameters: int) -> RequestLimits:
        return cls(
            max_positions=model.backbone.max_seq_len,
            audio_vocab_size=model.audio_vocab_size,
            audio_num_codebooks=model.audio_num_codebooks,
            **parameters,
        )

    @classmethod
    def parameters(cls) -> list[str]:
        """The deployment's parameters: every field but the model's facts."""
        return [f.name for f in fields(cls) if f.name not in MODEL_FACTS]

    @property
    def max_prompt_positions(self) -> int:
        """The longest prompt that leaves room for one frame."""
        return self.prompt_room(1)

    def prompt_room(self, max_frames: int) -> int:
        """The longest prompt that leaves room for `max_frames` frames: the prompt and every frame
        but the last must fit below the last position (Engine.check_fields)."""
        return self.max_positions - max_frames - 1

    def max_context_samples(self, sample_rate: int) -> int:
        """The most samples at `sample_rate` whose audio alone fits the prompt."""
        return (self.max_prompt_positions - 1) * SAMPLES_PER_FRAME * sample_rate // SAMPLE_RATE

    def check(self, request: GenerationRequest, names: Mapping[str, str] = API_NAMES) -> None:
        """Raise a ValueError naming the first field out of bounds. Costs no more than counting:
        no audio is resampled or encoded and no text tokenized."""
        _check_text(request.text, names["text"], self.max_text_bytes, "max_text_bytes")
        check_input_range(request.speaker, "SPEAKER", INPUTS["SPEAKER"].most, names["speaker"])
        self.check_segment_count(len(request.context), names)
        check_overflow(request.context_overflow, request.context_pinned, len(request.context), names)
        audio_so_far = 0  # prompt positions of the context audio (and codes) up to the segment checked
        for index, segment in enumerate(request.context):
            if request.context_overflow == "drop_oldest":
                # The context may hold more than the prompt (Generator.stream keeps what fits); each segment must fit alone.
                audio_so_far = 0
            has_audio = segment.audio is not None or segment.codes is not None
            label = _label(names, "context.text", index)
            _check_text(segment.text, label, self.max_context_text_bytes, "max_context_text_bytes", may_be_empty=has_audio)
            check_input_range(segment.speaker, "CONTEXT_SPEAKER", INPUTS["CONTEXT_SPEAKER"].most, _label(names, "context.speaker", index))
            if segment.audio is not None:
                samples, rate = len(segment.audio), segment.sample_rate
                self.check_sample_rate(rate, _label(names, "context.sample_rate", index))
                audio_so_far += audio_positions(samples, rate)
                self._check_audio_fits(samples, rate, audio_so_far, _label(names, "context.audio", index))
            elif segment.codes is not None:
                audio_so_far += len(segment.codes) + 1  # and the end-of-audio frame
                self._check_codes(segment.codes, audio_so_far, _label(names, "context.codes", index))
        if not (math.isfinite(request.temperature) and request.temperature > 0):
            raise ValueError(f"{names['temperature']} must be a finite number > 0, got {request.temperature}")
        check_input_range(request.topk, "TOPK", self.audio_vocab_size, names["topk"])
        check_input_range(request.max_audio_length_ms, "MAX_AUDIO_LENGTH_MS", self.max_audio_length_ms, names["max_audio_length_ms"])
        if request.seed is not None:
            check_range(request.seed, INT64_MIN, INT64_MAX, names["seed"], " (a 64-bit integer)")

    def check_segment_count(self, count: int, names: Mapping[str, str] = API_NAMES) -> None:
        if count > self.max_context_segments:
            raise ValueError(f"{names['context']} holds {count} segments, more than max_context_segments {self.max_context_segments}")

    def check_sample_rate(self, sample_rate: int, label: str) -> None:
        """A context sample rate in range whose resampling to 24 kHz costs little."""
        check_sample_rate(sample_rate, self.min_context_sample_rate, self.max_context_sample_rate, label)

    def _check_codes(self, codes: np.ndarray, positions: int, label: str) -> None:
        """A segment's codes: their shape and prompt positions first (counting), then their values."""
        if codes.ndim != 2 or codes.shape[1] != self.audio_num_codebooks:
            raise ValueError(f"{label} must be Mimi codes of shape [frames, {self.audio_num_codebooks}], got shape {list(codes.shape)}")
        if positions > self.max_prompt_positions:
            raise ValueError(
                f"{label} holds {len(codes)} frames, which bring the context audio to {positions} prompt positions, more "
                f"than the {self.max_prompt_positions} that fit the model's {self.max_positions}"
            )
        low, high, least = int(codes.min()), int(codes.max()), INPUTS["CONTEXT_CODES"].least
        if low < least or high >= self.audio_vocab_size:
            bad = low if low < least else high
            raise ValueError(f"{label} codes must be in [{least}, {self.audio_vocab_size - 1}], got {bad}")

    def _check_audio_fits(self, samples: int, sample_rate: int, positions: int, label: str) -> None:
        if positions > self.max_prompt_positions:
            raise ValueError(
                f"{label} holds {samples} samples at {sample_rate} Hz, which bring the context audio to {positions} prompt "
                f"positions, more than the {self.max_prompt_positions} that fit the model's {self.max_positions}; at "
                f"{sample_rate} Hz at most {self.max_context_samples(sample_rate)} samples fit"
            )


def check_overflow(mode: str, pinned: int, segments: int, names: Mapping[str, str] = API_NAMES) -> None:
    """context_overflow is a known mode, and context_pinned counts from none to every context segment."""
    if mode not in CONTEXT_OVERFLOW_MODES:
        modes = " or ".join(repr(known) for known in CONTEXT_OVERFLOW_MODES)
        raise ValueError(f"{names['context_overflow']} must be {modes}, got {mode[:80]!r}")
    if not INPUTS["CONTEXT_PINNED"].least <= pinned <= segments:
        raise ValueError(
            f"{names['context_pinned']} must be in [{INPUTS['CONTEXT_PINNED'].least}, {segments}], at most the number of "
            f"context segments ({segments}), got {pinned}"
        )


def _check_text(text: str, label: str, max_bytes: int, parameter: str, may_be_empty: bool = False) -> None:
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as error:
        raise ValueError(f"{label} is not valid UTF-8 text ({error.reason} at character {error.start})") from None
    if size > max_bytes:
        raise ValueError(f"{label} holds {size} bytes of UTF-8, more than {parameter} {max_bytes}")
    if not may_be_empty and not text.strip():
        raise ValueError(f"{label} must not be empty")
